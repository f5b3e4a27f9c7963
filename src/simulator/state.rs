//! What the simulator remembers, shared by every connection: its settings, the stored
//! contacts, issued tokens, queued faults and GET delays, and the counters.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use rand::Rng as _;

use super::assertion::ClientKeys;
use super::{Fault, RecordedRequest, SimReport, SimRoute, SimStats, SimulatorConfig};
use crate::consent::{ConsentStatus, ContactId};

/// Issued tokens are 43 alphanumeric characters: about 256 random bits.
const TOKEN_LEN: usize = 43;
/// Expired tokens are remembered this long (to count `expired_token_uses`) once the token
/// table grows past `TOKEN_PRUNE_THRESHOLD`.
const TOKEN_RETENTION_AFTER_EXPIRY: Duration = Duration::from_secs(600);
const TOKEN_PRUNE_THRESHOLD: usize = 4096;

/// One simulator's memory, shared by its connections: settings fixed at start, settings
/// tests change, counters, and everything behind one lock.
pub(super) struct Simulation {
    pub(super) client_id: String,
    pub(super) client_secret: String,
    pub(super) allowed_scopes: Vec<String>,
    token_ttl: AtomicU64,
    latency: AtomicU64,
    unknown_as_no_consent: AtomicBool,
    pub(super) counters: Counters,
    /// Public keys a client may sign `private_key_jwt` assertions with.
    pub(super) client_keys: ClientKeys,
    state: Mutex<State>,
}

/// The counters of [`SimStats`], lock-free.
#[derive(Default)]
pub(super) struct Counters {
    pub(super) token_requests: AtomicU64,
    pub(super) tokens_issued: AtomicU64,
    pub(super) gets: AtomicU64,
    pub(super) puts: AtomicU64,
    pub(super) unauthorized: AtomicU64,
    pub(super) expired_token_uses: AtomicU64,
}

impl Counters {
    fn all(&self) -> [&AtomicU64; 6] {
        [
            &self.token_requests,
            &self.tokens_issued,
            &self.gets,
            &self.puts,
            &self.unauthorized,
            &self.expired_token_uses,
        ]
    }

    pub(super) fn snapshot(&self) -> SimStats {
        let [token_requests, tokens_issued, gets, puts, unauthorized, expired_token_uses] =
            self.all().map(|c| c.load(Ordering::Relaxed));
        SimStats {
            token_requests,
            tokens_issued,
            gets,
            puts,
            unauthorized,
            expired_token_uses,
        }
    }
}

/// What changes under requests, behind one lock (held briefly, never across an await).
#[derive(Default)]
pub(super) struct State {
    /// By normalised contact id, as every per-contact map here.
    pub(super) contacts: HashMap<String, ConsentStatus>,
    tokens: HashMap<String, IssuedToken>,
    /// Per route (by `SimRoute::index`): faults with how many answers each still covers.
    faults: [VecDeque<(Fault, u32)>; 3],
    get_delays: HashMap<String, VecDeque<(Duration, u32)>>,
    pub(super) gets_per_contact: HashMap<String, u64>,
    pub(super) puts_per_contact: HashMap<String, u64>,
    pub(super) last_consent_request: Option<RecordedRequest>,
}

struct IssuedToken {
    expires_at: Instant,
    scopes: Vec<String>,
}

/// Takes one answer off the front of a counted queue.
fn take_counted<T: Clone>(queue: &mut VecDeque<(T, u32)>) -> Option<T> {
    let (item, remaining) = queue.front_mut()?;
    let item = item.clone();
    *remaining = remaining.saturating_sub(1);
    if *remaining == 0 {
        queue.pop_front();
    }
    Some(item)
}

impl Simulation {
    pub(super) fn new(config: SimulatorConfig) -> Simulation {
        Simulation {
            client_id: config.client_id,
            client_secret: config.client_secret,
            allowed_scopes: config.allowed_scopes,
            token_ttl: AtomicU64::new(nanos(config.token_ttl)),
            latency: AtomicU64::new(nanos(config.latency)),
            unknown_as_no_consent: AtomicBool::new(false),
            counters: Counters::default(),
            client_keys: ClientKeys::default(),
            state: Mutex::new(State::default()),
        }
    }

    pub(super) fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    pub(super) fn latency(&self) -> Duration {
        Duration::from_nanos(self.latency.load(Ordering::Relaxed))
    }

    pub(super) fn token_ttl(&self) -> Duration {
        Duration::from_nanos(self.token_ttl.load(Ordering::Relaxed))
    }

    pub(super) fn set_latency(&self, latency: Duration) {
        self.latency.store(nanos(latency), Ordering::Relaxed);
    }

    pub(super) fn set_token_ttl(&self, ttl: Duration) {
        self.token_ttl.store(nanos(ttl), Ordering::Relaxed);
    }

    /// Whether a GET of an unknown contact answers 200 `NO_CONSENT` rather than 404.
    pub(super) fn unknown_as_no_consent(&self) -> bool {
        self.unknown_as_no_consent.load(Ordering::Relaxed)
    }

