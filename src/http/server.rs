//! Listening and connection handling: the accept loop, the connection limit, optional TLS
//! termination, HTTP/1.1 + h2 via hyper-util's auto builder, and graceful shutdown.
//!
//! The loop follows hyper-util's `server_graceful` example: each connection is watched by a
//! `GracefulShutdown`; on shutdown the listener closes at once, in-flight requests get the
//! grace period to finish, and connections still open after it are cut off.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::rt::{Read, Write};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
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
}

/// Serves `listener` until `shutdown` resolves to a grace period, then drains within it.
///
/// The handler gets each request with the address of the peer that sent it (the token
/// endpoint throttles by it). Passed as an argument rather than a request extension: an
/// extension allocates a map on every request, and every request would pay for it.
///
/// A handler's `Err` makes hyper drop the connection unanswered (HTTP/2: reset the stream),
/// which only the simulator's `close` fault wants; the proxy's handlers never fail.
pub async fn serve<H, F, E>(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    limits: ListenerLimits,
    handler: H,
    shutdown: impl Future<Output = Duration>,
) where
    H: Fn(Request<Incoming>, SocketAddr) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Result<Response<Body>, E>> + Send + 'static,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let builder = Arc::new(connection_builder(&limits));
    let graceful = GracefulShutdown::new();
    // Every connection task ends when this sender is dropped: once the grace is over, or
    // with `serve` itself.
    let (cut_off, connections_alive) = watch::channel(());
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let mut shutdown = std::pin::pin!(shutdown);
    let grace = loop {
        // Beyond max_connections, new connections wait in the kernel's backlog. (Nothing
        // closes the semaphore; if it were closed, only the shutdown branch would be left.)
        let permit = tokio::select! {
            Ok(permit) = permits.clone().acquire_owned() => permit,
            grace = &mut shutdown => break grace,
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
            grace = &mut shutdown => break grace,
        };
        let _ = stream.set_nodelay(true);
        let connection = Connection {
            builder: builder.clone(),
            watcher: graceful.watcher(),
            header_read_timeout: limits.header_read_timeout,
            peer,
        };
        let handler = handler.clone();
        let tls = tls.clone();
        let mut alive = connections_alive.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = connection.serve(stream, tls, handler) => {}
                // Nothing is ever sent: this resolves when `cut_off` is dropped.
                _ = alive.changed() => {}
            }
            drop(permit);
        });
    };
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(grace) => {
            tracing::warn!("shutdown grace period ended with connections still open");
        }
    }
    drop(cut_off);
}

/// Resolves to `grace` once `shutdown` turns true (or its sender is gone): the shutdown
/// signal of a listener whose grace period is fixed in advance, as the proxy's are.
pub async fn when_shut_down(mut shutdown: watch::Receiver<bool>, grace: Duration) -> Duration {
    let _ = shutdown.wait_for(|stop| *stop).await;
    grace
}

/// What one accepted connection's task needs besides its stream.
struct Connection {
    builder: Arc<auto::Builder<TokioExecutor>>,
    watcher: Watcher,
    /// Both the TLS handshake and the first request must come within it.
    header_read_timeout: Duration,
    peer: SocketAddr,
}

impl Connection {
    /// Serves the connection to its end, after the TLS handshake if `tls` is set. The
    /// handshake runs here, in the connection's task, off the accept loop.
    async fn serve<H, F, E>(self, stream: TcpStream, tls: Option<TlsAcceptor>, handler: H)
    where
        H: Fn(Request<Incoming>, SocketAddr) -> F + Send + Sync + 'static,
        F: Future<Output = Result<Response<Body>, E>> + Send + 'static,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        match tls {
            None => self.serve_http(TokioIo::new(stream), handler).await,
            Some(acceptor) => {
                match tls_handshake(&acceptor, stream, self.header_read_timeout).await {
                    Ok(stream) => self.serve_http(TokioIo::new(stream), handler).await,
                    Err(err) => {
                        tracing::debug!(peer = %self.peer, error = %err, "TLS handshake failed");
                    }
                }
            }
        }
    }

    async fn serve_http<I, H, F, E>(self, io: I, handler: H)
    where
        I: Read + Write + Unpin + Send + 'static,
        H: Fn(Request<Incoming>, SocketAddr) -> F + Send + Sync + 'static,
        F: Future<Output = Result<Response<Body>, E>> + Send + 'static,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let request_seen = Arc::new(AtomicBool::new(false));
        let seen = request_seen.clone();
        let peer = self.peer;
        let service = service_fn(move |request| {
            seen.store(true, Ordering::Relaxed);
            handler(request, peer)
        });
        let connection = self.builder.serve_connection(io, service);
        let connection = first_request_within(
            self.watcher.watch(connection),
            &request_seen,
            self.header_read_timeout,
        );
        if let Err(err) = connection.await {
            tracing::debug!(peer = %self.peer, error = %err, "connection ended with an error");
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
