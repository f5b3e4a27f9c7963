//! The consent-API client: builds the upstream request (never anything of the caller's but
//! the contact, the body and the request id), injects the shared token, retries what is safe
//! to retry within the request's deadline, and renews the token once on a 401.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http::uri::{Authority, Parts, PathAndQuery, Scheme};
use http::{header, HeaderValue, Method, Request, StatusCode, Uri};
use http_body_util::Full;
use prometheus::{Histogram, HistogramVec, IntCounter, IntCounterVec, Registry};
use tokio::time::Instant;

use crate::config::TalkdeskSettings;
use crate::consent::{
    consent_status_of, consent_url, ConsentAnswer, ConsentStatus, ContactId, CONSENT_ROUTE,
};
use crate::error::{ErrorChain, Failure, ProxyError};
use crate::metrics::{self, status_label};
use crate::otel::{Span, SpanKind};
use crate::request::{AttemptOutcome, AttemptReport, RequestContext};
use crate::upstream::admission::{Admission, AdmissionMetrics, Verdict, MAX_HOLD_OFF};
use crate::upstream::backoff::Backoff;
use crate::upstream::token::TokenManager;
use crate::upstream::transport::{describe_server, Answer, AttemptError, Transport, USER_AGENT};
use crate::wire::body::APPLICATION_JSON;
use crate::wire::request_id::X_REQUEST_ID;

/// Retry back-off: the first delay, doubled each time, capped; jittered.
const RETRY_BACKOFF_FIRST: Duration = Duration::from_millis(50);
const RETRY_BACKOFF_LAST: Duration = Duration::from_secs(2);

#[derive(Clone)]
pub struct UpstreamMetrics {
    requests: IntCounterVec,
    duration: HistogramVec,
    hot: Arc<HotSeries>,
}

/// The upstream series of the common attempts (GET and PUT answered 200, 201 or 404), kept
/// once looked up: a label lookup hashes the labels and takes the family's lock on every
/// attempt, a kept series is one atomic load away. Each is looked up on first use, so
/// `/metrics` shows the same series as before.
#[derive(Default)]
struct HotSeries {
    /// By method (GET, PUT), then code (200, 201, 404).
    requests: [[OnceLock<IntCounter>; 3]; 2],
    /// By method (GET, PUT).
    duration: [OnceLock<Histogram>; 2],
}

impl UpstreamMetrics {
    fn count(&self, method: &Method, code: &str, elapsed: Duration) {
        let method_index = match *method {
            Method::GET => Some(0),
            Method::PUT => Some(1),
            _ => None,
        };
        let code_index = match code {
            "200" => Some(0),
            "201" => Some(1),
            "404" => Some(2),
            _ => None,
        };
        let requests = || self.requests.with_label_values(&[method.as_str(), code]);
        match (method_index, code_index) {
            (Some(m), Some(c)) => self.hot.requests[m][c].get_or_init(requests).inc(),
            _ => requests().inc(),
        }
        let duration = || self.duration.with_label_values(&[method.as_str()]);
        let seconds = elapsed.as_secs_f64();
        match method_index {
            Some(m) => self.hot.duration[m].get_or_init(duration).observe(seconds),
            None => duration().observe(seconds),
        }
    }
}

impl UpstreamMetrics {
    pub fn register(registry: &Registry) -> Self {
        UpstreamMetrics {
            requests: metrics::counter_vec(
                registry,
                "consent_proxy_upstream_requests_total",
                "Attempts sent to the consent API, by HTTP status or error/timeout.",
                &["method", "code"],
            ),
            duration: metrics::histogram_vec(
                registry,
                "consent_proxy_upstream_request_duration_seconds",
                "Time taken by each attempt sent to the consent API.",
                &["method"],
            ),
            hot: Arc::default(),
        }
    }
}

