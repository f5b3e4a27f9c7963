//! The consent listener's HTTP layer: matches the two consent routes, authenticates the
//! caller, validates the contact and body, calls the consent service, and turns the result
//! into the answer, with the request id, cache status, metrics and one access-log event. The
//! token endpoint (`POST /oauth/token`) is served here too: its request is read here, its
//! answer decided by [`TokenEndpoint`].

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use prometheus::{Histogram, IntCounter};
use tokio::time::Instant;

use crate::auth::{self, Authenticator, Permission};
use crate::cache::{CacheStatus, Settled};
use crate::consent::ConsentAnswer;
use crate::consent::{consent_path_segment, parse_consent_body, ContactId, CONSENT_ROUTE};
use crate::error::{ErrorChain, FieldProblem, ProxyError};
use crate::http::token_endpoint::{Refusal, TokenEndpoint};
use crate::metrics::status_label;
use crate::metrics::HttpMetrics;
use crate::otel::{Span, Tracer};
use crate::request::RequestContext;
use crate::service::{ConsentService, PendingRead, Read, WriteTask};
use crate::wire::body::{self, Body, ReadBodyError};
use crate::wire::forwarded::TrustedProxies;
use crate::wire::oauth::TOKEN_PATH;
use crate::wire::request_id::{request_id_of, X_REQUEST_ID};

const ALLOWED_METHODS: &str = "GET, PUT";
/// As a constant: inserting under a `&str` name that is not a standard header allocates a
/// copy of the name on every response.
const X_CACHE_STATUS: HeaderName = HeaderName::from_static("x-cache-status");
/// On a STALE answer (RFC 7234's warn-code 111: the cache could not revalidate it).
pub const STALE_WARNING: &str = r#"111 consent-proxy "Revalidation Failed""#;
/// On a `HIT` answered from the cluster's shared tier (Redis), not from this instance's cache.
const X_CACHE_TIER: HeaderName = HeaderName::from_static("x-cache-tier");

/// Limits the HTTP layer enforces itself, and whom it believes about callers' addresses.
#[derive(Debug, Clone)]
pub struct RouteLimits {
    pub max_body_bytes: usize,
    pub max_header_bytes: usize,
    pub request_timeout: Duration,
    /// `server.trusted_proxies`: the caller's address (throttles, access log) is the one they
    /// forward for.
    pub trusted_proxies: TrustedProxies,
}

/// The status a request is counted and logged with when its caller hung up before the answer
/// while its write was upstream (nginx's "client closed request"): the write is seen through
/// to its end, then recorded with this status and upstream's real outcome.
pub const CLIENT_CLOSED_REQUEST: StatusCode = match StatusCode::from_u16(499) {
    Ok(status) => status,
    Err(_) => panic!("499 is a valid status code"),
};

pub struct ConsentRoutes {
    service: ConsentService,
    auth: Arc<Authenticator>,
    recorder: Arc<Recorder>,
    limits: RouteLimits,
    /// `None` when `oauth.enabled = false`.
    token_endpoint: Option<TokenEndpoint>,
    tracer: Tracer,
}

/// A handled request's answer: ready at once when nothing had to be waited for, else to come
/// from a future on the heap ([`ConsentRoutes::handle`]).
pub enum Handled {
    Now(std::future::Ready<Response<Body>>),
    Later(Pin<Box<dyn Future<Output = Response<Body>> + Send>>),
}

impl Future for Handled {
    type Output = Response<Body>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Response<Body>> {
        match self.get_mut() {
            Handled::Now(ready) => Pin::new(ready).poll(cx),
            Handled::Later(later) => later.as_mut().poll(cx),
        }
    }
}

/// How far a request got without waiting.
enum Routed<B> {
    Answered(Response<Body>),
    Waits(Wait<B>),
}

