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
use std::io::IoSlice;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{HeaderValue, Uri};
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::client::proxy::matcher::Matcher;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
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
    type Response = TokioIo<EgressStream>;
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
                let stream = tcp
                    .call(destination)
                    .await
                    .map_err(|source| EgressError::Direct {
                        target,
                        source: source.into(),
                    })?;
                return Ok(TokioIo::new(EgressStream(stream.into_inner())));
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
            Ok(TokioIo::new(EgressStream(stream)))
        })
    }
}

/// A connection to Talkdesk (or a tunnel to it) as the client's pool keeps it: the TCP stream,
/// described to hyper-util without the addresses `TcpStream` adds (`HttpInfo`), which it would
/// copy into every response's extensions (two allocations per response) for nobody to read.
pub struct EgressStream(TcpStream);

impl Connection for EgressStream {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl AsyncRead for EgressStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for EgressStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
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

#[cfg(test)]
mod tests {
    use super::*;
    use hyper_util::client::legacy::connect::HttpInfo;

    /// What the pool keeps of a connection is copied into every response's extensions: the
    /// addresses `TcpStream` describes itself with would cost two allocations per response.
    #[tokio::test]
    async fn a_connection_brings_nothing_into_each_response() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let destination: Uri = format!("http://{}/", listener.local_addr().unwrap())
            .parse()
            .unwrap();
        let mut connector = EgressConnector {
            tcp: HttpConnector::new(),
            route: Route::Environment(Arc::new(Matcher::builder().build())),
        };
        let stream = connector.call(destination).await.expect("connected");
        let mut extensions = http::Extensions::new();
        stream.connected().get_extras(&mut extensions);
        assert!(extensions.get::<HttpInfo>().is_none());
    }
}
