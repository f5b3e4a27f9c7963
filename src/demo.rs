//! `consent-proxy demo`: the proxy and the built-in Talkdesk simulator in one process, with a
//! generated API key and ready-to-paste `curl` lines, so a newcomer sees it work with no
//! account or credentials. Auditing is on, in a temporary SQLite file removed at the end.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;

use crate::app::{App, AppHandle, StartError};
use crate::config::{ConfigErrors, Settings};
use crate::consent::ConsentStatus;
use crate::simulator::{Simulator, SimulatorConfig};

/// The contact seeded in the simulator so the first GET has something to show.
pub const DEMO_CONTACT: &str = "+15551234567";

/// The demo's one client: its API key is also its OAuth client secret.
pub const DEMO_CLIENT: &str = "demo";

/// `http://` and an address a client on this machine can connect to: an unspecified listener
/// address (`0.0.0.0`, `[::]`) is shown as the loopback of its family.
fn reachable_url(addr: SocketAddr) -> String {
    let ip = match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    format!("http://{}", SocketAddr::new(ip, addr.port()))
}

pub struct DemoOptions {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub api_key: Option<String>,
}

pub struct Demo {
    pub proxy: AppHandle,
    pub simulator: Simulator,
    pub api_key: String,
    /// The audit trail's SQLite file and chain key, removed at shutdown.
    pub audit_dir: PathBuf,
}

