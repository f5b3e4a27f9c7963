//! Spans: a [`Span`] records while it lives and is handed to the exporter when dropped. A
//! span that is not sampled records nothing and allocates nothing; it still carries the trace
//! context to propagate (W3C `traceparent`/`tracestate`).

use std::borrow::Cow;
use std::cell::RefCell;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use http::{HeaderMap, HeaderName, HeaderValue};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use super::data::{AttributeValue, FinishedSpan, SpanKind};
use super::export::Exporter;

/// The W3C trace-context headers (as `HeaderName`s: looked up by a `&str`, a name is parsed
/// on every request).
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");
/// The longest `tracestate` kept (W3C: 512 characters is what a vendor must propagate).
const MAX_TRACESTATE: usize = 512;

/// Where a span sits in its trace, as `traceparent` carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpanContext {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub sampled: bool,
    pub trace_state: Option<Arc<str>>,
}

impl SpanContext {
    /// The caller's context from `traceparent` (and `tracestate`), when valid (W3C Trace
    /// Context level 1: a version other than `ff`, ids not all zero, lowercase hex; a
    /// future version may append fields after a `-`).
    pub fn from_headers(headers: &HeaderMap) -> Option<SpanContext> {
        let value = headers.get(TRACEPARENT)?.to_str().ok()?;
        let (trace_id, span_id, sampled) = parse_traceparent(value)?;
        let trace_state = headers
            .get(TRACESTATE)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|s| !s.is_empty() && s.len() <= MAX_TRACESTATE)
            .map(Arc::from);
        Some(SpanContext {
            trace_id,
            span_id,
            sampled,
            trace_state,
        })
    }

    /// `00-<trace id>-<span id>-<flags>`.
    pub fn traceparent(&self) -> HeaderValue {
        let mut text = String::with_capacity(55);
        text.push_str("00-");
        text.push_str(&hex::encode(self.trace_id));
        text.push('-');
        text.push_str(&hex::encode(self.span_id));
        text.push_str(if self.sampled { "-01" } else { "-00" });
        // Only hex digits and dashes: always a valid header value.
        HeaderValue::from_str(&text).unwrap_or_else(|_| HeaderValue::from_static(""))
    }

    /// The caller's `tracestate`, passed on as it came.
    pub fn tracestate(&self) -> Option<HeaderValue> {
        self.trace_state
            .as_deref()
            .and_then(|s| HeaderValue::from_str(s).ok())
    }
}

fn parse_traceparent(value: &str) -> Option<([u8; 16], [u8; 8], bool)> {
    let mut fields = value.trim().split('-');
    let version = fields.next()?;
    let (trace_id, span_id, flags) = (fields.next()?, fields.next()?, fields.next()?);
    let lower_hex = |s: &str| s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    if version.len() != 2 || !lower_hex(version) || version == "ff" {
        return None;
    }
    // Version 00 has exactly four fields; a later version may have more.
    if version == "00" && fields.next().is_some() {
        return None;
    }
    if trace_id.len() != 32 || span_id.len() != 16 || flags.len() != 2 {
        return None;
    }
    if !lower_hex(trace_id) || !lower_hex(span_id) || !lower_hex(flags) {
        return None;
    }
    let mut trace = [0u8; 16];
    let mut span = [0u8; 8];
    hex::decode_to_slice(trace_id, &mut trace).ok()?;
    hex::decode_to_slice(span_id, &mut span).ok()?;
    let flags = u8::from_str_radix(flags, 16).ok()?;
    if trace == [0; 16] || span == [0; 8] {
        return None;
    }
    Some((trace, span, flags & 1 == 1))
}

thread_local! {
    /// Where ids and sampling draws come from: a small fast generator per thread (xoshiro),
    /// seeded from `rand::rng()` (ChaCha, seeded by the OS). Ids must not collide, they need
    /// not be secret (they travel in headers); `opentelemetry_sdk` draws its ids the same way.
    /// Every request starting a trace pays for it, recorded or not: `rand::random()` (ChaCha,
    /// through a reference-counted handle) took about 620 instructions per request, this
    /// about 200 with the span built (benches/hit_instructions.py, PROFILE=1).
    static RNG: RefCell<SmallRng> = RefCell::new(SmallRng::from_rng(&mut rand::rng()));
}

fn draw<T>(f: impl FnOnce(&mut SmallRng) -> T) -> T {
    RNG.with(|rng| f(&mut rng.borrow_mut()))
}

/// True with probability `ratio` (0 to 1).
pub(super) fn sampled_at(ratio: f64) -> bool {
    ratio >= 1.0 || (ratio > 0.0 && draw(|rng| rng.random::<f64>()) < ratio)
}

/// A trace id: random, never all zeros (W3C: invalid).
pub(super) fn new_trace_id() -> [u8; 16] {
    loop {
        let id = draw(|rng| rng.random::<u128>());
        if id != 0 {
            return id.to_be_bytes();
        }
    }
}

/// A span id: random, never all zeros (W3C: invalid).
pub(super) fn new_span_id() -> [u8; 8] {
    loop {
        let id = draw(|rng| rng.random::<u64>());
        if id != 0 {
            return id.to_be_bytes();
        }
    }
}

