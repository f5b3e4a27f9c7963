//! The shared tier's keys, derived from each secret of `cluster.shared_key_file` with
//! HKDF-SHA256: an HMAC-SHA256 key for the digests that name contacts in Redis (a contact id
//! never appears in a key name, and without the secret the digests cannot be tested against
//! guessed phone numbers), a ChaCha20-Poly1305 key for everything stored (answers and the
//! token), and a short key id that is part of every key name, so each secret has a keyspace of
//! its own.

use ring::{aead, hkdf, hmac, rand as ring_rand};

use crate::config::Secret;

const SALT: &[u8] = b"consent-proxy cluster shared tier v1";
const NONCE_LEN: usize = 12;

/// The keys derived from one secret.
pub struct KeySet {
    id: String,
    digests: hmac::Key,
    sealing: aead::LessSafeKey,
}

impl KeySet {
    fn derive(secret: &[u8]) -> KeySet {
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, SALT).extract(secret);
        // `expand` fails only for outputs longer than 255 hashes: these are constants.
        let digests = hmac::Key::from(
            prk.expand(&[b"contact digests"], hmac::HMAC_SHA256)
                .expect("an HMAC-SHA256 key is a valid HKDF length"),
        );
        let sealing = aead::LessSafeKey::new(aead::UnboundKey::from(
            prk.expand(&[b"sealing"], &aead::CHACHA20_POLY1305)
                .expect("a ChaCha20-Poly1305 key is a valid HKDF length"),
        ));
        let id = hex::encode(&hmac::sign(&digests, b"key id").as_ref()[..4]);
        KeySet {
            id,
            digests,
            sealing,
        }
    }

    /// Eight hex digits naming this secret's keyspace (it reveals nothing of the secret).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The keyed digest of `data`: 128 bits as hex.
    pub fn digest(&self, data: &[u8]) -> String {
        hex::encode(&hmac::sign(&self.digests, data).as_ref()[..16])
    }

    /// `plaintext` encrypted and authenticated, bound to `context` (the Redis key it is stored
    /// under, so that a value copied to another key does not open): nonce, ciphertext, tag.
    /// `None` only when the system's random source fails.
    pub fn seal(&self, context: &[u8], plaintext: &[u8]) -> Option<Vec<u8>> {
        let mut nonce = [0u8; NONCE_LEN];
        ring_rand::SecureRandom::fill(&ring_rand::SystemRandom::new(), &mut nonce).ok()?;
        let mut sealed = Vec::with_capacity(NONCE_LEN + plaintext.len() + aead::MAX_TAG_LEN);
        sealed.extend_from_slice(&nonce);
        let mut in_out = plaintext.to_vec();
        self.sealing
            .seal_in_place_append_tag(
                aead::Nonce::assume_unique_for_key(nonce),
                aead::Aad::from(context),
                &mut in_out,
            )
            .ok()?;
        sealed.extend_from_slice(&in_out);
        Some(sealed)
    }

    /// What [`Self::seal`] sealed under `context`; `None` when it was not (another key, another
    /// context, altered, truncated).
    pub fn open(&self, context: &[u8], sealed: &[u8]) -> Option<Vec<u8>> {
        if sealed.len() < NONCE_LEN + aead::MAX_TAG_LEN {
            return None;
        }
        let (nonce, ciphertext) = sealed.split_at(NONCE_LEN);
        let nonce = aead::Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut in_out = ciphertext.to_vec();
        let plaintext = self
            .sealing
            .open_in_place(nonce, aead::Aad::from(context), &mut in_out)
            .ok()?;
        Some(plaintext.to_vec())
    }
}

/// Every configured secret's keys, the one in use first.
pub struct SharedKeys {
    sets: Vec<KeySet>,
}

impl SharedKeys {
    /// `None` when no secret is given.
    pub fn new(secrets: &[Secret]) -> Option<SharedKeys> {
        if secrets.is_empty() {
            return None;
        }
        Some(SharedKeys {
            sets: secrets
                .iter()
                .map(|secret| KeySet::derive(secret.expose().as_bytes()))
                .collect(),
        })
    }

    /// The keys in use: what is read and stored.
    pub fn current(&self) -> &KeySet {
        &self.sets[0]
    }

    /// Every key: writes clear a contact in each keyspace, so that instances still using an
    /// older key during a rotation never read an entry older than a write.
    pub fn all(&self) -> &[KeySet] {
        &self.sets
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(secrets: &[&str]) -> SharedKeys {
        SharedKeys::new(&secrets.iter().map(|s| Secret::new(*s)).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn digests_are_keyed_and_stable() {
        let a = keys(&["a-secret-0123456789abcdef0123456789"]);
        let b = keys(&["b-secret-0123456789abcdef0123456789"]);
        let contact = b"+15551234567";
        assert_eq!(a.current().digest(contact), a.current().digest(contact));
        assert_ne!(a.current().digest(contact), b.current().digest(contact));
        assert_eq!(a.current().digest(contact).len(), 32);
        assert!(!a.current().digest(contact).contains("5551234567"));
        assert_ne!(a.current().id(), b.current().id());
        assert_eq!(a.current().id().len(), 8);
    }

    #[test]
    fn sealed_values_open_only_with_their_key_and_context() {
        let a = keys(&[
            "a-secret-0123456789abcdef0123456789",
            "an-older-one-0123456789abcdef012",
        ]);
        let b = keys(&["b-secret-0123456789abcdef0123456789"]);
        let sealed = a.current().seal(b"key-1", b"CONSENTED").unwrap();
        assert!(!sealed.windows(9).any(|w| w == b"CONSENTED"));
        assert_eq!(
            a.current().open(b"key-1", &sealed).as_deref(),
            Some(&b"CONSENTED"[..])
        );
        assert!(a.current().open(b"key-2", &sealed).is_none(), "moved");
        assert!(b.current().open(b"key-1", &sealed).is_none(), "another key");
        assert!(a.all()[1].open(b"key-1", &sealed).is_none(), "an older key");
        let mut altered = sealed.clone();
        altered[NONCE_LEN] ^= 1;
        assert!(a.current().open(b"key-1", &altered).is_none(), "altered");
        assert!(a.current().open(b"key-1", &sealed[..10]).is_none(), "cut");
        assert_ne!(sealed, a.current().seal(b"key-1", b"CONSENTED").unwrap());
    }
}