/// What a request waits for.
enum Wait<B> {
    /// A GET the cache could not answer at once: a fill, or upstream.
    Read {
        contact: ContactId,
        pending: PendingRead,
    },
    /// A PUT: its body, then the write.
    Write {
        contact: ContactId,
        request: Request<B>,
    },
    /// `POST /oauth/token`: its body.
    TokenRequest(Request<B>),
}

/// The answers common enough to keep their `consent_proxy_requests_total` series at hand.
const HOT_ANSWERS: usize = 4;

/// The index of a consent-route answer among the hot ones.
fn hot_answer(method: &Method, status: StatusCode) -> Option<usize> {
    match (method, status) {
        (&Method::GET, StatusCode::OK) => Some(0),
        (&Method::GET, StatusCode::NOT_FOUND) => Some(1),
        (&Method::PUT, StatusCode::OK) => Some(2),
        (&Method::PUT, StatusCode::CREATED) => Some(3),
        _ => None,
    }
}

/// Metric series of the consent route kept once looked up: a label lookup hashes the label
/// values and takes the metric family's lock on every request, a kept series is one atomic
/// load away. Each is looked up on first use, so `/metrics` shows the same series as before.
struct HotSeries {
    /// `consent_proxy_requests_total{route="consent"}`, by client slot (the configured
    /// clients in order, then `anonymous`) and hot answer.
    requests: Box<[[OnceLock<IntCounter>; HOT_ANSWERS]]>,
    /// `consent_proxy_request_duration_seconds{route="consent"}` for GET, then PUT.
    duration: [OnceLock<Histogram>; 2],
}

impl HotSeries {
    fn new(clients: usize) -> Self {
        HotSeries {
            requests: (0..=clients)
                .map(|_| std::array::from_fn(|_| OnceLock::new()))
                .collect(),
            duration: std::array::from_fn(|_| OnceLock::new()),
        }
    }
}

/// Counts and logs answered requests: kept apart from [`ConsentRoutes`] so that a write whose
/// caller hung up can be recorded from its own task when it ends.
struct Recorder {
    auth: Arc<Authenticator>,
    metrics: HttpMetrics,
    hot: HotSeries,
}

/// What the access log and metrics need to know about a handled request, besides its
/// context (id, caller, last upstream attempt).
#[derive(Default)]
struct Outcome {
    route: &'static str,
    /// The caller's address (the peer's, or the one a trusted proxy forwarded for).
    address: Option<IpAddr>,
    /// The matched route's template, for traces (`http.route`).
    http_route: Option<&'static str>,
    contact: Option<ContactId>,
    cache_status: Option<CacheStatus>,
    error: Option<ProxyError>,
    /// Why the token endpoint granted no token.
    token_refusal: Option<Refusal>,
    /// A write sent on its way whose answer the request has not had yet.
    write: Option<WriteTask>,
    /// The caller hung up before its write's answer.
    hung_up: bool,
}

/// A request being handled, recorded once answered. Dropped unanswered (its caller hung up)
/// while its write is upstream, it leaves a task that records the write when it ends; any
/// other request dropped unanswered never reached upstream, or only through a fill that
/// outlives it and answers the requests that wait for it.
struct InFlight {
    recorder: Arc<Recorder>,
    method: Method,
    context: RequestContext,
    outcome: Outcome,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let Some(write) = self.outcome.write.take() else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let recorder = self.recorder.clone();
        let method = self.method.clone();
        // Shares the last-attempt slot the write reports to.
        let context = self.context.hand_over();
        let mut outcome = std::mem::take(&mut self.outcome);
        runtime.spawn(async move {
            outcome.error = write.await.err();
            outcome.hung_up = true;
            recorder.record(&method, CLIENT_CLOSED_REQUEST, &outcome, &context);
        });
    }
}

