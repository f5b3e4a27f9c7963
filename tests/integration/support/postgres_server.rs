//! A real PostgreSQL server for the audit tests: `initdb` into a temporary directory and
//! `postgres` on a free loopback port, both run as the `postgres` user (`runuser`: the server
//! refuses to run as root), killed with `SIGKILL` and restarted on the same port. Optionally
//! TLS only, with a password (SCRAM) and the certificate it is given.
//! A missing PostgreSQL fails the test loudly (scripts/test.sh installs Debian's `postgresql`).
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The password of the `postgres` role on a TLS server.
pub const PASSWORD: &str = "audit-test-password";

pub struct PostgresServer {
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
    child: Option<Child>,
    /// Whether it speaks TLS (only).
    tls: bool,
}

/// A server certificate chain and its key, as PEM files.
pub struct CertificateFiles<'a> {
    pub cert_file: &'a Path,
    pub key_file: &'a Path,
}

/// Where Debian puts the server's programs: /usr/lib/postgresql/<version>/bin, newest first.
fn bin_dir() -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.path().join("bin"))
        .filter(|bin| bin.join("postgres").exists())
        .collect();
    versions.sort();
    versions.pop().unwrap_or_else(|| {
        panic!(
            "PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/postgres); the audit tests \
             need it: apt-get install -y postgresql (scripts/test.sh does this)"
        )
    })
}

fn run(command: &mut Command, what: &str) {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    assert!(
        output.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// As the `postgres` user.
fn as_postgres(program: &Path) -> Command {
    let mut command = Command::new("runuser");
    command.args(["-u", "postgres", "--"]).arg(program);
    command
}

impl PostgresServer {
    /// Plain TCP, any local connection trusted.
    pub fn start() -> PostgresServer {
        Self::start_with(None)
    }

    /// TLS only, with this certificate, and a password (`PASSWORD`) for `postgres`.
    pub fn start_tls(certificate: CertificateFiles<'_>) -> PostgresServer {
        Self::start_with(Some(certificate))
    }

    fn start_with(certificate: Option<CertificateFiles<'_>>) -> PostgresServer {
        let bin = bin_dir();
        let dir = std::env::temp_dir().join(format!(
            "consent-proxy-pg-{}-{:x}",
            std::process::id(),
            rand::random::<u64>()
        ));
        std::fs::create_dir_all(dir.join("data")).expect("create the PostgreSQL directory");
        std::fs::create_dir_all(dir.join("socket")).expect("create the socket directory");
        run(
            Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&dir),
            "chown",
        );
        run(
            as_postgres(&bin.join("initdb"))
                .args(["--no-sync", "-A", "trust", "-U", "postgres", "-D"])
                .arg(dir.join("data")),
            "initdb",
        );
        let tls = certificate.is_some();
        if let Some(certificate) = certificate {
            let data = dir.join("data");
            std::fs::copy(certificate.cert_file, data.join("server.crt")).unwrap();
            std::fs::copy(certificate.key_file, data.join("server.key")).unwrap();
            run(
                Command::new("chown")
                    .arg("postgres:postgres")
                    .arg(data.join("server.crt"))
                    .arg(data.join("server.key")),
                "chown",
            );
            run(
                Command::new("chmod")
                    .arg("600")
                    .arg(data.join("server.key")),
                "chmod",
            );
            std::fs::write(
                data.join("pg_hba.conf"),
                "local all all trust\nhostssl all all 127.0.0.1/32 scram-sha-256\n",
            )
            .unwrap();
        }
        for _ in 0..5 {
            let mut server = PostgresServer {
                bin: bin.clone(),
                dir: dir.clone(),
                port: free_port(),
                child: None,
                tls,
            };
            if server.spawn() {
                if tls {
                    server.psql(&format!("ALTER USER postgres PASSWORD '{PASSWORD}'"));
                }
                return server;
            }
        }
        panic!("postgres did not start on any of 5 free ports");
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// A URL for `database` (without a password), with `query` (e.g. `sslmode=disable`).
    pub fn url(&self, database: &str, query: &str) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/{database}?{query}",
            self.port
        )
    }

    /// A new, empty database for one test.
    pub fn create_database(&self) -> String {
        let name = format!("audit_{:x}", rand::random::<u32>());
        self.psql(&format!("CREATE DATABASE {name}"));
        name
    }

    /// Runs SQL through the local socket (as the superuser), returns what psql printed
    /// (unaligned, tuples only).
    pub fn psql_in(&self, database: &str, sql: &str) -> String {
        let output = as_postgres(&self.bin.join("psql"))
            .arg("-h")
            .arg(self.dir.join("socket"))
            .args([
                "-p",
                &self.port.to_string(),
                "-d",
                database,
                "-v",
                "ON_ERROR_STOP=1",
            ])
            .args(["-A", "-t", "-c", sql])
            .output()
            .expect("run psql");
        assert!(
            output.status.success(),
            "psql {sql}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    }

    pub fn psql(&self, sql: &str) -> String {
        self.psql_in("postgres", sql)
    }

    /// `SIGKILL` to the server: its backends (the postmaster's children, so that no open
    /// connection can still commit), then the postmaster, stopped first so that it forks no
    /// new one meanwhile.
    pub fn kill(&mut self) {
        let pid = std::fs::read_to_string(self.dir.join("data/postmaster.pid"))
            .ok()
            .and_then(|text| text.lines().next().map(str::to_owned));
        if let Some(pid) = pid {
            let _ = Command::new("kill").args(["-STOP", &pid]).status();
            let _ = Command::new("pkill").args(["-KILL", "-P", &pid]).status();
            let _ = Command::new("kill").args(["-KILL", &pid]).status();
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // The killed postmaster's backends notice and exit; the port is free once it stops
        // accepting.
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
            assert!(
                Instant::now() < deadline,
                "postgres still accepts after SIGKILL"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts it again on the same port (after [`Self::kill`]); crash recovery runs first.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "kill it first");
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.spawn() {
            assert!(Instant::now() < deadline, "postgres did not restart");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Starts the server and waits until it accepts connections; false if it exited.
    fn spawn(&mut self) -> bool {
        let _ = std::fs::remove_file(self.dir.join("data/postmaster.pid"));
        let mut command = as_postgres(&self.bin.join("postgres"));
        command
            .arg("-D")
            .arg(self.dir.join("data"))
            .arg("-k")
            .arg(self.dir.join("socket"))
            .args(["-p", &self.port.to_string(), "-h", "127.0.0.1"])
            .args(["-c", "fsync=on", "-c", "max_connections=50"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if self.tls {
            command.args(["-c", "ssl=on"]);
        }
        let child = command.spawn().expect("spawn postgres (runuser)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = as_postgres(&self.bin.join("pg_isready"))
                .arg("-h")
                .arg(self.dir.join("socket"))
                .args(["-p", &self.port.to_string(), "-q"])
                .status()
                .is_ok_and(|s| s.success());
            if ready {
                return true;
            }
            if let Some(child) = self.child.as_mut() {
                if child.try_wait().ok().flatten().is_some() {
                    self.child = None;
                    return false;
                }
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}
