//! The brake on guessing secrets, shared by the consent routes and the token endpoint: once a
//! source address, or a client name, has failed authentication [`MAX_FAILURES`] times within
//! [`WINDOW`], further attempts from it (for it) are refused (429, `Retry-After`) until the
//! oldest of those failures leaves the window, whether the credentials are right or not.
//!
//! Per client name (Basic's user name, the token endpoint's `client_id`), so a secret cannot be
//! guessed from many addresses at once; per address, so one address cannot try many names or
//! keys. Every name is counted alike, configured or not, so the throttle cannot tell anyone
//! which names exist: configured names in a table as long as the client list (never evicted),
//! other names by a digest in a bounded cache. Addresses are counted in a bounded cache whose
//! entries go once idle for a whole window; IPv6 addresses are counted by their /64 network,
//! the block one subscriber usually holds.
//!
//! The price, documented for operators: whoever knows a client's name can keep Basic
//! authentication and new tokens from working for that name for a minute at a time; its
//! tokens already issued and its key as `X-API-Key` or Bearer keep working.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use moka::sync::Cache;
use sha2::{Digest, Sha256};

/// Failures allowed within [`WINDOW`]; the next attempt is refused.
pub const MAX_FAILURES: usize = 10;
/// How far back failures count.
pub const WINDOW: Duration = Duration::from_secs(60);
/// Source addresses tracked at once (about 250 bytes each): beyond it the least recently seen
/// are forgotten, and the per-name limit still holds.
pub const MAX_ADDRESSES: u64 = 65_536;
/// Names that are not configured clients tracked at once, likewise. Only failures from
/// addresses not yet throttled reach it, so filling it takes thousands of addresses.
pub const MAX_OTHER_NAMES: u64 = 65_536;

/// The last [`MAX_FAILURES`] failure times of one client name or address.
#[derive(Debug, Default)]
struct Failures {
    /// A ring, oldest at `next` once full.
    times: [Option<Instant>; MAX_FAILURES],
    next: usize,
}

impl Failures {
    fn record(&mut self, now: Instant) {
        self.times[self.next] = Some(now);
        self.next = (self.next + 1) % MAX_FAILURES;
    }

    /// How long until another attempt may be made; `None` when one may be made now.
    fn wait(&self, now: Instant) -> Option<Duration> {
        // Full ring: the slot to be overwritten next holds the oldest of the last MAX_FAILURES.
        let oldest = self.times[self.next]?;
        let clears_at = oldest + WINDOW;
        (clears_at > now).then(|| clears_at - now)
    }
}

fn lock(failures: &Mutex<Failures>) -> std::sync::MutexGuard<'_, Failures> {
    // A panic while holding it cannot leave the ring inconsistent.
    failures.lock().unwrap_or_else(PoisonError::into_inner)
}

pub struct FailureThrottle {
    /// The configured clients' names, each with its failures.
    clients: HashMap<String, Mutex<Failures>>,
    /// Any other name, by the first half of its SHA-256 (a name may be as long as a header).
    other_names: Cache<[u8; 16], Arc<Mutex<Failures>>>,
    addresses: Cache<IpAddr, Arc<Mutex<Failures>>>,
    /// When the latest failure was recorded, in nanoseconds after `created` plus one (0: none
    /// yet): while no failure is in the window nobody can be throttled, and an attempt costs
    /// one atomic load instead of a cache lookup.
    latest_failure: AtomicU64,
    created: Instant,
}

fn name_key(name: &str) -> [u8; 16] {
    let digest = Sha256::digest(name.as_bytes());
    let mut key = [0; 16];
    key.copy_from_slice(&digest[..16]);
    key
}

/// The key an address is counted under: IPv4 as it is (an IPv4-mapped IPv6 address too), IPv6
/// by its /64 network.
fn address_key(address: IpAddr) -> IpAddr {
    match address.to_canonical() {
        IpAddr::V6(v6) => {
            let network = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(network.into())
        }
        v4 => v4,
    }
}