impl ConsentRoutes {
    pub fn new(
        service: ConsentService,
        auth: Arc<Authenticator>,
        metrics: HttpMetrics,
        limits: RouteLimits,
        token_endpoint: Option<TokenEndpoint>,
        tracer: Tracer,
    ) -> Self {
        // Every series shown from the start, so that a rate over them is defined at once.
        for reason in auth::FAILURE_REASONS {
            metrics
                .auth_failures
                .with_label_values(&["consent", reason]);
        }
        if token_endpoint.is_some() {
            for reason in Refusal::AUTH_FAILURE_REASONS {
                metrics.auth_failures.with_label_values(&["other", reason]);
            }
        }
        let recorder = Arc::new(Recorder {
            hot: HotSeries::new(auth.client_names().count()),
            auth: auth.clone(),
            metrics,
        });
        ConsentRoutes {
            service,
            auth,
            recorder,
            limits,
            token_endpoint,
            tracer,
        }
    }

    /// Handles one request from `peer`. Generic over the body so benchmarks can drive the
    /// handler in-process; the server passes hyper's `Incoming`.
    ///
    /// What needs no waiting (a cache hit, any refusal) is answered here, before the
    /// returned future is first polled: only a request that waits (a miss, a write, the token
    /// endpoint's body) gets an asynchronous state machine, on the heap, under the request
    /// deadline. A hit's future would otherwise be as large as a miss's and be moved
    /// (copied) several times on its way into hyper's connection task.
    pub fn handle<B>(self: &Arc<Self>, request: Request<B>, peer: SocketAddr) -> Handled
    where
        B: hyper::body::Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let started = Instant::now();
        let address = self
            .limits
            .trusted_proxies
            .client_address(peer.ip(), request.headers());
        let mut in_flight = InFlight {
            recorder: self.recorder.clone(),
            method: request.method().clone(),
            context: RequestContext::new(
                request_id_of(request.headers()),
                started,
                started + self.limits.request_timeout,
            ),
            outcome: Outcome {
                route: "other",
                address: Some(address),
                ..Outcome::default()
            },
        };
        // Named and described once the route is known (`describe_server_span`).
        in_flight.context.trace = self.tracer.server_span(request.headers(), "HTTP");
        let routed = self.route(
            request,
            address,
            &mut in_flight.context,
            &mut in_flight.outcome,
        );
        let wait = match routed {
            Ok(Routed::Waits(wait)) => wait,
            Ok(Routed::Answered(response)) => {
                return Handled::Now(std::future::ready(self.answer(in_flight, Ok(response))))
            }
            Err(error) => {
                return Handled::Now(std::future::ready(self.answer(in_flight, Err(error))))
            }
        };
        let routes = self.clone();
        Handled::Later(Box::pin(async move {
            let InFlight {
                context, outcome, ..
            } = &mut in_flight;
            let deadline = context.deadline;
            let waited = routes.wait(wait, address, context, outcome);
            let result = tokio::time::timeout_at(deadline, waited)
                .await
                .unwrap_or(Err(ProxyError::UpstreamTimeout));
            routes.answer(in_flight, result)
        }))
    }

    /// The answer to a handled request, counted, logged and with its request id.
    fn answer(
        &self,
        mut in_flight: InFlight,
        result: Result<Response<Body>, ProxyError>,
    ) -> Response<Body> {
        let InFlight {
            method,
            context,
            outcome,
            ..
        } = &mut in_flight;
        let mut response = match result {
            Ok(response) => response,
            Err(error) => error_response(outcome, error),
        };
        // Answered: a write still running (past the deadline) is not this request's to record.
        outcome.write = None;
        self.recorder
            .record(method, response.status(), outcome, context);
        if context.trace.is_recording() {
            describe_server_span(&mut context.trace, method, &response, outcome);
        }
        // Moved, not cloned: cloning a new id's bytes would allocate a shared copy.
        let id = std::mem::replace(&mut context.id, HeaderValue::from_static(""));
        response.headers_mut().insert(X_REQUEST_ID, id);
        response
    }

    /// What can be decided without waiting: the route, the caller, the contact, and a read's
    /// cache lookup.
    fn route<B>(
        &self,
        request: Request<B>,
        address: IpAddr,
        context: &mut RequestContext,
        outcome: &mut Outcome,
    ) -> Result<Routed<B>, ProxyError> {
        if let Some(too_large) =
            body::headers_too_large(request.headers(), self.limits.max_header_bytes)
        {
            return Ok(Routed::Answered(too_large));
        }
        let Some(segment) = consent_path_segment(request.uri().path()) else {
            return self.other_route(request, outcome);
        };
        outcome.route = "consent";
        outcome.http_route = Some(CONSENT_ROUTE);
        let needed = match *request.method() {
            Method::GET => Permission::Read,
            Method::PUT => Permission::Write,
            _ => {
                // Counted under the caller's name when its credentials are valid; the 405
                // itself does not depend on them.
                context.caller = self.auth.authenticate(request.headers()).ok();
                return Err(ProxyError::MethodNotAllowed {
                    allow: ALLOWED_METHODS,
                });
            }
        };
        // Counted under the caller's name also when it lacks the permission (403). Under the
        // failure throttle, whose clock is the request's start.
        let caller =
            self.auth
                .authenticate_from(request.headers(), address, context.started.into_std())?;
        context.caller = Some(caller);
        caller.require(needed)?;
        let contact = ContactId::from_path_segment(segment).ok_or(ProxyError::InvalidContactId)?;
        outcome.contact = Some(contact.clone());

        if needed == Permission::Read {
            match self.service.begin_read(&contact, context) {
                Read::Settled(read) => read_response(read, outcome).map(Routed::Answered),
                Read::Pending(pending) => Ok(Routed::Waits(Wait::Read { contact, pending })),
            }
        } else {
            check_json_content_type(request.headers())?;
            Ok(Routed::Waits(Wait::Write { contact, request }))
        }
    }

    /// Any path but the consent routes: the token endpoint, when enabled, or 404.
    fn other_route<B>(
        &self,
        request: Request<B>,
        outcome: &mut Outcome,
    ) -> Result<Routed<B>, ProxyError> {
        if self.token_endpoint.is_none() || request.uri().path() != TOKEN_PATH {
            return Err(ProxyError::NotFound);
        }
        outcome.http_route = Some(TOKEN_PATH);
        if request.method() != Method::POST {
            return Err(ProxyError::MethodNotAllowed { allow: "POST" });
        }
        Ok(Routed::Waits(Wait::TokenRequest(request)))
    }

    /// What a request waits for: a fill or upstream, a body.
    async fn wait<B>(
        &self,
        wait: Wait<B>,
        address: IpAddr,
        context: &mut RequestContext,
        outcome: &mut Outcome,
    ) -> Result<Response<Body>, ProxyError>
    where
        B: hyper::body::Body,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        match wait {
            Wait::Read { contact, pending } => {
                let read = self.service.finish_read(pending, &contact, context).await;
                read_response(read, outcome)
            }
            Wait::Write { contact, request } => {
                let body = self
                    .read_body(request.into_body(), context.deadline)
                    .await?;
                let status = parse_consent_body(&body).map_err(|e| ProxyError::InvalidBody {
                    fields: e
                        .field
                        .map(|name| FieldProblem {
                            name,
                            description: e.message.clone(),
                        })
                        .into_iter()
                        .collect(),
                    message: e.message,
                })?;
                let client = self.auth.client_name(context.caller.as_ref());
                let write = outcome
                    .write
                    .insert(self.service.write(&contact, status, context, client));
                let answer = write.await;
                outcome.write = None;
                Ok(answer_response(answer?))
            }
            Wait::TokenRequest(request) => {
                let (parts, body) = request.into_parts();
                let body = self.read_body(body, context.deadline).await?;
                // `other_route` matched the path to the enabled endpoint.
                let endpoint = self.token_endpoint.as_ref().ok_or(ProxyError::NotFound)?;
                let answer = endpoint.answer(&parts.headers, &body, address);
                context.caller = answer.caller;
                outcome.token_refusal = answer.refusal;
                Ok(answer.response)
            }
        }
    }

    async fn read_body<B>(&self, body: B, deadline: Instant) -> Result<Bytes, ProxyError>
    where
        B: hyper::body::Body,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let limit = self.limits.max_body_bytes;
        if hyper::body::Body::size_hint(&body)
            .exact()
            .is_some_and(|len| len > limit as u64)
        {
            return Err(ProxyError::PayloadTooLarge { limit });
        }
        match tokio::time::timeout_at(deadline, body::read_body_limited(body, limit)).await {
            Ok(Ok(bytes)) => Ok(bytes),
            Ok(Err(ReadBodyError::TooLarge)) => Err(ProxyError::PayloadTooLarge { limit }),
            Ok(Err(ReadBodyError::Failed(reason))) => Err(ProxyError::InvalidBody {
                message: format!("the body could not be read: {reason}"),
                fields: Vec::new(),
            }),
            Err(_) => Err(ProxyError::RequestTimeout),
        }
    }
}

