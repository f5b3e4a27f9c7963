//! The `consent-proxy` command: serve, demo, simulator, check-config, audit export|verify.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use consent_proxy::audit::cli::{self as audit_cli, ExportFormat, Verdict};
use consent_proxy::config::{LogFormat, LogSettings, Settings};
use consent_proxy::demo::{Demo, DemoOptions};
use consent_proxy::error::ErrorChain;
use consent_proxy::simulator::{Simulator, SimulatorConfig};
use consent_proxy::{build_info, logging, App};

#[derive(Parser)]
#[command(
    name = "consent-proxy",
    version = build_info::VERSION_LINE,
    about = "Caching, token-sharing reverse proxy for Talkdesk's Voice Biometrics consent API",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    /// With no command: `serve --config FILE`.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

/// The help of `--config`, shared by `serve` and `check-config`.
const CONFIG_HELP: &str = "TOML configuration file, layered over the built-in defaults \
                           (config/default.toml) and under the environment variables \
                           CONSENT_PROXY__<SECTION>__<KEY>";

#[derive(Subcommand)]
enum Command {
    /// Run the proxy (the default when no command is given).
    Serve {
        #[arg(long, value_name = "FILE", help = CONFIG_HELP)]
        config: Option<PathBuf>,
    },
    /// Run the proxy and the built-in Talkdesk simulator together: no account needed.
    Demo {
        /// Address of the consent API.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// Address of /metrics, /healthz, /readyz and /admin/*.
        #[arg(long, default_value = "127.0.0.1:9464")]
        admin_listen: SocketAddr,
        /// The API key callers use (random when not given; at least 16 characters).
        #[arg(long)]
        api_key: Option<String>,
    },
    /// Run the Talkdesk simulator alone (token endpoint /oauth/token, API at its root).
    ///
    /// It starts with no contacts: a GET answers 404 until a PUT sets the contact's status
    /// (unlike `demo`, which seeds +15551234567 as CONSENTED). /_sim/stats shows what it saw.
    Simulator {
        /// Address of the token endpoint and the consent API.
        #[arg(long, default_value = "127.0.0.1:8081")]
        listen: SocketAddr,
        /// The OAuth client id the token endpoint accepts.
        #[arg(long, default_value = "sim-client")]
        client_id: String,
        /// The OAuth client secret the token endpoint accepts.
        #[arg(long, default_value = "sim-secret")]
        client_secret: String,
        /// Delay added before every consent-API answer.
        #[arg(long, default_value_t = 0)]
        latency_ms: u64,
        /// Lifetime of issued tokens.
        #[arg(long, default_value_t = 600)]
        token_ttl_s: u64,
    },
    /// Load and validate the configuration; print it with secrets redacted. Exit 0 when
    /// valid, 2 listing every problem when not.
    CheckConfig {
        #[arg(long, value_name = "FILE", help = CONFIG_HELP)]
        config: Option<PathBuf>,
    },
    /// Read the audit trail of consent writes ([audit] in the configuration).
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Write the records to standard output, oldest first. Exit 0, or 2 when the store cannot
    /// be read.
    Export {
        #[arg(long, value_name = "FILE", help = CONFIG_HELP)]
        config: Option<PathBuf>,
        /// Only records of writes that arrived at or after this time (RFC 3339, e.g.
        /// 2026-01-31T12:00:00Z, or a date: 2026-01-31 is its midnight UTC).
        #[arg(long, value_name = "T")]
        since: Option<String>,
        /// Only records of writes that arrived before this time (as --since).
        #[arg(long, value_name = "T")]
        until: Option<String>,
        /// jsonl: one JSON object per line; csv: RFC 4180 with a header line.
        #[arg(long, value_enum, default_value_t = Format::Jsonl)]
        format: Format,
    },
    /// Check the hash chains: exit 0 when intact, 1 naming the first record that was edited,
    /// removed or reordered, 2 when the store cannot be read.
    Verify {
        #[arg(long, value_name = "FILE", help = CONFIG_HELP)]
        config: Option<PathBuf>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Jsonl,
    Csv,
}

/// mimalloc instead of glibc's malloc: less resident memory per cached contact and fewer
/// instructions per allocation (measured in docs/performance.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let command = cli.command.unwrap_or(Command::Serve { config: cli.config });
    let result = match command {
        Command::Serve { config } => runtime.block_on(serve(config)),
        Command::Demo {
            listen,
            admin_listen,
            api_key,
        } => runtime.block_on(demo(DemoOptions {
            listen,
            admin_listen,
            api_key,
        })),
        Command::Simulator {
            listen,
            client_id,
            client_secret,
            latency_ms,
            token_ttl_s,
        } => runtime.block_on(simulator(
            listen,
            SimulatorConfig {
                client_id,
                client_secret,
                latency: Duration::from_millis(latency_ms),
                token_ttl: Duration::from_secs(token_ttl_s),
                ..SimulatorConfig::default()
            },
        )),
        Command::CheckConfig { config } => return check_config(config),
        Command::Audit { command } => return runtime.block_on(audit(command)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("consent-proxy: {}", ErrorChain(err.as_ref()));
            ExitCode::FAILURE
        }
    }
}

/// What a command ends with: its error, with its sources, is printed on one line.
type CommandResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

