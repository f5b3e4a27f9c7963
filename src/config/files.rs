//! Every file the proxy reads (the configuration file, secrets, keys and key directories, the
//! TLS certificate and key) is read here, through one bounded read: `/dev/zero`, a FIFO or a
//! file that keeps growing cannot make the process read without end. Every file is also
//! checked for who else may change it: one that others (beyond owner and group) can write is
//! refused, as anyone on the machine could replace a secret, add a trusted root certificate, or
//! point the configuration's `token_url` at themselves and be sent the client secret. A secret
//! others can read is read with a warning. Group access stays quiet: Kubernetes mounts Secrets
//! group-readable (`fsGroup`).
//! Modes are those of the file a symlink leads to (Kubernetes' `..data/` links).
//! Messages name the file, never its content; the caller prefixes the key.

use std::{
    fs::{self, File, Metadata},
    io::Read,
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::Path,
};

/// The largest secret or key file (one secret, or one key per line): far above any real one.
pub const MAX_SECRET_FILE_BYTES: u64 = 64 * 1024;

/// The largest configuration file or certificate chain.
pub const MAX_FILE_BYTES: u64 = 1024 * 1024;

/// The most key files a key directory may hold.
pub(super) const MAX_KEYS_IN_DIRECTORY: usize = 64;

/// Permission bits of "others" (neither the owner nor the group).
const OTHERS_WRITE: u32 = 0o002;
const OTHERS_READ: u32 = 0o004;
const STICKY: u32 = 0o1000;

/// What a file holds, which decides its bound and the checks it gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileKind {
    /// The configuration file: anything readable (a pipe too, e.g. `--config <(...)`), bounded
    /// by [`MAX_FILE_BYTES`], not writable by others.
    Configuration,
    /// A certificate chain: a regular file of at most [`MAX_FILE_BYTES`], not writable by
    /// others.
    Certificates,
    /// A secret or a private key: a regular file of at most [`MAX_SECRET_FILE_BYTES`], not
    /// writable by others, a warning when readable by others.
    Secret,
}

impl FileKind {
    fn limit(self) -> u64 {
        match self {
            FileKind::Configuration | FileKind::Certificates => MAX_FILE_BYTES,
            FileKind::Secret => MAX_SECRET_FILE_BYTES,
        }
    }

    /// What anyone could do with a file of this kind they can write.
    fn others_could(self) -> &'static str {
        match self {
            FileKind::Configuration => {
                "anyone could change the configuration (token_url: where the client secret goes)"
            }
            FileKind::Certificates => "anyone could replace the certificates (add a trusted root)",
            FileKind::Secret => "anyone could replace the secret",
        }
    }
}

/// A file's text, and what is worth a warning about it.
#[derive(Debug)]
pub struct FileText {
    pub text: String,
    pub warning: Option<String>,
}

/// Reads `path` whole as UTF-8 text, within its kind's bound and checks.
pub fn read_text(path: &Path, kind: FileKind) -> Result<FileText, String> {
    let cannot_read = |e: std::io::Error| cannot_read(path, e);
    if kind != FileKind::Configuration {
        // Before opening: opening a FIFO would wait for a writer.
        regular(path, &fs::metadata(path).map_err(cannot_read)?)?;
    }
    let file = File::open(path).map_err(cannot_read)?;
    // The file opened, wherever its links lead: what is checked is what is read.
    let metadata = file.metadata().map_err(cannot_read)?;
    not_writable_by_others(path, &metadata, kind)?;
    let warning = if kind == FileKind::Secret {
        regular(path, &metadata)?;
        readable_by_others(path, &metadata)
    } else {
        None
    };
    let limit = kind.limit();
    let mut text = String::new();
    file.take(limit + 1)
        .read_to_string(&mut text)
        .map_err(cannot_read)?;
    if text.len() as u64 > limit {
        return Err(format!(
            "'{}' is larger than {}",
            path.display(),
            size(limit)
        ));
    }
    Ok(FileText { text, warning })
}