impl FailureThrottle {
    /// A throttle knowing the configured clients' names.
    pub fn new<'a>(client_names: impl Iterator<Item = &'a str>) -> Self {
        FailureThrottle {
            clients: client_names
                .map(|name| (name.to_owned(), Mutex::default()))
                .collect(),
            other_names: Cache::builder()
                .max_capacity(MAX_OTHER_NAMES)
                .time_to_idle(WINDOW)
                .build(),
            addresses: Cache::builder()
                .max_capacity(MAX_ADDRESSES)
                .time_to_idle(WINDOW)
                .build(),
            latest_failure: AtomicU64::new(0),
            created: Instant::now(),
        }
    }

    /// Whether no failure at all has been recorded within the window before `now`.
    fn quiet(&self, now: Instant) -> bool {
        match self.latest_failure.load(Ordering::Acquire) {
            0 => true,
            stamp => {
                let at = self.created + Duration::from_nanos(stamp - 1);
                now.saturating_duration_since(at) >= WINDOW
            }
        }
    }

    /// How long `address` must wait before trying again, if it must.
    pub fn address_wait(&self, address: IpAddr, now: Instant) -> Option<Duration> {
        if self.quiet(now) {
            return None;
        }
        let failures = self.addresses.get(&address_key(address))?;
        let wait = lock(&failures).wait(now);
        wait
    }

    /// How long attempts naming `name` must wait before trying again, if they must.
    pub fn name_wait(&self, name: &str, now: Instant) -> Option<Duration> {
        if self.quiet(now) {
            return None;
        }
        match self.clients.get(name) {
            Some(failures) => lock(failures).wait(now),
            None => {
                let failures = self.other_names.get(&name_key(name))?;
                let wait = lock(&failures).wait(now);
                wait
            }
        }
    }

    /// How long an attempt from `address`, naming `name` if it names one, must wait.
    pub fn wait(&self, address: IpAddr, name: Option<&str>, now: Instant) -> Option<Duration> {
        if self.quiet(now) {
            return None;
        }
        let by_address = self.address_wait(address, now);
        let by_name = name.and_then(|name| self.name_wait(name, now));
        by_address.max(by_name)
    }

    /// Counts a failed authentication from `address`, and against `name` when it named one.
    pub fn record_failure(&self, address: IpAddr, name: Option<&str>, now: Instant) {
        let stamp = now.saturating_duration_since(self.created).as_nanos() as u64 + 1;
        self.latest_failure.fetch_max(stamp, Ordering::AcqRel);
        let failures = self.addresses.get_with(address_key(address), Arc::default);
        lock(&failures).record(now);
        match name.map(|name| (name, self.clients.get(name))) {
            None => {}
            Some((_, Some(client))) => lock(client).record(now),
            Some((name, None)) => {
                let failures = self.other_names.get_with(name_key(name), Arc::default);
                lock(&failures).record(now);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    const A: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
    const B: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 2));

    #[test]
    fn the_eleventh_attempt_waits_until_the_oldest_failure_leaves_the_window() {
        let throttle = FailureThrottle::new(["ivr", "ops"].into_iter());
        let start = Instant::now();
        for i in 0..MAX_FAILURES as u64 {
            let now = start + Duration::from_secs(i);
            assert_eq!(throttle.address_wait(A, now), None, "attempt {}", i + 1);
            assert_eq!(throttle.name_wait("ops", now), None);
            throttle.record_failure(A, Some("ops"), now);
        }
        let now = start + Duration::from_secs(10);
        assert_eq!(throttle.address_wait(A, now), Some(Duration::from_secs(50)));
        assert_eq!(
            throttle.name_wait("ops", now),
            Some(Duration::from_secs(50))
        );
        assert_eq!(
            throttle.wait(B, Some("ops"), now),
            Some(Duration::from_secs(50))
        );
        // Others are not affected.
        assert_eq!(throttle.address_wait(B, now), None);
        assert_eq!(throttle.name_wait("ivr", now), None);
        assert_eq!(throttle.wait(B, Some("ivr"), now), None);
        // The oldest failure leaves the window: one more attempt is allowed.
        assert_eq!(throttle.address_wait(A, start + WINDOW), None);
        assert_eq!(
            throttle.address_wait(A, start + WINDOW - Duration::from_millis(1)),
            Some(Duration::from_millis(1))
        );
    }

    #[test]
    fn names_and_addresses_are_counted_apart() {
        let throttle = FailureThrottle::new(["ivr"].into_iter());
        let now = Instant::now();
        // Ten addresses, one failure each, all for "ivr": the name is throttled.
        for i in 0..MAX_FAILURES as u8 {
            throttle.record_failure(IpAddr::V4(Ipv4Addr::new(198, 51, 100, i)), Some("ivr"), now);
        }
        assert!(throttle.name_wait("ivr", now).is_some());
        assert_eq!(throttle.address_wait(A, now), None);
        // One address, ten names: the address is throttled, no name is.
        let throttle = FailureThrottle::new(["ivr"].into_iter());
        for i in 0..MAX_FAILURES {
            throttle.record_failure(A, Some(&format!("guess-{i}")), now);
        }
        assert!(throttle.address_wait(A, now).is_some());
        assert_eq!(throttle.name_wait("ivr", now), None);
        assert_eq!(throttle.name_wait("guess-0", now), None);
    }

    #[test]
    fn configured_and_unknown_names_are_throttled_alike() {
        let throttle = FailureThrottle::new(["ivr"].into_iter());
        let start = Instant::now();
        for name in ["ivr", "nobody"] {
            for i in 0..MAX_FAILURES as u8 {
                let address = IpAddr::V4(Ipv4Addr::new(198, 51, 100, i));
                assert_eq!(throttle.wait(address, Some(name), start), None, "{name}");
                throttle.record_failure(address, Some(name), start);
            }
            let later = start + Duration::from_secs(1);
            assert_eq!(
                throttle.wait(B, Some(name), later),
                Some(Duration::from_secs(59)),
                "{name}: the 11th attempt waits, whether the name exists or not"
            );
        }
    }

    #[test]
    fn ipv6_is_counted_by_its_64_network() {
        let throttle = FailureThrottle::new(std::iter::empty());
        let now = Instant::now();
        for host in 0..MAX_FAILURES as u16 {
            let address = Ipv6Addr::new(0x2001, 0xdb8, 1, 2, 0, 0, 0, host);
            throttle.record_failure(IpAddr::V6(address), None, now);
        }
        let same_network = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 1, 2, 9, 9, 9, 9));
        let next_network = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 1, 3, 0, 0, 0, 1));
        assert!(throttle.address_wait(same_network, now).is_some());
        assert_eq!(throttle.address_wait(next_network, now), None);
        // An IPv4-mapped address is its IPv4 address.
        let throttle = FailureThrottle::new(std::iter::empty());
        for _ in 0..MAX_FAILURES {
            throttle.record_failure(
                IpAddr::V6(Ipv4Addr::new(192, 0, 2, 1).to_ipv6_mapped()),
                None,
                now,
            );
        }
        assert!(throttle.address_wait(A, now).is_some());
    }

    #[test]
    fn the_address_table_is_bounded() {
        let throttle = FailureThrottle::new(std::iter::empty());
        let now = Instant::now();
        for i in 0..(MAX_ADDRESSES as u32 + 10_000) {
            throttle.record_failure(IpAddr::V4(Ipv4Addr::from(i)), None, now);
        }
        throttle.addresses.run_pending_tasks();
        assert!(throttle.addresses.entry_count() <= MAX_ADDRESSES);
    }
}
