//! The `consent-proxy` binary as a user runs it: `check-config`, `demo`, `simulator` and
//! `--help`. Child processes are always reaped, killed if a test fails half-way.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use crate::support::temp_file::TempFile;

const BIN: &str = env!("CARGO_BIN_EXE_consent-proxy");

const CLIENT_SECRET: &str = "cli-test-client-secret-Qw7ZpR2x";
const API_KEY: &str = "cli-test-api-key-Vb9Lm4Tn0123";

// ---------------------------------------------------------------------------------------------
// Helpers

/// The binary with no `CONSENT_PROXY__*` variables inherited from the test's environment.
fn command() -> Command {
    let mut command = Command::new(BIN);
    crate::support::without_proxy_env(&mut command).stdin(Stdio::null());
    command
}

/// A valid configuration, with `extra` appended to the `[talkdesk]` section.
fn valid_config(talkdesk_extra: &str, client_key_line: &str) -> String {
    format!(
        r#"[server]
listen = "127.0.0.1:18080"
admin_listen = "127.0.0.1:19464"

[talkdesk]
account = "acme"
region = "eu"
client_id = "cli-client"
{talkdesk_extra}

[[clients]]
name = "studio-ivr"
{client_key_line}
permissions = ["read", "write"]
"#
    )
}

fn inline_secret() -> String {
    format!("client_secret = \"{CLIENT_SECRET}\"")
}

fn inline_key() -> String {
    format!("api_key = \"{API_KEY}\"")
}

fn check_config(file: &Path, env: &[(&str, &str)]) -> Output {
    let mut command = command();
    command.arg("check-config").arg("--config").arg(file);
    for (key, value) in env {
        command.env(key, value);
    }
    command.output().expect("run check-config")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Asserts that check-config accepted the file (exit 0), that none of `secrets` is in its
/// stdout or stderr and that the configuration it printed is itself valid TOML; returns stdout.
fn assert_printed_without(output: &Output, secrets: &[&str]) -> String {
    let stdout = text(&output.stdout);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "stderr: {stderr}");
    for secret in secrets {
        assert!(!stdout.contains(secret), "secret in stdout:\n{stdout}");
        assert!(!stderr.contains(secret), "secret in stderr:\n{stderr}");
    }
    stdout
        .parse::<toml::Table>()
        .unwrap_or_else(|e| panic!("printed config is not TOML: {e}\n{stdout}"));
    stdout
}

/// Asserts exit 2 and that stderr names every one of `keys`.
fn assert_invalid(output: &Output, keys: &[&str]) {
    let stderr = text(&output.stderr);
    assert_eq!(
        output.status.code(),
        Some(2),
        "stdout: {}\nstderr: {stderr}",
        text(&output.stdout)
    );
    for key in keys {
        assert!(stderr.contains(key), "{key} not named in:\n{stderr}");
    }
}

/// Which stream a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stream {
    Stdout,
    Stderr,
}

/// A running child process: killed and reaped if the test ends without stopping it.
struct Running {
    child: Child,
    lines: mpsc::Receiver<(Stream, String)>,
    /// Every line received so far, for diagnostics.
    seen: Vec<(Stream, String)>,
}

impl Running {
    fn spawn(mut command: Command) -> Running {
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn the binary");
        let (tx, lines) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        forward_lines(stdout, Stream::Stdout, tx.clone());
        forward_lines(stderr, Stream::Stderr, tx);
        Running {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Lines of `stream` until `done` says the output is complete (bounded wait).
    fn read_until(
        &mut self,
        stream: Stream,
        limit: Duration,
        done: impl Fn(&[String]) -> bool,
    ) -> Vec<String> {
        let deadline = Instant::now() + limit;
        let mut lines = Vec::new();
        while !done(&lines) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok((from, line)) => {
                    if from == stream {
                        lines.push(line.clone());
                    }
                    self.seen.push((from, line));
                }
                Err(_) => {
                    let status = self.child.try_wait();
                    panic!(
                        "{stream:?} incomplete after {limit:?} (process: {status:?}):\n{}",
                        self.transcript()
                    );
                }
            }
        }
        lines
    }

