//! A real `redis-server` for the cluster tests, on a free loopback port, without persistence
//! (or with an append-only file, to restart with its data): started, killed, restarted on the
//! same port, frozen (`SIGSTOP`) and thawed (`SIGCONT`); a replica of another; and a
//! [`SentinelSet`]: a master, its replica and three sentinels (`redis-server <conf> --sentinel`)
//! that fail it over quickly.
//! A missing `redis-server` fails the test loudly (scripts/test.sh installs it).
//!
//! The proxies connect as the Redis user the ACL rule in docs/cluster.md creates ([`PROXY_ACL_RULE`]):
//! every cluster test runs with exactly the permissions the README grants. The tests' own
//! commands (deleting keys, filling memory) go as the default user, the administrator.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The proxy's Redis user, as the README gives it (`tests/integration/docs.rs` checks that the
/// README's rule is this one): its keys and channels (the default `cluster.key_prefix`), and the
/// commands it sends, its scripts' included. `PASSWORD` stands for the user's password.
pub const PROXY_ACL_RULE: &str = "ACL SETUSER consent-proxy on >PASSWORD resetkeys \
    ~consent-proxy:* resetchannels &consent-proxy:* -@all +evalsha +eval +publish +subscribe \
    +unsubscribe +ping +info +role +time +hget +hmget +hgetall +hset +hdel +pexpire +pttl +get \
    +set +del";
/// The proxy user's password in these tests.
const PROXY_PASSWORD: &str = "proxy-user-test-password";

/// The URL the proxies reach Redis by at `address` (the server, or a relay to it): as the
/// ACL rule's user.
pub fn proxy_url(address: impl std::fmt::Display) -> String {
    let user = PROXY_ACL_RULE.split_whitespace().nth(2).unwrap_or_default();
    format!("redis://{user}:{PROXY_PASSWORD}@{address}")
}

pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    password: Option<String>,
    dir: PathBuf,
    frozen: bool,
    /// Every write appended to a file (fsync'd) and read back when it restarts.
    persistent: bool,
    /// The port of the master it replicates, if it is a replica.
    replica_of: Option<u16>,
    /// More `redis-server` options (`--name value` pairs).
    options: Vec<String>,
}

impl RedisServer {
    /// A server on a free port.
    pub fn start() -> RedisServer {
        Self::start_with_password(None)
    }

    /// A server that requires `password` (`requirepass`).
    pub fn start_with_password(password: Option<&str>) -> RedisServer {
        Self::start_with(password, false)
    }

    /// A server that keeps its data across [`Self::kill`] and [`Self::restart`] (as a
    /// restarted production Redis with persistence, or a replica taking over, has data).
    pub fn start_persistent() -> RedisServer {
        Self::start_with(None, true)
    }

    /// A server started with these more options, e.g. `["--maxmemory-policy", "allkeys-lru"]`.
    pub fn start_with_options(options: &[&str]) -> RedisServer {
        let mut server = Self::start();
        server.options = options.iter().map(|option| (*option).to_owned()).collect();
        server.kill();
        server.restart();
        server
    }

