//! Recorded histories of consent reads and writes, and the read-your-writes checks over them:
//! rule 2 through one instance, rule 5 across the instances of a cluster.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use consent_proxy::simulator::{Fault, SimRoute, Simulator};
use tokio::time::Instant;

use super::TestResponse;

#[derive(Debug, Clone)]
pub enum Op {
    Get { result: Option<String> },
    Put { status: String, acked: bool },
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
        let Op::Get { result: Some(seen) } = &get.op else {
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

impl Op {
    /// A PUT of `status` and the proxy's answer: acknowledged when the answer is a 2xx.
    pub fn put(status: &str, response: &TestResponse) -> Op {
        Op::Put {
            status: status.to_owned(),
            acked: (200..300).contains(&response.status),
        }
    }

    /// A GET and the proxy's answer: a status seen when the answer is a 200.
    pub fn get(response: &TestResponse) -> Op {
        Op::Get {
            result: (response.status == 200).then(|| response.status_field()),
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

/// The four statuses a randomized history writes.
pub const STATUSES: [&str; 4] = ["NO_CONSENT", "CONSENTED", "DELETED", "REFUSED"];

/// One client of a randomized history: until `until`, one operation after another on a random
/// contact (of `contacts`) through a random instance (of `instances`), a PUT of a random status
/// with probability `put_share`, else a GET, with a pause of `pause_ms` (random in the range;
/// none when empty) after each; returns what it saw.
pub async fn random_client<G, GF, P, PF>(
    until: Instant,
    contacts: usize,
    instances: usize,
    put_share: f64,
    pause_ms: std::ops::Range<u64>,
    get: G,
    put: P,
) -> Vec<Event>
where
    G: Fn(usize, usize) -> GF,
    GF: Future<Output = TestResponse>,
    P: Fn(usize, usize, &'static str) -> PF,
    PF: Future<Output = TestResponse>,
{
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

/// How many GETs a history holds.
pub fn gets(history: &[Event]) -> usize {
    history
        .iter()
        .filter(|e| matches!(e.op, Op::Get { .. }))
        .count()
}
