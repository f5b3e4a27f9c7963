//! A real forward proxy for the egress tests: Debian's `tinyproxy`, started here on a free
//! loopback port with its own configuration and log (a missing `tinyproxy` fails loudly; the
//! test script installs it). It tunnels `CONNECT` only to the ports it is told to.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::redis_server::free_port;
use super::temp_file::TempFile;

pub struct ForwardProxy {
    child: Child,
    port: u16,
    log: TempFile,
    _config: TempFile,
}

impl ForwardProxy {
    /// Tunnels to `connect_ports` (others: 403); with `credentials`, asks for them (407).
    pub fn start(connect_ports: &[u16], credentials: Option<(&str, &str)>) -> ForwardProxy {
        let port = free_port();
        let log = TempFile::new("tinyproxy.log", "");
        let mut config = format!(
            "Port {port}\nListen 127.0.0.1\nTimeout 30\nLogFile \"{}\"\nLogLevel Connect\n\
             MaxClients 64\nAllow 127.0.0.1\n",
            log.display()
        );
        for connect_port in connect_ports {
            config.push_str(&format!("ConnectPort {connect_port}\n"));
        }
        if let Some((user, password)) = credentials {
            config.push_str(&format!("BasicAuth {user} {password}\n"));
        }
        let config = TempFile::new("tinyproxy.conf", &config);
        let child = Command::new(tinyproxy())
            .arg("-d")
            .arg("-c")
            .arg(config.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start tinyproxy (apt-get install tinyproxy): {e}"));
        let proxy = ForwardProxy {
            child,
            port,
            log,
            _config: config,
        };
        proxy.wait_listening();
        proxy
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The `CONNECT` requests it logged, e.g. `CONNECT localhost:4443 HTTP/1.1`.
    pub fn connects(&self) -> Vec<String> {
        std::fs::read_to_string(self.log.path())
            .unwrap_or_default()
            .lines()
            .filter_map(|line| line.split_once("): ").map(|(_, request)| request))
            .filter(|request| request.starts_with("CONNECT "))
            .map(str::to_owned)
            .collect()
    }

    fn wait_listening(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "tinyproxy did not listen on {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ForwardProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn tinyproxy() -> PathBuf {
    ["/usr/bin/tinyproxy", "/usr/sbin/tinyproxy"]
        .iter()
        .map(PathBuf::from)
        .find(|path| path.exists())
        .unwrap_or_else(|| PathBuf::from("tinyproxy"))
}
