//! The admin listener: `/metrics`, `/healthz`, `/readyz`, the cache purge and a contact's audit
//! history. Kept off the
//! consent listener so it can stay on a private address. Every answer carries `x-request-id`,
//! as on the consent listener. The admin key is checked under the failure throttle the consent
//! routes and the token endpoint share (per peer address), so it cannot be guessed faster.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use prometheus::{IntCounterVec, Registry};
use serde_json::json;

use crate::audit::Record;
use crate::auth::{self, Authenticator, Caller, Permission};
use crate::consent::ContactId;
use crate::error::ProxyError;
use crate::service::ConsentService;
use crate::upstream::token::TokenManager;
use crate::wire::body::{self, Body};
use crate::wire::request_id::{request_id_of, X_REQUEST_ID};

const PURGE_PREFIX: &str = "/admin/cache/";
const AUDIT_PREFIX: &str = "/admin/audit/contacts/";

/// Who may use the admin routes, and where their failures are counted.
pub struct AdminAuth {
    pub authenticator: Arc<Authenticator>,
    /// `consent_proxy_auth_failures_total`, counted under `route="admin"`.
    pub failures: IntCounterVec,
}

/// The `route` label of the admin routes' failed authentications.
const ADMIN_ROUTE: &str = "admin";

pub struct AdminRoutes {
    registry: Registry,
    service: ConsentService,
    tokens: TokenManager,
    auth: AdminAuth,
    /// Set once the consent listener accepts connections, cleared when it drains.
    serving: Arc<AtomicBool>,
    /// `server.max_header_bytes`, which applies to both listeners.
    max_header_bytes: usize,
}

impl AdminRoutes {
    pub fn new(
        registry: Registry,
        service: ConsentService,
        tokens: TokenManager,
        auth: AdminAuth,
        serving: Arc<AtomicBool>,
        max_header_bytes: usize,
    ) -> Self {
        // Every series shown from the start, as the consent routes' are.
        for reason in auth::FAILURE_REASONS {
            auth.failures.with_label_values(&[ADMIN_ROUTE, reason]);
        }
        AdminRoutes {
            registry,
            service,
            tokens,
            auth,
            serving,
            max_header_bytes,
        }
    }

    /// Answers one request from `peer`.
    pub async fn handle(&self, request: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
        let request_id = request_id_of(request.headers());
        let caller = Peer {
            address: peer.ip(),
            request_id: &request_id,
        };
        let mut response = self.route(&request, caller).await;
        response.headers_mut().insert(X_REQUEST_ID, request_id);
        response
    }

    async fn route(&self, request: &Request<Incoming>, peer: Peer<'_>) -> Response<Body> {
        if let Some(too_large) = body::headers_too_large(request.headers(), self.max_header_bytes) {
            return too_large;
        }
        let path = request.uri().path();
        let result = match (request.method(), path) {
            (&Method::GET, "/metrics") => Ok(self.metrics().await),
            (&Method::GET, "/healthz") => Ok(body::json_response(
                StatusCode::OK,
                &json!({"status": "ok"}),
            )),
            (&Method::GET, "/readyz") => Ok(self.readiness()),
            (_, "/metrics" | "/healthz" | "/readyz") => {
                Err(ProxyError::MethodNotAllowed { allow: "GET" })
            }
            (method, path) if path.starts_with(PURGE_PREFIX) => {
                self.purge(ContactRoute {
                    method,
                    segment: &path[PURGE_PREFIX.len()..],
                    request,
                    peer,
                })
                .await
            }
            (method, path) if path.starts_with(AUDIT_PREFIX) => {
                self.audit_history(ContactRoute {
                    method,
                    segment: &path[AUDIT_PREFIX.len()..],
                    request,
                    peer,
                })
                .await
            }
            _ => Err(ProxyError::NotFound),
        };
        result.unwrap_or_else(ProxyError::into_response)
    }

    /// The caller, if its key has the `admin` permission: under the failure throttle, and
    /// counted when refused.
    fn authorize(&self, request: &Request<Incoming>, peer: Peer<'_>) -> Result<Caller, ProxyError> {
        let result = self
            .auth
            .authenticator
            .authenticate_from(request.headers(), peer.address, Instant::now())
            .and_then(|caller| caller.require(Permission::Admin).map(|()| caller));
        if let Some(reason) = result.as_ref().err().and_then(auth::failure_reason) {
            self.auth
                .failures
                .with_label_values(&[ADMIN_ROUTE, reason])
                .inc();
        }
        result
    }

