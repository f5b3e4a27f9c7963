//! The exporter: spans go into a bounded queue as they end (never waiting: a full queue drops
//! the span and counts it) and one background task sends them in batches, as OTLP/HTTP
//! protobuf, to `{otel.endpoint}/v1/traces`. A dead or slow collector costs the proxy a
//! counter and the spans of the batches it failed, nothing on the request path.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, StatusCode};
use http_body_util::Full;
use prometheus::{IntCounter, Registry};
use tokio::sync::{mpsc, watch};

use super::data::FinishedSpan;
use super::proto;
use crate::metrics;

/// Spans waiting for export at most; past it, new ones are dropped (counted).
pub const QUEUE_CAPACITY: usize = 4096;
/// Spans per export request at most.
const MAX_BATCH: usize = 512;
/// How long a span may wait for others before its batch is sent.
const BATCH_DELAY: Duration = Duration::from_millis(500);
/// One export request's time limit.
pub const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// Sends one export request and says how the collector answered, or why it could not.
pub type Post = Arc<
    dyn Fn(Request<Full<Bytes>>) -> Pin<Box<dyn Future<Output = Result<StatusCode, String>> + Send>>
        + Send
        + Sync,
>;

#[derive(Clone)]
struct ExportMetrics {
    failures: IntCounter,
    dropped: IntCounter,
    exported: IntCounter,
}

impl ExportMetrics {
    fn register(registry: &Registry) -> Self {
        ExportMetrics {
            failures: metrics::counter(
                registry,
                "consent_proxy_otel_export_failures_total",
                "OTLP export requests that failed (collector unreachable, too slow, or not 2xx); \
                 their spans are lost.",
            ),
            dropped: metrics::counter(
                registry,
                "consent_proxy_otel_spans_dropped_total",
                "Spans lost: the export queue was full, or their export request failed.",
            ),
            exported: metrics::counter(
                registry,
                "consent_proxy_otel_spans_exported_total",
                "Spans the collector accepted.",
            ),
        }
    }
}

/// The sending end, shared by every sampled span.
pub struct Exporter {
    queue: mpsc::Sender<FinishedSpan>,
    metrics: ExportMetrics,
}

impl Exporter {
    pub(super) fn enqueue(&self, span: FinishedSpan) {
        if self.queue.try_send(span).is_err() {
            self.metrics.dropped.inc();
        }
    }
}

/// Starts the export task; it sends what is queued when `stop` turns true, then ends.
pub(super) fn start(
    endpoint: &str,
    service_name: String,
    post: Post,
    registry: &Registry,
    stop: watch::Receiver<bool>,
) -> (Arc<Exporter>, tokio::task::JoinHandle<()>) {
    let metrics = ExportMetrics::register(registry);
    let (queue, spans) = mpsc::channel(QUEUE_CAPACITY);
    let task = Batches {
        url: format!("{endpoint}/v1/traces"),
        service_name,
        post,
        metrics: metrics.clone(),
    };
    let handle = tokio::spawn(task.run(spans, stop));
    (Arc::new(Exporter { queue, metrics }), handle)
}

struct Batches {
    url: String,
    service_name: String,
    post: Post,
    metrics: ExportMetrics,
}

impl Batches {
    async fn run(self, mut spans: mpsc::Receiver<FinishedSpan>, mut stop: watch::Receiver<bool>) {
        let mut batch = Vec::with_capacity(MAX_BATCH);
        loop {
            // Wait for a first span (or the stop), then gather more for up to BATCH_DELAY.
            let stopping = tokio::select! {
                received = spans.recv() => match received {
                    Some(span) => { batch.push(span); false }
                    None => true,
                },
                _ = stop.wait_for(|stop| *stop) => true,
            };
            if !stopping {
                let gather = tokio::time::sleep(BATCH_DELAY);
                tokio::pin!(gather);
                while batch.len() < MAX_BATCH {
                    tokio::select! {
                        received = spans.recv() => match received {
                            Some(span) => batch.push(span),
                            None => break,
                        },
                        _ = &mut gather => break,
                    }
                }
                self.send(&mut batch).await;
                continue;
            }
            // Stopping: what is queued goes out, in batches, then the task ends.
            while let Ok(span) = spans.try_recv() {
                batch.push(span);
                if batch.len() == MAX_BATCH {
                    self.send(&mut batch).await;
                }
            }
            self.send(&mut batch).await;
            return;
        }
    }

    async fn send(&self, batch: &mut Vec<FinishedSpan>) {
        if batch.is_empty() {
            return;
        }
        let body = proto::export_request(&self.service_name, batch);
        let count = batch.len() as u64;
        batch.clear();
        let request = Request::builder()
            .method(Method::POST)
            .uri(&self.url)
            .header(header::CONTENT_TYPE, "application/x-protobuf")
            .body(Full::new(Bytes::from(body)));
        let outcome = match request {
            Ok(request) => (self.post)(request).await,
            Err(e) => Err(e.to_string()),
        };
        match outcome {
            Ok(status) if status.is_success() => self.metrics.exported.inc_by(count),
            failed => {
                self.metrics.failures.inc();
                self.metrics.dropped.inc_by(count);
                let problem = match failed {
                    Ok(status) => format!("the collector answered {}", status.as_u16()),
                    Err(error) => error,
                };
                tracing::debug!(url = %self.url, spans = count, problem, "OTLP export failed");
            }
        }
    }
}
