//! Redis Sentinel (`cluster.sentinels`): which node is the master now. A master is taken only
//! when a majority of the configured sentinels names it, so that a minority cut off with an old
//! master (split brain) never decides. The feed asks at the start of each session and again
//! with every heartbeat: the answer bounds how long the session's Redis may be trusted
//! ([`super::feed`]). The `redis` crate's own sentinel client looks the master up only when a
//! connection opens and never again, so the sentinels are asked here directly, each question
//! bounded in time.

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use futures_util::future::join_all;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client, Cmd, FromRedisValue, RedisError};
use tokio::sync::Mutex;

use super::ANNOUNCE_TIMEOUT;
use crate::config::{Secret, SentinelSettings};
use crate::error::Failure;

/// A data node, as the sentinels name it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) struct NodeAddress {
    host: String,
    port: u16,
}

impl fmt::Display for NodeAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// One sentinel and the connection to it, opened when first needed and again after a failure.
struct Sentinel {
    client: Client,
    connection: Mutex<Option<MultiplexedConnection>>,
}

pub(super) struct Sentinels {
    sentinels: Vec<Sentinel>,
    /// The master's name as the sentinels know it.
    master: String,
    tls: bool,
    /// The data nodes' password (`cluster.redis_password_file`).
    node_password: Option<Secret>,
    /// `egress.ca_file`'s roots, for TLS.
    roots: Option<Vec<u8>>,
}

/// `redis[s]://host:port` with `password`, as a client.
fn client(
    tls: bool,
    address: &NodeAddress,
    password: Option<&Secret>,
    roots: Option<&[u8]>,
) -> Result<Client, RedisError> {
    let scheme = if tls { "rediss" } else { "redis" };
    super::client(&format!("{scheme}://{address}"), password, roots)
}

impl Sentinels {
    pub fn new(
        settings: &SentinelSettings,
        node_password: Option<Secret>,
        roots: Option<&[u8]>,
    ) -> Result<Self, RedisError> {
        let sentinels = settings
            .sentinels
            .iter()
            .map(|(host, port)| {
                let address = NodeAddress {
                    host: host.clone(),
                    port: *port,
                };
                Ok(Sentinel {
                    client: client(settings.tls, &address, settings.password.as_ref(), roots)?,
                    connection: Mutex::new(None),
                })
            })
            .collect::<Result<_, RedisError>>()?;
        Ok(Sentinels {
            sentinels,
            master: settings.master.clone(),
            tls: settings.tls,
            node_password,
            roots: roots.map(<[u8]>::to_vec),
        })
    }

    /// How many sentinels make a majority.
    fn majority(&self) -> usize {
        self.sentinels.len() / 2 + 1
    }

    /// The master a majority of the sentinels names now; `Err` naming what they said when no
    /// majority agrees (too few answered, or they disagree during a failover).
    pub async fn majority_master(&self) -> Result<NodeAddress, Failure> {
        let answers = join_all(self.sentinels.iter().map(|s| self.ask_master(s))).await;
        let mut votes: HashMap<&NodeAddress, usize> = HashMap::new();
        let mut problems = Vec::new();
        for answer in &answers {
            match answer {
                Ok(Some(address)) => *votes.entry(address).or_default() += 1,
                Ok(None) => problems.push(format!("does not know master {:?}", self.master)),
                Err(problem) => problems.push(problem.clone()),
            }
        }
        if let Some((address, _)) = votes.iter().find(|(_, &n)| n >= self.majority()) {
            return Ok((*address).clone());
        }
        let named = votes
            .iter()
            .map(|(address, n)| format!("{n} name {address}"))
            .collect::<Vec<_>>();
        Err(Failure::msg(format!(
            "no majority ({} of {}) of the sentinels names the master {:?}: {}{}",
            self.majority(),
            self.sentinels.len(),
            self.master,
            named.join(", "),
            if problems.is_empty() {
                String::new()
            } else {
                format!("; the others: {}", problems.join("; "))
            }
        )))
    }

