//! The pooled outbound HTTP client (hyper-util + rustls) shared by the token manager and
//! the consent-API client: one attempt, bounded in time and in response size.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Body;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use super::egress::EgressConnector;
use crate::config::EgressSettings;
use crate::error::SharedError;
use crate::otel::Span;

/// Sent upstream as `User-Agent` (consent API and token endpoint).
pub const USER_AGENT: &str = concat!("consent-proxy/", env!("CARGO_PKG_VERSION"));

/// Idle upstream connections are kept this long for reuse.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// A complete upstream answer, body included.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// How one attempt failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AttemptError {
    /// No connection could be made: nothing was sent, so retrying is always safe.
    #[error("connect failed")]
    Connect(#[source] SharedError),
    /// The attempt's time ran out; whether the request was processed is unknown.
    #[error("timed out")]
    Timeout,
    /// The response was larger than allowed.
    #[error("response larger than {0} bytes")]
    TooLarge(usize),
    /// The exchange broke after the request may have been sent (reset, protocol error).
    #[error("exchange failed")]
    Failed(#[source] SharedError),
}

impl AttemptError {
    /// Its `error.type` in a client span (OpenTelemetry's HTTP conventions: a short name).
    pub fn kind(&self) -> &'static str {
        match self {
            AttemptError::Timeout => "timeout",
            AttemptError::Connect(_) => "connect",
            AttemptError::TooLarge(_) => "response_too_large",
            AttemptError::Failed(_) => "exchange_failed",
        }
    }
}

/// Where a request to `uri` goes, in its client span (OpenTelemetry's HTTP conventions):
/// `server.address` and `server.port` (the scheme's default when the URL names none).
pub fn describe_server(span: &mut Span, uri: &Uri) {
    if let Some(host) = uri.host() {
        span.set("server.address", host.to_owned());
    }
    let default_port = if uri.scheme_str() == Some("http") {
        80
    } else {
        443
    };
    span.set(
        "server.port",
        i64::from(uri.port_u16().unwrap_or(default_port)),
    );
}

#[derive(Clone)]
pub struct Transport {
    client: Client<HttpsConnector<EgressConnector>, Full<Bytes>>,
}

impl Transport {
    /// A client that speaks HTTPS (the webpki roots and `egress.ca_file`'s, ALPN h2 then
    /// http/1.1) and plain HTTP, through the egress proxy when there is one.
    pub fn new(connect_timeout: Duration, egress: &EgressSettings) -> Self {
        let extra_roots = egress
            .extra_roots
            .as_ref()
            .map_or(&[][..], |roots| &roots.certificates[..]);
        Self::with_tls(
            connect_timeout,
            crate::tls::client_config(extra_roots),
            egress,
        )
    }

    /// The same with a caller-chosen TLS configuration (tests trust their own CA this way).
    pub fn with_tls(
        connect_timeout: Duration,
        tls: rustls::ClientConfig,
        egress: &EgressSettings,
    ) -> Self {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(connect_timeout));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(EgressConnector::new(http, egress.proxy.as_ref()));
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .build(https);
        Transport { client }
    }

    /// Sends one request and reads the whole answer, within `timeout` and `max_bytes`.
    pub async fn attempt(
        &self,
        request: Request<Full<Bytes>>,
        timeout: Duration,
        max_bytes: usize,
    ) -> Result<Answer, AttemptError> {
        // Its bytes are shared with the request's URI: a clone, not a copy, until an error
        // names the host.
        let authority = request.uri().authority().cloned();
        let exchange = async {
            let response = self.client.request(request).await.map_err(|err| {
                if err.is_connect() {
                    let host = authority.as_ref().map_or("", |a| a.host()).to_owned();
                    AttemptError::Connect(connect_failure(err, host))
                } else {
                    AttemptError::Failed(Arc::new(err))
                }
            })?;
            let (parts, body) = response.into_parts();
            let body = whole_body(Limited::new(body, max_bytes))
                .await
                .map_err(|err| {
                    if err
                        .downcast_ref::<http_body_util::LengthLimitError>()
                        .is_some()
                    {
                        AttemptError::TooLarge(max_bytes)
                    } else {
                        AttemptError::Failed(SharedError::from(err))
                    }
                })?;
            Ok(Answer {
                status: parts.status,
                headers: parts.headers,
                body,
            })
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .unwrap_or(Err(AttemptError::Timeout))
    }
}

