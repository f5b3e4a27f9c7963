//! What the in-process benchmarks send through the handler: consent GETs and PUTs for the
//! contacts `+1555NNNNNNN` of a working set, with the benchmarks' API key, and the simulator
//! they are sent to.
#![allow(dead_code)]

use bytes::Bytes;
use consent_proxy::simulator::{Simulator, SimulatorConfig};
use http::Request;
use http_body_util::Full;

pub const KEY: &str = "bench-key-0123456789abcdef";
pub const SIM_CLIENT_SECRET: &str = "bench-secret";

fn path(contact: usize) -> String {
    format!("/voicebiometrics/contacts/%2B1555{contact:07}/consent")
}

pub fn get(contact: usize) -> Request<Full<Bytes>> {
    Request::get(path(contact))
        .header("x-api-key", KEY)
        .body(Full::new(Bytes::new()))
        .expect("valid request")
}

pub fn put(contact: usize, status: &str) -> Request<Full<Bytes>> {
    Request::put(path(contact))
        .header("x-api-key", KEY)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(format!(
            r#"{{"status":"{status}"}}"#
        ))))
        .expect("valid request")
}

/// The simulator on a free loopback port, with the client secret the benchmarks configure.
pub async fn simulator() -> Simulator {
    Simulator::start(
        "127.0.0.1:0".parse().expect("addr"),
        SimulatorConfig {
            client_secret: SIM_CLIENT_SECRET.into(),
            ..SimulatorConfig::default()
        },
    )
    .await
    .expect("simulator")
}
