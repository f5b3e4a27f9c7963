//! A fake upstream that answers each request with crafted bytes (or none), one request per
//! connection, and records what it received and when.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::raw_http::{content_length, head_end};

/// A request as the fake upstream received it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub target: String,
    /// The request line and headers, as received.
    pub head: String,
    /// When it had arrived whole.
    pub at: Instant,
}

/// How the fake upstream treats one request (one request per connection).
#[derive(Clone)]
pub enum Act {
    /// Write these bytes, then close.
    Send(Vec<u8>),
    /// Wait, then write these bytes and close (a slow upstream).
    SendAfter(Duration, Vec<u8>),
    /// Write `head` at once, then `body` one byte every `every`.
    Drip {
        head: Vec<u8>,
        body: Vec<u8>,
        every: Duration,
    },
    /// Never answer; keep the connection open until the peer closes it.
    Hang,
    /// Write these bytes, then reset the connection (RST, not FIN).
    ResetAfter(Vec<u8>),
    /// A chunked 200 whose body never ends, written as fast as the peer reads.
    Flood,
}

pub struct FakeUpstream {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    concurrency: Arc<Concurrency>,
    count: watch::Receiver<usize>,
    task: JoinHandle<()>,
}

impl FakeUpstream {
    /// Starts a fake upstream on a port of its own; `respond` picks the treatment of each
    /// request, given it and the number of requests received before it.
    pub async fn start(respond: impl Fn(&Seen, usize) -> Act + Send + Sync + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::serve(listener, respond)
    }

    /// Starts a fake upstream on `listener`, as [`FakeUpstream::start`].
    pub fn serve(
        listener: TcpListener,
        respond: impl Fn(&Seen, usize) -> Act + Send + Sync + 'static,
    ) -> Self {
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (count_tx, count) = watch::channel(0);
        let respond = Arc::new(respond);
        let recorded = seen.clone();
        let concurrency = Arc::new(Concurrency::default());
        let tracked = concurrency.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let respond = respond.clone();
                let recorded = recorded.clone();
                let count_tx = count_tx.clone();
                let tracked = tracked.clone();
                tokio::spawn(async move {
                    let mut stream = stream;
                    let Some(request) = read_request(&mut stream).await else {
                        return;
                    };
                    let act = {
                        let mut seen = recorded.lock().unwrap();
                        let act = respond(&request, seen.len());
                        seen.push(request);
                        count_tx.send_replace(seen.len());
                        act
                    };
                    tracked.enter();
                    perform(stream, act).await;
                    tracked.leave();
                });
            }
        });
        FakeUpstream {
            addr,
            seen,
            concurrency,
            count,
            task,
        }
    }

    /// The most requests it was ever answering at once.
    pub fn max_concurrent(&self) -> usize {
        self.concurrency.max.load(Ordering::SeqCst)
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// Waits (bounded) until `n` requests have arrived.
    pub async fn wait_for_requests(&self, n: usize) {
        let mut count = self.count.clone();
        tokio::time::timeout(Duration::from_secs(10), count.wait_for(|c| *c >= n))
            .await
            .unwrap_or_else(|_| panic!("{n} requests did not arrive"))
            .unwrap();
    }

    /// Stops listening (the port refuses connections again).
    pub async fn stop(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

/// Requests being answered now, and the most ever at once.
#[derive(Default)]
struct Concurrency {
    now: AtomicUsize,
    max: AtomicUsize,
}

impl Concurrency {
    fn enter(&self) {
        let now = self.now.fetch_add(1, Ordering::SeqCst) + 1;
        self.max.fetch_max(now, Ordering::SeqCst);
    }

    fn leave(&self) {
        self.now.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Reads one request head (and its Content-Length body); `None` when the peer goes away.
async fn read_request(stream: &mut TcpStream) -> Option<Seen> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(end) = head_end(&buf) {
            break end;
        }
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let length = content_length(&head);
    while buf.len() < head_end + length {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let mut words = head.split_whitespace();
    Some(Seen {
        method: words.next()?.to_owned(),
        target: words.next()?.to_owned(),
        at: Instant::now(),
        head: head.clone(),
    })
}

async fn perform(mut stream: TcpStream, act: Act) {
    match act {
        Act::Send(bytes) => {
            let _ = stream.write_all(&bytes).await;
            let _ = stream.shutdown().await;
        }
        Act::SendAfter(wait, bytes) => {
            tokio::time::sleep(wait).await;
            let _ = stream.write_all(&bytes).await;
            let _ = stream.shutdown().await;
        }
        Act::Drip { head, body, every } => {
            if stream.write_all(&head).await.is_err() {
                return;
            }
            for byte in body {
                tokio::time::sleep(every).await;
                if stream.write_all(&[byte]).await.is_err() {
                    return;
                }
            }
        }
        Act::Hang => {
            let mut sink = [0u8; 1024];
            while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
        }
        Act::ResetAfter(bytes) => {
            let _ = stream.write_all(&bytes).await;
            let _ = stream.flush().await;
            stream.set_zero_linger().unwrap();
            drop(stream);
        }
        Act::Flood => {
            let head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\
                         Transfer-Encoding: chunked\r\n\r\n";
            if stream.write_all(head).await.is_err() {
                return;
            }
            let chunk = format!("1000\r\n{}\r\n", "x".repeat(0x1000));
            // Bounded, in case the proxy reads it all: 64 MiB.
            for _ in 0..16 * 1024 {
                if stream.write_all(chunk.as_bytes()).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// A whole HTTP/1.1 answer with `Content-Length` and `Connection: close`.
pub fn answer(status_line: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut out = format!("HTTP/1.1 {status_line}\r\n");
    for (name, value) in headers {
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    out.push_str(&format!(
        "Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    ));
    let mut out = out.into_bytes();
    out.extend_from_slice(body);
    out
}

/// A 200 with a JSON consent body `{"status": status}`.
pub fn consent_200(status: &str) -> Vec<u8> {
    answer(
        "200 OK",
        &[("Content-Type", "application/json")],
        format!(r#"{{"status":"{status}"}}"#).as_bytes(),
    )
}
