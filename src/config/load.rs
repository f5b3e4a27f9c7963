//! The layers: built-in defaults < the `--config` file < `CONSENT_PROXY__<SECTION>__<KEY>`
//! environment variables, merged by the `config` crate and deserialised into the schema.
//! Keys the schema does not know are found by `serde_ignored` and reported all together, each
//! with the closest known key when one is near.

use std::{collections::HashMap, path::Path};

use config::{Config, Environment, File, FileFormat};
use serde_ignored::Path as IgnoredPath;

use super::{
    files::{read_text, FileKind},
    introspect::{struct_fields, StructFields},
    problems::Problems,
    schema::ConfigFile,
    suggest::closest,
    validate, ConfigErrors, Settings, DEFAULT_CONFIG_TOML, ENV_PREFIX,
};

/// Between the prefix, the section and the key: `CONSENT_PROXY__SERVER__LISTEN`.
const ENV_SEPARATOR: &str = "__";

/// The `[[clients]]` list, which only a file may set.
const CLIENTS: &str = "clients";

/// A configuration file's text and how messages name it.
struct FileLayer {
    label: String,
    text: String,
}

pub(super) fn from_file_and_process_env(file: Option<&Path>) -> Result<Settings, ConfigErrors> {
    let prefix = env_prefix_lowercase();
    let mut env = HashMap::new();
    let mut unreadable = Vec::new();
    for (name, value) in std::env::vars_os() {
        // Variables that are not ours are left alone, whatever their encoding.
        let Some(name) = name.to_str().map(str::to_owned) else {
            continue;
        };
        if !name.to_lowercase().starts_with(&prefix) {
            continue;
        }
        match value.into_string() {
            Ok(value) => {
                env.insert(name, value);
            }
            Err(_) => unreadable.push(format!("environment variable {name} is not valid UTF-8")),
        }
    }
    let result = from_file_and_env(file, env);
    if unreadable.is_empty() {
        return result;
    }
    if let Err(ConfigErrors(more)) = result {
        unreadable.extend(more);
    }
    Err(ConfigErrors(unreadable))
}

pub(super) fn from_file_and_env(
    file: Option<&Path>,
    env: HashMap<String, String>,
) -> Result<Settings, ConfigErrors> {
    let file = file.map(read_file).transpose()?;
    load(file, Some(env))
}

pub(super) fn from_toml_str(toml: &str) -> Result<Settings, ConfigErrors> {
    let file = FileLayer {
        label: "configuration".to_owned(),
        text: toml.to_owned(),
    };
    load(Some(file), None)
}

fn read_file(path: &Path) -> Result<FileLayer, ConfigErrors> {
    let label = format!("config file '{}'", path.display());
    if !path.exists() {
        return Err(ConfigErrors(vec![format!("{label} not found")]));
    }
    match read_text(path, FileKind::Configuration) {
        Ok(read) => Ok(FileLayer {
            label,
            text: read.text,
        }),
        Err(problem) => Err(ConfigErrors(vec![format!("config file: {problem}")])),
    }
}

/// Merge the layers, deserialise, report unknown keys, validate.
fn load(
    file: Option<FileLayer>,
    env: Option<HashMap<String, String>>,
) -> Result<Settings, ConfigErrors> {
    let mut problems = Problems::default();
    let mut layers =
        Config::builder().add_source(File::from_str(DEFAULT_CONFIG_TOML, FileFormat::Toml));
    if let Some(file) = &file {
        // Parsed here first so that a syntax error names the file.
        if let Err(e) = toml::from_str::<toml::Table>(&file.text) {
            let problem = format!(
                "{} is not valid TOML: {}",
                file.label,
                e.to_string().trim_end()
            );
            return Err(ConfigErrors(vec![problem]));
        }
        layers = layers.add_source(File::from_str(&file.text, FileFormat::Toml));
    }
    if let Some(env) = env {
        // No `try_parsing`: it would turn a client_id "00123" into the number 123. Each key's
        // own type parses its string instead.
        layers = layers.add_source(
            Environment::with_prefix(ENV_PREFIX)
                .prefix_separator(ENV_SEPARATOR)
                .separator(ENV_SEPARATOR)
                .source(Some(screen_env(env, &mut problems))),
        );
    }
    let merged = layers
        .build()
        .map_err(|e| ConfigErrors(vec![format!("cannot merge the configuration layers: {e}")]))?;

    let mut unknown = Vec::new();
    let schema: ConfigFile = serde_ignored::deserialize(merged, |path| unknown.push(key_of(&path)))
        .map_err(|e| {
            // Only the shape can fail here (e.g. `server = 5`): every key's value is read on
            // its own.
            ConfigErrors(vec![format!("the configuration has the wrong shape: {e}")])
        })?;
    report_unknown_keys(&unknown, &mut problems);
    let settings = validate::settings(schema, &mut problems);
    let (mut settings, warnings) = problems.finish(settings)?;
    settings.warnings = warnings;
    Ok(settings)
}

