//! `consent-proxy demo`: the proxy and the built-in Talkdesk simulator in one process, with a
//! generated API key and ready-to-paste `curl` lines, so a newcomer sees it work with no
//! account or credentials.

use std::net::{Ipv4Addr, SocketAddr};

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
}

/// Why the demo could not start.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("cannot start the simulator")]
    Simulator(#[source] std::io::Error),
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
        );
        let settings = Settings::from_toml_str(&toml)?;
        let proxy = App::start(settings).await?;
        Ok(Demo {
            proxy,
            simulator,
            api_key,
        })
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
             \n  API key      {key}\
             \n\nTry (contact {DEMO_CONTACT} starts as CONSENTED):\n\
             \ncurl -i -H 'X-API-Key: {key}' {url}/voicebiometrics/contacts/{contact}/consent\
             \ncurl -i -X PUT -H 'X-API-Key: {key}' -H 'Content-Type: application/json' -d '{{\"status\":\"REFUSED\"}}' {url}/voicebiometrics/contacts/{contact}/consent\
             \ncurl -i -H 'X-API-Key: {key}' {url}/voicebiometrics/contacts/{contact}/consent\
             \ncurl -s {admin}/metrics | grep ^consent_proxy_cache\
             \n\nCtrl-C stops it.\n",
            sim = self.simulator.base_url(),
        )
    }

    pub async fn shutdown(self) {
        self.proxy.shutdown().await;
        self.simulator.shutdown().await;
    }
}