    /// Sends SIGTERM and waits (bounded) for the exit status.
    fn terminate(&mut self, limit: Duration) -> Option<ExitStatus> {
        crate::support::send_sigterm(&self.child);
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Everything the process printed so far (after it exited: everything).
    fn transcript(&mut self) -> String {
        while let Ok(line) = self.lines.recv_timeout(Duration::from_millis(100)) {
            self.seen.push(line);
        }
        self.seen
            .iter()
            .map(|(stream, line)| format!("{stream:?}: {line}"))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// SIGTERM, then asserts a clean exit (status 0) within `limit`; returns everything the
    /// process printed.
    fn assert_stops_cleanly(&mut self, limit: Duration) -> String {
        let status = self.terminate(limit);
        let transcript = self.transcript();
        let status =
            status.unwrap_or_else(|| panic!("no exit within {limit:?} of SIGTERM:\n{transcript}"));
        assert_eq!(status.code(), Some(0), "{status}:\n{transcript}");
        transcript
    }
}

fn forward_lines(
    pipe: impl Read + Send + 'static,
    stream: Stream,
    tx: mpsc::Sender<(Stream, String)>,
) {
    thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            if tx.send((stream, line)).is_err() {
                break;
            }
        }
    });
}

impl Drop for Running {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs one shell line, returning its stdout.
fn shell(line: &str) -> String {
    let output = Command::new("sh")
        .arg("-c")
        .arg(line)
        .output()
        .expect("run sh");
    assert!(
        output.status.success(),
        "`{line}` failed: {}\n{}",
        output.status,
        text(&output.stderr)
    );
    text(&output.stdout)
}

/// A `curl -i` answer as status and body.
fn parse_curl_i(answer: &str) -> (u16, String) {
    let status = answer
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {answer:?}"));
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    (status, body)
}

fn consent_status(body: &str) -> String {
    let value: serde_json::Value =
        serde_json::from_str(body).unwrap_or_else(|_| panic!("not JSON: {body:?}"));
    value["status"].as_str().unwrap_or_default().to_owned()
}

/// A plain HTTP/1.1 GET over a fresh connection: status and body.
fn http_get(addr: &str, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).expect("read answer");
    parse_curl_i(&answer)
}

// ---------------------------------------------------------------------------------------------
// check-config

