//! A TCP relay between one proxy and Redis that a test can pause: while paused, bytes already
//! read are held and new connections are accepted but not connected onwards, like a network
//! that stopped delivering (connections stay open, nothing arrives). Resumed, everything held
//! is delivered in order.
#![allow(dead_code)]

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use super::redis_server::RedisServer;

pub struct Relay {
    addr: SocketAddr,
    paused: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    /// A relay on a free loopback port to `redis`.
    pub async fn before(redis: &RedisServer) -> Relay {
        let target = SocketAddr::from(([127, 0, 0, 1], redis.port()));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind relay");
        let addr = listener.local_addr().expect("relay address");
        let (paused, watch_paused) = watch::channel(false);
        let task = tokio::spawn(async move {
            loop {
                let Ok((inbound, _)) = listener.accept().await else {
                    return;
                };
                let paused = watch_paused.clone();
                tokio::spawn(async move {
                    let _ = relay(inbound, target, paused).await;
                });
            }
        });
        Relay { addr, paused, task }
    }

    /// The proxies' `redis://` URL of the relay (as the proxies' Redis user).
    pub fn url(&self) -> String {
        super::redis_server::proxy_url(self.addr)
    }

    pub fn pause(&self) {
        self.paused.send_replace(true);
    }

    pub fn resume(&self) {
        self.paused.send_replace(false);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn relay(
    inbound: TcpStream,
    target: SocketAddr,
    mut paused: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let _ = paused.wait_for(|paused| !paused).await;
    let outbound = TcpStream::connect(target).await?;
    let (inbound_read, inbound_write) = inbound.into_split();
    let (outbound_read, outbound_write) = outbound.into_split();
    tokio::select! {
        _ = pump(inbound_read, outbound_write, paused.clone()) => {}
        _ = pump(outbound_read, inbound_write, paused) => {}
    }
    Ok(())
}

/// Copies `from` to `to`, holding each chunk while the relay is paused.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut paused: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        let read = from.read(&mut buffer).await?;
        if read == 0 {
            return Ok(());
        }
        if paused.wait_for(|paused| !paused).await.is_err() {
            return Ok(());
        }
        to.write_all(&buffer[..read]).await?;
    }
}
