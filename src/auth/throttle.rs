//! The token endpoint's brake on guessing secrets: once a client name, or a source address,
//! has failed client authentication [`MAX_FAILURES`] times within [`WINDOW`], further attempts
//! for it are refused (429, `Retry-After`) until the oldest of those failures leaves the window.
//!
//! Per client name, so a secret cannot be guessed from many addresses at once; per address, so
//! one address cannot try many names. Only configured names are counted by name (an unknown
//! name has no secret to guess), so that table is as long as the client list. Addresses are
//! counted in a bounded cache whose entries go once idle for a whole window; IPv6 addresses are
//! counted by their /64 network, the block one subscriber usually holds.
//!
//! The price, documented for operators: whoever knows a client's name can keep that client
//! from getting new tokens for a minute at a time. Its tokens already issued and its API key
//! keep working.

use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use moka::sync::Cache;

/// Failures allowed within [`WINDOW`]; the next attempt is refused.
pub const MAX_FAILURES: usize = 10;
/// How far back failures count.
pub const WINDOW: Duration = Duration::from_secs(60);
/// Source addresses tracked at once (about 250 bytes each): beyond it the least recently seen
/// are forgotten, and the per-name limit still holds.
pub const MAX_ADDRESSES: u64 = 65_536;

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
    /// By client index.
    clients: Box<[Mutex<Failures>]>,
    addresses: Cache<IpAddr, Arc<Mutex<Failures>>>,
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
    /// A throttle for `clients` configured clients.
    pub fn new(clients: usize) -> Self {
        FailureThrottle {
            clients: (0..clients).map(|_| Mutex::default()).collect(),
            addresses: Cache::builder()
                .max_capacity(MAX_ADDRESSES)
                .time_to_idle(WINDOW)
                .build(),
        }
    }

    /// How long `address` must wait before trying again, if it must.
    pub fn address_wait(&self, address: IpAddr, now: Instant) -> Option<Duration> {
        let failures = self.addresses.get(&address_key(address))?;
        let wait = lock(&failures).wait(now);
        wait
    }

    /// How long the client at `client_index` must wait before trying again, if it must.
    pub fn client_wait(&self, client_index: usize, now: Instant) -> Option<Duration> {
        lock(self.clients.get(client_index)?).wait(now)
    }

    /// Counts a failed client authentication from `address`, for the client at `client_index`
    /// when the name was a configured one.
    pub fn record_failure(&self, address: IpAddr, client_index: Option<usize>, now: Instant) {
        let failures = self.addresses.get_with(address_key(address), Arc::default);
        lock(&failures).record(now);
        if let Some(client) = client_index.and_then(|i| self.clients.get(i)) {
            lock(client).record(now);
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
        let throttle = FailureThrottle::new(2);
        let start = Instant::now();
        for i in 0..MAX_FAILURES as u64 {
            let now = start + Duration::from_secs(i);
            assert_eq!(throttle.address_wait(A, now), None, "attempt {}", i + 1);
            assert_eq!(throttle.client_wait(1, now), None);
            throttle.record_failure(A, Some(1), now);
        }
        let now = start + Duration::from_secs(10);
        assert_eq!(throttle.address_wait(A, now), Some(Duration::from_secs(50)));
        assert_eq!(throttle.client_wait(1, now), Some(Duration::from_secs(50)));
        // Others are not affected.
        assert_eq!(throttle.address_wait(B, now), None);
        assert_eq!(throttle.client_wait(0, now), None);
        // The oldest failure leaves the window: one more attempt is allowed.
        assert_eq!(throttle.address_wait(A, start + WINDOW), None);
        assert_eq!(
            throttle.address_wait(A, start + WINDOW - Duration::from_millis(1)),
            Some(Duration::from_millis(1))
        );
    }

    #[test]
    fn names_and_addresses_are_counted_apart() {
        let throttle = FailureThrottle::new(1);
        let now = Instant::now();
        // Ten addresses, one failure each, all for client 0: the name is throttled.
        for i in 0..MAX_FAILURES as u8 {
            throttle.record_failure(IpAddr::V4(Ipv4Addr::new(198, 51, 100, i)), Some(0), now);
        }
        assert!(throttle.client_wait(0, now).is_some());
        assert_eq!(throttle.address_wait(A, now), None);
        // One address, ten unknown names: the address is throttled, no name is.
        let throttle = FailureThrottle::new(1);
        for _ in 0..MAX_FAILURES {
            throttle.record_failure(A, None, now);
        }
        assert!(throttle.address_wait(A, now).is_some());
        assert_eq!(throttle.client_wait(0, now), None);
        assert_eq!(throttle.client_wait(7, now), None, "no such client");
    }

    #[test]
    fn ipv6_is_counted_by_its_64_network() {
        let throttle = FailureThrottle::new(0);
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
        let throttle = FailureThrottle::new(0);
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
        let throttle = FailureThrottle::new(0);
        let now = Instant::now();
        for i in 0..(MAX_ADDRESSES as u32 + 10_000) {
            throttle.record_failure(IpAddr::V4(Ipv4Addr::from(i)), None, now);
        }
        throttle.addresses.run_pending_tasks();
        assert!(throttle.addresses.entry_count() <= MAX_ADDRESSES);
    }
}