    /// How long ago the sentinels that answer took `master` for the master (the least of
    /// their `role-reported-time`s, which restart at a failover); `None` when none says.
    pub async fn since_switch(&self, master: &NodeAddress) -> Option<Duration> {
        let command = redis::cmd("SENTINEL")
            .arg("MASTER")
            .arg(&self.master)
            .clone();
        let answers = join_all(
            self.sentinels
                .iter()
                .map(|s| self.ask::<Vec<String>>(s, &command)),
        )
        .await;
        answers
            .into_iter()
            .filter_map(Result::ok)
            .filter_map(|fields| {
                let field = |name: &str| {
                    fields
                        .chunks_exact(2)
                        .find(|pair| pair[0] == name)
                        .map(|pair| pair[1].as_str())
                };
                let named = field("ip") == Some(master.host.as_str())
                    && field("port") == Some(master.port.to_string().as_str());
                let ms = field("role-reported-time")?.parse().ok()?;
                named.then(|| Duration::from_millis(ms))
            })
            .min()
    }

    /// One sentinel's answer for the master.
    async fn ask_master(&self, sentinel: &Sentinel) -> Result<Option<NodeAddress>, String> {
        let command = redis::cmd("SENTINEL")
            .arg("get-master-addr-by-name")
            .arg(&self.master)
            .clone();
        let answer = self
            .ask::<Option<(String, u16)>>(sentinel, &command)
            .await?;
        Ok(answer.map(|(host, port)| NodeAddress { host, port }))
    }

    /// One sentinel's answer to `command`, within `ANNOUNCE_TIMEOUT` (connecting included).
    async fn ask<T: FromRedisValue>(
        &self,
        sentinel: &Sentinel,
        command: &Cmd,
    ) -> Result<T, String> {
        let asked = tokio::time::timeout(ANNOUNCE_TIMEOUT, async {
            let mut slot = sentinel.connection.lock().await;
            let mut connection = match slot.as_ref() {
                Some(connection) => connection.clone(),
                None => {
                    let config = AsyncConnectionConfig::new()
                        .set_connection_timeout(Some(ANNOUNCE_TIMEOUT))
                        .set_response_timeout(Some(ANNOUNCE_TIMEOUT));
                    let connection = sentinel
                        .client
                        .get_multiplexed_async_connection_with_config(&config)
                        .await?;
                    slot.insert(connection).clone()
                }
            };
            drop(slot);
            let answer = command.query_async::<T>(&mut connection).await;
            if answer.is_err() {
                *sentinel.connection.lock().await = None;
            }
            answer
        })
        .await;
        match asked {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(err)) => Err(format!("a sentinel failed: {err}")),
            Err(_) => {
                // Its connection may be stuck (a frozen sentinel): open another next time.
                if let Ok(mut slot) = sentinel.connection.try_lock() {
                    *slot = None;
                }
                Err(format!(
                    "a sentinel did not answer within {} ms",
                    ANNOUNCE_TIMEOUT.as_millis()
                ))
            }
        }
    }

    /// A client of the data node at `address`.
    pub fn node(&self, address: &NodeAddress) -> Result<Client, Failure> {
        client(
            self.tls,
            address,
            self.node_password.as_ref(),
            self.roots.as_deref(),
        )
        .map_err(|err| Failure::new("cannot use the master the sentinels name", err))
    }
}

/// Whether the node behind `connection` says it is a master (`ROLE`): a node the sentinels
/// have just promoted may not know yet, and one they demoted may not either.
pub(super) async fn is_master(connection: &MultiplexedConnection) -> Result<bool, Failure> {
    let mut connection = connection.clone();
    let role = tokio::time::timeout(
        ANNOUNCE_TIMEOUT,
        redis::cmd("ROLE").query_async::<Vec<redis::Value>>(&mut connection),
    )
    .await
    .map_err(|_| Failure::msg("ROLE was not answered in time"))?
    .map_err(|err| Failure::new("ROLE failed", err))?;
    Ok(role
        .first()
        .and_then(|first| redis::from_redis_value_ref::<String>(first).ok())
        .is_some_and(|role| role == "master"))
}
