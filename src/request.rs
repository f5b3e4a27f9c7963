//! One request as it travels from its handler through the service to the consent API: its
//! id, its deadline, who asked, and where its upstream attempts are reported. The handler
//! builds one per request and lends it to each layer (as pingora lends its `ProxyHttp::CTX`
//! to each filter); the access log reads it when the request ends.

use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use http::{HeaderValue, StatusCode};
use tokio::time::Instant;

use crate::auth::Caller;
use crate::otel::Span;

/// The per-request context.
pub struct RequestContext {
    /// The `x-request-id` the answer carries and upstream requests repeat.
    pub id: HeaderValue,
    pub started: Instant,
    /// When the caller gets `504 upstream_timeout`, whatever is still under way.
    pub deadline: Instant,
    /// Who asked, once authenticated.
    pub caller: Option<Caller>,
    /// The span the work at hand belongs to: the request's server span, or in a task it
    /// handed over to, a handle on it (or on a span of that task, e.g. the fill). Spans of
    /// deeper steps (upstream attempts) are its children. Nothing when tracing is off.
    pub trace: Span,
    /// Made on the first upstream attempt or the first hand-over to another task: a hit
    /// allocates nothing.
    upstream: OnceLock<LastAttempt>,
}

impl RequestContext {
    pub fn new(id: HeaderValue, started: Instant, deadline: Instant) -> Self {
        RequestContext {
            id,
            started,
            deadline,
            caller: None,
            trace: Span::none(),
            upstream: OnceLock::new(),
        }
    }

    /// This request's context for a task that may outlive it (a fill it leads, its write):
    /// the attempts that task makes are this request's, in its access-log line.
    pub fn hand_over(&self) -> RequestContext {
        RequestContext {
            id: self.id.clone(),
            started: self.started,
            deadline: self.deadline,
            caller: self.caller,
            trace: self.trace.handle(),
            upstream: OnceLock::from(self.last_attempt_slot().clone()),
        }
    }

    /// A context for work this request starts on behalf of the cache (a refresh-ahead): the
    /// same id and deadline, but neither the caller's nor in this request's log line.
    pub fn detached(&self) -> RequestContext {
        RequestContext {
            trace: self.trace.handle(),
            ..RequestContext::new(self.id.clone(), self.started, self.deadline)
        }
    }

    /// Records an upstream attempt that ended.
    pub fn report_attempt(&self, report: AttemptReport) {
        self.last_attempt_slot().set(report);
    }

    /// The last upstream attempt that ended, if any did (also one made by a task this request
    /// handed over to, when the deadline cut the request short).
    pub fn last_attempt(&self) -> Option<AttemptReport> {
        self.upstream.get().and_then(LastAttempt::get)
    }

    fn last_attempt_slot(&self) -> &LastAttempt {
        self.upstream.get_or_init(LastAttempt::default)
    }
}

/// How one upstream attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptOutcome {
    /// Upstream answered with this status.
    Answered(StatusCode),
    /// The attempt's time ran out.
    Timeout,
    /// No usable answer: connect error, broken exchange, answer too large.
    Error,
}

impl AttemptOutcome {
    /// The status (`"200"`), `"timeout"` or `"error"`, as in the upstream metrics' `code`.
    pub fn as_str(&self) -> &str {
        match self {
            AttemptOutcome::Answered(status) => status.as_str(),
            AttemptOutcome::Timeout => "timeout",
            AttemptOutcome::Error => "error",
        }
    }
}

/// One upstream attempt, as the access log reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttemptReport {
    pub outcome: AttemptOutcome,
    pub duration: Duration,
}

/// Where a call reports each attempt as it ends, shared by the request and the tasks it hands
/// over to, so that the request can log the last one even when the call outlives it.
#[derive(Debug, Clone, Default)]
struct LastAttempt(Arc<Mutex<Option<AttemptReport>>>);

impl LastAttempt {
    fn get(&self) -> Option<AttemptReport> {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn set(&self, report: AttemptReport) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = Some(report);
    }
}
