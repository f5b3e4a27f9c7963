//! The writes other instances announced and have not finished yet, each holding the cache's
//! remote write guard until its outcome arrives or it expires (its writer died or lost Redis;
//! dropping the guard counts as an unknown outcome, which drops the contact).

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;

use crate::cache::WriteGuard;

/// A write: its sender and its number there.
type WriteKey = (String, u64);

pub struct RemoteWrites {
    in_flight: HashMap<WriteKey, (WriteGuard, Instant)>,
    lifetime: Duration,
}

impl RemoteWrites {
    /// Writes expire `lifetime` after their pending announcement arrived.
    pub fn new(lifetime: Duration) -> Self {
        RemoteWrites {
            in_flight: HashMap::new(),
            lifetime,
        }
    }

    pub fn begin(&mut self, from: &str, write: u64, guard: WriteGuard, now: Instant) {
        self.in_flight
            .insert((from.to_owned(), write), (guard, now + self.lifetime));
    }

    /// The guard of the write, if its pending announcement arrived and has not expired.
    pub fn take(&mut self, from: &str, write: u64) -> Option<WriteGuard> {
        self.in_flight
            .remove(&(from.to_owned(), write))
            .map(|(guard, _)| guard)
    }

    /// Drops the writes whose outcome is overdue; returns how many.
    pub fn expire(&mut self, now: Instant) -> usize {
        let before = self.in_flight.len();
        self.in_flight.retain(|_, (_, expires)| *expires > now);
        before - self.in_flight.len()
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.in_flight.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::{ConsentCache, Lookup};
    use crate::consent::WriteOutcome;
    use crate::consent::{ConsentStatus, ContactId};

    fn is_hit(cache: &ConsentCache, id: &ContactId) -> bool {
        matches!(cache.lookup(id), Lookup::Hit(_))
    }

    #[tokio::test]
    async fn an_expired_write_releases_the_contact_and_keeps_nothing() {
        let cache = ConsentCache::for_tests();
        let id = ContactId::from_path_segment("+15550000001").unwrap();
        cache
            .begin_write(&id)
            .finish(WriteOutcome::Applied(ConsentStatus::Consented));
        assert!(is_hit(&cache, &id));

        let mut writes = RemoteWrites::new(Duration::from_secs(5));
        let now = Instant::now();
        writes.begin("other", 1, cache.begin_remote_write(&id), now);
        assert!(
            !is_hit(&cache, &id),
            "a pending remote write drops the entry"
        );
        assert_eq!(writes.expire(now + Duration::from_secs(4)), 0);
        assert_eq!(writes.expire(now + Duration::from_secs(5)), 1);
        assert!(writes.is_empty());
        assert!(
            writes.take("other", 1).is_none(),
            "a late outcome finds nothing"
        );
        assert_eq!(cache.keys_in_flight(), 0, "the contact is released");
    }
}
