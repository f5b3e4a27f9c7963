//! The `private_key_jwt` client assertion (RFC 7523, Talkdesk's "Client Credentials - JWT"):
//! a JWT signed with the client's private key, made anew for every token request. Token
//! requests come only from the refresher (or the fleet's renewal), so signing never sits on a
//! consent request's path.

use rand::Rng as _;
use serde_json::json;

use crate::clock::since_epoch;
use crate::jws::SigningKey;

/// The form's `client_assertion_type` for a JWT assertion.
pub const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// How long an assertion is valid: Talkdesk's examples use five minutes.
const LIFETIME_S: u64 = 300;

/// A fresh assertion: `iss` = `sub` = the client id, `aud` = the token URL, a new `jti`.
pub fn client_assertion(
    key: &SigningKey,
    key_id: &str,
    client_id: &str,
    token_url: &str,
) -> Result<String, ring::error::Unspecified> {
    let issued_at = since_epoch().as_secs();
    let mut header = serde_json::Map::new();
    header.insert("typ".into(), "JWT".into());
    header.insert("kid".into(), key_id.into());
    key.sign(
        header,
        &json!({
            "iss": client_id,
            "sub": client_id,
            "aud": token_url,
            "jti": random_uuid(),
            "iat": issued_at,
            "exp": issued_at + LIFETIME_S,
        }),
    )
}

/// A random (version 4) UUID, as Talkdesk's examples use for `jti`.
fn random_uuid() -> String {
    let mut bytes: [u8; 16] = rand::rng().random();
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let hex = hex::encode(bytes);
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jws::Algorithm;

    #[test]
    fn an_assertion_carries_what_talkdesk_checks() {
        let key = SigningKey::from_text(&SigningKey::generate_es256(), Algorithm::ES256).unwrap();
        let url = "https://acme.talkdeskid.com/oauth/token";
        let first = client_assertion(&key, "kid-1", "client-1", url).unwrap();
        let (header, claims) = key.verifying_key().verify(&first).unwrap();
        assert_eq!(header["kid"], "kid-1");
        assert_eq!(header["alg"], "ES256");
        assert_eq!(claims["iss"], "client-1");
        assert_eq!(claims["sub"], "client-1");
        assert_eq!(claims["aud"], url);
        let iat = claims["iat"].as_u64().unwrap();
        assert_eq!(claims["exp"].as_u64().unwrap(), iat + LIFETIME_S);
        let second = client_assertion(&key, "kid-1", "client-1", url).unwrap();
        let (_, again) = key.verifying_key().verify(&second).unwrap();
        assert_ne!(claims["jti"], again["jti"], "a fresh jti each time");
        assert_eq!(claims["jti"].as_str().unwrap().len(), 36);
    }
}
