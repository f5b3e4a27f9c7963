//! The Python interpreters of the virtualenvs `scripts/test.sh` prepares for the tests that
//! drive an independent Python library (`scripts/python-venv.sh`).

use std::path::{Path, PathBuf};
use std::process::Command;

/// The interpreter named by the variable `env_var`, else `<venv>/bin/python` of the checkout,
/// checked to import `module`; a loud failure saying how to make it when it does not.
pub fn venv_python(env_var: &str, venv: &str, module: &str, requirements: &str) -> PathBuf {
    let python = std::env::var_os(env_var)
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join(venv)
                .join("bin/python")
        });
    let usable = Command::new(&python)
        .args(["-c", &format!("import {module}")])
        .output()
        .is_ok_and(|out| out.status.success());
    assert!(
        usable,
        "no Python with {module} at {} ({env_var} or {venv}): run \
         `bash scripts/python-venv.sh {venv} {requirements}` (scripts/test.sh does)",
        python.display()
    );
    python
}
