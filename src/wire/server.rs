//! Listening and connection handling: the accept loop, the connection limit, optional TLS
//! termination, HTTP/1.1 + h2 via hyper-util's auto builder, and graceful shutdown.
//!
//! The loop follows hyper-util's `server_graceful` example: on shutdown the listener closes at
//! once, every connection is asked to finish gracefully, in-flight requests get the grace
//! period, and connections still open after it are cut off. A connection that brings no
//! request within the header read timeout, or stays idle past the idle timeout, is closed
//! too, so idle clients cannot hold `max_connections` slots. Nor can clients that never take
//! their answers (an HTTP/2 reader that keeps its flow-control window shut): an h2 stream not
//! answered to its last byte within the answer timeout is reset, and a connection asked to
//! shut down gracefully that has not within the answer timeout is cut off.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::rt::{Read, Write};
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;

use crate::wire::body::Body;

/// hyper's smallest allowed HTTP/1 read buffer.
const MIN_HTTP1_BUFFER: usize = 8192;

/// Descriptors reserved beyond a listener's `max_connections`: the other listener, upstream
/// and Redis connections, files.
const DESCRIPTOR_HEADROOM: usize = 1024;

/// How a listener treats its connections.
#[derive(Debug, Clone)]
pub struct ListenerLimits {
    /// All request headers together; the HTTP layer answers 431 beyond it.
    pub max_header_bytes: usize,
    /// Both the TLS handshake and a new connection's first request must come within it.
    pub header_read_timeout: Duration,
    /// A connection with no request in progress for this long is shut down gracefully.
    pub idle_timeout: Duration,
    /// The longest a request may take from its head to its answer's last byte sent: an h2
    /// stream still open past it is reset; a connection still open this long after it was
    /// asked to shut down gracefully (idle, or the server draining) is cut off.
    pub answer_timeout: Duration,
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
    let drain = Drain::new();
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
            watcher: drain.watcher(),
            header_read_timeout: limits.header_read_timeout,
            idle_timeout: limits.idle_timeout,
            answer_timeout: limits.answer_timeout,
            peer,
        };
        let handler = handler.clone();
        let tls = tls.clone();
        let mut alive = connections_alive.clone();
        // On the heap: a connection's future is several kilobytes (hyper's HTTP/1 and HTTP/2
        // state), and tokio copies a task's future whole as it spawns it, stores its output
        // and drops it; boxed, each copy is a pointer's.
        tokio::spawn(Box::pin(async move {
            tokio::select! {
                () = connection.serve(stream, tls, handler) => {}
                // Nothing is ever sent: this resolves when `cut_off` is dropped.
                _ = alive.changed() => {}
            }
            drop(permit);
        }));
    };
    drop(listener);
    tokio::select! {
        () = drain.finish() => {}
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
    builder: Arc<auto::Builder<StreamDeadline>>,
    watcher: DrainWatcher,
    /// Both the TLS handshake and the first request must come within it.
    header_read_timeout: Duration,
    idle_timeout: Duration,
    answer_timeout: Duration,
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
        let activity = Arc::new(Activity::new());
        let tracked = activity.clone();
        let peer = self.peer;
        let service = service_fn(move |request| {
            let in_progress = tracked.begin();
            let response = handler(request, peer);
            async move {
                let response = response.await;
                drop(in_progress);
                response
            }
        });
        let mut connection = std::pin::pin!(self.builder.serve_connection(io, service));
        let mut draining = false;
        let mut watcher = self.watcher;
        let mut drain_requested = std::pin::pin!(watcher.draining());
        // Armed when a graceful shutdown is asked: a peer that never takes its answers would
        // otherwise keep the connection (and its slot) for ever.
        let drain_deadline = tokio::time::sleep(Duration::MAX);
        let mut drain_deadline = std::pin::pin!(drain_deadline);
        let result = loop {
            tokio::select! {
                result = connection.as_mut() => break result.map_err(|e| e.to_string()),
                () = &mut drain_requested, if !draining => {
                    draining = true;
                    connection.as_mut().graceful_shutdown();
                    drain_deadline.as_mut().reset(Instant::now() + self.answer_timeout);
                }
                () = &mut drain_deadline, if draining => break Err(format!(
                    "answers not taken within {} ms of a graceful shutdown",
                    self.answer_timeout.as_millis()
                )),
                idle = activity.idle_for(self.header_read_timeout, self.idle_timeout), if !draining => {
                    match idle {
                        // A connection that never sent a request (or only part of an h2
                        // preface) is simply dropped: there is nothing to shut down gracefully.
                        Idle::NeverUsed => break Err(format!(
                            "no request within {} ms",
                            self.header_read_timeout.as_millis()
                        )),
                        Idle::Kept => {
                            draining = true;
                            connection.as_mut().graceful_shutdown();
                            drain_deadline.as_mut().reset(Instant::now() + self.answer_timeout);
                        }
                    }
                }
            }
        };
        if let Err(err) = result {
            tracing::debug!(peer = %self.peer, error = %err, "connection ended with an error");
        }
    }
}

/// Asks every connection to finish gracefully (h1: after the answer in progress; h2: GOAWAY)
/// and waits until all have. The pattern of hyper-util's `GracefulShutdown`, which cannot be
/// used here because it drives the connection itself, and the idle timeout must be able to
/// ask a connection for a graceful shutdown too.
struct Drain(watch::Sender<()>);

/// A connection's end of the drain signal; the drain waits until every one is dropped.
struct DrainWatcher(watch::Receiver<()>);

