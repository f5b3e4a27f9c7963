//! The consent listener's HTTP layer: matches the two consent routes, authenticates the
//! caller, validates the contact and body, calls the consent service, and turns the result
//! into the answer, with the request id, cache status, metrics and one access-log event. The
//! token endpoint (`POST /oauth/token`) is served here too: its request is read here, its
//! answer decided by [`TokenEndpoint`].

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use prometheus::{Histogram, IntCounter};
use tokio::time::Instant;

use crate::auth::{Authenticator, Permission};
use crate::cache::CacheStatus;
use crate::consent::ConsentAnswer;
use crate::consent::{consent_path_segment, parse_consent_body, ContactId};
use crate::error::{ErrorChain, FieldProblem, ProxyError};
use crate::http::token_endpoint::{Refusal, TokenEndpoint};
use crate::metrics::status_label;
use crate::metrics::HttpMetrics;
use crate::request::RequestContext;
use crate::service::ConsentService;
use crate::wire::body::{self, Body, ReadBodyError};
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

/// Limits the HTTP layer enforces itself.
#[derive(Debug, Clone)]
pub struct RouteLimits {
    pub max_body_bytes: usize,
    pub max_header_bytes: usize,
    pub request_timeout: Duration,
}

pub struct ConsentRoutes {
    service: ConsentService,
    auth: Arc<Authenticator>,
    metrics: HttpMetrics,
    hot: HotSeries,
    limits: RouteLimits,
    /// `None` when `oauth.enabled = false`.
    token_endpoint: Option<TokenEndpoint>,
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

/// What the access log and metrics need to know about a handled request, besides its
/// context (id, caller, last upstream attempt).
#[derive(Default)]
struct Outcome {
    route: &'static str,
    contact: Option<ContactId>,
    cache_status: Option<CacheStatus>,
    error: Option<ProxyError>,
    /// Why the token endpoint granted no token.
    token_refusal: Option<Refusal>,
}

impl ConsentRoutes {
    pub fn new(
        service: ConsentService,
        auth: Arc<Authenticator>,
        metrics: HttpMetrics,
        limits: RouteLimits,
        token_endpoint: Option<TokenEndpoint>,
    ) -> Self {
        let hot = HotSeries::new(auth.client_names().count());
        ConsentRoutes {
            service,
            auth,
            metrics,
            hot,
            limits,
            token_endpoint,
        }
    }

    /// Handles one request from `peer`. Generic over the body so benchmarks can drive the
    /// handler in-process; the server passes hyper's `Incoming`.
    pub async fn handle<B>(&self, request: Request<B>, peer: SocketAddr) -> Response<Body>
    where
        B: hyper::body::Body,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let started = Instant::now();
        let mut context = RequestContext::new(
            request_id_of(request.headers()),
            started,
            started + self.limits.request_timeout,
        );
        let method = request.method().clone();
        let mut outcome = Outcome {
            route: "other",
            ..Outcome::default()
        };

        let mut response = match tokio::time::timeout_at(
            context.deadline,
            self.route(request, peer, &mut context, &mut outcome),
        )
        .await
        {
            Ok(Ok(response)) => response,
            Ok(Err(error)) => error_response(&mut outcome, error),
            Err(_) => error_response(&mut outcome, ProxyError::UpstreamTimeout),
        };
        self.record(&method, &response, &outcome, &context);
        // Moved, not cloned: cloning a new id's bytes would allocate a shared copy.
        response.headers_mut().insert(X_REQUEST_ID, context.id);
        response
    }

    async fn route<B>(
        &self,
        request: Request<B>,
        peer: SocketAddr,
        context: &mut RequestContext,
        outcome: &mut Outcome,
    ) -> Result<Response<Body>, ProxyError>
    where
        B: hyper::body::Body,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        if header_bytes(request.headers()) > self.limits.max_header_bytes {
            return Ok(body::empty_response(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ));
        }
        let Some(segment) = consent_path_segment(request.uri().path()) else {
            return self.other_route(request, peer, context, outcome).await;
        };
        outcome.route = "consent";
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
        // Counted under the caller's name also when it lacks the permission (403).
        let caller = self.auth.authenticate(request.headers())?;
        context.caller = Some(caller);
        caller.require(needed)?;
        let contact = ContactId::from_path_segment(segment).ok_or(ProxyError::InvalidContactId)?;
        outcome.contact = Some(contact.clone());

        if needed == Permission::Read {
            let read = self.service.read(&contact, context).await;
            outcome.cache_status = Some(read.status);
            // Logged with the answer from the cache that stood in for upstream's.
            outcome.error = read.upstream_failure;
            let answer = read.answer?;
            let mut response = answer_response(answer);
            if matches!(response.status(), StatusCode::OK | StatusCode::NOT_FOUND) {
                response.headers_mut().insert(
                    X_CACHE_STATUS,
                    HeaderValue::from_static(read.status.header_value()),
                );
                if read.status == CacheStatus::SharedHit {
                    response
                        .headers_mut()
                        .insert(X_CACHE_TIER, HeaderValue::from_static("shared"));
                }
            }
            if read.status == CacheStatus::Stale {
                response
                    .headers_mut()
                    .insert(header::WARNING, HeaderValue::from_static(STALE_WARNING));
            }
            if let Some(age) = read.age_s {
                response
                    .headers_mut()
                    .insert(header::AGE, body::age_value(age));
            }
            Ok(response)
        } else {
            check_json_content_type(request.headers())?;
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
            let answer = self.service.write(&contact, status, context).await?;
            Ok(answer_response(answer))
        }
    }

    /// Any path but the consent routes: the token endpoint, when enabled, or 404.
    async fn other_route<B>(
        &self,
        request: Request<B>,
        peer: SocketAddr,
        context: &mut RequestContext,
        outcome: &mut Outcome,
    ) -> Result<Response<Body>, ProxyError>
    where
        B: hyper::body::Body,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let endpoint = match &self.token_endpoint {
            Some(endpoint) if request.uri().path() == TOKEN_PATH => endpoint,
            _ => return Err(ProxyError::NotFound),
        };
        if request.method() != Method::POST {
            return Err(ProxyError::MethodNotAllowed { allow: "POST" });
        }
        let (parts, body) = request.into_parts();
        let body = self.read_body(body, context.deadline).await?;
        let answer = endpoint.answer(&parts.headers, &body, peer.ip());
        context.caller = answer.caller;
        outcome.token_refusal = answer.refusal;
        Ok(answer.response)
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

    fn record(
        &self,
        method: &Method,
        response: &Response<Body>,
        outcome: &Outcome,
        context: &RequestContext,
    ) {
        let elapsed = context.started.elapsed();
        let method_label = method_label(method);
        let client = self.auth.client_name(context.caller.as_ref());
        let status = response.status();
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
                method = method_label,
                route = outcome.route,
                contact = contact.as_deref().unwrap_or("-"),
                status = status.as_u16(),
                cache = outcome.cache_status.map_or("-", CacheStatus::as_str),
                upstream_status = upstream.as_ref().map_or("-", |u| u.outcome.as_str()),
                upstream_duration_us = upstream.map(|u| u.duration.as_micros() as u64),
                error = outcome
                    .error
                    .as_ref()
                    .map(|e| ErrorChain(e).to_string())
                    .or_else(|| outcome.token_refusal.as_ref().map(Refusal::to_string))
                    .as_deref()
                    .unwrap_or("-"),
                duration_us = elapsed.as_micros() as u64,
                "request"
            );
        }
    }
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

fn header_bytes(headers: &HeaderMap) -> usize {
    headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum()
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
