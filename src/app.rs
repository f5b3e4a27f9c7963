//! Wiring: builds every component from the validated settings, binds both listeners and
//! returns a handle to stop them. Tests start whole proxies on port 0 through this.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use futures_util::FutureExt;
use prometheus::Registry;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::audit::{Audit, AuditStartError, AuditTasks};
use crate::auth::token::TokenKeys;
use crate::auth::Authenticator;
use crate::cache::{CacheMetrics, ConsentCache};
use crate::cluster::{Cluster, ClusterStartError};
use crate::config::{OtelSettings, Settings};
use crate::error::{ErrorChain, Failure};
use crate::http::admin::{AdminAuth, AdminRoutes};
use crate::http::routes::{ConsentRoutes, RouteLimits};
use crate::http::token_endpoint::TokenEndpoint;
use crate::metrics::{self, HttpMetrics};
use crate::otel::{self, Tracer};
use crate::service::{ConsentService, WriteMetrics};
use crate::tls::TlsError;
use crate::upstream::admission::AdmissionMetrics;
use crate::upstream::client::{ConsentApi, UpstreamMetrics};
use crate::upstream::token::{EndpointClient, TokenManager, TokenMetrics};
use crate::upstream::transport::Transport;
use crate::wire::server::{self, ListenerLimits};

