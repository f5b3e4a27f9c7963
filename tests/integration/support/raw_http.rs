//! Raw HTTP/1.1 over TCP: framing helpers and exchanges whose bytes tests control.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Where the head in `buf` ends (after its blank line), once it has all arrived.
pub fn head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|end| end + 4)
}

/// The `Content-Length` of a request or answer head; 0 when absent or unreadable.
pub fn content_length(head: &str) -> usize {
    head.lines()
        .find_map(|line| {
            let (n, v) = line.split_once(':')?;
            n.trim()
                .eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0)
}

/// A local address nothing listens on (bound, then released).
pub async fn free_addr() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    addr
}

/// Sends raw bytes on a fresh connection and reads the answer until the server closes the
/// connection or `complete` says the bytes so far are enough. Write errors are ignored (the
/// server may answer and close before reading everything). `None` when that takes longer
/// than `limit`.
pub async fn read_raw_answer(
    addr: SocketAddr,
    request: &[u8],
    limit: Duration,
    complete: impl Fn(&[u8]) -> bool,
) -> Option<Vec<u8>> {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let _ = stream.write_all(request).await;
    let mut answer = Vec::new();
    let read = tokio::time::timeout(limit, async {
        let mut buf = [0u8; 8192];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
            if complete(&answer) {
                break;
            }
        }
    })
    .await;
    read.is_ok().then_some(answer)
}
