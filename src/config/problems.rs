//! Every problem found while loading, collected rather than stopping at the first, each naming
//! its key and, when the environment set that key, the variable; and the warnings, which do not
//! stop the configuration from loading.

use std::{collections::BTreeMap, fmt};

use super::{schema::Field, secret_files::FromFiles, ConfigErrors};

#[derive(Default)]
pub(super) struct Problems {
    list: Vec<String>,
    /// "`key`: `warning`", for `check-config` and the start-up log.
    warnings: Vec<String>,
    /// Keys set by the environment (`server.listen`), with the variable that set each.
    env_vars: BTreeMap<String, String>,
}

impl Problems {
    /// Records that `var` sets `key`, so that problems with `key` name it.
    pub fn key_from_env(&mut self, key: String, var: String) {
        self.env_vars.insert(key, var);
    }

    /// The environment variables that set `key` or a key inside it.
    pub fn env_vars_within(&self, key: &str) -> Vec<&str> {
        self.env_vars
            .iter()
            .filter(|(set, _)| {
                set.strip_prefix(key)
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with('.'))
            })
            .map(|(_, var)| var.as_str())
            .collect()
    }

    /// " (from environment variable X)" when the environment set `key`.
    pub fn origin(&self, key: &str) -> String {
        match self.env_vars.get(key) {
            Some(var) => format!(" (from environment variable {var})"),
            None => String::new(),
        }
    }

    /// A problem with `key`'s value: "`key`: `problem`".
    pub fn at(&mut self, key: &str, problem: impl fmt::Display) {
        let origin = self.origin(key);
        self.list.push(format!("{key}: {problem}{origin}"));
    }

    /// A problem whose message names `key` itself ("talkdesk.client_id is required").
    pub fn about(&mut self, key: &str, message: impl fmt::Display) {
        let origin = self.origin(key);
        self.list.push(format!("{message}{origin}"));
    }

    /// A problem that is not about one key, or whose message names every key involved.
    pub fn general(&mut self, message: impl Into<String>) {
        self.list.push(message.into());
    }

    /// The value, or `None` after reporting what is wrong with it at `key`.
    pub fn take<T>(&mut self, key: &str, result: Result<T, String>) -> Option<T> {
        result.map_err(|problem| self.at(key, problem)).ok()
    }

    /// A value read from files for `key`, its warnings recorded; or `None` after reporting
    /// what is wrong at `key`.
    pub fn take_file<T>(&mut self, key: &str, result: Result<FromFiles<T>, String>) -> Option<T> {
        let read = self.take(key, result)?;
        for warning in read.warnings {
            let origin = self.origin(key);
            self.warnings.push(format!("{key}: {warning}{origin}"));
        }
        Some(read.value)
    }

    /// `key`'s value, if it could be read.
    pub fn value<T>(&mut self, key: &str, field: Field<T>) -> Option<T> {
        self.take(key, field.0)
    }

    /// `key`'s value passed through `rule` (a check and a conversion).
    pub fn check<T, U>(
        &mut self,
        key: &str,
        field: Field<T>,
        rule: impl FnOnce(T) -> Result<U, String>,
    ) -> Option<U> {
        self.take(key, field.0.and_then(rule))
    }

    /// `value` with the warnings when nothing was reported (it is `Some` then), else every
    /// problem.
    pub fn finish<T>(self, value: Option<T>) -> Result<(T, Vec<String>), ConfigErrors> {
        match value {
            Some(value) if self.list.is_empty() => Ok((value, self.warnings)),
            None if self.list.is_empty() => Err(ConfigErrors(vec![
                "the configuration could not be loaded, and no problem was recorded (a bug)".into(),
            ])),
            _ => Err(ConfigErrors(self.list)),
        }
    }
}
