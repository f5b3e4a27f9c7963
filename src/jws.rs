//! Signed JWTs (JWS compact serialisation) with ring's keys: ES256, ES384, RS256 and PS256.
//! The proxy signs its `private_key_jwt` client assertions with a [`SigningKey`]; the simulator
//! verifies them with a [`VerifyingKey`]. Plumbing: it knows nothing of the product and imports
//! nothing of it. A key's bytes never reach a message.

use std::fmt;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, KeyPair as _, RsaKeyPair};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::PrivateKeyDer;
use serde::{Deserialize, Serialize};

/// The JWS algorithms a client key may sign with (the key's type decides which fit).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Algorithm {
    ES256,
    ES384,
    RS256,
    PS256,
}

impl Algorithm {
    pub const ALL: [Algorithm; 4] = [
        Algorithm::ES256,
        Algorithm::ES384,
        Algorithm::RS256,
        Algorithm::PS256,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::ES256 => "ES256",
            Algorithm::ES384 => "ES384",
            Algorithm::RS256 => "RS256",
            Algorithm::PS256 => "PS256",
        }
    }

    /// The key type it needs, for messages.
    fn key_type(self) -> &'static str {
        match self {
            Algorithm::ES256 => "an EC P-256 key",
            Algorithm::ES384 => "an EC P-384 key",
            Algorithm::RS256 | Algorithm::PS256 => "an RSA key (2048 bits or more)",
        }
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a private key cannot sign.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("not a private key: neither base64 PKCS#8 (as Talkdesk hands it) nor PEM")]
    NotAKey,
    #[error("an EC key in SEC1 form ('EC PRIVATE KEY'): convert it to PKCS#8 (openssl pkcs8 -topk8 -nocrypt)")]
    Sec1,
    #[error("the key does not fit {algorithm}: {algorithm} needs {}", .algorithm.key_type())]
    WrongType { algorithm: Algorithm },
}

enum Pair {
    Ecdsa(EcdsaKeyPair),
    Rsa(RsaKeyPair, &'static dyn signature::RsaEncoding),
}

/// A private key that signs JWTs with one algorithm.
pub struct SigningKey {
    algorithm: Algorithm,
    pair: Pair,
    rng: SystemRandom,
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SigningKey({}, <redacted>)", self.algorithm)
    }
}

impl SigningKey {
    /// The key from its text: base64 PKCS#8 DER without armour (as Talkdesk hands it), or PEM
    /// (`PRIVATE KEY`, or `RSA PRIVATE KEY`); it must fit `algorithm`.
    pub fn from_text(text: &str, algorithm: Algorithm) -> Result<SigningKey, KeyError> {
        let der = if text.contains("-----BEGIN") {
            PrivateKeyDer::from_pem_slice(text.as_bytes()).map_err(|_| KeyError::NotAKey)?
        } else {
            let compact: String = text.split_whitespace().collect();
            let bytes = STANDARD.decode(compact).map_err(|_| KeyError::NotAKey)?;
            PrivateKeyDer::Pkcs8(bytes.into())
        };
        let rng = SystemRandom::new();
        let wrong_type = |_| KeyError::WrongType { algorithm };
        let pair = match (algorithm, &der) {
            (_, PrivateKeyDer::Sec1(_)) => return Err(KeyError::Sec1),
            (Algorithm::ES256 | Algorithm::ES384, PrivateKeyDer::Pkcs8(der)) => {
                let curve = if algorithm == Algorithm::ES256 {
                    &signature::ECDSA_P256_SHA256_FIXED_SIGNING
                } else {
                    &signature::ECDSA_P384_SHA384_FIXED_SIGNING
                };
                Pair::Ecdsa(
                    EcdsaKeyPair::from_pkcs8(curve, der.secret_pkcs8_der(), &rng)
                        .map_err(wrong_type)?,
                )
            }
            (Algorithm::RS256 | Algorithm::PS256, der) => {
                let pair = match der {
                    PrivateKeyDer::Pkcs8(der) => RsaKeyPair::from_pkcs8(der.secret_pkcs8_der()),
                    PrivateKeyDer::Pkcs1(der) => RsaKeyPair::from_der(der.secret_pkcs1_der()),
                    _ => return Err(KeyError::WrongType { algorithm }),
                }
                .map_err(wrong_type)?;
                let encoding: &'static dyn signature::RsaEncoding = if algorithm == Algorithm::RS256
                {
                    &signature::RSA_PKCS1_SHA256
                } else {
                    &signature::RSA_PSS_SHA256
                };
                Pair::Rsa(pair, encoding)
            }
            _ => return Err(KeyError::WrongType { algorithm }),
        };
        Ok(SigningKey {
            algorithm,
            pair,
            rng,
        })
    }

    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// A JWT: `header` (with `alg` set here) and `claims`, signed.
    pub fn sign(
        &self,
        mut header: serde_json::Map<String, serde_json::Value>,
        claims: &serde_json::Value,
    ) -> Result<String, ring::error::Unspecified> {
        header.insert("alg".into(), self.algorithm.as_str().into());
        let mut token = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(serde_json::Value::Object(header).to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let signature = match &self.pair {
            Pair::Ecdsa(pair) => pair.sign(&self.rng, token.as_bytes())?.as_ref().to_vec(),
            Pair::Rsa(pair, encoding) => {
                let mut signature = vec![0; pair.public().modulus_len()];
                pair.sign(*encoding, &self.rng, token.as_bytes(), &mut signature)?;
                signature
            }
        };
        token.push('.');
        token.push_str(&URL_SAFE_NO_PAD.encode(signature));
        Ok(token)
    }

    /// The public half, for a verifier.
    pub fn verifying_key(&self) -> VerifyingKey {
        let public = match &self.pair {
            Pair::Ecdsa(pair) => pair.public_key().as_ref().to_vec(),
            Pair::Rsa(pair, _) => pair.public_key().as_ref().to_vec(),
        };
        VerifyingKey {
            algorithm: self.algorithm,
            public,
        }
    }

    /// A new EC P-256 key as base64 PKCS#8, the form Talkdesk hands out (for the demo and tests).
    pub fn generate_es256() -> String {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .expect("the system's random source works");
        STANDARD.encode(pkcs8.as_ref())
    }
}

/// A public key that checks one algorithm's signatures: an EC point (uncompressed) or an RSA
/// public key (PKCS#1 DER), as ring gives them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyingKey {
    pub algorithm: Algorithm,
    pub public: Vec<u8>,
}

