//! The shared OAuth client-credentials token: fetched once however many requests need it,
//! renewed in the background before it expires, dropped and renewed when upstream rejects it.
//!
//! Requests read the current token from an `ArcSwap` (no lock, no await). Only one task, the
//! refresher, ever talks to the token endpoint; requests that find no usable token wake it
//! and wait on a `watch` channel for its next result, so a burst of cold requests or of
//! upstream 401s causes exactly one fetch. While the endpoint is failing and no usable token
//! is held, requests fail fast with `token_unavailable` instead of queueing behind retries.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwapOption;
use base64::Engine;
use bytes::Bytes;
use http::{header, HeaderValue, Method, Request};
use http_body_util::Full;
use prometheus::{Histogram, IntCounter, Registry};
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

use crate::config::{ClientAuth, Secret, TalkdeskSettings, TokenSettings};
use crate::error::ProxyError;
use crate::metrics;
use crate::upstream::transport::Transport;

/// A request never waits longer than this for a token (the contract's "within 1 s").
pub const MAX_TOKEN_WAIT: Duration = Duration::from_secs(1);
/// Renewal back-off after a failed fetch: doubles from the first to the last, with jitter.
const BACKOFF_FIRST: Duration = Duration::from_millis(250);
const BACKOFF_LAST: Duration = Duration::from_secs(30);
/// The largest token response read.
const MAX_TOKEN_RESPONSE_BYTES: usize = 64 * 1024;

/// A bearer token and when it stops being usable.
pub struct AccessToken {
    /// `Bearer <token>`, marked sensitive so hyper never logs it.
    authorization: HeaderValue,
    /// Past this instant the token is never sent (a safety margin before its real expiry).
    usable_until: Instant,
    /// When the refresher renews it.
    refresh_at: Instant,
    /// Distinguishes tokens, so that only the current one is dropped on a 401.
    id: u64,
}

impl AccessToken {
    pub fn authorization(&self) -> &HeaderValue {
        &self.authorization
    }

    pub fn is_usable(&self, now: Instant) -> bool {
        now < self.usable_until
    }
}

impl fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AccessToken")
            .field("id", &self.id)
            .field("authorization", &"<redacted>")
            .finish()
    }
}

/// What the refresher is doing, as requests see it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    /// A fetch is in flight: wait for it.
    Fetching,
    /// The last fetch succeeded; the refresher sleeps until renewal or a wake-up.
    Idle,
    /// The last fetch failed and the refresher is backing off: fail fast.
    BackingOff { reason: String },
}

#[derive(Clone)]
pub struct TokenMetrics {
    fetch_succeeded: IntCounter,
    fetch_failed: IntCounter,
    expiry: prometheus::Gauge,
    fetch_duration: Histogram,
    renewed_after_rejection: IntCounter,
    rejected_again: IntCounter,
}

impl TokenMetrics {
    /// Registers the token metrics, every label value present from the start (at 0), so
    /// `increase()` sees the first failure and dashboards are never empty.
    pub fn register(registry: &Registry) -> Self {
        let fetches = metrics::counter_vec(
            registry,
            "consent_proxy_token_fetches_total",
            "Token endpoint requests by result.",
            &["result"],
        );
        let rejections = metrics::counter_vec(
            registry,
            "consent_proxy_token_upstream_rejections_total",
            "Upstream 401 answers to the proxy's token, by what followed: renewed \
             (token dropped and renewed), rejected_again (401 after a renewal, caller got 502).",
            &["outcome"],
        );
        TokenMetrics {
            fetch_succeeded: fetches.with_label_values(&["success"]),
            fetch_failed: fetches.with_label_values(&["failure"]),
            expiry: metrics::float_gauge(
                registry,
                "consent_proxy_token_expiry_timestamp_seconds",
                "Unix time at which the current access token expires (0 = none held).",
            ),
            fetch_duration: metrics::histogram(
                registry,
                "consent_proxy_token_fetch_duration_seconds",
                "Time taken by token endpoint requests.",
            ),
            renewed_after_rejection: rejections.with_label_values(&["renewed"]),
            rejected_again: rejections.with_label_values(&["rejected_again"]),
        }
    }

    pub fn rejected_again(&self) -> &IntCounter {
        &self.rejected_again
    }
}

/// How to ask the token endpoint for a token.
struct TokenRequest {
    url: String,
    client_id: String,
    client_secret: Secret,
    client_auth: ClientAuth,
    scopes: String,
    timeout: Duration,
}

