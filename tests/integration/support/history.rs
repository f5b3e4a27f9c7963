//! Recorded histories of consent reads and writes, and the checks over them: read-your-writes
//! (rule 2 through one instance, rule 5 across the instances of a cluster) and the bounds on
//! STALE answers (rule 6); the rules of docs/CONSISTENCY.md.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use consent_proxy::simulator::{Fault, SimRoute, Simulator};
use tokio::time::Instant;

use super::TestResponse;

#[derive(Debug, Clone)]
pub enum Op {
    Get {
        result: Option<String>,
        /// For a STALE answer: its `Age` (whole seconds).
        stale_age_s: Option<u64>,
    },
    Put {
        status: String,
        acked: bool,
    },
}

#[derive(Debug, Clone)]
pub struct Event {
    pub contact: usize,
    /// The instance it went through (0 with a single proxy).
    pub via: usize,
    pub start: Instant,
    pub end: Instant,
    pub op: Op,
}

/// Checks read-your-writes over a history: a GET may return the status of any write that
/// could be the latest one when it ran: not superseded by an acknowledged write that started
/// after it ended and ended before the GET started. Before any acknowledged write, the
/// initial value is also allowed. Returns the violations found. O(gets × writes).
pub fn violations(history: &[Event], initial: &str) -> Vec<String> {
    cluster_violations(history, initial, Duration::ZERO)
}

/// Rule 5 over a cluster's history: as [`violations`], except that a write acknowledged
/// through one instance supersedes the older ones for GETs through another instance only when
/// they start `lag` or more after its acknowledgement (through its own instance, at once).
pub fn cluster_violations(history: &[Event], initial: &str, lag: Duration) -> Vec<String> {
    let mut writes_of: BTreeMap<usize, Vec<(&Event, &str, bool)>> = BTreeMap::new();
    for event in history {
        if let Op::Put { status, acked } = &event.op {
            writes_of
                .entry(event.contact)
                .or_default()
                .push((event, status.as_str(), *acked));
        }
    }
    let mut found = Vec::new();
    for get in history {
        let Op::Get {
            result: Some(seen), ..
        } = &get.op
        else {
            continue;
        };
        let writes = writes_of.get(&get.contact).map_or(&[][..], Vec::as_slice);
        // A write is superseded when it ended before the start of an acknowledged write
        // that ended before this GET started; the latest such start decides.
        let known = |w: &Event| {
            if w.via == get.via {
                w.end < get.start
            } else {
                w.end + lag <= get.start
            }
        };
        let latest_acked_start = writes
            .iter()
            .filter(|(w, _, acked)| *acked && known(w))
            .map(|(w, _, _)| w.start)
            .max();
        let superseded = |w: &Event| latest_acked_start.is_some_and(|s| w.end < s);
        let mut allowed: Vec<&str> = writes
            .iter()
            .filter(|(w, _, _)| w.start < get.end && !superseded(w))
            .map(|(_, status, _)| *status)
            .collect();
        if latest_acked_start.is_none() {
            allowed.push(initial);
        }
        if !allowed.contains(&seen.as_str()) {
            allowed.sort_unstable();
            allowed.dedup();
            found.push(format!(
                "GET of contact {} through instance {} at -{:?} saw {seen}, allowed {allowed:?}",
                get.contact,
                get.via,
                get.start.elapsed()
            ));
        }
    }
    found
}

/// Acknowledged writes that upstream lost: `upstream` holds each contact's status as upstream
/// has it now, read after every write of `history` ended; it must be one a GET starting then
/// could see (rule 1 and 5: nothing acknowledged is lost or overtaken by an older write).
pub fn lost_writes(history: &[Event], initial: &str, upstream: &[(usize, String)]) -> Vec<String> {
    let now = Instant::now();
    let mut checked: Vec<Event> = history
        .iter()
        .filter(|event| matches!(event.op, Op::Put { .. }))
        .cloned()
        .collect();
    checked.extend(upstream.iter().map(|(contact, status)| Event {
        contact: *contact,
        via: usize::MAX,
        start: now,
        end: now,
        op: Op::Get {
            result: Some(status.clone()),
            stale_age_s: None,
        },
    }));
    cluster_violations(&checked, initial, Duration::ZERO)
}