impl Drain {
    fn new() -> Self {
        Drain(watch::channel(()).0)
    }

    fn watcher(&self) -> DrainWatcher {
        DrainWatcher(self.0.subscribe())
    }

    async fn finish(self) {
        let _ = self.0.send(());
        self.0.closed().await;
    }
}

impl DrainWatcher {
    /// Resolves once a drain is requested.
    async fn draining(&mut self) {
        let _ = self.0.changed().await;
    }
}

/// How a connection came to be idle too long.
enum Idle {
    /// No request within the header read timeout of the connection's start.
    NeverUsed,
    /// No request in progress for the idle timeout after the last one.
    Kept,
}

/// Requests in progress on one connection, and whether any began or ended lately.
///
/// hyper's HTTP/1 header read timeout only starts once the auto builder has read enough to
/// pick HTTP/1 or HTTP/2, and HTTP/2 has neither that nor an idle timeout, so without this a
/// connection that sends nothing (or part of the HTTP/2 preface), or an idle h2 connection,
/// would hold a `max_connections` slot for ever. A request only bumps two counters (no clock
/// read): the idle check compares them between its wake-ups, so a connection is closed
/// between one and two idle timeouts after its last request.
struct Activity {
    in_progress: AtomicU32,
    /// Requests begun and ended so far (both bump it).
    events: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Activity {
            in_progress: AtomicU32::new(0),
            events: AtomicU64::new(0),
        }
    }

    /// Marks a request in progress until the returned guard is dropped.
    fn begin(self: &Arc<Self>) -> RequestInProgress {
        self.in_progress.fetch_add(1, Ordering::AcqRel);
        self.events.fetch_add(1, Ordering::Release);
        RequestInProgress(self.clone())
    }

    /// Resolves once the connection has been idle too long: never used within
    /// `first_request`, or with no request in progress or begun for `idle`.
    async fn idle_for(&self, first_request: Duration, idle: Duration) -> Idle {
        tokio::time::sleep(first_request).await;
        let mut seen = self.events.load(Ordering::Acquire);
        if seen == 0 {
            return Idle::NeverUsed;
        }
        loop {
            tokio::time::sleep(idle).await;
            let now = self.events.load(Ordering::Acquire);
            if now == seen && self.in_progress.load(Ordering::Acquire) == 0 {
                return Idle::Kept;
            }
            seen = now;
        }
    }
}

/// A request in progress; dropping it (the answer is ready, or the request was cancelled)
/// counts as activity too.
struct RequestInProgress(Arc<Activity>);

impl Drop for RequestInProgress {
    fn drop(&mut self) {
        self.0.in_progress.fetch_sub(1, Ordering::AcqRel);
        self.0.events.fetch_add(1, Ordering::Release);
    }
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

/// The executor hyper's h2 server runs each stream on: tokio's, with every stream bounded by
/// the answer timeout. A stream's task is its handler and then the sending of its answer,
/// which waits for the peer's flow-control window; dropped at the deadline, the stream is
/// reset (RST_STREAM CANCEL) and its buffers freed, and the connection goes on.
#[derive(Clone, Copy)]
struct StreamDeadline {
    answer_timeout: Duration,
}

impl<F> hyper::rt::Executor<F> for StreamDeadline
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, stream: F) {
        let answer_timeout = self.answer_timeout;
        tokio::spawn(async move {
            if tokio::time::timeout(answer_timeout, stream).await.is_err() {
                tracing::debug!(
                    "h2 stream not answered within {} ms: reset",
                    answer_timeout.as_millis()
                );
            }
        });
    }
}

fn connection_builder(limits: &ListenerLimits) -> auto::Builder<StreamDeadline> {
    let mut builder = auto::Builder::new(StreamDeadline {
        answer_timeout: limits.answer_timeout,
    });
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

/// Grows the process's descriptor table now to hold `connections` descriptors and some
/// headroom (below the soft `RLIMIT_NOFILE`), so that the first burst of new connections does not grow it. Linux grows
/// the table by doubling as descriptors are opened (64, 256, 512, 1024, ...), and in a
/// multi-threaded process each growth waits inside `accept()` for an RCU grace period
/// (milliseconds, tens under load): a fresh proxy stalled at its 256th, 512th and 1024th
/// connection while the accept queue overflowed and the kernel dropped SYNs (those clients wait
/// a second for their retransmit). The table never shrinks, so a later burst never paid it.
/// Opening one descriptor at the top (a duplicate of the listener's, closed at once) grows it
/// once, here, before any caller waits: call it before saying the listener is up.
pub fn reserve_descriptors(listener: &TcpListener, connections: usize) {
    let count = connections.saturating_add(DESCRIPTOR_HEADROOM);
    #[cfg(target_os = "linux")]
    {
        use rustix::process::{getrlimit, Resource};
        let soft_limit = getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX);
        let highest = (count as u64).min(soft_limit.saturating_sub(1));
        let Ok(highest) = i32::try_from(highest) else {
            return;
        };
        if let Err(err) = rustix::io::fcntl_dupfd_cloexec(listener, highest) {
            tracing::debug!(error = %err, highest, "could not grow the descriptor table");
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (listener, count);
}

/// Binds a listener with an accept queue of `backlog` connections (std's default is 128,
/// which a burst of new connections overflows: the kernel drops SYNs, and those clients wait
/// a whole second for their retransmit). The kernel caps it at `net.core.somaxconn`.
pub fn bind(addr: SocketAddr, backlog: u32) -> io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    // Like std's listeners: a restarted proxy can listen again while old connections linger
    // in TIME_WAIT.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}