struct Shared {
    current: ArcSwapOption<AccessToken>,
    phase: watch::Sender<Phase>,
    wake: Notify,
    next_id: AtomicU64,
    metrics: TokenMetrics,
}

/// The handle requests use. Cheap to clone.
#[derive(Clone)]
pub struct TokenManager {
    shared: Arc<Shared>,
}

impl TokenManager {
    /// Starts the refresher, which fetches the first token at once. It stops when the
    /// returned manager and all its clones are dropped, or when `shutdown` fires.
    pub fn start(
        transport: Transport,
        talkdesk: &TalkdeskSettings,
        settings: &TokenSettings,
        metrics: TokenMetrics,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        let (phase, _) = watch::channel(Phase::Fetching);
        let shared = Arc::new(Shared {
            current: ArcSwapOption::empty(),
            phase,
            wake: Notify::new(),
            next_id: AtomicU64::new(1),
            metrics,
        });
        let request = TokenRequest {
            url: talkdesk.token_url.clone(),
            client_id: talkdesk.client_id.clone(),
            client_secret: talkdesk.client_secret.clone(),
            client_auth: talkdesk.client_auth,
            scopes: talkdesk.scopes.join(" "),
            timeout: talkdesk.timeout,
        };
        let refresher = Refresher {
            shared: Arc::downgrade(&shared),
            transport,
            request,
            refresh_margin: settings.refresh_margin,
        };
        tokio::spawn(refresher.run(shutdown));
        TokenManager { shared }
    }

    /// The current token, waiting (at most `MAX_TOKEN_WAIT`, and not past `deadline`) for
    /// the refresher when none is usable. Fails fast while the token endpoint is failing.
    pub async fn current(&self, deadline: Instant) -> Result<Arc<AccessToken>, ProxyError> {
        if let Some(token) = self.usable_token() {
            return Ok(token);
        }
        let wait_until = deadline.min(Instant::now() + MAX_TOKEN_WAIT);
        let mut phase = self.shared.phase.subscribe();
        loop {
            if let Some(token) = self.usable_token() {
                return Ok(token);
            }
            match &*phase.borrow_and_update() {
                Phase::BackingOff { reason } => {
                    return Err(ProxyError::TokenUnavailable(reason.clone()));
                }
                // Idle with no usable token: dropped after a 401 or expired unrenewed.
                Phase::Idle => self.shared.wake.notify_one(),
                Phase::Fetching => {}
            }
            match tokio::time::timeout_at(wait_until, phase.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => {
                    return Err(ProxyError::TokenUnavailable(
                        "token refresher stopped".into(),
                    ))
                }
                Err(_) => {
                    return Err(ProxyError::TokenUnavailable(
                        "the token endpoint did not answer in time".into(),
                    ))
                }
            }
        }
    }

    /// Upstream rejected `token`: drop it if it is still the current one (so a burst of 401s
    /// causes one renewal) and wake the refresher.
    pub fn reject(&self, token: &Arc<AccessToken>) {
        let current = self.shared.current.load();
        if current.as_ref().is_some_and(|c| Arc::ptr_eq(c, token)) {
            let previous = self.shared.current.compare_and_swap(&*current, None);
            if previous.as_ref().is_some_and(|p| Arc::ptr_eq(p, token)) {
                self.shared.metrics.renewed_after_rejection.inc();
                // No token is held until the renewal succeeds ("0 = none held").
                self.shared.metrics.expiry.set(0.0);
                tracing::info!(token_id = token.id, "upstream rejected the token; renewing");
                self.shared.wake.notify_one();
            }
        }
    }

    pub fn metrics(&self) -> &TokenMetrics {
        &self.shared.metrics
    }

    /// Ready when a usable token is held; otherwise the reason.
    pub fn readiness(&self) -> Result<(), String> {
        if self.usable_token().is_some() {
            return Ok(());
        }
        Err(match &*self.shared.phase.borrow() {
            Phase::BackingOff { reason } => format!("no valid token: {reason}"),
            Phase::Fetching => "no valid token yet: fetching".to_owned(),
            Phase::Idle => "no valid token: renewal pending".to_owned(),
        })
    }

    fn usable_token(&self) -> Option<Arc<AccessToken>> {
        let token = self.shared.current.load_full()?;
        token.is_usable(Instant::now()).then_some(token)
    }
}