/// How a write ended.
#[derive(Debug, Clone)]
pub struct WriteResult {
    /// Upstream's answer to pass on (2xx: applied), or why there is none.
    pub answer: Result<ConsentAnswer, ProxyError>,
    /// Not answered 2xx, yet upstream may have applied it: an attempt timed out, broke after
    /// sending, or met a gateway's 502/504, whatever the attempts after it got.
    pub maybe_applied: bool,
}

/// How one call (all attempts) ended.
struct CallEnd {
    result: Result<ConsentAnswer, CallError>,
    /// The call retried after an attempt that may have been processed (a gateway's 502/504):
    /// however it then ended, a write may have been applied.
    an_attempt_may_have_applied: bool,
}

/// How one call (all attempts) failed.
enum CallError {
    /// Upstream may have processed the request: it timed out or broke after sending.
    Unknown(ProxyError),
    /// Upstream answered an error, or could not be reached: the call failed.
    NotApplied(ProxyError),
}

pub struct ConsentApi {
    transport: Transport,
    tokens: TokenManager,
    admission: Admission,
    /// `talkdesk.api_base_url` parsed once; `None` when it does not parse (each call then
    /// fails).
    uris: Option<ConsentUris>,
    attempt_timeout: Duration,
    max_retries: u32,
    max_response_bytes: usize,
    metrics: UpstreamMetrics,
}

impl ConsentApi {
    pub fn new(
        transport: Transport,
        tokens: TokenManager,
        talkdesk: &TalkdeskSettings,
        metrics: UpstreamMetrics,
        admission: AdmissionMetrics,
    ) -> Self {
        ConsentApi {
            transport,
            tokens,
            admission: Admission::new(talkdesk, admission),
            uris: ConsentUris::new(&talkdesk.api_base_url),
            attempt_timeout: talkdesk.timeout,
            max_retries: talkdesk.max_retries,
            max_response_bytes: talkdesk.max_response_bytes,
            metrics,
        }
    }

    /// Reads a contact's consent. `Ok` holds an answer to pass on (200 with a valid consent
    /// body, or an upstream 4xx); anything unusable is an error. Each attempt is reported to
    /// `request`.
    pub async fn get(
        &self,
        contact: &ContactId,
        request: &RequestContext,
    ) -> Result<ConsentAnswer, ProxyError> {
        // On the heap: a call's future is large, and held inline it would make every future
        // awaiting it as large (a read's, a hit's included, and a fill's task), copied each time
        // one moves or a task stores its output.
        let answer = Box::pin(self.call(Method::GET, contact, None, request))
            .await
            .result
            .map_err(|e| match e {
                CallError::Unknown(e) | CallError::NotApplied(e) => e,
            })?;
        if answer.status == StatusCode::OK && consent_status_of(&answer.body).is_none() {
            return Err(ProxyError::Upstream(
                "200 answer without a valid consent body".into(),
            ));
        }
        Ok(answer)
    }

    /// Writes a contact's consent. 2xx only when upstream answered 2xx. Each attempt is
    /// reported to `request`.
    pub async fn put(
        &self,
        contact: &ContactId,
        status: ConsentStatus,
        request: &RequestContext,
    ) -> WriteResult {
        let body = Bytes::from_static(status.canonical_body());
        // On the heap, as in `get`.
        let call = Box::pin(self.call(Method::PUT, contact, Some(body), request)).await;
        let (answer, unknown) = match call.result {
            Ok(answer) => (Ok(answer), false),
            Err(CallError::Unknown(error)) => (Err(error), true),
            Err(CallError::NotApplied(error)) => (Err(error), false),
        };
        let applied = answer.as_ref().is_ok_and(|a| a.status.is_success());
        WriteResult {
            answer,
            maybe_applied: !applied && (unknown || call.an_attempt_may_have_applied),
        }
    }

