//! What this instance knows of each contact's changes, for answers it did not make itself (the
//! cluster's shared tier): when a write of the contact last ended here (a local write, another
//! instance's write as announced, or its pending announcement expiring), an admin purge, or
//! when the cache last forgot everything (a flush: announcements may have been missed). An
//! answer whose upstream read began before that moment may be older than the change, whatever
//! Redis says (its keys may have been evicted or replayed since).
//!
//! Contacts share 65,536 slots by their keyed hash (`key`); each slot keeps the latest moment of any of
//! its contacts. A collision can only make an answer look older than it is (one more upstream
//! GET), never younger, and the memory is bounded (512 KiB) however many contacts change.

use std::sync::atomic::{AtomicU64, Ordering};

/// A power of two.
const SLOTS: usize = 1 << 16;

pub(super) struct ChangeLog {
    /// Per slot: milliseconds since the cache's epoch, rounded up, of its latest change.
    slots: Box<[AtomicU64]>,
    /// The latest flush (every contact changed, as far as this instance can tell).
    flushed_ms: AtomicU64,
}

impl ChangeLog {
    pub fn new() -> ChangeLog {
        ChangeLog {
            slots: (0..SLOTS).map(|_| AtomicU64::new(0)).collect(),
            flushed_ms: AtomicU64::new(0),
        }
    }

    /// The slot of the contact whose key hashes to `hash`.
    fn slot(&self, hash: u64) -> &AtomicU64 {
        &self.slots[hash as usize & (SLOTS - 1)]
    }

    /// The contact whose key hashes to `hash` changed at `now_ms`.
    pub fn changed(&self, hash: u64, now_ms: u64) {
        self.slot(hash).fetch_max(now_ms, Ordering::AcqRel);
    }

    /// Every contact may have changed at `now_ms`.
    pub fn flushed(&self, now_ms: u64) {
        self.flushed_ms.fetch_max(now_ms, Ordering::AcqRel);
    }

    /// The latest change known of the contact whose key hashes to `hash`, in milliseconds
    /// since the epoch (0: none since it).
    pub fn last_change(&self, hash: u64) -> u64 {
        let slot = self.slot(hash).load(Ordering::Acquire);
        slot.max(self.flushed_ms.load(Ordering::Acquire))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_is_never_forgotten_and_a_flush_counts_for_every_contact() {
        let log = ChangeLog::new();
        // Two contacts' hashes, in different slots.
        let (contact, other) = (0x1234_5678_0000_0001, 0x1234_5678_0000_0002);
        assert_eq!(log.last_change(contact), 0);
        log.changed(contact, 20);
        log.changed(contact, 10);
        assert_eq!(log.last_change(contact), 20, "never goes back");
        log.flushed(15);
        assert_eq!(log.last_change(contact), 20);
        assert!(log.last_change(other) >= 15, "a flush changes all");
    }
}
