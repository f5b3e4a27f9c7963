//! The audit trail in tests: a temporary directory with a SQLite store and a chain key, the
//! contact's history as the admin route answers it, the `audit` commands of the binary, and
//! the store made unwritable for real (`chattr +i`: root ignores file modes).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use std::sync::Mutex;
use std::time::Duration;

use consent_proxy::AppHandle;
use http::Method;

use super::child_proxy::ChildProxy;
use super::fake_upstream::{consent_200, Act, FakeUpstream};
use super::temp_file::TempFile;
use super::{wait_until, without_proxy_env, ProxyConfig, TestClient, ADMIN_KEY, RW_KEY};

pub const BIN: &str = env!("CARGO_BIN_EXE_consent-proxy");
/// The chain key of these tests (the same for every instance of a test).
pub const CHAIN_KEY: &str = "audit-chain-test-key-0123456789abcdef";

/// A directory with the audit's files, removed (made writable first) when dropped.
pub struct AuditDir {
    dir: PathBuf,
}

impl Default for AuditDir {
    fn default() -> Self {
        Self::new()
    }
}

impl AuditDir {
    pub fn new() -> AuditDir {
        let dir = std::env::temp_dir().join(format!(
            "consent-proxy-audit-{}-{:x}",
            std::process::id(),
            rand::random::<u64>()
        ));
        std::fs::create_dir_all(&dir).expect("create the audit directory");
        std::fs::write(dir.join("chain.key"), format!("{CHAIN_KEY}\n")).expect("write the key");
        AuditDir { dir }
    }

    pub fn sqlite_path(&self) -> PathBuf {
        self.dir.join("audit.sqlite")
    }

    pub fn key_file(&self) -> PathBuf {
        self.dir.join("chain.key")
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Auditing on in `config`, with the SQLite store here and `write_policy`.
    pub fn sqlite<'a>(
        &self,
        config: &'a mut ProxyConfig,
        write_policy: &str,
    ) -> &'a mut ProxyConfig {
        config
            .set("audit.enabled", "true")
            .set_str("audit.store", "sqlite")
            .set_str(
                "audit.sqlite_path",
                &self.sqlite_path().display().to_string(),
            )
            .set_str(
                "audit.chain_key_file",
                &self.key_file().display().to_string(),
            )
            .set_str("audit.write_policy", write_policy)
    }

    /// Auditing on in `config`, with the PostgreSQL store at `url` and `write_policy`.
    pub fn postgres<'a>(
        &self,
        config: &'a mut ProxyConfig,
        url: &str,
        write_policy: &str,
    ) -> &'a mut ProxyConfig {
        config
            .set("audit.enabled", "true")
            .set_str("audit.store", "postgres")
            .set_str("audit.postgres_url", url)
            .set_str(
                "audit.chain_key_file",
                &self.key_file().display().to_string(),
            )
            .set_str("audit.write_policy", write_policy)
    }

    /// A file in this directory with `content` (a password file, say).
    pub fn file(&self, name: &str, content: &str) -> PathBuf {
        let path = self.dir.join(name);
        std::fs::write(&path, content).expect("write the file");
        path
    }

    /// The SQLite store, opened directly (as someone with access to the file would).
    pub fn open(&self) -> rusqlite::Connection {
        rusqlite::Connection::open(self.sqlite_path()).expect("open the audit store")
    }

    /// The store's database and write-ahead log made immutable (`chattr +i`), so that no write
    /// reaches them, not even root's; `false` undoes it. (The shared-memory index, which SQLite
    /// maps into memory, is left alone: a mapped page of an immutable file faults with SIGBUS.)
    pub fn set_immutable(&self, immutable: bool) {
        let flag = if immutable { "+i" } else { "-i" };
        for suffix in ["", "-wal"] {
            let file = PathBuf::from(format!("{}{suffix}", self.sqlite_path().display()));
            if file.exists() {
                let status = Command::new("chattr")
                    .arg(flag)
                    .arg(&file)
                    .status()
                    .expect("run chattr (e2fsprogs)");
                // The write-ahead log may go meanwhile: a proxy shutting down removes it.
                assert!(
                    status.success() || !file.exists(),
                    "chattr {flag} {}",
                    file.display()
                );
            }
        }
    }
}

impl Drop for AuditDir {
    fn drop(&mut self) {
        self.set_immutable(false);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `contact`'s records from `GET /admin/audit/contacts/{contact}` (newest first).
pub async fn history(
    http: &TestClient,
    proxy: &AppHandle,
    contact: &str,
) -> Vec<serde_json::Value> {
    history_at(http, &proxy.admin_url(), contact).await
}

/// As [`history`], from the admin listener at `admin_url`.
pub async fn history_at(
    http: &TestClient,
    admin_url: &str,
    contact: &str,
) -> Vec<serde_json::Value> {
    let answer = http
        .send(
            Method::GET,
            &format!("{admin_url}/admin/audit/contacts/{contact}"),
            &[("x-api-key", ADMIN_KEY)],
            None,
        )
        .await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    answer.json()["records"]
        .as_array()
        .cloned()
        .expect("records")
}

/// Waits until `contact`'s newest record (on the admin listener at `admin_url`) has an outcome
/// other than pending, within `limit`; returns the records, newest first.
pub async fn settled_history(
    http: &TestClient,
    admin_url: &str,
    contact: &str,
    limit: Duration,
) -> Vec<serde_json::Value> {
    let found = Mutex::new(Vec::new());
    wait_until(limit, || async {
        let records = history_at(http, admin_url, contact).await;
        let settled = records.first().is_some_and(|r| r["outcome"] != "pending");
        *found.lock().unwrap() = records;
        settled
    })
    .await;
    found.into_inner().unwrap()
}

/// An upstream that holds every PUT (never answers it) and answers GETs `CONSENTED`.
pub async fn upstream_holding_puts() -> FakeUpstream {
    FakeUpstream::start(|seen, _| {
        if seen.method == "PUT" {
            Act::Hang
        } else {
            Act::Send(consent_200("CONSENTED"))
        }
    })
    .await
}

/// Sends a PUT of `status` for `contact` through the child `proxy` and kills it (`-9`) once
/// `upstream` holds the PUT.
pub async fn crash_at_upstream(
    proxy: ChildProxy,
    upstream: &FakeUpstream,
    contact: &str,
    status: &str,
) {
    let url = format!("{}/voicebiometrics/contacts/{contact}/consent", proxy.url);
    let body = format!(r#"{{"status":"{status}"}}"#);
    let put = tokio::spawn(async move {
        TestClient::new()
            .send(
                Method::PUT,
                &url,
                &[("x-api-key", RW_KEY), ("content-type", "application/json")],
                Some(body),
            )
            .await
    });
    upstream.wait_for_requests(1).await;
    proxy.kill9();
    put.abort();
}

/// Runs `consent-proxy audit <args> --config <config>`.
pub fn audit_command(config: &ProxyConfig, args: &[&str]) -> Output {
    let file = TempFile::new("audit.toml", &config.to_toml());
    let mut command = Command::new(BIN);
    command
        .arg("audit")
        .args(args)
        .arg("--config")
        .arg(file.path());
    without_proxy_env(&mut command);
    command.output().expect("run consent-proxy audit")
}