    /// All attempts of one call: retries on connect errors, 5xx and 429 (at most
    /// `max_retries`, within the deadline), plus one retry after a token renewal on 401. Each
    /// attempt needs admission first (Retry-After, circuit breaker, budgets), and a 429 or 503
    /// with `Retry-After` holds off every caller's attempts, this one's retries included.
    async fn call(
        &self,
        method: Method,
        contact: &ContactId,
        body: Option<Bytes>,
        context: &RequestContext,
    ) -> CallEnd {
        let deadline = context.deadline;
        let uri = match self.uris.as_ref().and_then(|uris| uris.of(contact)) {
            Some(uri) => uri,
            None => {
                return CallEnd {
                    result: Err(CallError::NotApplied(ProxyError::Internal(
                        "upstream request could not be built".into(),
                    ))),
                    an_attempt_may_have_applied: false,
                }
            }
        };
        let mut retries_left = self.max_retries;
        let mut renewed_after_401 = false;
        let mut an_attempt_may_have_applied = false;
        let mut backoff = Backoff::new(RETRY_BACKOFF_FIRST, RETRY_BACKOFF_LAST);
        let mut attempts: i64 = 0;
        let result = loop {
            let token = match self.tokens.current(deadline).await {
                Ok(token) => token,
                Err(error) => break Err(CallError::NotApplied(error)),
            };
            if Instant::now() >= deadline {
                break Err(CallError::NotApplied(ProxyError::UpstreamTimeout));
            }
            let permit = match self.admission.admit(deadline).await {
                Ok(permit) => permit,
                Err(error) => break Err(CallError::NotApplied(error)),
            };
            // Named after the method (HTTP client conventions); only GET and PUT go upstream.
            let name = if method == Method::PUT { "PUT" } else { "GET" };
            let mut span = context.trace.child(name, SpanKind::Client);
            if span.is_recording() {
                self.describe_attempt(&mut span, &method, &uri, attempts);
            }
            attempts += 1;
            let mut request =
                build_request(&method, uri.clone(), &token, &context.id, body.clone());
            span.inject(request.headers_mut());
            let started = Instant::now();
            let timeout = self
                .attempt_timeout
                .min(deadline.saturating_duration_since(started));
            let result = self
                .transport
                .attempt(request, timeout, self.max_response_bytes)
                .await;
            self.record(&method, &result, started, context);
            match &result {
                Ok(answer) => {
                    span.set(
                        "http.response.status_code",
                        i64::from(answer.status.as_u16()),
                    );
                    if answer.status.is_server_error() {
                        span.set("error.type", status_label(answer.status));
                        span.fail(format!("upstream answered {}", answer.status.as_u16()));
                    }
                }
                Err(error) => {
                    span.set("error.type", error.kind());
                    span.fail(error.to_string());
                }
            }
            drop(span);
            permit.finish(match &result {
                Ok(answer) if !answer.status.is_server_error() => Verdict::Answered,
                _ => Verdict::Failed,
            });
            if let Ok(answer) = &result {
                if matches!(
                    answer.status,
                    StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE
                ) {
                    if let Some(wait) = retry_after(answer) {
                        self.admission.hold_off(wait);
                    }
                }
            }

            // Decide between answering, retrying after a delay, or failing.
            let retry_delay = match result {
                Ok(answer) if answer.status == StatusCode::UNAUTHORIZED => {
                    if renewed_after_401 {
                        self.tokens.metrics().rejected_again().inc();
                        break Err(CallError::NotApplied(ProxyError::Upstream(
                            "upstream rejected a freshly renewed token".into(),
                        )));
                    }
                    renewed_after_401 = true;
                    self.tokens.reject(&token);
                    Duration::ZERO
                }
                Ok(answer) if is_retryable(answer.status) && retries_left > 0 => {
                    let backoff_delay = backoff.next_delay();
                    let delay = retry_after(&answer).unwrap_or(backoff_delay);
                    // Compared as durations: upstream's Retry-After may be any u64, and
                    // `Instant + Duration` panics on overflow.
                    if delay >= deadline.saturating_duration_since(Instant::now()) {
                        break finish(answer);
                    }
                    an_attempt_may_have_applied |= gateway_gave_up(answer.status);
                    retries_left -= 1;
                    delay
                }
                Ok(answer) => break finish(answer),
                Err(err @ AttemptError::Connect(_)) => {
                    let delay = backoff.next_delay();
                    if retries_left == 0 || Instant::now() + delay >= deadline {
                        break Err(CallError::NotApplied(ProxyError::Upstream(Failure::new(
                            "consent API unreachable",
                            err,
                        ))));
                    }
                    tracing::debug!(error = %ErrorChain(&err), "upstream connect failed; retrying");
                    retries_left -= 1;
                    delay
                }
                Err(AttemptError::Timeout) => {
                    break Err(CallError::Unknown(ProxyError::UpstreamTimeout));
                }
                Err(err @ (AttemptError::TooLarge(_) | AttemptError::Failed(_))) => {
                    break Err(CallError::Unknown(ProxyError::Upstream(Failure::new(
                        "consent API exchange failed",
                        err,
                    ))));
                }
            };
            // Every delay was checked against the deadline when chosen.
            if !retry_delay.is_zero() {
                tokio::time::sleep(retry_delay).await;
            }
        };
        CallEnd {
            result,
            an_attempt_may_have_applied,
        }
    }

