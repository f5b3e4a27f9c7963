//! How connections to Talkdesk leave the machine: directly, or through an HTTP proxy that
//! tunnels them (`CONNECT`), as `egress.proxy_url` or, when it is empty, the environment's
//! `HTTPS_PROXY` / `HTTP_PROXY` / `ALL_PROXY` and `NO_PROXY` say (read as curl reads them, by
//! hyper-util's matcher). TLS to Talkdesk runs inside the tunnel (the HTTPS connector wraps this
//! one), so the proxy sees only the host and port; the pool keeps tunnelled connections alive
//! like direct ones, one CONNECT per connection, not per request.
//!
//! Each way a tunnel can fail is its own error, so the log line and `/readyz` say which: the
//! proxy unreachable, a refusal with the proxy's status (407, 403, 502, ...), or an answer that
//! is not HTTP. The proxy's credentials travel only in the CONNECT request's
//! `Proxy-Authorization` header; no message shows them.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{HeaderValue, Uri};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::proxy::matcher::Matcher;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tower_service::Service;

use crate::config::ProxyEndpoint;

/// The longest answer to CONNECT read; a proxy's refusal page beyond it is not read.
const MAX_CONNECT_ANSWER: usize = 8192;

/// Where connections go: the configured proxy, or the environment's rules.
#[derive(Clone)]
enum Route {
    Configured(Arc<ProxyEndpoint>),
    Environment(Arc<Matcher>),
}

/// A connector for hyper-util's client: TCP to the destination, or a CONNECT tunnel to it.
#[derive(Clone)]
pub struct EgressConnector {
    tcp: HttpConnector,
    route: Route,
}

/// Why no connection to the destination could be made.
#[derive(Debug, thiserror::Error)]
pub enum EgressError {
    #[error("cannot connect to {target}")]
    Direct {
        target: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("the egress proxy {proxy} is unreachable")]
    ProxyUnreachable {
        proxy: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("the egress proxy {proxy} refused the tunnel to {target}: {status} ({meaning})")]
    Refused {
        proxy: String,
        target: String,
        status: u16,
        meaning: &'static str,
    },
    #[error("the egress proxy {proxy} broke off the tunnel to {target}")]
    Broken {
        proxy: String,
        target: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the egress proxy {proxy} answered CONNECT with something that is not HTTP")]
    NotHttp { proxy: String },
    #[error("the egress proxy {proxy} is not an http:// proxy (https:// and SOCKS proxies are not supported)")]
    UnsupportedProxy { proxy: String },
    #[error("the destination {0} has no host")]
    NoHost(String),
}

impl EgressConnector {
    /// `configured` is `egress.proxy_url`; without it the environment decides (read now).
    pub fn new(tcp: HttpConnector, configured: Option<&ProxyEndpoint>) -> Self {
        let route = match configured {
            Some(proxy) => Route::Configured(Arc::new(proxy.clone())),
            None => Route::Environment(Arc::new(Matcher::from_env())),
        };
        EgressConnector { tcp, route }
    }