fn env_prefix_lowercase() -> String {
    format!("{ENV_PREFIX}{ENV_SEPARATOR}").to_lowercase()
}

/// Keeps the variables that name a `SECTION__KEY` and records which key each sets; any other
/// variable with our prefix, and any for `[[clients]]`, is a problem naming it.
fn screen_env(env: HashMap<String, String>, problems: &mut Problems) -> HashMap<String, String> {
    let prefix = env_prefix_lowercase();
    let mut env: Vec<_> = env.into_iter().collect();
    env.sort();
    let mut kept = HashMap::new();
    for (var, value) in env {
        let lowercase = var.to_lowercase();
        let Some(path) = lowercase.strip_prefix(&prefix) else {
            continue;
        };
        let parts: Vec<&str> = path.split(ENV_SEPARATOR).collect();
        let is_key = parts.len() == 2
            && parts.iter().all(|part| {
                !part.is_empty()
                    && part
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
            });
        if parts[0] == CLIENTS {
            problems.general(format!(
                "environment variable {var}: [[clients]] can only be configured in a file"
            ));
        } else if !is_key {
            problems.general(format!(
                "environment variable {var} is not a configuration key \
                 (expected {ENV_PREFIX}__<SECTION>__<KEY>)"
            ));
        } else {
            problems.key_from_env(parts.join("."), var.clone());
            kept.insert(var, value);
        }
    }
    kept
}

/// `clients[0].foo` for serde_ignored's path `clients.0.foo`.
fn key_of(path: &IgnoredPath<'_>) -> String {
    match path {
        IgnoredPath::Root => String::new(),
        IgnoredPath::Seq { parent, index } => format!("{}[{index}]", key_of(parent)),
        IgnoredPath::Map { parent, key } => match key_of(parent) {
            parent if parent.is_empty() => key.clone(),
            parent => format!("{parent}.{key}"),
        },
        IgnoredPath::Some { parent }
        | IgnoredPath::NewtypeStruct { parent }
        | IgnoredPath::NewtypeVariant { parent } => key_of(parent),
    }
}

fn report_unknown_keys(unknown: &[String], problems: &mut Problems) {
    if unknown.is_empty() {
        return;
    }
    let known = struct_fields::<ConfigFile>();
    for key in unknown {
        let mut message = format!("unknown key '{key}'");
        let vars = problems.env_vars_within(key);
        if !vars.is_empty() {
            let plural = if vars.len() > 1 { "s" } else { "" };
            message += &format!(" (from environment variable{plural} {})", vars.join(", "));
        }
        if let Some(suggestion) = suggestion(key, &known) {
            message += &format!("; did you mean '{suggestion}'?");
        }
        problems.general(message);
    }
}