impl Recorder {
    fn record(
        &self,
        method: &Method,
        status: StatusCode,
        outcome: &Outcome,
        context: &RequestContext,
    ) {
        let elapsed = context.started.elapsed();
        let method_label = method_label(method);
        let client = self.auth.client_name(context.caller.as_ref());
        let requests_labels = [outcome.route, method_label, status_label(status), client];
        let duration_labels = [outcome.route, method_label];
        let hot = &self.hot;
        // The hot series of this answer, if it has one (the consent route, common answers).
        let hot_requests = (outcome.route == "consent")
            .then(|| hot_answer(method, status))
            .flatten()
            .and_then(|answer| {
                let slots = hot.requests.len();
                let slot = context
                    .caller
                    .and_then(|c| c.client_index)
                    .filter(|&i| i + 1 < slots)
                    .unwrap_or(slots - 1);
                hot.requests.get(slot).map(|series| &series[answer])
            });
        let requests = || self.metrics.requests.with_label_values(&requests_labels);
        match hot_requests {
            Some(series) => series.get_or_init(requests).inc(),
            None => requests().inc(),
        }
        let hot_duration = match (outcome.route, method) {
            ("consent", &Method::GET) => Some(&hot.duration[0]),
            ("consent", &Method::PUT) => Some(&hot.duration[1]),
            _ => None,
        };
        let auth_failure = match outcome.route {
            "consent" => outcome.error.as_ref().and_then(auth::failure_reason),
            _ => outcome
                .token_refusal
                .as_ref()
                .and_then(Refusal::auth_failure_reason),
        };
        if let Some(reason) = auth_failure {
            self.metrics
                .auth_failures
                .with_label_values(&[outcome.route, reason])
                .inc();
        }
        let duration = || self.metrics.duration.with_label_values(&duration_labels);
        match hot_duration {
            Some(series) => series.get_or_init(duration).observe(elapsed.as_secs_f64()),
            None => duration().observe(elapsed.as_secs_f64()),
        }
        if tracing::enabled!(tracing::Level::INFO) {
            let contact = outcome.contact.as_ref().map(ContactId::masked);
            let upstream = context.last_attempt();
            tracing::info!(
                request_id = context.id.to_str().unwrap_or("-"),
                client,
                address = outcome.address.map(tracing::field::display),
                method = method_label,
                route = outcome.route,
                contact = contact.as_deref().unwrap_or("-"),
                status = status.as_u16(),
                cache = outcome.cache_status.map_or("-", CacheStatus::header_value),
                cache_detail = outcome.cache_status.and_then(CacheStatus::log_detail),
                upstream_status = upstream.as_ref().map_or("-", |u| u.outcome.as_str()),
                upstream_duration_us = upstream.map(|u| u.duration.as_micros() as u64),
                error = outcome
                    .error
                    .as_ref()
                    .map(|e| ErrorChain(e).to_string())
                    .or_else(|| outcome.token_refusal.as_ref().map(Refusal::to_string))
                    .or_else(|| {
                        outcome
                            .hung_up
                            .then(|| "the caller hung up before the answer".to_owned())
                    })
                    .as_deref()
                    .unwrap_or("-"),
                duration_us = elapsed.as_micros() as u64,
                "request"
            );
        }
    }
}

