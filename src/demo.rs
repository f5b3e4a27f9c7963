//! `consent-proxy demo`: the proxy and the built-in Talkdesk simulator in one process, with a
//! generated API key and ready-to-paste `curl` lines, so a newcomer sees it work with no
//! account or credentials. Auditing is on, in a temporary SQLite file removed at the end.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use crate::app::{App, AppHandle, StartError};
use crate::config::{ConfigErrors, Settings};
use crate::consent::ConsentStatus;
use crate::simulator::{Simulator, SimulatorConfig};

/// The contact seeded in the simulator so the first GET has something to show.
pub const DEMO_CONTACT: &str = "+15551234567";

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
    #[error("cannot create the demo's audit directory")]
    AuditDir(#[source] std::io::Error),
    #[error("invalid demo configuration:\n{0}")]
    Config(#[from] ConfigErrors),
    #[error(transparent)]
    Proxy(#[from] StartError),
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
name = "demo"
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

    /// The banner printed at start: URLs, the key and curl lines that work when pasted.
    pub fn banner(&self) -> String {
        let url = self.proxy.url();
        let admin = self.proxy.admin_url();
        let key = &self.api_key;
        let contact = "%2B15551234567";
        format!(
            "consent-proxy demo: the proxy in front of the built-in Talkdesk simulator\n\
             \n  consent API  {url}/voicebiometrics/contacts/{{contact_id}}/consent\
             \n  admin        {admin}/metrics  {admin}/readyz\
             \n  simulator    {sim}\
             \n  audit trail  {audit} (removed at exit)\
             \n  API key      {key}\
             \n\nTry (contact {DEMO_CONTACT} starts as CONSENTED):\n\
             \ncurl -i -H 'X-API-Key: {key}' {url}/voicebiometrics/contacts/{contact}/consent\
             \ncurl -i -X PUT -H 'X-API-Key: {key}' -H 'Content-Type: application/json' -d '{{\"status\":\"REFUSED\"}}' {url}/voicebiometrics/contacts/{contact}/consent\
             \ncurl -i -H 'X-API-Key: {key}' {url}/voicebiometrics/contacts/{contact}/consent\
             \ncurl -s -H 'X-API-Key: {key}' {admin}/admin/audit/contacts/{contact}\
             \ncurl -s {admin}/metrics | grep ^consent_proxy_cache\
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