/// A key directory's files (links followed, names starting with '.' skipped), sorted by name.
/// A directory that others can write is refused, as they could add a key, unless it is sticky
/// and everything in it belongs to the directory's owner (Kubernetes' Secret mounts: a
/// read-only `1777` tmpfs, owned by root, like its links and files).
pub(super) fn key_files(dir: &Path) -> Result<Vec<std::path::PathBuf>, String> {
    let dir_metadata = fs::metadata(dir).map_err(|e| cannot_read(dir, e))?;
    let dir_mode = dir_metadata.permissions().mode();
    let open_to_others = dir_mode & OTHERS_WRITE != 0;
    if open_to_others && dir_mode & STICKY == 0 {
        return Err(format!(
            "'{}' can be written by others (mode {:04o}): anyone could add a key; chmod o-w",
            dir.display(),
            dir_mode & 0o7777
        ));
    }
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| cannot_read(dir, e))? {
        let path = entry.map_err(|e| cannot_read(dir, e))?.path();
        let hidden = path
            .file_name()
            .is_some_and(|name| name.to_string_lossy().starts_with('.'));
        if hidden {
            continue;
        }
        // `metadata` follows symlinks: Kubernetes mounts each key as a link into `..data/`.
        let target = fs::metadata(&path).map_err(|e| cannot_read(&path, e))?;
        if !target.is_file() {
            continue;
        }
        if open_to_others {
            let link = fs::symlink_metadata(&path).map_err(|e| cannot_read(&path, e))?;
            if link.uid() != dir_metadata.uid() || target.uid() != dir_metadata.uid() {
                return Err(format!(
                    "'{}' is in a directory others can write, and does not belong to its owner",
                    path.display()
                ));
            }
        }
        files.push(path);
        if files.len() > MAX_KEYS_IN_DIRECTORY {
            return Err(format!(
                "'{}' holds more than {MAX_KEYS_IN_DIRECTORY} key files",
                dir.display()
            ));
        }
    }
    files.sort();
    Ok(files)
}

/// A failed read, naming the file; a permission refused also names who this process runs as,
/// since a file mounted into a container must be readable by the image's user (65532), which
/// is rarely the owner of the file on the host.
fn cannot_read(path: &Path, e: std::io::Error) -> String {
    let shown = path.display();
    if e.kind() != std::io::ErrorKind::PermissionDenied {
        return format!("cannot read '{shown}': {e}");
    }
    // `/proc/self` belongs to the process' effective user and group: no libc call needed.
    let who = fs::metadata("/proc/self")
        .map(|me| format!("uid {} gid {}", me.uid(), me.gid()))
        .unwrap_or_else(|_| "this process' user".to_owned());
    format!(
        "cannot read '{shown}': {e}; it must be readable by {who} (the container image runs as \
         uid 65532: give the file to that user or group, or make it group-readable with fsGroup)"
    )
}

fn regular(path: &Path, metadata: &Metadata) -> Result<(), String> {
    if metadata.is_file() {
        Ok(())
    } else {
        Err(format!("'{}' is not a regular file", path.display()))
    }
}

/// Refuses a regular file others can write (a pipe or a device, e.g. `--config <(...)`, holds
/// nothing anyone could change later).
fn not_writable_by_others(path: &Path, metadata: &Metadata, kind: FileKind) -> Result<(), String> {
    let mode = metadata.permissions().mode() & 0o7777;
    if !metadata.is_file() || mode & OTHERS_WRITE == 0 {
        return Ok(());
    }
    Err(format!(
        "'{}' can be written by others (mode {mode:04o}): {}; chmod o-w",
        path.display(),
        kind.others_could()
    ))
}

/// A warning about a secret others can read.
fn readable_by_others(path: &Path, metadata: &Metadata) -> Option<String> {
    let mode = metadata.permissions().mode() & 0o7777;
    (mode & OTHERS_READ != 0).then(|| {
        format!(
            "'{}' can be read by others (mode {mode:04o}); owner and group suffice: chmod o-r",
            path.display()
        )
    })
}