/// The server span in OpenTelemetry's HTTP semantic conventions: named `{method} {route}`
/// after the route template (never the path, which holds the contact id), the answer's
/// status, a 5xx as an error, and how the cache answered.
fn describe_server_span(
    span: &mut Span,
    method: &Method,
    response: &Response<Body>,
    outcome: &Outcome,
) {
    let method = match *method {
        Method::GET => "GET",
        Method::PUT => "PUT",
        Method::POST => "POST",
        _ => "_OTHER",
    };
    let route = outcome.http_route;
    span.rename(match (method, route) {
        ("GET", Some(CONSENT_ROUTE)) => "GET /voicebiometrics/contacts/{contact_id}/consent",
        ("PUT", Some(CONSENT_ROUTE)) => "PUT /voicebiometrics/contacts/{contact_id}/consent",
        ("POST", Some(TOKEN_PATH)) => "POST /oauth/token",
        (method, _) => method,
    });
    span.set("http.request.method", method);
    if let Some(route) = route {
        span.set("http.route", route);
    }
    let status = response.status();
    span.set("http.response.status_code", i64::from(status.as_u16()));
    if let Some(cache) = outcome.cache_status {
        span.set("consent_proxy.cache.status", cache.header_value());
    }
    if status.is_server_error() {
        span.set("error.type", status_label(status));
        if let Some(error) = &outcome.error {
            span.fail(error.code());
        }
    }
}