    /// An upstream attempt's span in OpenTelemetry's HTTP client conventions: the method,
    /// Talkdesk's host and port, the path template (the real path holds the contact id), and
    /// which retry it is.
    fn describe_attempt(&self, span: &mut Span, method: &Method, uri: &Uri, retries_before: i64) {
        span.set(
            "http.request.method",
            if *method == Method::PUT { "PUT" } else { "GET" },
        );
        describe_server(span, uri);
        if let Some(uris) = &self.uris {
            let base_path = uris.base_path.trim_end_matches('/');
            span.set("url.template", format!("{base_path}{CONSENT_ROUTE}"));
        }
        if retries_before > 0 {
            span.set("http.request.resend_count", retries_before);
        }
    }

    fn record(
        &self,
        method: &Method,
        result: &Result<Answer, AttemptError>,
        started: Instant,
        context: &RequestContext,
    ) {
        let elapsed = started.elapsed();
        let (code, outcome) = match result {
            Ok(answer) => (
                status_label(answer.status),
                AttemptOutcome::Answered(answer.status),
            ),
            Err(AttemptError::Timeout) => ("timeout", AttemptOutcome::Timeout),
            Err(_) => ("error", AttemptOutcome::Error),
        };
        self.metrics.count(method, code, elapsed);
        context.report_attempt(AttemptReport {
            outcome,
            duration: elapsed,
        });
    }
}

/// Turns upstream's final answer into what the caller gets.
fn finish(answer: Answer) -> Result<ConsentAnswer, CallError> {
    let status = answer.status;
    if status == StatusCode::SERVICE_UNAVAILABLE {
        if let Some(wait) = retry_after(&answer) {
            // Upstream says when it will take traffic again: so does the caller's answer.
            return Err(CallError::NotApplied(ProxyError::UpstreamUnavailable {
                reason: "retry_after",
                retry_after: wait.min(MAX_HOLD_OFF),
            }));
        }
    }
    // Upstream answered, but nothing the proxy can pass on: the call failed.
    let reject = |why: String| Err(CallError::NotApplied(ProxyError::Upstream(why.into())));
    if status.is_success() || (status.is_client_error() && status != StatusCode::UNAUTHORIZED) {
        let mut headers = answer.headers;
        Ok(ConsentAnswer {
            status,
            body: answer.body,
            content_type: headers.remove(header::CONTENT_TYPE),
            retry_after: headers.remove(header::RETRY_AFTER),
        })
    } else if gateway_gave_up(status) {
        // A gateway in front of Talkdesk gave up: the request may have been applied behind it.
        Err(CallError::Unknown(ProxyError::Upstream(
            format!("upstream gateway answered {}", status.as_u16()).into(),
        )))
    } else if status.is_redirection() {
        reject(format!(
            "upstream answered a redirect ({})",
            status.as_u16()
        ))
    } else {
        // 5xx after the retries, or something stranger (1xx): the proxy cannot use it.
        reject(format!("upstream answered {}", status.as_u16()))
    }
}

