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
    fn root(&self, name: &'static str, kind: SpanKind) -> Span {
        let sampled = self.sample_ratio >= 1.0
            || (self.sample_ratio > 0.0 && rand::random::<f64>() < self.sample_ratio);
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
