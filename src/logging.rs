//! Log set-up: `log.level` (a level or a tracing filter) and `log.format` (text or JSON lines)
//! on standard error. What gets logged is masked at the source (see `ContactId::masked`).
//!
//! The HTTP and TLS libraries underneath (`h2`, `hyper_util`, ...) stay at `info` when
//! `log.level` raises the default to debug or trace without naming them: their debug and trace
//! events are about connections, pools and frames, numerous, and not written with the proxy's
//! secrets in mind (h2, for one, logs an unparsable request path verbatim at debug). Naming one
//! in the filter, e.g. `debug,h2=trace`, is the user's explicit choice and is obeyed.

use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, LogSettings};

/// The libraries kept at `info` unless named (targets are matched by prefix, as tracing does:
/// naming `hyper` names `hyper_util` and `hyper_rustls` too).
const QUIET_LIBRARIES: &[&str] = &[
    "h2",
    "hyper",
    "hyper_util",
    "hyper_rustls",
    "rustls",
    "tokio_rustls",
];

/// Why logging could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum LoggingError {
    #[error("log.level {0:?} is not a level or tracing filter")]
    Filter(String, #[source] tracing_subscriber::filter::ParseError),
    #[error("a global logger is already installed")]
    AlreadyInstalled(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// Installs the global subscriber. Fails when the level is not a valid filter.
pub fn init(settings: &LogSettings) -> Result<(), LoggingError> {
    let directives = effective_filter(&settings.level);
    let filter = EnvFilter::try_new(&directives)
        .map_err(|e| LoggingError::Filter(settings.level.clone(), e))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = match settings.format {
        LogFormat::Text => builder.with_ansi(false).try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    result.map_err(LoggingError::AlreadyInstalled)?;
    tracing::debug!(filter = %directives, "log filter installed");
    Ok(())
}

/// `log.level` with `<library>=info` appended for each quiet library it does not name, when
/// its default level is debug or trace (a lower default needs no cap, and with no default the
/// libraries are off already).
pub fn effective_filter(level: &str) -> String {
    let directives: Vec<&str> = level
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .collect();
    let default = directives
        .iter()
        .filter_map(|d| d.parse::<LevelFilter>().ok())
        .max();
    if default.is_none_or(|level| level <= LevelFilter::INFO) {
        return level.to_owned();
    }
    let named: Vec<&str> = directives
        .iter()
        .filter(|d| d.parse::<LevelFilter>().is_err())
        .filter_map(|d| d.split(['[', '=']).next())
        .map(str::trim)
        .filter(|target| !target.is_empty())
        .collect();
    let mut filter = level.to_owned();
    for library in QUIET_LIBRARIES {
        if !named.iter().any(|target| library.starts_with(target)) {
            filter.push_str(&format!(",{library}=info"));
        }
    }
    filter
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libraries_stay_at_info_unless_named() {
        assert_eq!(effective_filter("info"), "info");
        assert_eq!(
            effective_filter("warn,consent_proxy=debug"),
            "warn,consent_proxy=debug"
        );
        assert_eq!(
            effective_filter("consent_proxy=trace"),
            "consent_proxy=trace"
        );
        assert_eq!(
            effective_filter("debug"),
            "debug,h2=info,hyper=info,hyper_util=info,hyper_rustls=info,rustls=info,\
             tokio_rustls=info"
        );
        assert_eq!(
            effective_filter("consent_proxy=debug,trace,hyper=debug,h2[conn]=trace"),
            "consent_proxy=debug,trace,hyper=debug,h2[conn]=trace,rustls=info,tokio_rustls=info"
        );
        for level in ["debug", "trace", "info,h2=trace", "debug,hyper_util=trace"] {
            assert!(
                EnvFilter::try_new(effective_filter(level)).is_ok(),
                "{level}"
            );
        }
    }
}