/// Why the demo could not start.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("cannot start the simulator")]
    Simulator(#[source] std::io::Error),
    /// The problems of the flags, each named after its flag (`--api-key: ...`).
    #[error("{0}")]
    Flags(String),
    #[error("cannot listen on {addr} ({flag})")]
    Listen {
        flag: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create the demo's audit directory")]
    AuditDir(#[source] std::io::Error),
    #[error(transparent)]
    Proxy(StartError),
}

/// The configuration keys the demo's flags set, and the flags: a problem is told in the words
/// the user typed.
const FLAG_KEYS: [(&str, &str); 3] = [
    ("clients[0].api_key", "--api-key"),
    ("server.listen", "--listen"),
    ("server.admin_listen", "--admin-listen"),
];

fn flag_of(key: &str) -> &str {
    FLAG_KEYS
        .iter()
        .find(|(k, _)| *k == key)
        .map_or(key, |(_, flag)| flag)
}

impl From<ConfigErrors> for DemoError {
    fn from(errors: ConfigErrors) -> Self {
        let problems: Vec<String> = errors
            .0
            .iter()
            .map(|problem| match problem.split_once(": ") {
                Some((key, what)) => format!("{}: {what}", flag_of(key)),
                None => problem.clone(),
            })
            .collect();
        DemoError::Flags(problems.join("\n"))
    }
}

impl From<StartError> for DemoError {
    fn from(error: StartError) -> Self {
        match error {
            StartError::Listen { key, addr, source } => DemoError::Listen {
                flag: flag_of(key),
                addr,
                source,
            },
            other => DemoError::Proxy(other),
        }
    }
}

/// A random key of 32 hex digits.
pub fn random_key() -> String {
    format!("{:032x}", rand::random::<u128>())
}

impl Demo {
    pub async fn start(options: DemoOptions) -> Result<Demo, DemoError> {
        let client_secret = random_key();
        let simulator = Simulator::start(
            SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            SimulatorConfig {
                client_id: "demo-client".into(),
                client_secret: client_secret.clone(),
                ..SimulatorConfig::default()
            },
        )
        .await
        .map_err(DemoError::Simulator)?;
        simulator.set_status(DEMO_CONTACT, ConsentStatus::Consented);

        let api_key = options.api_key.unwrap_or_else(random_key);
        let audit_dir = std::env::temp_dir().join(format!("consent-proxy-demo-{}", random_key()));
        std::fs::create_dir(&audit_dir).map_err(DemoError::AuditDir)?;
        let chain_key = audit_dir.join("chain.key");
        std::fs::write(&chain_key, format!("{}{}\n", random_key(), random_key()))
            .map_err(DemoError::AuditDir)?;
        let toml = format!(
            r#"
[server]
listen = "{listen}"
admin_listen = "{admin}"
[talkdesk]
api_base_url = "{api}"
token_url = "{token}"
client_id = "demo-client"
client_secret = "{client_secret}"
[audit]
enabled = true
store = "sqlite"
sqlite_path = {sqlite}
chain_key_file = {chain_key}
[[clients]]
name = "{DEMO_CLIENT}"
api_key = {api_key}
permissions = ["read", "write", "admin"]
"#,
            listen = options.listen,
            admin = options.admin_listen,
            api = simulator.base_url(),
            token = simulator.token_url(),
            // TOML string quoting of a caller-chosen key.
            api_key = toml::Value::String(api_key.clone()),
            sqlite = toml::Value::String(audit_dir.join("audit.sqlite").display().to_string()),
            chain_key = toml::Value::String(chain_key.display().to_string()),
        );
        let started = match Settings::from_toml_str(&toml) {
            Ok(settings) => App::start(settings).await.map_err(DemoError::from),
            Err(errors) => Err(DemoError::from(errors)),
        };
        match started {
            Ok(proxy) => Ok(Demo {
                proxy,
                simulator,
                api_key,
                audit_dir,
            }),
            Err(err) => {
                let _ = std::fs::remove_dir_all(&audit_dir);
                Err(err)
            }
        }
    }

    /// The banner printed at start: URLs, the key and curl lines that work when pasted (on the
    /// same machine: an "all addresses" listener is shown as loopback, which inside a
    /// container is also what `-p 8080:8080` forwards to).
    pub fn banner(&self) -> String {
        let url = reachable_url(self.proxy.listen_addr);
        let admin = reachable_url(self.proxy.admin_addr);
        let key = &self.api_key;
        let contact = "%2B15551234567";
        format!(
            "consent-proxy demo: the proxy in front of the built-in Talkdesk simulator\n\
             \n  consent API  {url}/voicebiometrics/contacts/{{contact_id}}/consent\
             \n  admin        {admin}/metrics  {admin}/readyz\
             \n  simulator    {sim}\
             \n  audit trail  {audit} (removed at exit)\
             \n  API key      {key}\
             \n  OAuth client {DEMO_CLIENT} (its secret is the API key; token endpoint {url}/oauth/token)\
             \n\nTry (contact {DEMO_CONTACT} starts as CONSENTED):\n\
             \ncurl -i -H 'X-API-Key: {key}' {url}/voicebiometrics/contacts/{contact}/consent\
             \ncurl -i -X PUT -H 'X-API-Key: {key}' -H 'Content-Type: application/json' -d '{{\"status\":\"REFUSED\"}}' {url}/voicebiometrics/contacts/{contact}/consent\
             \ncurl -i -H 'X-API-Key: {key}' {url}/voicebiometrics/contacts/{contact}/consent\
             \ncurl -s -H 'X-API-Key: {key}' {admin}/admin/audit/contacts/{contact}\
             \ncurl -s {admin}/metrics | grep ^consent_proxy_cache\
             \ncurl -s -u '{DEMO_CLIENT}:{key}' -d grant_type=client_credentials {url}/oauth/token\
             \n\nCtrl-C stops it.\n",
            sim = self.simulator.base_url(),
            audit = self.audit_dir.join("audit.sqlite").display(),
        )
    }

    pub async fn shutdown(self) {
        self.proxy.shutdown().await;
        self.simulator.shutdown().await;
        let _ = std::fs::remove_dir_all(&self.audit_dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_all_addresses_listener_is_shown_as_loopback() {
        let url = |s: &str| reachable_url(s.parse().unwrap());
        assert_eq!(url("0.0.0.0:8080"), "http://127.0.0.1:8080");
        assert_eq!(url("[::]:8080"), "http://[::1]:8080");
        assert_eq!(url("10.1.2.3:8080"), "http://10.1.2.3:8080");
    }

    #[test]
    fn flag_problems_are_named_after_the_flags() {
        let errors = ConfigErrors(vec![
            "clients[0].api_key: must be at least 16 characters".into(),
            "server.listen: busy".into(),
        ]);
        assert_eq!(
            DemoError::from(errors).to_string(),
            "--api-key: must be at least 16 characters\n--listen: busy"
        );
    }
}