#[test]
fn check_config_accepts_a_valid_file_and_prints_it_without_secrets() {
    let file = TempFile::new("valid.toml", &valid_config(&inline_secret(), &inline_key()));
    let stdout = assert_printed_without(&check_config(file.path(), &[]), &[CLIENT_SECRET, API_KEY]);
    // The effective configuration: file values, defaults and derived URLs.
    assert!(stdout.contains(r#"listen = "127.0.0.1:18080""#), "{stdout}");
    assert!(stdout.contains(r#"client_id = "cli-client""#), "{stdout}");
    assert!(stdout.contains(r#"region = "eu""#), "{stdout}");
    assert!(
        stdout.contains("https://acme.talkdeskid.eu/oauth/token"),
        "{stdout}"
    );
    assert!(stdout.contains("https://api.talkdeskapp.eu"), "{stdout}");
    assert!(stdout.contains("max_body_bytes = 4096"), "{stdout}");
    assert!(stdout.contains(r#"name = "studio-ivr""#), "{stdout}");
}

#[test]
fn check_config_names_an_unknown_key() {
    let config = valid_config(&inline_secret(), &inline_key())
        .replace("[server]\n", "[server]\nlisten_adress = \"127.0.0.1:1\"\n");
    let file = TempFile::new("unknown.toml", &config);
    assert_invalid(&check_config(file.path(), &[]), &["server.listen_adress"]);

    let file = TempFile::new(
        "unknown-top.toml",
        &format!("{config}\n[cahce]\nttl_s = 1\n"),
    );
    assert_invalid(
        &check_config(file.path(), &[]),
        &["server.listen_adress", "cahce"],
    );
}

#[test]
fn check_config_names_a_bad_region() {
    let config = valid_config(&inline_secret(), &inline_key())
        .replace("region = \"eu\"", "region = \"mars\"");
    let file = TempFile::new("region.toml", &config);
    assert_invalid(
        &check_config(file.path(), &[]),
        &["talkdesk.region", "mars"],
    );
}

#[test]
fn check_config_names_a_missing_client_secret() {
    let file = TempFile::new("nosecret.toml", &valid_config("", &inline_key()));
    let output = check_config(file.path(), &[]);
    assert_invalid(&output, &["talkdesk.client_secret"]);
    assert!(!text(&output.stderr).contains(API_KEY));
}

#[test]
fn check_config_lists_every_problem_at_once() {
    let config = valid_config("", &inline_key())
        .replace("region = \"eu\"", "region = \"mars\"")
        .replace("[server]\n", "[server]\nbogus = 1\n");
    let file = TempFile::new("many.toml", &config);
    assert_invalid(
        &check_config(file.path(), &[]),
        &["server.bogus", "talkdesk.region", "talkdesk.client_secret"],
    );
}

#[test]
fn check_config_environment_overrides_the_file() {
    let file = TempFile::new("env.toml", &valid_config(&inline_secret(), &inline_key()));
    let output = check_config(
        file.path(),
        &[
            ("CONSENT_PROXY__SERVER__LISTEN", "127.0.0.1:28080"),
            ("CONSENT_PROXY__CACHE__TTL_S", "42"),
        ],
    );
    let stdout = text(&output.stdout);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    assert!(stdout.contains(r#"listen = "127.0.0.1:28080""#), "{stdout}");
    assert!(!stdout.contains("127.0.0.1:18080"), "{stdout}");
    assert!(stdout.contains("ttl_s = 42"), "{stdout}");

    // A secret from the environment completes a file without one, and is not printed.
    let file = TempFile::new("env-secret.toml", &valid_config("", &inline_key()));
    let output = check_config(
        file.path(),
        &[("CONSENT_PROXY__TALKDESK__CLIENT_SECRET", CLIENT_SECRET)],
    );
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    assert!(!text(&output.stdout).contains(CLIENT_SECRET));

    // An unknown key from the environment is named too.
    let output = check_config(file.path(), &[("CONSENT_PROXY__SERVER__LISTN", "x")]);
    assert_invalid(&output, &["server.listn"]);
}

#[test]
fn check_config_reads_secrets_from_files() {
    let secret = TempFile::new("client-secret", &format!("{CLIENT_SECRET}\n"));
    let key = TempFile::new("api-key", &format!("{API_KEY}\n"));
    let config = valid_config(
        &format!("client_secret_file = {:?}", secret.display()),
        &format!("api_key_file = {:?}", key.display()),
    );
    let file = TempFile::new("files.toml", &config);
    let output = check_config(file.path(), &[]);
    let stdout = text(&output.stdout);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "stderr: {stderr}");
    for secret in [CLIENT_SECRET, API_KEY] {
        assert!(!stdout.contains(secret), "secret in stdout:\n{stdout}");
        assert!(!stderr.contains(secret), "secret in stderr:\n{stderr}");
    }

    // A secret file that does not exist is named.
    let config = valid_config(
        "client_secret_file = \"/nonexistent/consent-proxy/secret\"",
        &inline_key(),
    );
    let file = TempFile::new("missing-file.toml", &config);
    assert_invalid(
        &check_config(file.path(), &[]),
        &["talkdesk.client_secret_file"],
    );
}

/// Sets a file's permission bits.
fn chmod(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

#[test]
fn check_config_warns_of_a_secret_others_can_read_and_refuses_one_they_can_write() {
    let secret = TempFile::new("modes-secret", &format!("{CLIENT_SECRET}\n"));
    let config = valid_config(
        &format!("client_secret_file = {:?}", secret.display()),
        &inline_key(),
    );
    let file = TempFile::new("modes.toml", &config);

    chmod(secret.path(), 0o640);
    let output = check_config(file.path(), &[]);
    assert_printed_without(&output, &[CLIENT_SECRET]);
    assert_eq!(text(&output.stderr), "", "group-readable stays quiet");

    chmod(secret.path(), 0o644);
    let output = check_config(file.path(), &[]);
    assert_printed_without(&output, &[CLIENT_SECRET]);
    assert_eq!(
        text(&output.stderr),
        format!(
            "warning: talkdesk.client_secret_file: '{}' can be read by others (mode 0644); \
             owner and group suffice: chmod o-r\n",
            secret.display()
        )
    );

    chmod(secret.path(), 0o666);
    let output = check_config(file.path(), &[]);
    assert_invalid(
        &output,
        &["talkdesk.client_secret_file", "can be written by others"],
    );
    assert!(!text(&output.stderr).contains(CLIENT_SECRET));
}

#[test]
fn check_config_refuses_a_config_file_others_can_write() {
    // Anyone who can write it could point token_url at themselves and be sent the secret.
    let file = TempFile::new(
        "writable.toml",
        &valid_config(&inline_secret(), &inline_key()),
    );
    chmod(file.path(), 0o644);
    assert_eq!(check_config(file.path(), &[]).status.code(), Some(0));
    chmod(file.path(), 0o646);
    let output = check_config(file.path(), &[]);
    assert_invalid(
        &output,
        &[
            "config file: ",
            "can be written by others (mode 0646)",
            "chmod o-w",
        ],
    );
    assert!(!text(&output.stderr).contains(CLIENT_SECRET));
}

#[test]
fn check_config_refuses_an_endless_secret_file_at_once() {
    let config = format!(
        "{}\n[oauth]\nsigning_key_file = \"/dev/zero\"\n",
        valid_config(&inline_secret(), &inline_key())
    );
    let file = TempFile::new("dev-zero.toml", &config);
    // Read whole, /dev/zero would take all the memory there is before any answer.
    let output = check_config(file.path(), &[]);
    assert_invalid(
        &output,
        &["oauth.signing_key_file: '/dev/zero' is not a regular file"],
    );
}

#[test]
fn serve_logs_the_configuration_warnings_at_start() {
    let secret = TempFile::new("serve-secret", &format!("{CLIENT_SECRET}\n"));
    chmod(secret.path(), 0o644);
    // Nothing answers on port 1: the proxy starts all the same (not ready), which is enough.
    let config = config_for_simulator("127.0.0.1:1", "warned-client").replace(
        &format!("client_secret = \"{CLIENT_SECRET}\""),
        &format!("client_secret_file = {:?}", secret.display()),
    );
    let file = TempFile::new("serve-warned.toml", &config);
    let mut command = command();
    command.arg("serve").arg("--config").arg(file.path());
    let mut proxy = Running::spawn(command);
    let logs = proxy.read_until(Stream::Stderr, Duration::from_secs(30), |lines| {
        lines.iter().any(|l| l.contains("listen_addr="))
    });
    let warning = logs
        .iter()
        .find(|l| l.contains("talkdesk.client_secret_file"))
        .unwrap_or_else(|| panic!("no warning logged:\n{}", logs.join("\n")));
    assert!(warning.contains("WARN"), "{warning}");
    assert!(
        warning.contains("can be read by others (mode 0644)"),
        "{warning}"
    );
    // At info in the text format the configuration is one line, not its ~70 TOML lines
    // (those are at debug; `check-config` prints them).
    let start = logs.join("\n");
    assert!(start.contains("configuration loaded"), "{start}");
    assert!(!start.contains("[[clients]]"), "{start}");
    assert!(logs.len() < 15, "{} lines at start:\n{start}", logs.len());
    proxy.assert_stops_cleanly(Duration::from_secs(15));
}

#[test]
fn check_config_keeps_cluster_and_oauth_secrets_out_of_its_output() {
    const REDIS_PASSWORD: &str = "cli-redis-password-Hq3Zm8";
    const SIGNING_KEY: &str = "cli-signing-key-0123456789abcdef-Xr5";
    let keys = TempFile::new("signing-keys", &format!("# current\n{SIGNING_KEY}\n"));
    let config = format!(
        "{}\n[cluster]\nredis_url = \"rediss://proxy:{REDIS_PASSWORD}@redis.internal:6380/3\"\n\
         [oauth]\nsigning_key_file = {:?}\n",
        valid_config(&inline_secret(), &inline_key()),
        keys.display()
    );
    let file = TempFile::new("cluster.toml", &config);
    let stdout = assert_printed_without(
        &check_config(file.path(), &[]),
        &[CLIENT_SECRET, API_KEY, REDIS_PASSWORD, SIGNING_KEY],
    );
    assert!(
        stdout.contains(r#"redis_url = "rediss://proxy:<redacted>@redis.internal:6380/3""#),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("signing_key_file = {:?}", keys.display())),
        "{stdout}"
    );
}

#[test]
fn check_config_refuses_a_per_process_signing_key_in_a_cluster_among_other_problems() {
    let file = TempFile::new(
        "cluster-bad.toml",
        &valid_config(&inline_secret(), &inline_key()),
    );
    let output = check_config(
        file.path(),
        &[
            ("CONSENT_PROXY__CLUSTER__REDIS_URL", "redis://redis:6379/0"),
            ("CONSENT_PROXY__CLUSTER__SHARED_CACHE", "true"),
            ("CONSENT_PROXY__TOKEN__REFRESH_MARGIN_S", "0"),
            ("CONSENT_PROXY__CLIENTS__NAME", "x"),
        ],
    );
    assert_invalid(
        &output,
        &[
            "oauth.signing_key_file: must be set when cluster.redis_url is set",
            "cluster.shared_cache: true needs cluster.shared_key_file",
            "(from environment variable CONSENT_PROXY__CLUSTER__SHARED_CACHE)",
            "token.refresh_margin_s: must be greater than 0",
            "CONSENT_PROXY__CLIENTS__NAME: [[clients]] can only be configured in a file",
        ],
    );
}

// ---------------------------------------------------------------------------------------------
// demo

#[test]
fn demo_prints_working_curl_lines_and_stops_on_sigterm() {
    let key = "demo-test-key-0123456789abcdef";
    let mut command = command();
    command.args([
        "demo",
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--api-key",
        key,
    ]);
    let mut demo = Running::spawn(command);
    let banner = demo.read_until(Stream::Stdout, Duration::from_secs(30), |lines| {
        lines.iter().filter(|l| l.starts_with("curl ")).count() >= 6
    });
    let curls: Vec<&String> = banner.iter().filter(|l| l.starts_with("curl ")).collect();
    assert!(banner.iter().any(|l| l.contains(key)), "{banner:?}");
    for line in &curls {
        assert!(
            !line.contains("127.0.0.1:0/"),
            "unbound port printed: {line}"
        );
        assert!(!line.contains(":0/"), "unbound port printed: {line}");
    }

    let (status, body) = parse_curl_i(&shell(curls[0]));
    assert_eq!(status, 200, "{body}");
    assert_eq!(consent_status(&body), "CONSENTED");

    let (status, body) = parse_curl_i(&shell(curls[1]));
    assert!(
        status == 200 || status == 201,
        "PUT answered {status}: {body}"
    );
    assert_eq!(consent_status(&body), "REFUSED");

    let (status, body) = parse_curl_i(&shell(curls[2]));
    assert_eq!(status, 200, "{body}");
    assert_eq!(consent_status(&body), "REFUSED");

    // The demo audits: the PUT's record, with its outcome once upstream answered.
    let audit: serde_json::Value = serde_json::from_str(&shell(curls[3])).expect("audit JSON");
    assert_eq!(audit["records"][0]["status"], "REFUSED", "{audit}");

    let metrics = shell(curls[4]);
    assert!(
        metrics.contains("consent_proxy_cache_lookups_total"),
        "{metrics}"
    );

    // The OAuth client is named, and its token line works as printed.
    assert!(
        banner.iter().any(|l| l.contains("OAuth client demo")),
        "{banner:?}"
    );
    let token = shell(curls[5]);
    assert!(token.contains("\"access_token\""), "{token}");

    // Like `serve`, it says that it drains and that it stopped.
    let transcript = demo.assert_stops_cleanly(Duration::from_secs(10));
    assert_logs_shutdown(&transcript);
}

#[test]
fn demo_flag_errors_are_named_after_the_flags_and_said_once() {
    let short = command()
        .args([
            "demo",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .args(["--api-key", "short"])
        .output()
        .expect("run demo");
    assert!(!short.status.success());
    let stderr = text(&short.stderr);
    assert!(stderr.contains("--api-key: "), "{stderr}");
    assert!(!stderr.contains("clients[0]"), "{stderr}");
    assert_eq!(
        stderr.matches("must be at least 16 characters").count(),
        1,
        "said twice: {stderr}"
    );

    let busy = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = busy.local_addr().expect("addr").to_string();
    let taken = command()
        .args(["demo", "--listen", &addr, "--admin-listen", "127.0.0.1:0"])
        .output()
        .expect("run demo");
    assert!(!taken.status.success());
    let stderr = text(&taken.stderr);
    assert!(
        stderr.contains(&format!("cannot listen on {addr} (--listen)")),
        "{stderr}"
    );
    assert!(!stderr.contains("server.listen"), "{stderr}");
}

/// The two lines every serving command logs on SIGTERM, in order.
fn assert_logs_shutdown(transcript: &str) {
    let draining = transcript
        .find("shutting down: draining in-flight requests")
        .unwrap_or_else(|| panic!("no draining line:\n{transcript}"));
    let stopped = transcript
        .rfind("consent_proxy: stopped")
        .unwrap_or_else(|| panic!("no stopped line:\n{transcript}"));
    assert!(draining < stopped, "{transcript}");
}

// ---------------------------------------------------------------------------------------------
// simulator

/// Starts `consent-proxy simulator` on a free port; returns it and its `host:port`.
fn start_simulator_process(client_id: &str, secret: &str, latency_ms: u64) -> (Running, String) {
    let mut command = command();
    command
        .args([
            "simulator",
            "--listen",
            "127.0.0.1:0",
            "--client-id",
            client_id,
        ])
        .args(["--client-secret", secret, "--token-ttl-s", "120"])
        .args(["--latency-ms", &latency_ms.to_string()]);
    let mut sim = Running::spawn(command);
    let lines = sim.read_until(Stream::Stdout, Duration::from_secs(30), |lines| {
        lines.iter().any(|l| l.contains("/_sim/stats"))
    });
    let base = lines
        .iter()
        .find_map(|l| l.trim().strip_prefix("api base"))
        .map(str::trim)
        .unwrap_or_else(|| panic!("no api base line: {lines:?}"));
    let addr = base
        .strip_prefix("http://")
        .unwrap_or_else(|| panic!("api base is not http: {base}"))
        .to_owned();
    assert!(!addr.ends_with(":0"), "unbound port printed: {addr}");
    assert!(
        lines
            .iter()
            .any(|l| l.contains(&format!("{base}/oauth/token"))),
        "{lines:?}"
    );
    (sim, addr)
}

/// The simulator's counters over its control surface.
fn sim_stats(addr: &str) -> serde_json::Value {
    let (status, body) = http_get(addr, "/_sim/stats");
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).expect("stats are JSON")
}

#[test]
fn simulator_answers_its_stats_and_stops_on_sigterm() {
    let (mut sim, addr) = start_simulator_process("cli-sim", "cli-sim-secret", 5);
    let stats = sim_stats(&addr);
    assert_eq!(stats["token_requests"], 0);
    assert_eq!(stats["gets"], 0);
    assert_eq!(stats["latency_ms"], 5);
    assert_eq!(stats["token_ttl_ms"], 120_000);
    sim.assert_stops_cleanly(Duration::from_secs(10));
}

// ---------------------------------------------------------------------------------------------
// serve

/// A configuration for `serve` on free ports in front of the simulator at `sim_addr`, with
/// one client (`cli`, key `API_KEY`, read and write).
fn config_for_simulator(sim_addr: &str, client_id: &str) -> String {
    format!(
        r#"[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
[talkdesk]
api_base_url = "http://{sim_addr}"
token_url = "http://{sim_addr}/oauth/token"
client_id = "{client_id}"
client_secret = "{CLIENT_SECRET}"
[[clients]]
name = "cli"
api_key = "{API_KEY}"
permissions = ["read", "write"]
"#
    )
}

/// The value of `field=` in the log lines (the start-up line names both listeners).
fn logged_field(logs: &[String], field: &str) -> String {
    let prefix = format!("{field}=");
    logs.iter()
        .find_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix(prefix.as_str()))
        })
        .unwrap_or_else(|| panic!("{field} not logged: {logs:?}"))
        .to_owned()
}

#[test]
fn serve_finishes_the_request_in_flight_on_sigterm_and_exits_0() {
    let (mut sim, sim_addr) = start_simulator_process("serve-client", CLIENT_SECRET, 400);
    let file = TempFile::new(
        "serve.toml",
        &config_for_simulator(&sim_addr, "serve-client"),
    );
    let mut command = command();
    command.arg("serve").arg("--config").arg(file.path());
    let mut proxy = Running::spawn(command);
    let logs = proxy.read_until(Stream::Stderr, Duration::from_secs(30), |lines| {
        lines.iter().any(|l| l.contains("listen_addr="))
    });
    let listen = logged_field(&logs, "listen_addr");
    let startup = logs.join("\n");
    assert!(
        !startup.contains(CLIENT_SECRET),
        "secret logged:\n{startup}"
    );
    assert!(!startup.contains(API_KEY), "API key logged:\n{startup}");

    // A write that upstream sits on for 400 ms.
    let url = format!("http://{listen}/voicebiometrics/contacts/%2B15553000001/consent");
    let put = thread::spawn(move || {
        shell(&format!(
            "curl -s -i -X PUT -H 'X-API-Key: {API_KEY}' -H 'Content-Type: application/json' \
             -d '{{\"status\":\"REFUSED\"}}' {url}"
        ))
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while sim_stats(&sim_addr)["puts"] != 1 {
        assert!(Instant::now() < deadline, "the PUT never reached upstream");
        thread::sleep(Duration::from_millis(20));
    }
    let transcript = proxy.assert_stops_cleanly(Duration::from_secs(10));
    assert_logs_shutdown(&transcript);

    let (status, body) = parse_curl_i(&put.join().expect("curl thread"));
    assert_eq!(status, 201, "{body}");
    assert_eq!(consent_status(&body), "REFUSED");
    assert!(
        TcpStream::connect(&listen).is_err(),
        "still accepting after exit"
    );
    sim.assert_stops_cleanly(Duration::from_secs(10));
}

#[test]
fn a_bare_config_option_serves() {
    let (mut sim, sim_addr) = start_simulator_process("bare-client", CLIENT_SECRET, 0);
    let file = TempFile::new("bare.toml", &config_for_simulator(&sim_addr, "bare-client"));
    // `consent-proxy --config FILE`, no command: the same as `serve --config FILE`.
    let mut bare = command();
    bare.arg("--config").arg(file.path());
    let mut proxy = Running::spawn(bare);
    let logs = proxy.read_until(Stream::Stderr, Duration::from_secs(30), |lines| {
        lines.iter().any(|l| l.contains("admin_addr="))
    });
    let admin = logged_field(&logs, "admin_addr");
    // The file was read: its client id reached the simulator's token endpoint.
    let deadline = Instant::now() + Duration::from_secs(10);
    while http_get(&admin, "/readyz").0 != 200 {
        assert!(
            Instant::now() < deadline,
            "not ready:\n{}",
            proxy.transcript()
        );
        thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(sim_stats(&sim_addr)["token_requests"], 1);
    proxy.assert_stops_cleanly(Duration::from_secs(10));
    sim.assert_stops_cleanly(Duration::from_secs(10));

    // A command and the bare option together are refused, naming the conflict.
    let output = command()
        .args(["--config", "x.toml", "check-config"])
        .output()
        .expect("run");
    assert_eq!(output.status.code(), Some(2));
    assert!(
        text(&output.stderr).contains("--config"),
        "{}",
        text(&output.stderr)
    );
}

#[test]
fn version_names_the_release_and_the_commit() {
    let output = command().arg("--version").output().expect("run --version");
    assert_eq!(output.status.code(), Some(0));
    let commit = consent_proxy::build_info::COMMIT;
    assert_eq!(
        text(&output.stdout).trim(),
        format!(
            "consent-proxy {} (commit {commit})",
            env!("CARGO_PKG_VERSION")
        )
    );
    // Built from this checkout: the commit is its HEAD (build.rs re-runs when HEAD moves).
    let head = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output();
    match head {
        Ok(head) if head.status.success() => assert_eq!(commit, text(&head.stdout).trim()),
        _ => assert_eq!(commit, "unknown"),
    }
}

// ---------------------------------------------------------------------------------------------
// --help

#[test]
fn help_works_for_every_command() {
    let cases: [(&[&str], &[&str]); 5] = [
        (&["--help"], &["serve", "demo", "simulator", "check-config"]),
        (
            &["serve", "--help"],
            &["--config <FILE>", "TOML configuration file"],
        ),
        (
            &["demo", "--help"],
            &["--listen", "--admin-listen", "--api-key"],
        ),
        (
            &["simulator", "--help"],
            &[
                "--listen",
                "--client-id",
                "--client-secret",
                "--latency-ms",
                "--token-ttl-s",
                "starts with no contacts",
            ],
        ),
        (
            &["check-config", "--help"],
            &[
                "--config <FILE>",
                "TOML configuration file",
                "Exit 0 when valid",
            ],
        ),
    ];
    for (args, expected) in cases {
        let output = command().args(args).output().expect("run --help");
        let stdout = text(&output.stdout);
        assert_eq!(output.status.code(), Some(0), "{args:?}: {stdout}");
        assert!(stdout.contains("Usage"), "{args:?}: {stdout}");
        for word in expected {
            assert!(stdout.contains(word), "{args:?} lacks {word}:\n{stdout}");
        }
    }
}