    /// The proxy for `destination`, if any: its address and credentials.
    fn proxy_for(&self, destination: &Uri) -> Result<Option<Hop>, EgressError> {
        match &self.route {
            Route::Configured(proxy) => Ok(Some(Hop {
                authority: proxy.authority.clone(),
                authorization: proxy.authorization.clone(),
            })),
            Route::Environment(matcher) => {
                let Some(intercept) = matcher.intercept(destination) else {
                    return Ok(None);
                };
                let uri = intercept.uri();
                let host = uri.host().unwrap_or_default();
                let authority = match uri.port_u16() {
                    Some(port) => format!("{host}:{port}"),
                    None => host.to_owned(),
                };
                if uri.scheme_str() != Some("http") {
                    return Err(EgressError::UnsupportedProxy { proxy: authority });
                }
                Ok(Some(Hop {
                    authority,
                    authorization: intercept.basic_auth().cloned(),
                }))
            }
        }
    }
}

/// One proxy to pass through.
struct Hop {
    /// `host:port`, safe to log.
    authority: String,
    authorization: Option<HeaderValue>,
}

impl Service<Uri> for EgressConnector {
    type Response = TokioIo<TcpStream>;
    type Error = EgressError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, EgressError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), EgressError>> {
        // The TCP connector is always ready.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, destination: Uri) -> Self::Future {
        let mut tcp = self.tcp.clone();
        let hop = self.proxy_for(&destination);
        Box::pin(async move {
            let target = target_of(&destination)?;
            let Some(hop) = hop? else {
                return tcp
                    .call(destination)
                    .await
                    .map_err(|source| EgressError::Direct {
                        target,
                        source: source.into(),
                    });
            };
            let proxy_uri = Uri::try_from(format!("http://{}", hop.authority)).map_err(|_| {
                EgressError::UnsupportedProxy {
                    proxy: hop.authority.clone(),
                }
            })?;
            let stream =
                tcp.call(proxy_uri)
                    .await
                    .map_err(|source| EgressError::ProxyUnreachable {
                        proxy: hop.authority.clone(),
                        source: source.into(),
                    })?;
            let stream = tunnel(stream.into_inner(), &hop, &target).await?;
            Ok(TokioIo::new(stream))
        })
    }
}

/// `host:port` of the destination, the port from the scheme when absent.
fn target_of(destination: &Uri) -> Result<String, EgressError> {
    let host = destination
        .host()
        .ok_or_else(|| EgressError::NoHost(destination.to_string()))?;
    let port = destination
        .port_u16()
        .unwrap_or(if destination.scheme_str() == Some("http") {
            80
        } else {
            443
        });
    Ok(format!("{host}:{port}"))
}

/// Asks the proxy for a tunnel to `target` and reads its answer: the stream is the tunnel
/// once the proxy said 2xx.
async fn tunnel(mut stream: TcpStream, hop: &Hop, target: &str) -> Result<TcpStream, EgressError> {
    let broken = |source| EgressError::Broken {
        proxy: hop.authority.clone(),
        target: target.to_owned(),
        source,
    };
    let mut request = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n").into_bytes();
    if let Some(authorization) = &hop.authorization {
        request.extend_from_slice(b"Proxy-Authorization: ");
        request.extend_from_slice(authorization.as_bytes());
        request.extend_from_slice(b"\r\n");
    }
    request.extend_from_slice(b"\r\n");
    stream.write_all(&request).await.map_err(broken)?;

    // The proxy sends nothing after its answer's head until the client speaks (TLS and HTTP
    // both begin with the client), so reading up to the blank line takes no tunnelled byte.
    let mut answer = Vec::with_capacity(512);
    let mut chunk = [0u8; 512];
    loop {
        let read = stream.read(&mut chunk).await.map_err(broken)?;
        if read == 0 {
            return Err(broken(std::io::ErrorKind::UnexpectedEof.into()));
        }
        answer.extend_from_slice(&chunk[..read]);
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut head = httparse::Response::new(&mut headers);
        match head.parse(&answer) {
            Ok(httparse::Status::Complete(end)) => {
                let status = head.code.unwrap_or_default();
                if !(200..300).contains(&status) {
                    return Err(EgressError::Refused {
                        proxy: hop.authority.clone(),
                        target: target.to_owned(),
                        status,
                        meaning: meaning_of(status),
                    });
                }
                if end != answer.len() {
                    return Err(EgressError::NotHttp {
                        proxy: hop.authority.clone(),
                    });
                }
                return Ok(stream);
            }
            Ok(httparse::Status::Partial) if answer.len() < MAX_CONNECT_ANSWER => {}
            _ => {
                return Err(EgressError::NotHttp {
                    proxy: hop.authority.clone(),
                })
            }
        }
    }
}

/// What a proxy's refusal means for the operator.
fn meaning_of(status: u16) -> &'static str {
    match status {
        407 => "the proxy wants credentials: check the user and password of egress.proxy_url",
        403 => "the proxy's policy forbids this destination or port",
        502 | 504 => "the proxy could not reach the destination",
        503 => "the proxy is overloaded or shutting down",
        _ => "the proxy refused",
    }
}