pub struct App;

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr} ({key})")]
    Listen {
        key: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot load the TLS certificate")]
    Tls(#[from] TlsError),
    #[error("cannot start cluster mode")]
    Cluster(#[from] ClusterStartError),
    #[error("cannot set up the OAuth token endpoint")]
    OAuth(#[source] Failure),
    #[error(transparent)]
    Audit(#[from] AuditStartError),
}

/// A running proxy.
pub struct AppHandle {
    pub listen_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub registry: Registry,
    pub cache: ConsentCache,
    /// `None` without `cluster.redis_url`.
    pub cluster: Option<Cluster>,
    /// `None` unless `audit.enabled`.
    pub audit: Option<Audit>,
    pub tokens: TokenManager,
    /// The consent listener's handler, for driving requests in-process (benchmarks).
    pub routes: Arc<ConsentRoutes>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    feed_stop: watch::Sender<bool>,
    feed_task: Option<JoinHandle<()>>,
    /// The trace exporter, stopped last (it sends what the drained requests recorded).
    export_stop: watch::Sender<bool>,
    export_task: Option<JoinHandle<()>>,
    audit_tasks: Option<AuditTasks>,
}

impl App {
    /// Starts the proxy with the default outbound TLS roots (webpki).
    pub async fn start(settings: Settings) -> Result<AppHandle, StartError> {
        let transport = Transport::new(settings.talkdesk.timeout, &settings.egress);
        Self::start_with_transport(settings, transport).await
    }

    /// Starts the proxy with a given outbound transport (tests trust their own CA this way).
    pub async fn start_with_transport(
        settings: Settings,
        transport: Transport,
    ) -> Result<AppHandle, StartError> {
        crate::tls::install_crypto_provider();
        let tls = match &settings.server.tls {
            Some(files) => Some(crate::tls::tls_acceptor(&files.cert_file, &files.key_file)?),
            None => None,
        };
        let backlog = settings.server.listen_backlog;
        let (listener, listen_addr) = listen("server.listen", settings.server.listen, backlog)?;
        let (admin_listener, admin_addr) =
            listen("server.admin_listen", settings.server.admin_listen, backlog)?;
        // Before the first connection can come: a burst must not wait while the table grows.
        server::reserve_descriptors(&listener, settings.server.max_connections);

        let registry = metrics::new_registry();
        let (shutdown, shutdown_rx) = watch::channel(false);
        let cache = ConsentCache::new(&settings.cache, CacheMetrics::register(&registry));
        // The cluster's feed stops only after the listeners have drained, so that the requests
        // finishing within the grace period can still announce their writes.
        let (feed_stop, feed_stop_rx) = watch::channel(false);
        let mut feed_task = None;
        let cluster = match &settings.cluster {
            Some(cluster_settings) => {
                let (cluster, feed) = Cluster::start(
                    cluster_settings,
                    &settings.talkdesk,
                    cache.clone(),
                    settings.server.request_timeout,
                    &registry,
                    feed_stop_rx,
                )?;
                feed_task = Some(feed);
                Some(cluster)
            }
            None => None,
        };
        let (export_stop, export_stop_rx) = watch::channel(false);
        let (tracer, export_task) = match &settings.otel {
            Some(otel) => {
                let (tracer, task) =
                    start_tracer(otel, transport.clone(), &registry, export_stop_rx);
                tracing::info!(endpoint = %otel.endpoint, sample_ratio = otel.sample_ratio, "OpenTelemetry trace export on");
                (tracer, Some(task))
            }
            None => (Tracer::off(), None),
        };
        let (tokens, refresher) = TokenManager::start(
            EndpointClient {
                transport: transport.clone(),
                tracer: tracer.clone(),
            },
            &settings.talkdesk,
            &settings.token,
            TokenMetrics::register(&registry),
            cluster.as_ref().and_then(Cluster::fleet_tokens),
            shutdown_rx.clone(),
        );
        let api = Arc::new(ConsentApi::new(
            transport,
            tokens.clone(),
            &settings.talkdesk,
            UpstreamMetrics::register(&registry),
            AdmissionMetrics::register(&registry),
        ));
        let mut tasks = vec![refresher];
        let (audit, audit_tasks) = Audit::start(&settings, &registry).await?.unzip();
        let service = ConsentService::new(
            api,
            cache.clone(),
            cluster.clone(),
            audit.clone(),
            WriteMetrics::register(&registry),
        );
        let token_keys = if settings.oauth.enabled {
            let keys = TokenKeys::from_settings(&settings.oauth).map_err(StartError::OAuth)?;
            if settings.oauth.signing_keys.is_empty() {
                tracing::info!(
                    "oauth.signing_key_file is empty: access tokens are signed with a random key \
                     of this process, and stop working when it restarts"
                );
            }
            tracing::info!(key_ids = ?keys.key_ids(), "OAuth token endpoint on POST /oauth/token");
            Some(Arc::new(keys))
        } else {
            None
        };
        let mut authenticator =
            Authenticator::new(settings.clients.clone(), settings.auth.required);
        if let Some(keys) = &token_keys {
            authenticator = authenticator.with_access_tokens(keys.clone(), &registry);
        }
        let auth = Arc::new(authenticator);
        let token_endpoint = token_keys.map(|keys| {
            TokenEndpoint::new(auth.clone(), keys, settings.oauth.token_ttl, &registry)
        });
        if !settings.auth.required {
            tracing::warn!(
                "auth.required = false: ANY caller that can reach {listen_addr} may read and \
                 write consent without a key"
            );
        }

        let http_metrics = HttpMetrics::register(&registry);
        let admin_auth = AdminAuth {
            authenticator: auth.clone(),
            failures: http_metrics.auth_failures.clone(),
        };
        let routes = Arc::new(ConsentRoutes::new(
            service.clone(),
            auth,
            http_metrics,
            RouteLimits {
                max_body_bytes: settings.server.max_body_bytes,
                max_header_bytes: settings.server.max_header_bytes,
                request_timeout: settings.server.request_timeout,
                trusted_proxies: settings.server.trusted_proxies.clone(),
            },
            token_endpoint,
            tracer,
        ));
        let serving = Arc::new(AtomicBool::new(false));
        let admin = Arc::new(AdminRoutes::new(
            registry.clone(),
            service,
            tokens.clone(),
            admin_auth,
            serving.clone(),
            settings.server.max_header_bytes,
        ));
        let limits = ListenerLimits {
            max_header_bytes: settings.server.max_header_bytes,
            header_read_timeout: settings.server.header_read_timeout,
            idle_timeout: settings.server.idle_timeout,
            // An answer may take as long to be taken as a request's head may take to come.
            answer_timeout: settings.server.request_timeout + settings.server.header_read_timeout,
            max_connections: settings.server.max_connections,
        };
        let grace = settings.server.shutdown_grace;
        let admin_limits = ListenerLimits {
            max_connections: 64,
            ..limits.clone()
        };

        let consent_task = {
            let consent_routes = routes.clone();
            let serving = serving.clone();
            let shutdown_rx = shutdown_rx.clone();
            tokio::spawn(async move {
                serving.store(true, Ordering::Release);
                server::serve(
                    listener,
                    tls,
                    limits,
                    move |request, peer| {
                        consent_routes
                            .handle(request, peer)
                            .map(Ok::<_, Infallible>)
                    },
                    server::when_shut_down(shutdown_rx, grace),
                )
                .await;
                serving.store(false, Ordering::Release);
            })
        };
        let admin_task = tokio::spawn(server::serve(
            admin_listener,
            None,
            admin_limits,
            move |request, peer| {
                let admin = admin.clone();
                async move { Ok::<_, Infallible>(admin.handle(request, peer).await) }
            },
            server::when_shut_down(shutdown_rx, grace),
        ));
        tracing::info!(%listen_addr, %admin_addr, "consent-proxy listening");
        tasks.extend([consent_task, admin_task]);
        Ok(AppHandle {
            listen_addr,
            admin_addr,
            registry,
            cache,
            cluster,
            audit,
            tokens,
            routes,
            shutdown,
            tasks,
            feed_stop,
            feed_task,
            export_stop,
            export_task,
            audit_tasks,
        })
    }
}

/// The trace exporter, posting through the upstream transport (TLS roots and egress proxy as
/// for Talkdesk; a collector inside the network belongs in `NO_PROXY`).
fn start_tracer(
    otel: &OtelSettings,
    transport: Transport,
    registry: &prometheus::Registry,
    stop: watch::Receiver<bool>,
) -> (Tracer, JoinHandle<()>) {
    /// A collector's answer is small; its body is read only to reuse the connection.
    const MAX_ANSWER_BYTES: usize = 64 * 1024;
    let post: otel::Post = Arc::new(move |request| {
        let transport = transport.clone();
        Box::pin(async move {
            transport
                .attempt(request, otel::EXPORT_TIMEOUT, MAX_ANSWER_BYTES)
                .await
                .map(|answer| answer.status)
                .map_err(|error| ErrorChain(&error).to_string())
        })
    });
    Tracer::start(
        &otel.endpoint,
        otel.service_name.clone(),
        otel.sample_ratio,
        post,
        registry,
        stop,
    )
}

/// Binds the listener configured under `key`, and says where it listens (port 0 resolved).
fn listen(
    key: &'static str,
    addr: SocketAddr,
    backlog: u32,
) -> Result<(tokio::net::TcpListener, SocketAddr), StartError> {
    let failed = |source| StartError::Listen { key, addr, source };
    let listener = server::bind(addr, backlog).map_err(failed)?;
    let local = listener.local_addr().map_err(failed)?;
    Ok((listener, local))
}

impl AppHandle {
    /// Stops accepting, lets in-flight requests finish within the grace period, and returns
    /// when both listeners are closed.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        for task in self.tasks {
            let _ = task.await;
        }
        // After the drain: the last writes' outcomes are recorded.
        if let Some(audit) = self.audit_tasks {
            audit.stop().await;
        }
        let _ = self.feed_stop.send(true);
        if let Some(feed) = self.feed_task {
            let _ = feed.await;
        }
        let _ = self.export_stop.send(true);
        if let Some(export) = self.export_task {
            // What is queued gets one more chance; a collector that stays slow does not hold
            // the exit up for long.
            let _ = tokio::time::timeout(otel::EXPORT_TIMEOUT * 2, export).await;
        }
    }

    /// Base URL of the consent listener (plain HTTP).
    pub fn url(&self) -> String {
        format!("http://{}", self.listen_addr)
    }

    pub fn admin_url(&self) -> String {
        format!("http://{}", self.admin_addr)
    }
}