/// What [`stale_violations`] found.
#[derive(Debug, Default)]
pub struct StaleCheck {
    /// STALE answers in the history.
    pub stale: usize,
    /// Of those, the ones held to an acknowledged write of their contact (the ones the write
    /// rule could catch).
    pub after_a_write: usize,
    /// With a `failure_latency`: GETs (answered anyhow) that took that long, during whose
    /// first `failure_latency` an acknowledged write of their contact ended: the ones that
    /// must fall back on that write if their fill failed (what remembering the entry the
    /// lookup found, instead of reading it again, gets wrong).
    pub writes_during_failing_gets: usize,
    pub violations: Vec<String>,
}

/// Rule 6 over a history through one instance: a STALE answer is never `ttl_plus_stale`
/// (`ttl_s + stale_if_error_s`) old, and never older than an acknowledged write of its contact
/// that the proxy knew of when the fill failed: one that had ended before the GET began, or
/// before `failure_latency` after it when every upstream failure is known to take that long
/// (and no GET joins another's fill). The entry a write leaves was stored after the write
/// began, so an answer whose `Age` (whole seconds, rounded down: the true age is at least
/// that) reaches back past the start of such a write is certainly older than it.
pub fn stale_violations(
    history: &[Event],
    ttl_plus_stale: Duration,
    failure_latency: Duration,
) -> StaleCheck {
    let mut check = StaleCheck::default();
    let acked_writes = |contact| {
        history
            .iter()
            .filter(move |w| w.contact == contact)
            .filter(|w| matches!(w.op, Op::Put { acked: true, .. }))
    };
    if !failure_latency.is_zero() {
        check.writes_during_failing_gets = history
            .iter()
            .filter(|g| {
                matches!(
                    g.op,
                    Op::Get {
                        result: Some(_),
                        ..
                    }
                )
            })
            .filter(|g| g.end >= g.start + failure_latency)
            .filter(|g| {
                acked_writes(g.contact)
                    .any(|w| w.end >= g.start && w.end < g.start + failure_latency)
            })
            .count();
    }
    for get in history {
        let Op::Get {
            result: Some(seen),
            stale_age_s: Some(age_s),
        } = &get.op
        else {
            continue;
        };
        check.stale += 1;
        let age = Duration::from_secs(*age_s);
        if age >= ttl_plus_stale {
            check.violations.push(format!(
                "STALE answer of contact {} ({seen}) {age_s} s old, the limit is {ttl_plus_stale:?}",
                get.contact
            ));
        }
        let latest_write = acked_writes(get.contact)
            .filter(|w| w.end < get.start + failure_latency)
            .max_by_key(|w| w.start);
        if let Some(write) = latest_write {
            check.after_a_write += 1;
            let since_write = get.end.duration_since(write.start);
            if age > since_write {
                check.violations.push(format!(
                    "STALE answer of contact {} ({seen}, Age {age_s}) is older than the write \
                     that began {since_write:?} before it ended",
                    get.contact
                ));
            }
        }
    }
    check
}

impl Op {
    /// A PUT of `status` and the proxy's answer: acknowledged when the answer is a 2xx.
    pub fn put(status: &str, response: &TestResponse) -> Op {
        Op::Put {
            status: status.to_owned(),
            acked: (200..300).contains(&response.status),
        }
    }

    /// A GET and the proxy's answer: a status seen when the answer is a 200, and its `Age`
    /// when it is STALE.
    pub fn get(response: &TestResponse) -> Op {
        let stale = response.status == 200 && response.header("x-cache-status") == Some("STALE");
        Op::Get {
            result: (response.status == 200).then(|| response.status_field()),
            stale_age_s: stale.then(|| {
                response
                    .header("age")
                    .and_then(|age| age.parse().ok())
                    .expect("a STALE answer has an Age")
            }),
        }
    }
}

/// Until `until`, holds back upstream's answers at random: a GET of a random contact by 5 to
/// 60 ms, and now and then a PUT by 1 to 20 ms, so that reads and writes race.
pub async fn random_upstream_delays(sim: &Simulator, contacts: &[String], until: Instant) {
    while Instant::now() < until {
        let contact = &contacts[rand::random_range(0..contacts.len())];
        let delay = Duration::from_millis(rand::random_range(5..60));
        sim.delay_next_get(contact, delay, 1);
        if rand::random_bool(0.3) {
            sim.inject(
                SimRoute::Put,
                Fault::Delay(Duration::from_millis(rand::random_range(1..20))),
                1,
            );
        }
        tokio::time::sleep(Duration::from_millis(rand::random_range(1..15))).await;
    }
}