/// The background task that owns all talk with the token endpoint.
struct Refresher {
    shared: std::sync::Weak<Shared>,
    transport: Transport,
    request: TokenRequest,
    refresh_margin: Duration,
}

impl Refresher {
    async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut backoff = BACKOFF_FIRST;
        loop {
            let Some(shared) = self.shared.upgrade() else {
                return;
            };
            shared.phase.send_replace(Phase::Fetching);
            let started = Instant::now();
            let result = self.fetch(started, &shared).await;
            shared
                .metrics
                .fetch_duration
                .observe(started.elapsed().as_secs_f64());
            let sleep_until = match result {
                Ok((token, expires_in)) => {
                    shared.metrics.fetch_succeeded.inc();
                    tracing::debug!(
                        token_id = token.id,
                        expires_in_s = expires_in.as_secs(),
                        "token obtained"
                    );
                    let refresh_at = token.refresh_at;
                    shared.current.store(Some(Arc::new(token)));
                    // After the store, so that a concurrent `reject` of the previous token
                    // (which zeroes the gauge) cannot overwrite the new token's expiry.
                    shared
                        .metrics
                        .expiry
                        .set(unix_now() + expires_in.as_secs_f64());
                    shared.phase.send_replace(Phase::Idle);
                    backoff = BACKOFF_FIRST;
                    refresh_at
                }
                Err(reason) => {
                    shared.metrics.fetch_failed.inc();
                    tracing::warn!(reason = %reason, retry_in_ms = backoff.as_millis() as u64, "token fetch failed");
                    shared.phase.send_replace(Phase::BackingOff { reason });
                    let delay = with_jitter(backoff);
                    backoff = (backoff * 2).min(BACKOFF_LAST);
                    Instant::now() + delay
                }
            };
            drop(shared);
            if !self.sleep(sleep_until, &mut shutdown).await {
                return;
            }
        }
    }

    /// Sleeps until `until`, or until woken while no usable token is held.
    /// Returns false when the proxy is shutting down or the manager is gone.
    async fn sleep(&self, until: Instant, shutdown: &mut watch::Receiver<bool>) -> bool {
        loop {
            let Some(shared) = self.shared.upgrade() else {
                return false;
            };
            let backing_off = matches!(*shared.phase.borrow(), Phase::BackingOff { .. });
            tokio::select! {
                _ = tokio::time::sleep_until(until) => return true,
                _ = shared.wake.notified(), if !backing_off => {
                    let usable = shared.current.load().as_ref().is_some_and(|t| t.is_usable(Instant::now()));
                    if !usable {
                        return true;
                    }
                }
                _ = shutdown.changed() => return false,
            }
        }
    }

    async fn fetch(
        &self,
        started: Instant,
        shared: &Shared,
    ) -> Result<(AccessToken, Duration), String> {
        let request = self.build_request()?;
        let answer = self
            .transport
            .attempt(request, self.request.timeout, MAX_TOKEN_RESPONSE_BYTES)
            .await
            .map_err(|err| format!("token endpoint: {err}"))?;
        if !answer.status.is_success() {
            return Err(format!(
                "token endpoint answered {}{}",
                answer.status.as_u16(),
                oauth_error_code(&answer.body)
                    .map(|c| format!(" ({c})"))
                    .unwrap_or_default()
            ));
        }
        let parsed = parse_token_response(&answer.body)?;
        let lifetime = parsed.expires_in;
        let margin = self.refresh_margin.min(lifetime / 2);
        let safety = (lifetime / 4).min(Duration::from_secs(5));
        let token = AccessToken {
            authorization: parsed.authorization,
            usable_until: started + lifetime - safety,
            refresh_at: started + lifetime - margin,
            id: shared.next_id.fetch_add(1, Ordering::Relaxed),
        };
        Ok((token, lifetime))
    }

    fn build_request(&self) -> Result<Request<Full<Bytes>>, String> {
        let r = &self.request;
        let mut form = format!(
            "grant_type=client_credentials&scope={}",
            form_encode(&r.scopes)
        );
        let mut builder = Request::builder()
            .method(Method::POST)
            .uri(&r.url)
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(header::ACCEPT, "application/json")
            .header(header::USER_AGENT, crate::upstream::transport::USER_AGENT);
        match r.client_auth {
            ClientAuth::Basic => {
                // RFC 6749 §2.3.1: both parts form-encoded before base64.
                let pair = format!(
                    "{}:{}",
                    form_encode(&r.client_id),
                    form_encode(r.client_secret.expose())
                );
                let encoded = base64::engine::general_purpose::STANDARD.encode(pair);
                let mut value = HeaderValue::from_str(&format!("Basic {encoded}"))
                    .map_err(|_| "client credentials are not a valid header".to_owned())?;
                value.set_sensitive(true);
                builder = builder.header(header::AUTHORIZATION, value);
            }
            ClientAuth::Post => {
                form.push_str("&client_id=");
                form.push_str(&form_encode(&r.client_id));
                form.push_str("&client_secret=");
                form.push_str(&form_encode(r.client_secret.expose()));
            }
        }
        builder
            .body(Full::new(Bytes::from(form)))
            .map_err(|_| "token_url is not a valid request target".to_owned())
    }
}

