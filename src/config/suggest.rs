//! "Did you mean": the known word nearest to an unknown one, for unknown keys and log levels.
//!
//! Near means one of: a few edits away, scaled by length (`lisen` → `listen`, `deubg` →
//! `debug`; a transposition is one edit); one word a prefix of the other (`ttl_secs` →
//! `ttl_s`, `warning` → `warn`, `request_timeout` → `request_timeout_ms`); or a Jaro-Winkler
//! similarity of at least [`MIN_SIMILARITY`] (`header_timeout_ms` → `header_read_timeout_ms`).
//! Among the near candidates the most similar wins. Case and `-` against `_` do not count.

/// Jaro-Winkler similarity from which two words are near whatever their edit distance.
const MIN_SIMILARITY: f64 = 0.9;

/// The shortest word that counts as a prefix of another (`ttl` yes, `t` no).
const MIN_PREFIX: usize = 3;

/// The candidate nearest to `word`, if any is near.
pub(super) fn closest<'a>(
    word: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    let word = normalise(word);
    candidates
        .into_iter()
        .filter_map(|candidate| {
            let normal = normalise(candidate);
            let similarity = strsim::jaro_winkler(&word, &normal);
            near(&word, &normal, similarity).then_some((similarity, candidate))
        })
        // The first of equally similar candidates wins (`max_by` would take the last).
        .fold(
            None,
            |best: Option<(f64, &str)>, (similarity, candidate)| match best {
                Some((best_similarity, _)) if best_similarity >= similarity => best,
                _ => Some((similarity, candidate)),
            },
        )
        .map(|(_, candidate)| candidate)
}

fn near(word: &str, candidate: &str, similarity: f64) -> bool {
    let edits_allowed = (word.chars().count() / 3).clamp(1, 3);
    let (shorter, longer) = if word.len() <= candidate.len() {
        (word, candidate)
    } else {
        (candidate, word)
    };
    strsim::osa_distance(word, candidate) <= edits_allowed
        || (shorter.chars().count() >= MIN_PREFIX && longer.starts_with(shorter))
        || similarity >= MIN_SIMILARITY
}

fn normalise(word: &str) -> String {
    word.to_lowercase().replace('-', "_")
}

#[cfg(test)]
mod tests {
    use super::*;

    const CACHE: &[&str] = &[
        "enabled",
        "ttl_s",
        "not_found_ttl_s",
        "max_entries",
        "stale_if_error_s",
        "refresh_ahead_s",
    ];
    const SERVER: &[&str] = &[
        "listen",
        "admin_listen",
        "tls_cert_file",
        "tls_key_file",
        "max_body_bytes",
        "max_header_bytes",
        "header_read_timeout_ms",
        "idle_timeout_ms",
        "request_timeout_ms",
        "shutdown_grace_ms",
        "max_connections",
        "listen_backlog",
    ];

    #[test]
    fn near_misses_get_their_key() {
        for (word, candidates, expected) in [
            ("ttl_secs", CACHE, "ttl_s"),
            ("ttl_seconds", CACHE, "ttl_s"),
            ("ttl", CACHE, "ttl_s"),
            ("TTL-S", CACHE, "ttl_s"),
            ("not_found_ttl", CACHE, "not_found_ttl_s"),
            ("max_entry", CACHE, "max_entries"),
            ("stale_if_error_secs", CACHE, "stale_if_error_s"),
            ("enable", CACHE, "enabled"),
            ("lisen", SERVER, "listen"),
            ("request_timeout", SERVER, "request_timeout_ms"),
            ("header_timeout_ms", SERVER, "header_read_timeout_ms"),
            ("max_conections", SERVER, "max_connections"),
            ("shutdown_grace_secs", SERVER, "shutdown_grace_ms"),
            ("tls_cert", SERVER, "tls_cert_file"),
            ("admin-listen", SERVER, "admin_listen"),
        ] {
            assert_eq!(
                closest(word, candidates.iter().copied()),
                Some(expected),
                "{word}"
            );
        }
    }

    #[test]
    fn far_names_get_no_hint() {
        for (word, candidates) in [
            ("zzz", SERVER),
            ("port", SERVER),
            ("colour", SERVER),
            ("workers", SERVER),
            ("size", CACHE),
            ("eviction_policy", CACHE),
            ("backend", CACHE),
            ("t", CACHE),
        ] {
            assert_eq!(closest(word, candidates.iter().copied()), None, "{word}");
        }
    }
}
