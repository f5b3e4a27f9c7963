//! Build script: records the git commit the binary is built from, for `--version` and the
//! `consent_proxy_build_info` metric.
//!
//! `CONSENT_PROXY_COMMIT` in the build's environment wins (builds from a tarball, or a CI that
//! knows better); otherwise `git rev-parse --short=12 HEAD`; otherwise `unknown`. Only `git`
//! itself is run: no crate is needed for this.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=CONSENT_PROXY_COMMIT");
    let commit = std::env::var("CONSENT_PROXY_COMMIT")
        .ok()
        .filter(|c| !c.trim().is_empty())
        .or_else(|| git(&["rev-parse", "--short=12", "HEAD"]))
        .unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=CONSENT_PROXY_COMMIT={}", commit.trim());
    watch_head();
}

/// A git command's trimmed output, or `None` when git or the repository is missing.
fn git(args: &[&str]) -> Option<String> {
    let output = Command::new("git").args(args).output().ok()?;
    if !output.status.success() {
        return None;
    }
    let text = String::from_utf8(output.stdout).ok()?;
    let text = text.trim();
    (!text.is_empty()).then(|| text.to_owned())
}

/// Re-run when HEAD moves: a commit, a checkout, a merge. HEAD names a branch whose ref lives
/// in the common git directory (shared by worktrees), or in `packed-refs`.
fn watch_head() {
    let Some(git_dir) = git(&["rev-parse", "--git-dir"]).map(PathBuf::from) else {
        return;
    };
    let common_dir = git(&["rev-parse", "--git-common-dir"]).map_or(git_dir.clone(), PathBuf::from);
    let head = git_dir.join("HEAD");
    rerun_if_exists(&head);
    rerun_if_exists(&common_dir.join("packed-refs"));
    if let Ok(content) = std::fs::read_to_string(&head) {
        if let Some(branch) = content.trim().strip_prefix("ref: ") {
            rerun_if_exists(&common_dir.join(branch));
        }
    }
}

fn rerun_if_exists(path: &Path) {
    if path.exists() {
        println!("cargo:rerun-if-changed={}", path.display());
    }
}
