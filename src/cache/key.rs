//! A contact's key in the cache's maps, hashed once per operation: moka's map of answers, the
//! choice of a shard lock, the shard's map of keys in flight and the change log all take the
//! key's hash from it instead of hashing the id again (a miss hashed it seven times).
//!
//! The hash is SipHash with a key drawn per process (`RandomState`), as each map's own would
//! be: contact ids come from callers, and a seeded hash keeps them from choosing ids that
//! collide. The maps hash a [`Key`] as its stored hash ([`KeyHashing`]).

use std::hash::{BuildHasher, BuildHasherDefault, Hash, Hasher, RandomState};
use std::sync::Arc;

use crate::consent::ContactId;

/// A contact id with its keyed hash.
#[derive(Clone)]
pub struct Key {
    hash: u64,
    id: Arc<str>,
}

impl Key {
    /// The id's hash (low bits: the change log's slot; bits 32 and up: the shard).
    pub fn keyed_hash(&self) -> u64 {
        self.hash
    }
}

impl Hash for Key {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

impl PartialEq for Key {
    fn eq(&self, other: &Self) -> bool {
        self.hash == other.hash && self.id == other.id
    }
}

impl Eq for Key {}

/// Makes the [`Key`]s of contacts: one seeded hash for every map of one cache.
pub struct Keys(RandomState);

impl Keys {
    pub fn new() -> Keys {
        Keys(RandomState::new())
    }

    pub fn of(&self, contact: &ContactId) -> Key {
        Key {
            hash: self.0.hash_one(contact.as_str()),
            id: contact.as_arc().clone(),
        }
    }
}

/// The maps' hasher: a [`Key`]'s hash is its stored one.
pub type KeyHashing = BuildHasherDefault<KeyHasher>;

#[derive(Default)]
pub struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write_u64(&mut self, hash: u64) {
        self.0 = hash;
    }

    /// Not used ([`Key`] writes one `u64`); folds bytes in (FNV-1a) should anything else be
    /// hashed with it.
    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.0 = (self.0 ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn contact(id: &str) -> ContactId {
        ContactId::from_path_segment(id).expect("valid id")
    }

    #[test]
    fn one_contact_one_key_and_the_maps_hash_it_as_its_keyed_hash() {
        let keys = Keys::new();
        let (a, b) = (
            keys.of(&contact("+15550000001")),
            keys.of(&contact("%2B15550000001")),
        );
        assert!(
            a == b && a.keyed_hash() == b.keyed_hash(),
            "one contact, one key"
        );
        assert_eq!(KeyHashing::default().hash_one(&a), a.keyed_hash());
        assert!(a != keys.of(&contact("+15550000002")));
        let another_cache = Keys::new();
        assert_ne!(
            another_cache.of(&contact("+15550000001")).keyed_hash(),
            a.keyed_hash(),
            "seeded per cache"
        );
    }
}
