//! OpenTelemetry traces (`[otel]`, off unless `otel.endpoint` is set): W3C trace context in
//! (`traceparent`/`tracestate` from the caller) and out (on each upstream attempt), spans
//! recorded along a request's path, exported over OTLP/HTTP protobuf by a background task.
//!
//! Hand-written rather than the `opentelemetry` crates: the proxy needs a handful of span
//! kinds, one propagator and one exporter; the crates' SDK, OTLP exporter and protobuf types
//! (prost, and tonic's with them) would add more to a 2-core build than the proxy itself, for
//! what fits in `proto` (the few OTLP messages, encoded by hand), `data` (a finished span) and
//! `span`. `export` batches
//! and sends; `Tracer` decides what is sampled. Knows nothing of the product: callers name
//! their spans and attributes (OpenTelemetry's HTTP semantic conventions, the route template,
//! never a contact id or a secret).

mod data;
mod export;
mod proto;
mod span;

use std::sync::Arc;

use http::HeaderMap;
use prometheus::Registry;
use tokio::sync::watch;

pub use data::{AttributeValue, SpanKind};
pub use export::{Post, EXPORT_TIMEOUT};
pub use span::{Span, SpanContext, TRACEPARENT, TRACESTATE};

/// Where spans start: off (no spans, nothing propagated), or exporting with a sample ratio.
#[derive(Clone, Default)]
pub struct Tracer {
    inner: Option<Arc<Inner>>,
}

struct Inner {
    exporter: Arc<export::Exporter>,
    sample_ratio: f64,
}

impl Tracer {
    pub fn off() -> Tracer {
        Tracer::default()
    }

    /// Starts the exporter task (it flushes and ends when `stop` turns true).
    pub fn start(
        endpoint: &str,
        service_name: String,
        sample_ratio: f64,
        post: Post,
        registry: &Registry,
        stop: watch::Receiver<bool>,
    ) -> (Tracer, tokio::task::JoinHandle<()>) {
        let (exporter, task) = export::start(endpoint, service_name, post, registry, stop);
        let tracer = Tracer {
            inner: Some(Arc::new(Inner {
                exporter,
                sample_ratio,
            })),
        };
        (tracer, task)
    }

    /// The server span of a request: a child of the caller's `traceparent` (sampled as the
    /// caller decided), else the root of a new trace sampled at `sample_ratio`.
    pub fn server_span(&self, headers: &HeaderMap, name: &'static str) -> Span {
        let Some(inner) = &self.inner else {
            return Span::none();
        };
        match SpanContext::from_headers(headers) {
            Some(parent) => {
                let exporter = parent.sampled.then(|| inner.exporter.clone());
                let parent_span_id = parent.span_id;
                let context = SpanContext {
                    span_id: span::new_span_id(),
                    ..parent
                };
                Span::start(
                    exporter,
                    context,
                    Some(parent_span_id),
                    name,
                    SpanKind::Server,
                )
            }
            None => inner.root(name, SpanKind::Server),
        }
    }

    /// The root of a new trace for work no request asked for (a token renewal).
    pub fn root_span(&self, name: &'static str, kind: SpanKind) -> Span {
        match &self.inner {
            Some(inner) => inner.root(name, kind),
            None => Span::none(),
        }
    }
}

impl Inner {
    /// The root of a new trace, recorded at `sample_ratio`.
    ///
    /// An unrecorded root still gets ids, and its `traceparent` goes upstream with the sampled
    /// flag 0. Nothing in W3C Trace Context obliges a component to start a trace it does not
    /// record (it could send nothing), but it asks that a component's "definitive recording
    /// decision ... SHOULD be reflected in the `sampled` flag": Talkdesk's side, if it traces
    /// with a parent-based sampler, then records nothing of a trace not recorded here, where
    /// without a `traceparent` it would start one of its own, half a trace seen from here. The
    /// ids are what an unrecorded request pays for that: with the thread's small generator
    /// (`span::draw`) about 200 instructions, the span included, of a hit's 26,000; drawing
    /// them lazily, at the first upstream attempt (a hit makes none), would save part of that
    /// and need the id shared with the tasks a request hands work to. A caller's
    /// `traceparent`, sampled or not, is always passed on with a parent id of this proxy's
    /// ([`Tracer::server_span`]).
    fn root(&self, name: &'static str, kind: SpanKind) -> Span {
        let sampled = span::sampled_at(self.sample_ratio);
        let context = SpanContext {
            trace_id: span::new_trace_id(),
            span_id: span::new_span_id(),
            sampled,
            trace_state: None,
        };
        let exporter = sampled.then(|| self.exporter.clone());
        Span::start(exporter, context, None, name, kind)
    }
}

#[cfg(test)]
mod tests {
    use http::{HeaderValue, StatusCode};

    use super::*;

    /// A tracer at `ratio` whose exports go nowhere.
    fn tracer(ratio: f64) -> Tracer {
        let post: Post = Arc::new(|_| Box::pin(async { Ok(StatusCode::OK) }));
        let (_stop, stopped) = watch::channel(false);
        let registry = Registry::new();
        Tracer::start(
            "http://127.0.0.1:9",
            "test".into(),
            ratio,
            post,
            &registry,
            stopped,
        )
        .0
    }

    fn traceparent_sent(span: &Span) -> String {
        let mut headers = HeaderMap::new();
        span.inject(&mut headers);
        headers[TRACEPARENT].to_str().unwrap().to_owned()
    }

    #[tokio::test]
    async fn an_unrecorded_trace_started_here_is_propagated_as_unsampled() {
        let tracer = tracer(0.0);
        let first = tracer.server_span(&HeaderMap::new(), "HTTP");
        let second = tracer.server_span(&HeaderMap::new(), "HTTP");
        assert!(!first.is_recording());
        let sent = traceparent_sent(&first);
        assert!(sent.starts_with("00-") && sent.ends_with("-00"), "{sent}");
        let context = first.context().unwrap();
        assert_ne!(context.trace_id, [0; 16]);
        assert_ne!(context.span_id, [0; 8]);
        assert_ne!(context.trace_id, second.context().unwrap().trace_id);
        // Its children (an upstream attempt) pass the same context on.
        let attempt = first.child("GET", SpanKind::Client);
        assert_eq!(traceparent_sent(&attempt), sent);
    }

    #[tokio::test]
    async fn a_callers_traceparent_is_passed_on_with_a_new_parent_id_and_its_decision() {
        let tracer = tracer(0.0);
        for (flags, sampled) in [("01", true), ("00", false)] {
            let caller = format!("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-{flags}");
            let mut headers = HeaderMap::new();
            headers.insert(TRACEPARENT, HeaderValue::from_str(&caller).unwrap());
            let server = tracer.server_span(&headers, "HTTP");
            assert_eq!(server.is_recording(), sampled, "{caller}");
            let sent = traceparent_sent(&server.child("GET", SpanKind::Client));
            assert!(
                sent.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
                "{sent}"
            );
            assert!(sent.ends_with(&format!("-{flags}")), "{sent}");
            assert!(
                !sent.contains("00f067aa0ba902b7"),
                "a parent id of its own: {sent}"
            );
        }
    }
}