/// A GET's answer, from the cache or upstream.
fn read_response(read: Settled, outcome: &mut Outcome) -> Result<Response<Body>, ProxyError> {
    outcome.cache_status = Some(read.status);
    // Logged with the answer from the cache that stood in for upstream's.
    outcome.error = read.upstream_failure;
    let answer = read.answer?;
    let status = answer.status;
    let mut response = answer_response(answer);
    let headers = response.headers_mut();
    if matches!(status, StatusCode::OK | StatusCode::NOT_FOUND) {
        headers.insert(
            X_CACHE_STATUS,
            HeaderValue::from_static(read.status.header_value()),
        );
        if read.status == CacheStatus::SharedHit {
            headers.insert(X_CACHE_TIER, HeaderValue::from_static("shared"));
        }
    }
    if read.status == CacheStatus::Stale {
        headers.insert(header::WARNING, HeaderValue::from_static(STALE_WARNING));
    }
    if let Some(age) = read.age_s {
        headers.insert(header::AGE, body::age_value(age));
    }
    Ok(response)
}

fn error_response(outcome: &mut Outcome, error: ProxyError) -> Response<Body> {
    let response = error.clone().into_response();
    outcome.error = Some(error);
    response
}

/// The upstream answer as the caller's response: status, body and the headers kept.
fn answer_response(answer: ConsentAnswer) -> Response<Body> {
    let content_type = answer.content_type.unwrap_or(body::APPLICATION_JSON);
    let mut response = body::bytes_response(answer.status, content_type, answer.body);
    if let Some(retry_after) = answer.retry_after {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, retry_after);
    }
    response
}

fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::PUT => "PUT",
        Method::POST => "POST",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        _ => "other",
    }
}

/// A PUT body must be JSON when its type is declared at all.
fn check_json_content_type(headers: &HeaderMap) -> Result<(), ProxyError> {
    let Some(essence) = body::media_type(headers) else {
        return Ok(());
    };
    let essence = essence.to_ascii_lowercase();
    if essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
    {
        Ok(())
    } else {
        Err(ProxyError::UnsupportedMediaType)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_types() {
        let mut headers = HeaderMap::new();
        assert!(check_json_content_type(&headers).is_ok());
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json; charset=utf-8"),
        );
        assert!(check_json_content_type(&headers).is_ok());
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        assert!(check_json_content_type(&headers).is_err());
    }
}
