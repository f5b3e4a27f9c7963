//! Helpers shared by the configuration's unit tests.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::atomic::{AtomicUsize, Ordering},
};

use super::{ConfigErrors, Settings};

pub const SECRET: &str = "s3cr3t-client-secret";
pub const API_KEY: &str = "k3y-0123456789abcdef";

/// A minimal valid configuration (on top of the defaults).
pub fn minimal() -> String {
    format!(
        r#"
[talkdesk]
account = "acme"
client_id = "cid"
client_secret = "{SECRET}"

[[clients]]
name = "studio-ivr"
api_key = "{API_KEY}"
permissions = ["read", "write"]
"#
    )
}

/// `minimal()` with `extra` lines added to `[section]`, which it may or may not have yet.
pub fn minimal_with(section: &str, extra: &str) -> String {
    let header = format!("[{section}]\n");
    let base = minimal();
    match base.find(&header) {
        Some(at) => {
            let end = at + header.len();
            format!("{}{extra}\n{}", &base[..end], &base[end..])
        }
        None => format!("{header}{extra}\n{base}"),
    }
}

/// The problems `toml` has (panics when it is valid).
pub fn errors(toml: &str) -> Vec<String> {
    match Settings::from_toml_str(toml) {
        Ok(_) => panic!("expected errors for:\n{toml}"),
        Err(ConfigErrors(list)) => list,
    }
}

pub fn has(list: &[String], needle: &str) -> bool {
    list.iter().any(|e| e.contains(needle))
}

pub fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A fresh directory under the temp dir; removed with its content on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!(
            "consent-proxy-config-test-{}-{n}-{tag}",
            std::process::id()
        ));
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn path_str(&self) -> String {
        self.0.display().to_string()
    }

    /// Writes `name` in the directory; returns its path.
    pub fn file(&self, name: &str, content: &str) -> String {
        let path = self.0.join(name);
        std::fs::write(&path, content).unwrap();
        path.display().to_string()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