/// A known key close to `unknown`: a near name in the same table (`server.lisen` →
/// `server.listen`, `cache.ttl_secs` → `cache.ttl_s`), or for a top-level key the near key of
/// any section (`listen` → `server.listen`, `ttl_secs` → `cache.ttl_s`).
fn suggestion(unknown: &str, known: &StructFields) -> Option<String> {
    let (parent, name) = unknown.rsplit_once('.').unwrap_or(("", unknown));
    let fields = known.get(&without_indices(parent))?;
    if let Some(close) = closest(name, fields.iter().copied()) {
        return Some(match parent {
            "" => close.to_owned(),
            parent => format!("{parent}.{close}"),
        });
    }
    if !parent.is_empty() {
        return None;
    }
    let sections: Vec<(&String, &&[&str])> = known
        .iter()
        .filter(|(section, _)| !section.is_empty() && !section.contains('['))
        .collect();
    let close = closest(
        name,
        sections
            .iter()
            .flat_map(|(_, fields)| fields.iter().copied()),
    )?;
    sections
        .iter()
        .find(|(_, fields)| fields.contains(&close))
        .map(|(section, _)| format!("{section}.{close}"))
}

/// `clients[0]` → `clients[]`: every element of a list has the same keys.
fn without_indices(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    let mut in_index = false;
    for c in path.chars() {
        match c {
            '[' => in_index = true,
            ']' => {
                in_index = false;
                out.push_str("[]");
            }
            _ if in_index => {}
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::test_support::{env, errors, has, minimal, TempDir};

    #[test]
    fn the_default_file_is_complete_and_has_no_unknown_key() {
        let mut unknown = Vec::new();
        let merged = Config::builder()
            .add_source(File::from_str(DEFAULT_CONFIG_TOML, FileFormat::Toml))
            .build()
            .unwrap();
        // A missing section key would fail here: the schema has no defaults of its own.
        let schema: ConfigFile =
            serde_ignored::deserialize(merged, |path| unknown.push(key_of(&path))).unwrap();
        assert!(unknown.is_empty(), "{unknown:?}");
        assert!(
            schema.clients.is_empty(),
            "the [[clients]] example must be commented out"
        );

        // Every key of every section, read from the structs, is in the file with a value of
        // its type.
        let table: toml::Table = toml::from_str(DEFAULT_CONFIG_TOML).unwrap();
        let known = struct_fields::<ConfigFile>();
        for section in known[""].iter().filter(|s| **s != CLIENTS) {
            for key in known[*section] {
                assert!(
                    table[*section].get(key).is_some(),
                    "{section}.{key} missing"
                );
            }
        }
        // The commented [[clients]] example names every client key (the configuration
        // reference, docs/configuration.md, is generated from this file).
        for key in known["clients[]"] {
            assert!(
                DEFAULT_CONFIG_TOML.contains(&format!("\n# {key} = ")),
                "clients[].{key} missing from the commented [[clients]] example"
            );
        }
        let printed: toml::Table = toml::from_str(&toml::to_string(&schema).unwrap()).unwrap();
        assert_eq!(printed, table, "every default is of its key's type");
        assert_eq!(table["auth"]["required"].as_bool(), Some(true));
    }

    #[test]
    fn candidates_come_from_the_structs() {
        let known = struct_fields::<ConfigFile>();
        assert!(known[""].contains(&"cluster"));
        assert!(known["server"].contains(&"listen_backlog"));
        assert!(known["clients[]"].contains(&"api_key_file"));
        assert_eq!(
            suggestion("clients[3].permisions", &known).as_deref(),
            Some("clients[3].permissions")
        );
        assert_eq!(suggestion("cahce", &known).as_deref(), Some("cache"));
        assert_eq!(
            suggestion("redis_url", &known).as_deref(),
            Some("cluster.redis_url")
        );
        assert_eq!(suggestion("server.zzz", &known), None);
        // Near names, not only near spellings (see `suggest` for the rules and more cases).
        for (unknown, expected) in [
            ("cache.ttl_secs", "cache.ttl_s"),
            ("server.request_timeout", "server.request_timeout_ms"),
            ("token.refresh_margin", "token.refresh_margin_s"),
            ("cluster.redis_password", "cluster.redis_password_file"),
            ("clients[0].api_key_hash", "clients[0].api_key_sha256"),
            ("ttl_secs", "cache.ttl_s"),
        ] {
            assert_eq!(
                suggestion(unknown, &known).as_deref(),
                Some(expected),
                "{unknown}"
            );
        }
        for far in [
            "cache.colour",
            "server.port",
            "oauth.issuer",
            "bogus",
            "log.colour",
        ] {
            assert_eq!(suggestion(far, &known), None, "{far}");
        }
    }

    #[test]
    fn unknown_keys_are_named() {
        let toml = format!(
            "{}\n[server]\nlisen = \"1.2.3.4:1\"\n[bogus]\nx = 1\n",
            minimal().replace("permissions =", "foo = 1\npermissions =")
        );
        let list = errors(&toml);
        assert!(has(&list, "unknown key 'server.lisen'"), "{list:?}");
        assert!(has(&list, "did you mean 'server.listen'?"), "{list:?}");
        assert!(has(&list, "unknown key 'bogus'"), "{list:?}");
        assert!(has(&list, "unknown key 'clients[0].foo'"), "{list:?}");
        assert_eq!(list.len(), 3, "{list:?}");

        let list = errors(&format!("listen = \"1.2.3.4:1\"\n{}", minimal()));
        assert_eq!(
            list,
            vec!["unknown key 'listen'; did you mean 'server.listen'?".to_owned()]
        );

        let list = errors(&format!(
            "{}\n[Server]\nlisten = \"1.2.3.4:1\"\n",
            minimal()
        ));
        assert!(has(&list, "unknown key 'Server'"), "{list:?}");
    }

    #[test]
    fn a_wrong_shape_is_one_problem_naming_the_key() {
        let list = errors(&format!("server = 5\n{}", minimal()));
        assert_eq!(list.len(), 1, "{list:?}");
        assert!(has(&list, "server"), "{list:?}");
    }

    #[test]
    fn syntax_error_names_the_file() {
        let dir = TempDir::new("syntax");
        let path = dir.file("bad.toml", "[server\n");
        let list = from_file_and_env(Some(Path::new(&path)), HashMap::new())
            .unwrap_err()
            .0;
        assert_eq!(list.len(), 1, "{list:?}");
        assert!(list[0].starts_with(&format!("config file '{path}' is not valid TOML")));
    }

    #[test]
    fn an_endless_config_file_is_refused_after_its_bound() {
        let list = from_file_and_env(Some(Path::new("/dev/zero")), HashMap::new())
            .unwrap_err()
            .0;
        assert_eq!(
            list,
            vec!["config file: '/dev/zero' is larger than 1 MiB".to_owned()]
        );
    }

    #[test]
    fn missing_config_file_is_named() {
        let path = std::env::temp_dir().join("consent-proxy-config-test-does-not-exist.toml");
        let list = from_file_and_env(Some(&path), HashMap::new())
            .unwrap_err()
            .0;
        assert_eq!(list.len(), 1);
        assert!(list[0].contains(&path.display().to_string()), "{list:?}");
    }

    #[test]
    fn env_overrides_file() {
        let dir = TempDir::new("env");
        let file = dir.file("env.toml", &minimal());
        let s = from_file_and_env(
            Some(Path::new(&file)),
            env(&[
                ("CONSENT_PROXY__SERVER__LISTEN", "127.0.0.1:18080"),
                ("CONSENT_PROXY__TALKDESK__CLIENT_SECRET", "from-env"),
                ("CONSENT_PROXY__TALKDESK__REGION", "eu"),
                ("consent_proxy__log__format", "json"),
                ("OTHER_VAR", "ignored"),
            ]),
        )
        .unwrap();
        assert_eq!(s.server.listen, "127.0.0.1:18080".parse().unwrap());
        assert_eq!(
            s.talkdesk.client_credential.secret().unwrap().expose(),
            "from-env"
        );
        assert_eq!(
            s.talkdesk.token_url,
            "https://acme.talkdeskid.eu/oauth/token"
        );
        assert_eq!(s.log.format, crate::config::LogFormat::Json);
        // The file still supplies what the environment does not.
        assert_eq!(s.talkdesk.client_id, "cid");
        assert_eq!(s.clients.len(), 1);
    }

    #[test]
    fn env_numbers_bools_lists_and_numeric_looking_strings() {
        let dir = TempDir::new("envtypes");
        let file = dir.file("envtypes.toml", &minimal());
        let s = from_file_and_env(
            Some(Path::new(&file)),
            env(&[
                ("CONSENT_PROXY__SERVER__MAX_BODY_BYTES", "8192"),
                ("CONSENT_PROXY__TALKDESK__MAX_RETRIES", "0"),
                ("CONSENT_PROXY__CACHE__ENABLED", "false"),
                ("CONSENT_PROXY__CACHE__TTL_S", "0"),
                ("CONSENT_PROXY__AUTH__REQUIRED", "TRUE"),
                ("CONSENT_PROXY__TALKDESK__SCOPES", "a:read, b:write c:x"),
                ("CONSENT_PROXY__TALKDESK__CLIENT_ID", "00123"),
            ]),
        )
        .unwrap();
        assert_eq!(s.server.max_body_bytes, 8192);
        assert_eq!(s.talkdesk.max_retries, 0);
        assert!(!s.cache.enabled);
        assert_eq!(s.cache.ttl, std::time::Duration::ZERO);
        assert!(s.auth.required);
        assert_eq!(s.talkdesk.scopes, vec!["a:read", "b:write", "c:x"]);
        assert_eq!(s.talkdesk.client_id, "00123");
    }

    #[test]
    fn env_problems_name_their_variable_all_together() {
        let dir = TempDir::new("envbad");
        let file = dir.file("envbad.toml", &minimal());
        let list = from_file_and_env(
            Some(Path::new(&file)),
            env(&[
                ("CONSENT_PROXY__SERVER__MAX_BODY_BYTES", "lots"),
                ("CONSENT_PROXY__CACHE__ENABLED", "maybe"),
                ("CONSENT_PROXY__SERVER__LISEN", "1.2.3.4:5"),
                ("CONSENT_PROXY__CLIENTS__0__NAME", "x"),
            ]),
        )
        .unwrap_err()
        .0;
        assert!(has(&list, "server.max_body_bytes: expected a non-negative integer, got string \"lots\" (from environment variable CONSENT_PROXY__SERVER__MAX_BODY_BYTES)"), "{list:#?}");
        assert!(has(&list, "cache.enabled: expected a boolean"), "{list:#?}");
        assert!(has(&list, "unknown key 'server.lisen' (from environment variable CONSENT_PROXY__SERVER__LISEN); did you mean 'server.listen'?"), "{list:#?}");
        assert!(
            has(
                &list,
                "CONSENT_PROXY__CLIENTS__0__NAME: [[clients]] can only be configured in a file"
            ),
            "{list:#?}"
        );
        assert_eq!(list.len(), 4, "{list:#?}");

        let list = from_file_and_env(
            Some(Path::new(&file)),
            env(&[
                ("CONSENT_PROXY__SERVER", "x"),
                ("CONSENT_PROXY__SERVER__LISTEN__PORT", "1"),
                ("CONSENT_PROXY__BOGUS__KEY", "1"),
                ("CONSENT_PROXY__SERVER__LISTEN", "nope"),
            ]),
        )
        .unwrap_err()
        .0;
        for needle in [
            "environment variable CONSENT_PROXY__SERVER is not a configuration key",
            "environment variable CONSENT_PROXY__SERVER__LISTEN__PORT is not a configuration key",
            "unknown key 'bogus' (from environment variable CONSENT_PROXY__BOGUS__KEY)",
            "server.listen: \"nope\" is not a socket address (ip:port, e.g. \"0.0.0.0:8080\" or \"[::1]:8080\") (from environment variable CONSENT_PROXY__SERVER__LISTEN)",
        ] {
            assert!(has(&list, needle), "missing {needle:?} in {list:#?}");
        }
        assert_eq!(list.len(), 4, "{list:#?}");
    }
}