async fn serve(config: Option<PathBuf>) -> CommandResult {
    let settings =
        Settings::load(config.as_deref()).map_err(|e| format!("invalid configuration:\n{e}"))?;
    logging::init(&settings.log)?;
    log_effective_configuration(&settings);
    for warning in settings.warnings() {
        tracing::warn!("configuration: {warning}");
    }
    let stop = shutdown_signal();
    let proxy = App::start(settings).await?;
    stop.await;
    log_draining();
    proxy.shutdown().await;
    log_stopped();
    Ok(())
}

/// Logged when a stop signal arrives, by every command that serves.
fn log_draining() {
    tracing::info!("shutting down: draining in-flight requests");
}

/// Logged once the listeners are closed, just before exit 0.
fn log_stopped() {
    tracing::info!("stopped");
}

/// The configuration in effect, secrets redacted, at start-up. In the text format its ~70
/// TOML lines are logged at debug, and one line at info says where to find them; in JSON it is
/// one `config` string field (one object per line) at info.
fn log_effective_configuration(settings: &Settings) {
    let config = settings.redacted_toml();
    match settings.log.format {
        LogFormat::Text => {
            tracing::info!(
                "configuration loaded; `consent-proxy check-config` prints the effective \
                 configuration, as does this log at debug"
            );
            tracing::debug!(
                "effective configuration (secrets redacted):\n{}",
                config.trim_end()
            );
        }
        LogFormat::Json => tracing::info!(
            config = %config,
            "effective configuration (secrets redacted)"
        ),
    }
}

async fn demo(options: DemoOptions) -> CommandResult {
    logging::init(&LogSettings {
        level: "info".into(),
        format: LogFormat::Text,
    })?;
    let stop = shutdown_signal();
    let demo = Demo::start(options).await?;
    println!("{}", demo.banner());
    stop.await;
    log_draining();
    demo.shutdown().await;
    log_stopped();
    Ok(())
}

async fn simulator(listen: SocketAddr, config: SimulatorConfig) -> CommandResult {
    logging::init(&LogSettings {
        level: "info".into(),
        format: LogFormat::Text,
    })?;
    let stop = shutdown_signal();
    let simulator = Simulator::start(listen, config)
        .await
        .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    println!(
        "talkdesk simulator\n  api base   {}\n  token url  {}\n  control    {}/_sim/stats",
        simulator.base_url(),
        simulator.token_url(),
        simulator.base_url()
    );
    stop.await;
    log_draining();
    simulator.shutdown().await;
    log_stopped();
    Ok(())
}

fn check_config(config: Option<PathBuf>) -> ExitCode {
    match Settings::load(config.as_deref()) {
        Ok(settings) => {
            print!("{}", settings.redacted_toml());
            for warning in settings.warnings() {
                eprintln!("warning: {warning}");
            }
            ExitCode::SUCCESS
        }
        Err(errors) => {
            eprintln!("invalid configuration:");
            for problem in &errors.0 {
                eprintln!("  - {problem}");
            }
            ExitCode::from(2)
        }
    }
}

/// `audit export` and `audit verify`. Exit 2 when the configuration or the store fails.
async fn audit(command: AuditCommand) -> ExitCode {
    let config = match &command {
        AuditCommand::Export { config, .. } | AuditCommand::Verify { config } => config.clone(),
    };
    let settings = match Settings::load(config.as_deref()) {
        Ok(settings) => settings,
        Err(errors) => {
            eprintln!("invalid configuration:\n{errors}");
            return ExitCode::from(2);
        }
    };
    let failed = |err: consent_proxy::error::Failure| {
        eprintln!("consent-proxy audit: {}", ErrorChain(&err));
        ExitCode::from(2)
    };
    match command {
        AuditCommand::Export {
            since,
            until,
            format,
            ..
        } => {
            let format = match format {
                Format::Jsonl => ExportFormat::Jsonl,
                Format::Csv => ExportFormat::Csv,
            };
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            let exported = audit_cli::export(
                &settings,
                since.as_deref(),
                until.as_deref(),
                format,
                &mut out,
            )
            .await;
            match exported {
                Ok(count) => {
                    eprintln!("{count} records exported");
                    ExitCode::SUCCESS
                }
                Err(err) => failed(err),
            }
        }
        AuditCommand::Verify { .. } => {
            let started = std::time::Instant::now();
            match audit_cli::verify(&settings).await {
                Ok(Verdict::Intact { chains, entries }) => {
                    println!(
                        "audit trail intact: {entries} entries in {chains} chains, checked in {:.3} s",
                        started.elapsed().as_secs_f64()
                    );
                    ExitCode::SUCCESS
                }
                Ok(Verdict::Broken(broken)) => {
                    println!("audit trail broken: {broken}");
                    ExitCode::from(1)
                }
                Err(err) => failed(err),
            }
        }
    }
}

/// Installs the SIGTERM and SIGINT handlers at once (so a signal that arrives while starting,
/// or just after the banner, is not fatal) and returns a future that resolves on either.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let terminate = signal(SignalKind::terminate());
        let interrupt = signal(SignalKind::interrupt());
        async move {
            match (terminate, interrupt) {
                (Ok(mut terminate), Ok(mut interrupt)) => {
                    tokio::select! {
                        _ = terminate.recv() => {}
                        _ = interrupt.recv() => {}
                    }
                }
                (Ok(mut terminate), Err(_)) => {
                    terminate.recv().await;
                }
                (Err(_), Ok(mut interrupt)) => {
                    interrupt.recv().await;
                }
                (Err(_), Err(_)) => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
    }
    #[cfg(not(unix))]
    async {
        let _ = tokio::signal::ctrl_c().await;
    }
}