/// A successful token response, validated.
pub struct ParsedToken {
    pub authorization: HeaderValue,
    pub expires_in: Duration,
}

/// Validates a token endpoint's JSON answer. Error messages never contain the body, which
/// may hold a token.
pub fn parse_token_response(body: &[u8]) -> Result<ParsedToken, String> {
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|_| "token response is not JSON".to_owned())?;
    let access_token = value
        .get("access_token")
        .and_then(|v| v.as_str())
        .filter(|t| !t.is_empty())
        .ok_or("token response has no access_token")?;
    // Visible ASCII only (RFC 6750's b64token is a subset): `HeaderValue` would also take
    // spaces, tabs and non-ASCII bytes, which upstream would trim, split or refuse.
    if !access_token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("access_token has characters not allowed in a header".into());
    }
    if let Some(token_type) = value.get("token_type") {
        if !token_type
            .as_str()
            .is_some_and(|t| t.eq_ignore_ascii_case("bearer"))
        {
            return Err("token response's token_type is not Bearer".into());
        }
    }
    let expires_in = match value.get("expires_in") {
        Some(serde_json::Value::Number(n)) => n.as_f64(),
        Some(serde_json::Value::String(s)) => s.parse::<f64>().ok(),
        _ => None,
    }
    .filter(|s| s.is_finite() && *s >= 1.0)
    .ok_or("token response has no positive expires_in")?;
    let mut authorization = HeaderValue::from_str(&format!("Bearer {access_token}"))
        .map_err(|_| "access_token has characters not allowed in a header".to_owned())?;
    authorization.set_sensitive(true);
    Ok(ParsedToken {
        authorization,
        // Capped at a year so instant arithmetic cannot overflow.
        expires_in: Duration::from_secs_f64(expires_in.min(365.0 * 86_400.0)),
    })
}

/// The OAuth `error` code of an error answer, when it is a short plain word (never the
/// description, which could echo input).
fn oauth_error_code(body: &[u8]) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    let code = value.get("error")?.as_str()?;
    (code.len() <= 40 && code.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'))
        .then(|| code.to_owned())
}

/// `application/x-www-form-urlencoded` encoding of one value.
pub fn form_encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'*' => {
                out.push(byte as char)
            }
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{byte:02X}")),
        }
    }
    out
}

fn with_jitter(delay: Duration) -> Duration {
    // Between half and all of the delay, so many proxies do not retry in step.
    delay.mul_f64(rand::random_range(0.5..=1.0))
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_token_response() {
        let parsed = parse_token_response(
            br#"{"access_token":"abc","token_type":"Bearer","expires_in":600,"scope":"x"}"#,
        )
        .unwrap();
        assert_eq!(parsed.expires_in, Duration::from_secs(600));
        assert!(parsed.authorization.is_sensitive());
    }

    #[test]
    fn malformed_token_responses_are_refused_without_echoing_the_body() {
        for body in [
            &b"not json"[..],
            br#"{"token_type":"Bearer","expires_in":600}"#,
            br#"{"access_token":"secret-xyz","expires_in":0}"#,
            br#"{"access_token":"secret-xyz"}"#,
            br#"{"access_token":"secret-xyz","expires_in":600,"token_type":"mac"}"#,
            br#"{"access_token":"bad\nvalue","expires_in":600}"#,
        ] {
            let err = parse_token_response(body).err().unwrap();
            assert!(!err.contains("secret-xyz"), "{err}");
        }
    }

    #[test]
    fn form_encoding() {
        assert_eq!(form_encode("a b:c/d"), "a+b%3Ac%2Fd");
    }
}
