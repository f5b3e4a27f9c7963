//! `log.level`: a level, or a tracing filter of comma-separated directives. A directive is a
//! level (`info`) or `<target>=<level>` (`consent_proxy=debug`, also with span filters,
//! `consent_proxy[request]=trace`). tracing itself would also read a bare word as a target
//! enabled at every level, so that `deubg` or `warning` would silently log nothing of the
//! proxy; here a bare word must be a level, and an unknown level is refused with the nearest
//! one. A target is always written with its level.

use tracing_subscriber::filter::LevelFilter;

use super::suggest::closest;

/// The level names, quietest first (tracing also takes them in any case, and 0-5).
const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];

/// Words other loggers use for a level, and the level they mean here.
const SYNONYMS: [(&str, &str); 7] = [
    ("verbose", "debug"),
    ("fatal", "error"),
    ("critical", "error"),
    ("all", "trace"),
    ("none", "off"),
    ("quiet", "off"),
    ("silent", "off"),
];

/// `level` when it is a valid filter whose every level is a level.
pub(super) fn log_filter(level: String) -> Result<String, String> {
    let directives: Vec<&str> = level
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .collect();
    if directives.is_empty() {
        return Err(format!(
            "must not be empty (a level: {}, or a filter such as \"consent_proxy=debug,info\")",
            LEVELS.join(", ")
        ));
    }
    let problems: Vec<String> = directives
        .iter()
        .filter_map(|directive| directive_problem(directive))
        .collect();
    if !problems.is_empty() {
        return Err(format!(
            "{}; the levels are {} (a target takes one as <target>=<level>)",
            problems.join("; "),
            LEVELS.join(", ")
        ));
    }
    tracing_subscriber::EnvFilter::try_new(&level)
        .map(|_| level.clone())
        .map_err(|e| format!("{level:?} is not a level or tracing filter: {e}"))
}

/// What is wrong with one directive's level, if anything.
fn directive_problem(directive: &str) -> Option<String> {
    let level = match level_separator(directive) {
        Some(at) => &directive[at + 1..],
        None => directive,
    };
    if level.parse::<LevelFilter>().is_ok() && !level.is_empty() {
        return None;
    }
    let lowercase = level.to_lowercase();
    let meant = SYNONYMS
        .iter()
        .find(|(synonym, _)| *synonym == lowercase)
        .map(|(_, meant)| *meant)
        .or_else(|| closest(level, LEVELS));
    let hint = meant.map_or(String::new(), |meant| {
        let prefix = &directive[..directive.len() - level.len()];
        format!("; did you mean \"{prefix}{meant}\"?")
    });
    Some(if level == directive {
        format!("{directive:?} is not a level{hint}")
    } else {
        format!("{directive:?}: {level:?} is not a level{hint}")
    })
}

/// The `=` before a directive's level: the last one outside its span filter's `[...]`/`{...}`
/// (`target[span{field=value}]=level`).
fn level_separator(directive: &str) -> Option<usize> {
    let mut depth = 0usize;
    let mut separator = None;
    for (at, c) in directive.char_indices() {
        match c {
            '[' | '{' => depth += 1,
            ']' | '}' => depth = depth.saturating_sub(1),
            '=' if depth == 0 => separator = Some(at),
            _ => {}
        }
    }
    separator
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_and_filters_are_accepted() {
        for level in [
            "info",
            "DEBUG",
            "off",
            "3",
            "consent_proxy=debug,info",
            "warn,consent_proxy::http=trace",
            "info,h2=trace,",
            "consent_proxy[request{method=PUT}]=trace,info",
        ] {
            assert_eq!(
                log_filter(level.to_owned()).as_deref(),
                Ok(level),
                "{level}"
            );
        }
    }

    #[test]
    fn unknown_level_words_are_refused_with_the_nearest_level() {
        for (level, expected) in [
            ("deubg", "\"deubg\" is not a level; did you mean \"debug\"?"),
            (
                "warning",
                "\"warning\" is not a level; did you mean \"warn\"?",
            ),
            (
                "verbose",
                "\"verbose\" is not a level; did you mean \"debug\"?",
            ),
            ("Inf", "\"Inf\" is not a level; did you mean \"info\"?"),
            (
                "consent_proxy=deubg,info",
                "\"consent_proxy=deubg\": \"deubg\" is not a level; \
                 did you mean \"consent_proxy=debug\"?",
            ),
            ("loud", "\"loud\" is not a level;"),
            // A bare target: tracing would enable it at every level; here it needs its level.
            ("consent_proxy", "\"consent_proxy\" is not a level;"),
            ("consent_proxy=", "\"consent_proxy=\": \"\" is not a level"),
        ] {
            let err = log_filter(level.to_owned()).unwrap_err();
            assert!(err.starts_with(expected), "{level}: {err}");
            assert!(
                err.ends_with("the levels are off, error, warn, info, debug, trace (a target takes one as <target>=<level>)"),
                "{err}"
            );
        }
        assert!(log_filter(" , ".to_owned())
            .unwrap_err()
            .starts_with("must not be empty"));
    }
}