    /// A replica of `master` (which must have no password), in sync with it when this returns.
    pub fn start_replica_of(master: &RedisServer) -> RedisServer {
        let mut replica = Self::start_with(None, false);
        replica.replica_of = Some(master.port);
        replica.kill();
        replica.restart();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !replica
            .info("replication")
            .contains("master_link_status:up")
        {
            assert!(
                Instant::now() < deadline,
                "the replica did not sync with its master"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        replica
    }

    /// `INFO section`, or "" when it does not answer.
    pub fn info(&self, section: &str) -> String {
        command(self.port, redis::cmd("INFO").arg(section)).unwrap_or_default()
    }

    fn start_with(password: Option<&str>, persistent: bool) -> RedisServer {
        let dir = std::env::temp_dir().join(format!(
            "consent-proxy-redis-{}-{}",
            std::process::id(),
            rand::random::<u64>()
        ));
        std::fs::create_dir_all(&dir).expect("create the Redis directory");
        // A port can be taken between finding it free and Redis binding it: try a few.
        for _ in 0..5 {
            let mut server = RedisServer {
                child: None,
                port: free_port(),
                password: password.map(str::to_owned),
                dir: dir.clone(),
                frozen: false,
                persistent,
                replica_of: None,
                options: Vec::new(),
            };
            if server.spawn() {
                return server;
            }
        }
        panic!("redis-server did not start on any of 5 free ports");
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The proxies' URL: `redis://consent-proxy:PASSWORD@127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        proxy_url(format!("127.0.0.1:{}", self.port))
    }

    /// The administrator's URL (the default user).
    pub fn admin_url(&self) -> String {
        let password = self.password.as_deref().unwrap_or_default();
        format!("redis://:{password}@127.0.0.1:{}", self.port)
    }

    /// A connection as the administrator.
    pub fn admin(&self) -> redis::Connection {
        redis::Client::open(self.admin_url())
            .and_then(|client| client.get_connection())
            .expect("connect to Redis as the administrator")
    }

    /// Runs one command as the administrator and returns its answer.
    pub fn command<A: AsRef<[u8]>>(&self, args: &[A]) -> redis::Value {
        let mut command = redis::cmd(std::str::from_utf8(args[0].as_ref()).expect("a name"));
        for arg in &args[1..] {
            command.arg(arg.as_ref());
        }
        command
            .query(&mut self.admin())
            .expect("the command succeeds")
    }

    /// Makes Redis evict under `policy` (`allkeys-lru`, `volatile-lru`...): `maxmemory` 1 MiB
    /// above what it uses now.
    pub fn limit_memory(&self, policy: &str) {
        let info: String =
            redis::from_redis_value(self.command(&["INFO", "memory"])).expect("INFO memory");
        let used: u64 = info
            .lines()
            .find_map(|line| line.strip_prefix("used_memory:"))
            .and_then(|n| n.trim().parse().ok())
            .expect("used_memory in INFO");
        let limit = (used + (1 << 20)).to_string();
        self.command(&["CONFIG", "SET", "maxmemory", &limit]);
        self.command(&["CONFIG", "SET", "maxmemory-policy", policy]);
    }

    /// Writes junk keys of 1 KiB (each with a TTL when `volatile`, so that a `volatile-*`
    /// policy may evict them) until Redis has evicted `key` by itself; the number written.
    pub fn evict(&self, key: &str, volatile: bool) -> usize {
        let mut connection = self.admin();
        let junk = "x".repeat(1024);
        for round in 0..400 {
            let mut pipe = redis::pipe();
            for i in 0..250 {
                let name = format!("junk:{}:{round}:{i}", rand::random::<u32>());
                pipe.cmd("SET").arg(name).arg(&junk);
                if volatile {
                    pipe.arg("EX").arg(3600);
                }
                pipe.ignore();
            }
            pipe.cmd("EXISTS").arg(key);
            let exists: (u32,) = pipe.query(&mut connection).expect("junk written");
            if exists.0 == 0 {
                return (round + 1) * 250;
            }
        }
        panic!("Redis did not evict {key} after 100,000 junk keys: is maxmemory set?");
    }

    /// The keys matching `pattern` (`KEYS`: test data is small).
    pub fn keys(&self, pattern: &str) -> Vec<String> {
        redis::from_redis_value(self.command(&["KEYS", pattern])).expect("a list of keys")
    }

    /// Kills the server (`SIGKILL`): every connection to it breaks at once.
    pub fn kill(&mut self) {
        self.thaw();
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port (after [`Self::kill`]).
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "kill it first");
        let deadline = Instant::now() + Duration::from_secs(10);
        // The port may still be held by the dying process for a moment.
        while !self.spawn() {
            assert!(
                Instant::now() < deadline,
                "redis-server did not restart on port {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the process (`SIGSTOP`): connections stay open, nothing is answered.
    pub fn freeze(&mut self) {
        self.signal("-STOP");
        self.frozen = true;
    }

    /// Lets a frozen server go on (`SIGCONT`).
    pub fn thaw(&mut self) {
        if self.frozen {
            self.signal("-CONT");
            self.frozen = false;
        }
    }

    fn signal(&self, signal: &str) {
        let child = self.child.as_ref().expect("redis-server is running");
        let sent = Command::new("kill")
            .arg(signal)
            .arg(child.id().to_string())
            .status()
            .expect("run kill");
        assert!(sent.success(), "kill {signal} failed");
    }

    /// Starts the process and waits until it answers PING; false if it exited (port taken).
    fn spawn(&mut self) -> bool {
        let mut command = Command::new("redis-server");
        command
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(["--appendonly", if self.persistent { "yes" } else { "no" }])
            .args(["--appendfsync", "always"])
            .args(["--protected-mode", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(password) = &self.password {
            command.args(["--requirepass", password]);
        }
        // `ACL SETUSER name rules...` as the `user name rules...` directive.
        let rule = PROXY_ACL_RULE.replace(">PASSWORD", &format!(">{PROXY_PASSWORD}"));
        command.arg("--user").args(rule.split_whitespace().skip(2));
        command.args(&self.options);
        if let Some(master) = self.replica_of {
            command.args(["--replicaof", "127.0.0.1", &master.to_string()]);
        }
        let child = match command.spawn() {
            Ok(child) => child,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => panic!(
                "redis-server is not installed; the cluster tests need it: \
                 apt-get install -y redis-server (scripts/test.sh does this)"
            ),
            Err(err) => panic!("cannot start redis-server: {err}"),
        };
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if self.answers_ping() {
                return true;
            }
            if let Some(child) = self.child.as_mut() {
                if child.try_wait().ok().flatten().is_some() {
                    self.child = None;
                    return false;
                }
            }
            assert!(
                Instant::now() < deadline,
                "redis-server did not answer on port {} within 10 s",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether the server answers an inline `PING` (with `AUTH` first when it has a password).
    fn answers_ping(&self) -> bool {
        let Ok(mut stream) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
        let mut request = String::new();
        if let Some(password) = &self.password {
            request.push_str(&format!("AUTH {password}\r\n"));
        }
        request.push_str("PING\r\n");
        if stream.write_all(request.as_bytes()).is_err() {
            return false;
        }
        let mut answer = Vec::new();
        let mut buffer = [0u8; 64];
        while !String::from_utf8_lossy(&answer).contains("+PONG") {
            match stream.read(&mut buffer) {
                Ok(0) | Err(_) => return false,
                Ok(n) => answer.extend_from_slice(&buffer[..n]),
            }
        }
        true
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Sends `cmd` to the Redis (or sentinel) on `port` within a second.
pub fn command<T: redis::FromRedisValue>(port: u16, cmd: &redis::Cmd) -> redis::RedisResult<T> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}"))?;
    let mut connection = client.get_connection_with_timeout(Duration::from_secs(1))?;
    connection.set_read_timeout(Some(Duration::from_secs(1)))?;
    cmd.query(&mut connection)
}

/// The master's name the sentinels of a [`SentinelSet`] know.
pub const SENTINEL_MASTER: &str = "consent";
/// The sentinels' `down-after-milliseconds`: a master silent this long is failed over.
pub const DOWN_AFTER: Duration = Duration::from_millis(1000);

/// A master (`master`), its replica and three sentinels watching it with a quorum of two,
/// `down-after-milliseconds` [`DOWN_AFTER`], ready to fail over when this returns (the sentinels
/// know the replica and each other).
pub struct SentinelSet {
    pub replica: RedisServer,
    sentinels: Vec<Option<Child>>,
    ports: Vec<u16>,
    dir: PathBuf,
}

impl SentinelSet {
    pub fn start(master: &RedisServer) -> SentinelSet {
        let replica = RedisServer::start_replica_of(master);
        let dir = std::env::temp_dir().join(format!(
            "consent-proxy-sentinels-{}-{}",
            std::process::id(),
            rand::random::<u64>()
        ));
        std::fs::create_dir_all(&dir).expect("create the sentinels' directory");
        let mut set = SentinelSet {
            replica,
            sentinels: Vec::new(),
            ports: Vec::new(),
            dir,
        };
        for i in 0..3 {
            let port = free_port();
            let conf = set.dir.join(format!("sentinel-{i}.conf"));
            std::fs::write(
                &conf,
                format!(
                    "port {port}\nbind 127.0.0.1\nprotected-mode no\ndir {dir}\n\
                     sentinel monitor {SENTINEL_MASTER} 127.0.0.1 {master} 2\n\
                     sentinel down-after-milliseconds {SENTINEL_MASTER} {down_after}\n\
                     sentinel failover-timeout {SENTINEL_MASTER} 2000\n",
                    dir = set.dir.display(),
                    master = master.port(),
                    down_after = DOWN_AFTER.as_millis(),
                ),
            )
            .expect("write a sentinel's configuration");
            let child = Command::new("redis-server")
                .arg(&conf)
                .arg("--sentinel")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start redis-server --sentinel");
            set.sentinels.push(Some(child));
            set.ports.push(port);
        }
        // Ready when each knows the replica and the two other sentinels (hello messages).
        let deadline = Instant::now() + Duration::from_secs(20);
        for &port in &set.ports {
            loop {
                let knows = |what: &str| {
                    command::<Vec<redis::Value>>(
                        port,
                        redis::cmd("SENTINEL").arg(what).arg(SENTINEL_MASTER),
                    )
                    .map_or(0, |list| list.len())
                };
                if knows("replicas") == 1 && knows("sentinels") == 2 {
                    break;
                }
                assert!(Instant::now() < deadline, "the sentinels did not get ready");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        set
    }

    /// `["127.0.0.1:port", ...]`: `cluster.sentinels` as a TOML value.
    pub fn toml_list(&self) -> String {
        let quoted: Vec<String> = self
            .ports
            .iter()
            .map(|port| format!("\"127.0.0.1:{port}\""))
            .collect();
        format!("[{}]", quoted.join(", "))
    }

    pub fn ports(&self) -> &[u16] {
        &self.ports
    }

    /// The master's port as the sentinels still running name it, when they all agree.
    pub fn master_port(&self) -> Option<u16> {
        let named: Vec<Option<u16>> = self
            .ports
            .iter()
            .zip(&self.sentinels)
            .filter(|(_, child)| child.is_some())
            .map(|(&port, _)| {
                command::<Option<(String, u16)>>(
                    port,
                    redis::cmd("SENTINEL")
                        .arg("get-master-addr-by-name")
                        .arg(SENTINEL_MASTER),
                )
                .ok()
                .flatten()
                .map(|(_, port)| port)
            })
            .collect();
        named
            .first()
            .copied()
            .flatten()
            .filter(|first| named.iter().all(|n| *n == Some(*first)))
    }

    /// Waits until every running sentinel names the master on `port`.
    pub fn wait_master(&self, port: u16, within: Duration) {
        let deadline = Instant::now() + within;
        while self.master_port() != Some(port) {
            assert!(
                Instant::now() < deadline,
                "the sentinels did not name {port} the master within {within:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `SENTINEL FAILOVER` through the first sentinel still running.
    pub fn failover(&self) {
        let port = self
            .ports
            .iter()
            .zip(&self.sentinels)
            .find(|(_, child)| child.is_some())
            .map(|(&port, _)| port)
            .expect("a sentinel running");
        let answer: String = command(
            port,
            redis::cmd("SENTINEL").arg("FAILOVER").arg(SENTINEL_MASTER),
        )
        .expect("SENTINEL FAILOVER");
        assert_eq!(answer, "OK");
    }

    /// Kills sentinel `i` (`SIGKILL`).
    pub fn kill_sentinel(&mut self, i: usize) {
        if let Some(mut child) = self.sentinels[i].take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for SentinelSet {
    fn drop(&mut self) {
        for i in 0..self.sentinels.len() {
            self.kill_sentinel(i);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A loopback port nothing listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port()
}
