//! Listening and connection handling: the accept loop, the connection limit, optional TLS
//! termination, HTTP/1.1 + h2 via hyper-util's auto builder, and graceful shutdown.
//!
//! The loop follows hyper-util's `server_graceful` example: each connection is watched by a
//! `GracefulShutdown`; on shutdown the listener closes at once and in-flight requests get
//! `shutdown_grace` to finish.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio_rustls::TlsAcceptor;

use crate::http::body::Body;

/// hyper's smallest allowed HTTP/1 read buffer.
const MIN_HTTP1_BUFFER: usize = 8192;

/// How a listener treats its connections.
#[derive(Debug, Clone)]
pub struct ListenerLimits {
    /// All request headers together; the HTTP layer answers 431 beyond it.
    pub max_header_bytes: usize,
    pub header_read_timeout: Duration,
    pub max_connections: usize,
    pub shutdown_grace: Duration,
}

/// Serves `listener` until `shutdown` turns true, then drains within the grace period.
pub async fn serve<H, F>(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    limits: ListenerLimits,
    handler: H,
    mut shutdown: watch::Receiver<bool>,
) where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let builder = connection_builder(&limits);
    let graceful = GracefulShutdown::new();
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    loop {
        // Beyond max_connections, new connections wait in the kernel's backlog.
        let permit = tokio::select! {
            permit = permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
            _ = stopped(&mut shutdown) => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // Usually EMFILE or a connection reset before accept: pause, go on.
                    tracing::warn!(error = %err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stopped(&mut shutdown) => break,
        };
        let _ = stream.set_nodelay(true);
        let handler = handler.clone();
        let request_seen = Arc::new(AtomicBool::new(false));
        let seen = request_seen.clone();
        let service = service_fn(move |request| {
            seen.store(true, Ordering::Relaxed);
            let response = handler(request);
            async move { Ok::<_, Infallible>(response.await) }
        });
        let first_request_timeout = limits.header_read_timeout;
        match &tls {
            None => {
                let connection = builder
                    .serve_connection(TokioIo::new(stream), service)
                    .into_owned();
                let connection = graceful.watch(connection);
                tokio::spawn(async move {
                    let connection =
                        first_request_within(connection, &request_seen, first_request_timeout);
                    if let Err(err) = connection.await {
                        tracing::debug!(%peer, error = %err, "connection ended with an error");
                    }
                    drop(permit);
                });
            }
            Some(acceptor) => {
                let acceptor = acceptor.clone();
                let builder = builder.clone();
                let handshake_timeout = limits.header_read_timeout;
                let watcher = graceful.watcher();
                // The handshake runs in the connection's task, off the accept loop.
                tokio::spawn(async move {
                    let stream = match tls_handshake(&acceptor, stream, handshake_timeout).await {
                        Ok(stream) => stream,
                        Err(err) => {
                            tracing::debug!(%peer, error = %err, "TLS handshake failed");
                            return;
                        }
                    };
                    let connection = builder
                        .serve_connection(TokioIo::new(stream), service)
                        .into_owned();
                    let connection = first_request_within(
                        watcher.watch(connection),
                        &request_seen,
                        first_request_timeout,
                    );
                    if let Err(err) = connection.await {
                        tracing::debug!(%peer, error = %err, "connection ended with an error");
                    }
                    drop(permit);
                });
            }
        }
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(limits.shutdown_grace) => {
            tracing::warn!("shutdown grace period ended with connections still open");
        }
    }
}

/// Drives `connection`, but ends it when no request has begun within `limit` of the start.
///
/// hyper's HTTP/1 header read timeout only starts once the auto builder has read enough to
/// pick HTTP/1 or HTTP/2, and HTTP/2 has no such timeout at all, so without this a connection
/// that sends nothing (or part of the HTTP/2 preface) would hold a `max_connections` slot for
/// ever. Later requests on a kept-alive connection are hyper's business.
async fn first_request_within<F, E>(
    connection: F,
    request_seen: &AtomicBool,
    limit: Duration,
) -> Result<(), String>
where
    F: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    tokio::pin!(connection);
    tokio::select! {
        result = &mut connection => return result.map_err(|e| e.to_string()),
        _ = tokio::time::sleep(limit) => {}
    }
    if !request_seen.load(Ordering::Relaxed) {
        return Err(format!("no request within {} ms", limit.as_millis()));
    }
    connection.await.map_err(|e| e.to_string())
}

/// Resolves once shutdown is requested (or its sender is gone).
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

async fn tls_handshake(
    acceptor: &TlsAcceptor,
    stream: TcpStream,
    timeout: Duration,
) -> io::Result<tokio_rustls::server::TlsStream<TcpStream>> {
    tokio::time::timeout(timeout, acceptor.accept(stream))
        .await
        .unwrap_or_else(|_| {
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "TLS handshake timed out",
            ))
        })
}

fn connection_builder(limits: &ListenerLimits) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        // Headers beyond the buffer get hyper's own 431; within it the HTTP layer counts.
        .max_buf_size((limits.max_header_bytes + 1024).max(MIN_HTTP1_BUFFER));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX));
    builder
}

/// Binds a listener.
pub async fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    TcpListener::bind(addr).await
}
