//! The proxy as a child process (the binary), for what only a process can show: a `kill -9`.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::Child;
use std::sync::mpsc;
use std::time::Duration;

use super::temp_file::TempFile;
use super::ProxyConfig;

pub struct ChildProxy {
    child: Child,
    /// `http://` base URLs of the consent and admin listeners.
    pub url: String,
    pub admin_url: String,
    _config: TempFile,
}

impl ChildProxy {
    /// Starts `consent-proxy serve` with `config` (text logs) and waits until it listens.
    pub fn start(config: &ProxyConfig) -> ChildProxy {
        let config = TempFile::new("child.toml", &config.to_toml());
        let mut child = super::serve_command(config.path())
            .spawn()
            .expect("spawn consent-proxy");
        let stderr = child.stderr.take().expect("piped stderr");
        let (tx, listening) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if line.contains("consent-proxy listening") {
                    let _ = tx.send(line);
                }
            }
        });
        let line = listening
            .recv_timeout(Duration::from_secs(30))
            .expect("the child proxy did not start");
        let addr = |key: &str| {
            let start = line.find(&format!("{key}=")).expect("address in the line") + key.len() + 1;
            let rest = &line[start..];
            let end = rest
                .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == ':'))
                .unwrap_or(rest.len());
            format!("http://{}", &rest[..end])
        };
        ChildProxy {
            url: addr("listen_addr"),
            admin_url: addr("admin_addr"),
            child,
            _config: config,
        }
    }

    /// `kill -9`: no drain, no last writes, as a crash or an OOM kill.
    pub fn kill9(mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("reap");
    }
}

impl Drop for ChildProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