/// Why a JWT was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("not a JWT")]
    Malformed,
    #[error("signed with another algorithm")]
    Algorithm,
    #[error("bad signature")]
    Signature,
}

impl VerifyingKey {
    /// The header and claims of `token` once its signature and algorithm check out.
    pub fn verify(
        &self,
        token: &str,
    ) -> Result<(serde_json::Value, serde_json::Value), VerifyError> {
        let mut parts = token.split('.');
        let (Some(header), Some(claims), Some(signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(VerifyError::Malformed);
        };
        let json = |part: &str| -> Result<serde_json::Value, VerifyError> {
            let bytes = URL_SAFE_NO_PAD
                .decode(part)
                .map_err(|_| VerifyError::Malformed)?;
            serde_json::from_slice(&bytes).map_err(|_| VerifyError::Malformed)
        };
        let (header_json, claims_json) = (json(header)?, json(claims)?);
        if header_json["alg"] != self.algorithm.as_str() {
            return Err(VerifyError::Algorithm);
        }
        let signature = URL_SAFE_NO_PAD
            .decode(signature)
            .map_err(|_| VerifyError::Malformed)?;
        let algorithm: &dyn signature::VerificationAlgorithm = match self.algorithm {
            Algorithm::ES256 => &signature::ECDSA_P256_SHA256_FIXED,
            Algorithm::ES384 => &signature::ECDSA_P384_SHA384_FIXED,
            Algorithm::RS256 => &signature::RSA_PKCS1_2048_8192_SHA256,
            Algorithm::PS256 => &signature::RSA_PSS_2048_8192_SHA256,
        };
        let signed = &token[..header.len() + 1 + claims.len()];
        signature::UnparsedPublicKey::new(algorithm, &self.public)
            .verify(signed.as_bytes(), &signature)
            .map_err(|_| VerifyError::Signature)?;
        Ok((header_json, claims_json))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn header() -> serde_json::Map<String, serde_json::Value> {
        let mut header = serde_json::Map::new();
        header.insert("kid".into(), "key-1".into());
        header
    }

    #[test]
    fn an_es256_key_as_talkdesk_hands_it_signs_and_verifies() {
        let key = SigningKey::from_text(&SigningKey::generate_es256(), Algorithm::ES256).unwrap();
        let token = key.sign(header(), &json!({"iss": "me"})).unwrap();
        let (header, claims) = key.verifying_key().verify(&token).unwrap();
        assert_eq!(header["alg"], "ES256");
        assert_eq!(header["kid"], "key-1");
        assert_eq!(claims["iss"], "me");

        let mut forged = token.clone();
        forged.replace_range(forged.len() - 4.., "AAAA");
        assert_eq!(
            key.verifying_key().verify(&forged),
            Err(VerifyError::Signature)
        );
        let other = SigningKey::from_text(&SigningKey::generate_es256(), Algorithm::ES256).unwrap();
        assert_eq!(
            other.verifying_key().verify(&token),
            Err(VerifyError::Signature)
        );
        assert!(!format!("{key:?}").contains(&SigningKey::generate_es256()[..10]));
    }

    #[test]
    fn pem_keys_and_rsa_keys() {
        let ec = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        let key = SigningKey::from_text(&ec.serialize_pem(), Algorithm::ES384).unwrap();
        let token = key.sign(header(), &json!({})).unwrap();
        key.verifying_key().verify(&token).unwrap();

        // ring does not generate RSA keys: openssl does (a missing openssl fails the test).
        let rsa = std::process::Command::new("openssl")
            .args([
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
            ])
            .output()
            .expect("openssl makes an RSA key");
        let rsa = String::from_utf8(rsa.stdout).unwrap();
        for algorithm in [Algorithm::RS256, Algorithm::PS256] {
            let key = SigningKey::from_text(&rsa, algorithm).unwrap();
            let token = key.sign(header(), &json!({})).unwrap();
            key.verifying_key().verify(&token).unwrap();
            let err = SigningKey::from_text(&rsa, Algorithm::ES256).unwrap_err();
            assert!(matches!(err, KeyError::WrongType { .. }), "{err}");
        }
    }

    #[test]
    fn a_key_that_does_not_fit_its_algorithm_is_refused() {
        let es256 = SigningKey::generate_es256();
        for algorithm in [Algorithm::ES384, Algorithm::RS256, Algorithm::PS256] {
            let err = SigningKey::from_text(&es256, algorithm).unwrap_err();
            assert!(
                matches!(err, KeyError::WrongType { algorithm: a } if a == algorithm),
                "{err}"
            );
        }
        for text in ["", "not base64 at all!", "aGVsbG8="] {
            assert!(
                SigningKey::from_text(text, Algorithm::ES256).is_err(),
                "{text}"
            );
        }
    }
}
