//! The limit a cache hit is measured against: a bare hyper 1.x server with the proxy's runtime
//! settings (tokio's multi-thread runtime with its defaults, hyper-util's auto builder for
//! HTTP/1.1 and h2, `TCP_NODELAY`, mimalloc, the release profile's optimisation), answering every request `200 {"status":"NO_CONSENT"}` from a
//! static body, as a consent-proxy hit answers the simulator's unknown contacts. Nothing else:
//! no routing, no authentication, no cache, no metrics, no log.
//!
//! `benches/compare.sh` runs it as target `h`: `bare_hyper --listen 127.0.0.1:PORT`. Run by
//! `cargo bench` without `--listen`, it says so and exits.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http::{header, HeaderValue, Response};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const BODY: &[u8] = br#"{"status":"NO_CONSENT"}"#;

fn main() {
    let mut args = std::env::args().skip_while(|a| a != "--listen").skip(1);
    let Some(addr) = args.next().and_then(|a| a.parse::<SocketAddr>().ok()) else {
        eprintln!("bare_hyper: nothing to measure on its own; benches/compare.sh runs it with --listen ADDR");
        return;
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr).await.expect("bind");
        let builder = auto::Builder::new(TokioExecutor::new());
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            let builder = builder.clone();
            tokio::spawn(async move {
                let service = service_fn(|_request| async {
                    let mut response = Response::new(Full::new(Bytes::from_static(BODY)));
                    response.headers_mut().insert(
                        header::CONTENT_TYPE,
                        HeaderValue::from_static("application/json"),
                    );
                    Ok::<_, Infallible>(response)
                });
                let _ = builder
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
}