/// A body's data, joined (its trailers, if any, dropped): what `collect().to_bytes()` gives,
/// without the list of chunks it keeps (an allocation) for an answer that comes in one.
async fn whole_body<B>(mut body: B) -> Result<Bytes, B::Error>
where
    B: Body<Data = Bytes> + Unpin,
{
    let mut first = Bytes::new();
    let mut joined: Option<BytesMut> = None;
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else {
            continue;
        };
        if data.is_empty() {
            continue;
        }
        match &mut joined {
            Some(joined) => joined.extend_from_slice(&data),
            None if first.is_empty() => first = data,
            None => {
                let mut both = BytesMut::with_capacity(first.len() + data.len());
                both.extend_from_slice(&first);
                both.extend_from_slice(&data);
                joined = Some(both);
            }
        }
    }
    Ok(joined.map_or(first, BytesMut::freeze))
}

/// A certificate that no trusted root signs.
#[derive(Debug, thiserror::Error)]
#[error(
    "TLS: the certificate of {host} is not trusted (no built-in root and no root of \
     egress.ca_file signs it, or it is not valid for {host})"
)]
pub struct UntrustedCertificate {
    host: String,
    #[source]
    source: hyper_util::client::legacy::Error,
}

/// A failed connection, said plainly when the cause is the peer's certificate (a TLS-inspecting
/// proxy whose CA is missing from `egress.ca_file` looks like this).
fn connect_failure(err: hyper_util::client::legacy::Error, host: String) -> SharedError {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&err);
    while let Some(current) = cause {
        if let Some(rustls::Error::InvalidCertificate(_)) = current.downcast_ref::<rustls::Error>()
        {
            return Arc::new(UntrustedCertificate { host, source: err });
        }
        // hyper-rustls hands rustls' error over inside `io::Error`s, whose `source` skips it.
        cause = match current
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            Some(inner) => Some(inner),
            None => current.source(),
        };
    }
    Arc::new(err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::StreamBody;
    use hyper::body::Frame;

    fn body_of(frames: Vec<Frame<Bytes>>) -> impl Body<Data = Bytes, Error = String> + Unpin {
        StreamBody::new(futures_util::stream::iter(
            frames.into_iter().map(Ok).collect::<Vec<_>>(),
        ))
    }

    #[tokio::test]
    async fn a_body_is_read_whole_as_collect_reads_it() {
        let data = |s: &'static str| Frame::data(Bytes::from_static(s.as_bytes()));
        let mut trailers = HeaderMap::new();
        trailers.insert("x-checksum", http::HeaderValue::from_static("1"));
        let frames = || {
            vec![
                data(""),
                data("{\"status\""),
                data(""),
                Frame::trailers(trailers.clone()),
                data(":\"REFU"),
                data("SED\"}"),
            ]
        };
        let whole = whole_body(body_of(frames())).await.unwrap();
        assert_eq!(whole, br#"{"status":"REFUSED"}"#[..]);
        let collected = body_of(frames()).collect().await.unwrap().to_bytes();
        assert_eq!(whole, collected);

        // One chunk is handed over as it is, not copied.
        let one = Bytes::from_static(br#"{"status":"CONSENTED"}"#);
        let whole = whole_body(body_of(vec![Frame::data(one.clone())]))
            .await
            .unwrap();
        assert_eq!(whole.as_ptr(), one.as_ptr());
        assert!(whole_body(body_of(Vec::new())).await.unwrap().is_empty());
    }
}