/// Which faults [`random_upstream_outages`] injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutageFaults {
    /// Every GET meets one fault: a 500, a 429 with `Retry-After` 0 or 1, a closed connection,
    /// or a hold past the attempt timeout.
    Mixed,
    /// Every GET is held past the attempt timeout: each failure takes that long.
    Slow,
}

/// Until `until`, takes upstream down and up at random: healthy for 0.3 to 1 s, then failing
/// for 1 to 2.5 s, with GETs meeting `faults` (holds last `past_timeout`, more than the
/// proxy's attempt timeout) and PUTs, half the time, one too (a 500, or a hold past the
/// timeout: applied, but unacknowledged). Returns the number of outages.
pub async fn random_upstream_outages(
    sim: &Simulator,
    faults: OutageFaults,
    past_timeout: Duration,
    until: Instant,
) -> usize {
    let mut outages = 0;
    let between =
        |from_ms: u64, to_ms: u64| Duration::from_millis(rand::random_range(from_ms..to_ms));
    loop {
        tokio::time::sleep(between(300, 1000)).await;
        if Instant::now() >= until {
            return outages;
        }
        outages += 1;
        let get_fault = match (faults, rand::random_range(0..5)) {
            (OutageFaults::Slow, _) | (_, 0) => Fault::Delay(past_timeout),
            (_, 1) => Fault::Status500,
            (_, 2) => Fault::TooManyRequests { retry_after_s: 0 },
            (_, 3) => Fault::TooManyRequests { retry_after_s: 1 },
            _ => Fault::CloseConnection,
        };
        sim.inject(SimRoute::Get, get_fault, u32::MAX);
        match rand::random_range(0..4) {
            0 => sim.inject(SimRoute::Put, Fault::Status500, u32::MAX),
            1 => sim.inject(SimRoute::Put, Fault::Delay(past_timeout), u32::MAX),
            _ => {}
        }
        let left = until.saturating_duration_since(Instant::now());
        tokio::time::sleep(between(1000, 2500).min(left)).await;
        sim.clear_faults();
    }
}

/// The four statuses a randomized history writes.
pub const STATUSES: [&str; 4] = ["NO_CONSENT", "CONSENTED", "DELETED", "REFUSED"];

/// One client of a randomized history: until `until`, one operation after another on a random
/// contact (of `contacts`) through a random instance (of `instances`), a PUT of a random status
/// with probability `put_share`, else a GET, with a pause of `pause_ms` (random in the range;
/// none when empty) after each.
pub struct RandomClient {
    pub until: Instant,
    pub contacts: usize,
    pub instances: usize,
    pub put_share: f64,
    pub pause_ms: std::ops::Range<u64>,
}

impl RandomClient {
    /// Runs the client, each GET by `get(instance, contact)` and each PUT by
    /// `put(instance, contact, status)`; returns what it saw.
    pub async fn run<G, GF, P, PF>(self, get: G, put: P) -> Vec<Event>
    where
        G: Fn(usize, usize) -> GF,
        GF: Future<Output = TestResponse>,
        P: Fn(usize, usize, &'static str) -> PF,
        PF: Future<Output = TestResponse>,
    {
        let RandomClient {
            until,
            contacts,
            instances,
            put_share,
            pause_ms,
        } = self;
        let mut events = Vec::new();
        while Instant::now() < until {
            let contact = rand::random_range(0..contacts);
            let via = rand::random_range(0..instances);
            let start = Instant::now();
            let op = if rand::random_bool(put_share) {
                let status = STATUSES[rand::random_range(0..STATUSES.len())];
                Op::put(status, &put(via, contact, status).await)
            } else {
                Op::get(&get(via, contact).await)
            };
            events.push(Event {
                contact,
                via,
                start,
                end: Instant::now(),
                op,
            });
            if !pause_ms.is_empty() {
                let pause = rand::random_range(pause_ms.clone());
                tokio::time::sleep(Duration::from_millis(pause)).await;
            }
        }
        events
    }
}

/// How many GETs a history holds.
pub fn gets(history: &[Event]) -> usize {
    history
        .iter()
        .filter(|e| matches!(e.op, Op::Get { .. }))
        .count()
}
