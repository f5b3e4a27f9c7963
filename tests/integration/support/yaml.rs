//! YAML files (the OpenAPI spec, the Kubernetes manifests, the alert rules) read as JSON values.
//!
//! serde_yaml is not a dependency, so Python's PyYAML converts them (`yaml.safe_load_all`, then
//! `json.dump`). The interpreter is the first of `$OPENAPI_PYTHON`, `.venv-schemathesis/bin/python`
//! (made by `scripts/schemathesis.sh`, which installs PyYAML with schemathesis) and `python3`
//! that can `import yaml`; Debian's python3 has it (`python3-yaml`). None found is a test failure
//! that says how to get one, never a silent skip.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use serde_json::Value;

fn root_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// An interpreter that has PyYAML, or a message saying how to get one; looked for once per
/// test process.
fn python_with_yaml() -> &'static Result<PathBuf, String> {
    static PYTHON: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    PYTHON.get_or_init(find_python_with_yaml)
}

fn find_python_with_yaml() -> Result<PathBuf, String> {
    let mut candidates = Vec::new();
    if let Some(p) = std::env::var_os("OPENAPI_PYTHON") {
        candidates.push(PathBuf::from(p));
    }
    candidates.push(root_dir().join(".venv-schemathesis/bin/python"));
    candidates.push(PathBuf::from("python3"));
    let mut tried = Vec::new();
    for candidate in candidates {
        let ok = Command::new(&candidate)
            .args(["-c", "import yaml"])
            .output()
            .is_ok_and(|out| out.status.success());
        if ok {
            return Ok(candidate);
        }
        tried.push(candidate.display().to_string());
    }
    Err(format!(
        "no Python with PyYAML to read YAML (tried {tried:?}); run `apt-get install python3-yaml`, \
         `bash scripts/schemathesis.sh --setup-only` (a virtualenv with PyYAML) or \
         `python3 -m pip install pyyaml`, or point OPENAPI_PYTHON at an interpreter that has it"
    ))
}

/// Every document of a YAML file (`---`-separated), as JSON values; empty documents skipped.
pub fn yaml_documents(path: &Path) -> Vec<Value> {
    let python = python_with_yaml()
        .as_ref()
        .unwrap_or_else(|e| panic!("{e}"));
    let out = Command::new(python)
        .args([
            "-c",
            "import json, sys, yaml\n\
             with open(sys.argv[1], encoding='utf-8') as f:\n    \
                 docs = [d for d in yaml.safe_load_all(f) if d is not None]\n\
             json.dump(docs, sys.stdout)",
        ])
        .arg(path)
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", python.display()));
    assert!(
        out.status.success(),
        "{} is not valid YAML (or not JSON-representable):\n{}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    match serde_json::from_slice(&out.stdout).expect("PyYAML's JSON parses") {
        Value::Array(documents) => documents,
        other => panic!("expected a list of documents, got {other}"),
    }
}

/// A YAML file of exactly one document, as a JSON value.
pub fn yaml_to_json(path: &Path) -> Value {
    let mut documents = yaml_documents(path);
    assert_eq!(
        documents.len(),
        1,
        "{} should hold one YAML document",
        path.display()
    );
    documents.remove(0)
}