/// `65536` → "64 KiB".
fn size(bytes: u64) -> String {
    match bytes {
        b if b >= 1024 * 1024 && b % (1024 * 1024) == 0 => format!("{} MiB", b / (1024 * 1024)),
        b if b >= 1024 && b % 1024 == 0 => format!("{} KiB", b / 1024),
        b => format!("{b} bytes"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::test_support::TempDir;

    fn chmod(path: &str, mode: u32) {
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn a_refused_read_names_the_user_the_file_must_be_readable_by() {
        let denied = std::io::Error::from(std::io::ErrorKind::PermissionDenied);
        let message = cannot_read(Path::new("/etc/consent-proxy/secret"), denied);
        assert!(
            message.starts_with("cannot read '/etc/consent-proxy/secret': "),
            "{message}"
        );
        let me = fs::metadata("/proc/self").unwrap();
        assert!(
            message.contains(&format!("readable by uid {} gid {}", me.uid(), me.gid())),
            "{message}"
        );
        assert!(message.contains("uid 65532"), "{message}");
        // Other failures say only what failed.
        let missing = std::io::Error::from(std::io::ErrorKind::NotFound);
        assert!(!cannot_read(Path::new("/x"), missing).contains("65532"));
    }

    #[test]
    fn reads_are_bounded_even_where_the_size_is_unknown() {
        // /dev/zero never ends and has no size: only a bounded read stops.
        let err = read_text(Path::new("/dev/zero"), FileKind::Configuration).unwrap_err();
        assert_eq!(err, "'/dev/zero' is larger than 1 MiB");
        for kind in [FileKind::Secret, FileKind::Certificates] {
            let err = read_text(Path::new("/dev/zero"), kind).unwrap_err();
            assert_eq!(err, "'/dev/zero' is not a regular file", "{kind:?}");
        }

        let dir = TempDir::new("bounded");
        let limit = MAX_SECRET_FILE_BYTES as usize;
        let at_limit = dir.file("at-limit", &"k".repeat(limit));
        chmod(&at_limit, 0o600);
        assert_eq!(
            read_text(Path::new(&at_limit), FileKind::Secret)
                .unwrap()
                .text
                .len(),
            limit
        );
        let over = dir.file("over", &"k".repeat(limit + 1));
        chmod(&over, 0o600);
        assert_eq!(
            read_text(Path::new(&over), FileKind::Secret).unwrap_err(),
            format!("'{over}' is larger than 64 KiB")
        );
        // A FIFO is refused before it is opened (which would wait for a writer).
        let fifo = dir.path().join("fifo");
        assert!(std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success());
        assert!(read_text(&fifo, FileKind::Secret)
            .unwrap_err()
            .ends_with("is not a regular file"));
    }

    #[test]
    fn a_secret_others_can_write_is_refused_one_they_can_read_warned_group_is_quiet() {
        let dir = TempDir::new("modes");
        let secret = dir.file("secret", "s3cret\n");
        for (mode, outcome) in [
            (0o600, Ok(None)),
            (0o640, Ok(None)),
            (0o440, Ok(None)),
            (0o660, Ok(None)),
            (0o644, Ok(Some("can be read by others (mode 0644)"))),
            (0o604, Ok(Some("can be read by others (mode 0604)"))),
            (0o602, Err("can be written by others (mode 0602)")),
            (0o666, Err("can be written by others (mode 0666)")),
        ] {
            chmod(&secret, mode);
            let read = read_text(Path::new(&secret), FileKind::Secret);
            match (read, outcome) {
                (Ok(read), Ok(expected)) => {
                    assert_eq!(read.text, "s3cret\n");
                    match (read.warning, expected) {
                        (None, None) => {}
                        (Some(warning), Some(part)) => {
                            assert!(warning.contains(part), "{mode:o}: {warning}");
                            assert!(!warning.contains("s3cret"), "{warning}");
                        }
                        (warning, expected) => panic!("{mode:o}: {warning:?} vs {expected:?}"),
                    }
                }
                (Err(err), Err(part)) => {
                    assert!(err.contains(part), "{mode:o}: {err}");
                    assert!(!err.contains("s3cret"), "{err}");
                }
                (read, expected) => panic!("{mode:o}: {read:?} vs {expected:?}"),
            }
        }
        // Through a symlink (Kubernetes' `..data/` links), the target's mode counts, not the
        // link's (always 0777).
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&secret, &link).unwrap();
        chmod(&secret, 0o440);
        assert!(read_text(&link, FileKind::Secret)
            .unwrap()
            .warning
            .is_none());
        chmod(&secret, 0o646);
        assert!(read_text(&link, FileKind::Secret).is_err());
    }

    #[test]
    fn a_configuration_or_certificate_file_others_can_write_is_refused_readable_is_quiet() {
        let dir = TempDir::new("public-modes");
        let file = dir.file("file", "x = 1\n");
        for (kind, consequence) in [
            (
                FileKind::Configuration,
                "token_url: where the client secret goes",
            ),
            (FileKind::Certificates, "add a trusted root"),
        ] {
            for mode in [0o644, 0o664, 0o444] {
                chmod(&file, mode);
                let read = read_text(Path::new(&file), kind).unwrap();
                assert!(read.warning.is_none(), "{kind:?} {mode:o}");
            }
            for mode in [0o646, 0o666] {
                chmod(&file, mode);
                let err = read_text(Path::new(&file), kind).unwrap_err();
                assert!(
                    err.contains(&format!("can be written by others (mode {mode:04o})"))
                        && err.contains(consequence),
                    "{kind:?}: {err}"
                );
            }
        }
    }

    #[test]
    fn a_key_directory_others_can_write_is_refused_unless_sticky_and_owned() {
        let dir = TempDir::new("key-dir-modes");
        let key = dir.file("key", "k");
        chmod(&dir.path_str(), 0o757);
        let err = key_files(dir.path()).unwrap_err();
        assert!(
            err.contains("can be written by others (mode 0757)"),
            "{err}"
        );
        // Sticky and everything the owner's (as the kubelet mounts Secrets): accepted.
        chmod(&dir.path_str(), 0o1777);
        assert_eq!(key_files(dir.path()).unwrap(), [Path::new(&key)]);
        chmod(&dir.path_str(), 0o750);
        assert_eq!(key_files(dir.path()).unwrap().len(), 1);

        let many = TempDir::new("key-dir-many");
        for i in 0..=MAX_KEYS_IN_DIRECTORY {
            many.file(&format!("key-{i:03}"), "k");
        }
        assert!(key_files(many.path())
            .unwrap_err()
            .contains(&format!("more than {MAX_KEYS_IN_DIRECTORY} key files")));
    }
}