/// Where consent requests go: `talkdesk.api_base_url`'s scheme and authority parsed once, so
/// that a call parses only its own path (the URI is what parsing the whole URL would give).
struct ConsentUris {
    scheme: Scheme,
    authority: Authority,
    /// The base URL's path as written (empty, or from its `/`): the consent path follows it.
    base_path: String,
}

impl ConsentUris {
    fn new(api_base_url: &str) -> Option<ConsentUris> {
        let base = api_base_url.parse::<Uri>().ok()?;
        let authority = base.authority()?.clone();
        let (_, after_scheme) = api_base_url.split_once("://")?;
        Some(ConsentUris {
            scheme: base.scheme()?.clone(),
            base_path: after_scheme.get(authority.as_str().len()..)?.to_owned(),
            authority,
        })
    }

    /// `contact`'s consent URI.
    fn of(&self, contact: &ContactId) -> Option<Uri> {
        let path = consent_url(&self.base_path, contact);
        let mut parts = Parts::default();
        parts.scheme = Some(self.scheme.clone());
        parts.authority = Some(self.authority.clone());
        parts.path_and_query = Some(PathAndQuery::from_maybe_shared(Bytes::from(path)).ok()?);
        Uri::from_parts(parts).ok()
    }
}

/// Headers an upstream request may carry: `build_request`'s five, the trace context's two and
/// the `Host` hyper-util adds; room for them at once, so the map never grows.
const UPSTREAM_HEADERS: usize = 8;

fn build_request(
    method: &Method,
    uri: Uri,
    token: &crate::upstream::token::AccessToken,
    request_id: &http::HeaderValue,
    body: Option<Bytes>,
) -> Request<Full<Bytes>> {
    let has_body = body.is_some();
    let mut request = Request::new(Full::new(body.unwrap_or_default()));
    *request.method_mut() = method.clone();
    *request.uri_mut() = uri;
    let headers = request.headers_mut();
    headers.reserve(UPSTREAM_HEADERS);
    headers.insert(header::AUTHORIZATION, token.authorization().clone());
    headers.insert(header::ACCEPT, APPLICATION_JSON);
    headers.insert(header::USER_AGENT, HeaderValue::from_static(USER_AGENT));
    headers.insert(X_REQUEST_ID, request_id.clone());
    if has_body {
        headers.insert(header::CONTENT_TYPE, APPLICATION_JSON);
    }
    request
}

/// A gateway in front of Talkdesk gave up (502/504): the request may have been applied behind it.
fn gateway_gave_up(status: StatusCode) -> bool {
    matches!(
        status,
        StatusCode::BAD_GATEWAY | StatusCode::GATEWAY_TIMEOUT
    )
}

fn is_retryable(status: StatusCode) -> bool {
    status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS
}

/// `Retry-After` in seconds (the HTTP-date form is not used by Talkdesk and is ignored).
fn retry_after(answer: &Answer) -> Option<Duration> {
    let seconds: u64 = answer
        .headers
        .get(header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(Duration::from_secs(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_consent_uri_is_the_whole_url_parsed() {
        let contact = ContactId::from_path_segment("%2B15551234567").expect("valid id");
        for base in [
            "https://api.talkdeskapp.com",
            "http://127.0.0.1:9000",
            "https://gateway.example:8443/talkdesk/v1",
            "https://gateway.example/talkdesk/",
            "HTTPS://API.TALKDESKAPP.COM",
            "http://[::1]:9000/api",
        ] {
            let whole = Uri::try_from(consent_url(base, &contact)).expect("valid URL");
            let uris = ConsentUris::new(base).expect("a base URL");
            assert_eq!(uris.of(&contact), Some(whole.clone()), "{base}");
            assert_eq!(
                uris.of(&contact).map(|u| u.to_string()),
                Some(whole.to_string())
            );
        }
    }
}