    pub(super) fn set_unknown_as_no_consent(&self, on: bool) {
        self.unknown_as_no_consent.store(on, Ordering::Relaxed);
    }

    pub(super) fn inject(&self, route: SimRoute, fault: Fault, count: u32) {
        if count > 0 {
            self.state().faults[route.index()].push_back((fault, count));
        }
    }

    pub(super) fn take_fault(&self, route: SimRoute) -> Option<Fault> {
        take_counted(&mut self.state().faults[route.index()])
    }

    pub(super) fn delay_next_get(&self, contact: &str, delay: Duration, count: u32) {
        if count > 0 {
            self.state()
                .get_delays
                .entry(normalise(contact))
                .or_default()
                .push_back((delay, count));
        }
    }

    pub(super) fn clear_faults(&self) {
        let mut state = self.state();
        state.faults.iter_mut().for_each(VecDeque::clear);
        state.get_delays.clear();
    }

    pub(super) fn reset_counters(&self) {
        for counter in self.counters.all() {
            counter.store(0, Ordering::Relaxed);
        }
        let mut state = self.state();
        state.gets_per_contact.clear();
        state.puts_per_contact.clear();
        state.last_consent_request = None;
    }

    pub(super) fn report(&self) -> SimReport {
        let stats = self.counters.snapshot();
        let state = self.state();
        let sorted = |map: &HashMap<String, u64>| -> BTreeMap<String, u64> {
            map.iter().map(|(k, v)| (k.clone(), *v)).collect()
        };
        SimReport {
            stats,
            gets_per_contact: sorted(&state.gets_per_contact),
            puts_per_contact: sorted(&state.puts_per_contact),
            pending_faults: SimRoute::ALL
                .into_iter()
                .map(|route| {
                    let pending = state.faults[route.index()]
                        .iter()
                        .map(|(_, n)| u64::from(*n))
                        .sum();
                    (route.as_str().to_owned(), pending)
                })
                .collect(),
            contacts: state.contacts.len(),
            latency_ms: millis(self.latency()),
            token_ttl_ms: millis(self.token_ttl()),
            last_consent_request: state.last_consent_request.clone(),
        }
    }

    /// Issues a token valid for `token_ttl` from now.
    pub(super) fn issue_token(&self, scopes: Vec<String>) -> (String, Duration) {
        let ttl = self.token_ttl();
        let token: String = rand::rng()
            .sample_iter(rand::distr::Alphanumeric)
            .take(TOKEN_LEN)
            .map(char::from)
            .collect();
        let now = Instant::now();
        let expires_at = now
            .checked_add(ttl)
            .unwrap_or(now + Duration::from_secs(1 << 40));
        let mut state = self.state();
        if state.tokens.len() >= TOKEN_PRUNE_THRESHOLD {
            state.tokens.retain(|_, t| {
                match t.expires_at.checked_add(TOKEN_RETENTION_AFTER_EXPIRY) {
                    Some(keep_until) => keep_until > now,
                    None => true,
                }
            });
        }
        state
            .tokens
            .insert(token.clone(), IssuedToken { expires_at, scopes });
        self.counters.tokens_issued.fetch_add(1, Ordering::Relaxed);
        (token, ttl)
    }

    /// A GET's read, on arrival: the stored status of `contact`, and the extra wait of its
    /// next queued GET delay (consumed here).
    pub(super) fn read_for_get(&self, contact: &ContactId) -> (Option<ConsentStatus>, Duration) {
        let key = contact.as_str();
        let mut state = self.state();
        let status = state.contacts.get(key).copied();
        let mut extra_wait = Duration::ZERO;
        if let Some(delays) = state.get_delays.get_mut(key) {
            extra_wait = take_counted(delays).unwrap_or_default();
            if delays.is_empty() {
                state.get_delays.remove(key);
            }
        }
        (status, extra_wait)
    }

    /// What the token store says of `token` for a request needing `scope`.
    pub(super) fn check_token(&self, token: &str, scope: &str) -> TokenCheck {
        let now = Instant::now();
        match self.state().tokens.get(token) {
            None => TokenCheck::Unknown,
            Some(issued) if issued.expires_at <= now => TokenCheck::Expired,
            Some(issued) if !issued.scopes.iter().any(|s| s == scope) => TokenCheck::LacksScope,
            Some(_) => TokenCheck::Valid,
        }
    }
}

/// What the token store says of a presented access token.
pub(super) enum TokenCheck {
    Unknown,
    Expired,
    LacksScope,
    Valid,
}

pub(super) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

pub(super) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The key a contact is stored and counted under: the normalised id, or the raw string when
/// it is not a valid id (such a contact can never be reached over HTTP).
pub(super) fn normalise(contact: &str) -> String {
    ContactId::from_path_segment(contact)
        .map(|id| id.as_str().to_owned())
        .unwrap_or_else(|| contact.to_owned())
}
