//! HS256 for `jsonwebtoken` on `ring`: the crate's crypto is pluggable (a process-wide
//! `CryptoProvider`), and its built-in providers pull in aws-lc or the whole RustCrypto family
//! (RSA, ECDSA, EdDSA). The proxy only ever signs and checks HMAC-SHA256, and `ring` is already
//! here for rustls, so this provider offers HS256 and refuses every other algorithm.

use std::sync::Once;

use jsonwebtoken::crypto::{CryptoProvider, JwtSigner, JwtVerifier, KeyUtils};
use jsonwebtoken::errors::{Error, ErrorKind};
use jsonwebtoken::signature::{self, Signer, Verifier};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, EncodingKey};
use ring::hmac;

static PROVIDER: CryptoProvider = CryptoProvider {
    signer_factory: signer,
    verifier_factory: verifier,
    key_utils: KeyUtils::new_unimplemented(),
};

/// Installs the provider for the process, once. Harmless when another one was installed first:
/// any provider computes HS256 the same way, and this one is only a way to have one at all.
pub(super) fn install() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        let _ = PROVIDER.install_default();
    });
}

struct Hs256(hmac::Key);

fn hs256_key(
    algorithm: &Algorithm,
    family: AlgorithmFamily,
    secret: &[u8],
) -> Result<Hs256, Error> {
    if *algorithm != Algorithm::HS256 || family != AlgorithmFamily::Hmac {
        return Err(ErrorKind::InvalidAlgorithm.into());
    }
    Ok(Hs256(hmac::Key::new(hmac::HMAC_SHA256, secret)))
}

fn signer(algorithm: &Algorithm, key: &EncodingKey) -> Result<Box<dyn JwtSigner>, Error> {
    Ok(Box::new(hs256_key(
        algorithm,
        key.family(),
        key.as_bytes(),
    )?))
}

fn verifier(algorithm: &Algorithm, key: &DecodingKey) -> Result<Box<dyn JwtVerifier>, Error> {
    Ok(Box::new(hs256_key(
        algorithm,
        key.family(),
        key.try_get_as_bytes()?,
    )?))
}

impl Signer<Vec<u8>> for Hs256 {
    fn try_sign(&self, message: &[u8]) -> Result<Vec<u8>, signature::Error> {
        Ok(hmac::sign(&self.0, message).as_ref().to_vec())
    }
}

impl Verifier<Vec<u8>> for Hs256 {
    /// Constant-time comparison (ring's `hmac::verify`).
    fn verify(&self, message: &[u8], tag: &Vec<u8>) -> Result<(), signature::Error> {
        hmac::verify(&self.0, message, tag).map_err(|_| signature::Error::new())
    }
}

impl JwtSigner for Hs256 {
    fn algorithm(&self) -> Algorithm {
        Algorithm::HS256
    }
}

impl JwtVerifier for Hs256 {
    fn algorithm(&self) -> Algorithm {
        Algorithm::HS256
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hs256_matches_the_rfc_4231_vector_and_nothing_else_is_offered() {
        install();
        // RFC 4231 test case 2: key "Jefe", data "what do ya want for nothing?".
        let key = EncodingKey::from_secret(b"Jefe").unwrap();
        let tag = signer(&Algorithm::HS256, &key)
            .unwrap()
            .try_sign(b"what do ya want for nothing?")
            .unwrap();
        assert_eq!(
            hex::encode(&tag),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        let decoding = DecodingKey::from_secret(b"Jefe").unwrap();
        let check = verifier(&Algorithm::HS256, &decoding).unwrap();
        assert!(check.verify(b"what do ya want for nothing?", &tag).is_ok());
        assert!(check.verify(b"what do ya want for nothing!", &tag).is_err());
        for other in [
            Algorithm::HS384,
            Algorithm::HS512,
            Algorithm::RS256,
            Algorithm::ES256,
        ] {
            assert!(signer(&other, &key).is_err(), "{other:?}");
            assert!(verifier(&other, &decoding).is_err(), "{other:?}");
        }
    }
}