pub(super) fn unix_nanos(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// A span in progress, or none at all (tracing off, or the trace not sampled). Dropping it
/// ends it and hands it to the exporter, off the request path (a bounded queue).
#[derive(Default)]
pub struct Span {
    /// What is propagated (`None`: tracing is off).
    context: Option<SpanContext>,
    /// Where sampled spans go: set only when the trace is sampled.
    exporter: Option<Arc<Exporter>>,
    /// `Some` only for a span that records (sampled): [`Span::handle`]s do not.
    recording: Option<Box<FinishedSpan>>,
}

impl Span {
    /// No span: tracing is off.
    pub fn none() -> Span {
        Span::default()
    }

    pub(super) fn start(
        exporter: Option<Arc<Exporter>>,
        context: SpanContext,
        parent_span_id: Option<[u8; 8]>,
        name: impl Into<Cow<'static, str>>,
        kind: SpanKind,
    ) -> Span {
        let recording = exporter.as_ref().map(|_| {
            Box::new(FinishedSpan {
                trace_id: context.trace_id,
                span_id: context.span_id,
                parent_span_id,
                trace_state: context.trace_state.clone(),
                name: name.into(),
                kind,
                start_unix_nanos: unix_nanos(SystemTime::now()),
                end_unix_nanos: 0,
                attributes: Vec::new(),
                error: None,
            })
        });
        Span {
            context: Some(context),
            exporter,
            recording,
        }
    }

    /// A child of this span (of nothing when tracing is off): same trace, a new span id when
    /// sampled; unsampled, it carries this span's context unchanged.
    pub fn child(&self, name: impl Into<Cow<'static, str>>, kind: SpanKind) -> Span {
        match (&self.context, &self.exporter) {
            (Some(parent), Some(exporter)) => Span::start(
                Some(exporter.clone()),
                SpanContext {
                    span_id: new_span_id(),
                    ..parent.clone()
                },
                Some(parent.span_id),
                name,
                kind,
            ),
            (context, _) => Span {
                context: context.clone(),
                exporter: None,
                recording: None,
            },
        }
    }

    /// A parent for work done elsewhere (another task): the same context, recording nothing
    /// itself.
    pub fn handle(&self) -> Span {
        Span {
            context: self.context.clone(),
            exporter: self.exporter.clone(),
            recording: None,
        }
    }

    /// Whether attributes set on it are kept (worth computing).
    pub fn is_recording(&self) -> bool {
        self.recording.is_some()
    }

    /// Names the span once what it is became known (a server span, after routing).
    pub fn rename(&mut self, name: &'static str) {
        if let Some(recording) = &mut self.recording {
            recording.name = Cow::Borrowed(name);
        }
    }

    pub fn set(&mut self, key: &'static str, value: impl Into<AttributeValue>) {
        if let Some(recording) = &mut self.recording {
            recording.attributes.push((key, value.into()));
        }
    }

    /// Marks the span failed (status ERROR) with `message`, which must hold no secret and no
    /// contact id.
    pub fn fail(&mut self, message: impl Into<String>) {
        if let Some(recording) = &mut self.recording {
            recording.error = Some(message.into());
        }
    }

    /// Adds `traceparent` (and the caller's `tracestate`) naming this span as the parent.
    pub fn inject(&self, headers: &mut HeaderMap) {
        if let Some(context) = &self.context {
            headers.insert(TRACEPARENT, context.traceparent());
            if let Some(state) = context.tracestate() {
                headers.insert(TRACESTATE, state);
            }
        }
    }

    pub fn context(&self) -> Option<&SpanContext> {
        self.context.as_ref()
    }
}

impl Drop for Span {
    fn drop(&mut self) {
        if let (Some(mut span), Some(exporter)) = (self.recording.take(), &self.exporter) {
            span.end_unix_nanos = unix_nanos(SystemTime::now());
            exporter.enqueue(*span);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(traceparent: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(TRACEPARENT, HeaderValue::from_str(traceparent).unwrap());
        headers
    }

    #[test]
    fn a_valid_traceparent_is_read_and_written_back_alike() {
        let value = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let context = SpanContext::from_headers(&headers(value)).unwrap();
        assert!(context.sampled);
        assert_eq!(context.traceparent(), value);
        let unsampled = SpanContext::from_headers(&headers(&value.replace("-01", "-00")));
        assert!(!unsampled.unwrap().sampled);
        // A later version with more fields is read for what version 00 defines.
        assert!(SpanContext::from_headers(&headers(&format!("cc{}-extra", &value[2..]))).is_some());
    }

    #[test]
    fn an_invalid_traceparent_is_ignored() {
        for bad in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "garbage",
        ] {
            assert_eq!(SpanContext::from_headers(&headers(bad)), None, "{bad}");
        }
    }

    #[test]
    fn an_unsampled_span_passes_its_context_on_unchanged_and_records_nothing() {
        let context = SpanContext {
            trace_id: [7; 16],
            span_id: [9; 8],
            sampled: false,
            trace_state: None,
        };
        let parent = Span::start(None, context.clone(), None, "server", SpanKind::Server);
        let mut child = parent.child("GET", SpanKind::Client);
        child.set("http.request.method", "GET");
        assert!(!child.is_recording());
        assert_eq!(child.context(), Some(&context));
        assert!(Span::none()
            .child("x", SpanKind::Internal)
            .context()
            .is_none());
    }
}
