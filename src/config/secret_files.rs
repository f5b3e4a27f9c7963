//! Secrets read from files (`<key>_file`) and the OAuth signing keys, each file through the
//! bounded, mode-checked read of `files`. Messages name the file, never its content.

use std::path::{Path, PathBuf};

use super::{
    files::{key_files, read_text, FileKind},
    Secret,
};

/// The shortest accepted key (OAuth signing keys, the cluster's shared-tier keys).
pub(super) const MIN_SIGNING_KEY_BYTES: usize = 32;

/// A value read from secret files, with the warnings about those files (their modes).
#[derive(Debug)]
pub(super) struct FromFiles<T> {
    pub value: T,
    pub warnings: Vec<String>,
}

impl<T> FromFiles<T> {
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> FromFiles<U> {
        FromFiles {
            value: f(self.value),
            warnings: self.warnings,
        }
    }
}

/// A secret file's text (bounded, mode checked), its warning recorded in `warnings`.
fn read_secret_text(path: &Path, warnings: &mut Vec<String>) -> Result<String, String> {
    let read = read_text(path, FileKind::Secret)?;
    warnings.extend(read.warning);
    Ok(read.text)
}

/// A secret from a file: its content without trailing whitespace (the newline), not empty.
pub(super) fn read_secret_file(path: &str) -> Result<FromFiles<Secret>, String> {
    let mut warnings = Vec::new();
    let text = read_secret_text(Path::new(path), &mut warnings)?;
    match text.trim_end() {
        "" => Err(format!("file '{path}' is empty")),
        secret => Ok(FromFiles {
            value: Secret::new(secret),
            warnings,
        }),
    }
}

/// The keys at `path`, the one in use (the signing one) first:
/// - a file: one key per line, blank lines and `#` comments skipped; the first line is in use;
/// - a directory (e.g. a Kubernetes Secret mount): every regular file in it is one key (names
///   starting with '.' skipped, symlinks followed); the file whose name sorts last is in use.
///
/// Each key must be at least [`MIN_SIGNING_KEY_BYTES`] long; `what` names one of them in
/// messages ("a signing key").
pub(super) fn read_keys(path: &str, what: &str) -> Result<FromFiles<Vec<Secret>>, String> {
    let metadata = std::fs::metadata(path).map_err(|e| format!("cannot read '{path}': {e}"))?;
    let mut warnings = Vec::new();
    let keys = if metadata.is_dir() {
        keys_in_directory(Path::new(path), &mut warnings)?
    } else {
        keys_in_file(path, &mut warnings)?
    };
    if keys.is_empty() {
        return Err(format!("'{path}' holds no key"));
    }
    let too_short: Vec<&str> = keys
        .iter()
        .filter(|(_, key)| key.len() < MIN_SIGNING_KEY_BYTES)
        .map(|(origin, _)| origin.as_str())
        .collect();
    if !too_short.is_empty() {
        return Err(format!(
            "{what} must be at least {MIN_SIGNING_KEY_BYTES} bytes; shorter: {}",
            too_short.join(", ")
        ));
    }
    Ok(FromFiles {
        value: keys.into_iter().map(|(_, key)| Secret::new(key)).collect(),
        warnings,
    })
}

/// Each key with where it came from ("line 2 of '/etc/keys'"), in file order.
fn keys_in_file(path: &str, warnings: &mut Vec<String>) -> Result<Vec<(String, String)>, String> {
    let text = read_secret_text(Path::new(path), warnings)?;
    Ok(text
        .lines()
        .enumerate()
        .map(|(i, line)| (i, line.trim()))
        .filter(|(_, line)| !line.is_empty() && !line.starts_with('#'))
        .map(|(i, key)| (format!("line {} of '{path}'", i + 1), key.to_owned()))
        .collect())
}

/// Each key with its file, the signing one (the name that sorts last) first.
fn keys_in_directory(
    dir: &Path,
    warnings: &mut Vec<String>,
) -> Result<Vec<(String, String)>, String> {
    key_files(dir)?
        .into_iter()
        .rev()
        .map(|path: PathBuf| {
            let text = read_secret_text(&path, warnings)?;
            Ok((format!("'{}'", path.display()), text.trim_end().to_owned()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIGNING_KEY: &str = "a signing key";
    use crate::config::test_support::TempDir;

    const KEY_A: &str = "key-a-0123456789abcdef0123456789abcdef";
    const KEY_B: &str = "key-b-0123456789abcdef0123456789abcdef";

    fn exposed(keys: &[Secret]) -> Vec<&str> {
        keys.iter().map(Secret::expose).collect()
    }

    #[test]
    fn secret_file_is_trimmed_and_must_not_be_empty() {
        let dir = TempDir::new("secret-file");
        let secret = dir.file("secret", "s3cret \r\n");
        assert_eq!(read_secret_file(&secret).unwrap().value.expose(), "s3cret");
        let empty = dir.file("empty", "\n");
        assert_eq!(
            read_secret_file(&empty).unwrap_err(),
            format!("file '{empty}' is empty")
        );
    }

    #[test]
    fn key_file_one_key_per_line_first_signs() {
        let dir = TempDir::new("key-lines");
        let file = dir.file(
            "keys",
            &format!("# rotated in on Monday\n{KEY_B}\n\n  {KEY_A}  \r\n# old\n"),
        );
        let keys = read_keys(&file, SIGNING_KEY).unwrap().value;
        assert_eq!(exposed(&keys), [KEY_B, KEY_A]);
    }

    #[test]
    fn key_directory_last_name_signs_hidden_skipped_links_followed() {
        let dir = TempDir::new("key-dir");
        dir.file("2024-01", &format!("{KEY_A}\n"));
        let target = dir.file(".hidden-target", KEY_B);
        std::os::unix::fs::symlink(&target, dir.path().join("2024-06")).unwrap();
        dir.file(".ignored", "short");
        std::fs::create_dir(dir.path().join("..data")).unwrap();
        let keys = read_keys(&dir.path_str(), SIGNING_KEY).unwrap().value;
        assert_eq!(exposed(&keys), [KEY_B, KEY_A]);
    }

    #[test]
    fn short_or_missing_keys_name_their_file_not_their_content() {
        let dir = TempDir::new("key-short");
        let file = dir.file("keys", &format!("{KEY_A}\nshort-key\n"));
        let err = read_keys(&file, SIGNING_KEY).unwrap_err();
        assert!(err.contains(&format!("line 2 of '{file}'")), "{err}");
        assert!(!err.contains("short-key"), "{err}");

        let keys_dir = TempDir::new("key-short-dir");
        let short = keys_dir.file("current", "tiny\n");
        let err = read_keys(&keys_dir.path_str(), SIGNING_KEY).unwrap_err();
        assert!(err.contains(&format!("'{short}'")), "{err}");
        assert!(!err.contains("tiny"), "{err}");

        let comments = dir.file("comments", "# nothing yet\n\n");
        assert_eq!(
            read_keys(&comments, SIGNING_KEY).unwrap_err(),
            format!("'{comments}' holds no key")
        );
        let empty_dir = TempDir::new("key-empty-dir");
        assert!(read_keys(&empty_dir.path_str(), SIGNING_KEY)
            .unwrap_err()
            .contains("holds no key"));
        let missing = format!("{}/missing", dir.path_str());
        assert!(read_keys(&missing, SIGNING_KEY)
            .unwrap_err()
            .starts_with(&format!("cannot read '{missing}'")));
    }
}