    async fn metrics(&self) -> Response<Body> {
        self.service.refresh_gauges();
        body::bytes_response(
            StatusCode::OK,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            Bytes::from(crate::metrics::encode(&self.registry)),
        )
    }

    /// 200 once serving with a valid token. A cluster feed that is down does not make the
    /// instance unready (it still answers, from upstream); it is reported under `cluster`.
    fn readiness(&self) -> Response<Body> {
        let reason = if !self.serving.load(Ordering::Acquire) {
            Err("the consent listener is not accepting connections".to_owned())
        } else {
            self.tokens.readiness()
        };
        let (status, mut answer) = match reason {
            Ok(()) => (StatusCode::OK, json!({"status": "ready"})),
            Err(reason) => (
                StatusCode::SERVICE_UNAVAILABLE,
                json!({"status": "not_ready", "reason": reason}),
            ),
        };
        if let Some(audit) = self.service.audit() {
            answer["audit"] = match audit.problem() {
                None => json!({"store": "up"}),
                Some(reason) => json!({
                    "store": "down",
                    "reason": format!("{reason}; PUTs are refused or go unrecorded, by audit.write_policy"),
                }),
            };
        }
        if let Some(cluster) = self.service.cluster_status() {
            answer["cluster"] = match cluster.reason {
                None => json!({"feed": "live"}),
                Some(reason) => json!({
                    "feed": "down",
                    "reason": format!("{reason}; answering from upstream, not from the cache"),
                }),
            };
            if let Some(warning) = cluster.warning {
                answer["cluster"]["warning"] = json!(warning);
            }
        }
        body::json_response(status, &answer)
    }

    /// `GET /admin/audit/contacts/{contact_id}`: the contact's records, newest first.
    async fn audit_history(&self, route: ContactRoute<'_>) -> Result<Response<Body>, ProxyError> {
        let (_, contact) = self.admit(&route, "GET")?;
        let audit = self.service.audit().ok_or(ProxyError::AuditDisabled)?;
        let records = audit.history(&contact).await?;
        Ok(body::json_response(
            StatusCode::OK,
            &json!({
                "contact_id": contact.as_str(),
                "records": records.iter().map(Record::to_api_json).collect::<Vec<_>>(),
            }),
        ))
    }

    /// `DELETE /admin/cache/{contact_id}`: drops the contact's cached answer.
    async fn purge(&self, route: ContactRoute<'_>) -> Result<Response<Body>, ProxyError> {
        let (caller, contact) = self.admit(&route, "DELETE")?;
        self.service.purge(&contact).await;
        tracing::info!(
            request_id = route.peer.request_id.to_str().unwrap_or("-"),
            client = self.auth.authenticator.client_name(Some(&caller)),
            contact = %contact.masked(),
            "cache entry purged"
        );
        Ok(body::empty_response(StatusCode::NO_CONTENT))
    }

    /// What every `/admin/.../{contact_id}` route checks first, in this order: one path
    /// segment (else 404), the one method it `allow`s, the admin key, the contact id.
    fn admit(
        &self,
        route: &ContactRoute<'_>,
        allow: &'static str,
    ) -> Result<(Caller, ContactId), ProxyError> {
        if route.segment.is_empty() || route.segment.contains('/') {
            return Err(ProxyError::NotFound);
        }
        if route.method.as_str() != allow {
            return Err(ProxyError::MethodNotAllowed { allow });
        }
        let caller = self.authorize(route.request, route.peer)?;
        let contact =
            ContactId::from_path_segment(route.segment).ok_or(ProxyError::InvalidContactId)?;
        Ok((caller, contact))
    }
}

/// An admin request to a route that ends in a contact id.
struct ContactRoute<'a> {
    method: &'a Method,
    /// The path after the route's prefix.
    segment: &'a str,
    request: &'a Request<Incoming>,
    peer: Peer<'a>,
}

/// Who sent an admin request: its peer's address (the throttle's key) and its request id.
#[derive(Clone, Copy)]
struct Peer<'a> {
    address: IpAddr,
    request_id: &'a HeaderValue,
}
