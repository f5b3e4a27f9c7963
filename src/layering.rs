//! The dependency rules of the module tree, checked on the source: the HTTP plumbing (`wire/`)
//! and tracing (`otel/`) use nothing of the product, the product never uses the simulator, and the simulator uses
//! only the plumbing (the listener, body helpers, credential parsing, the OAuth token-endpoint
//! plumbing) and the consent domain. The
//! compiler cannot tell, since both live in one library.

use std::fs;
use std::path::{Path, PathBuf};

/// What under `src/` may name the simulator: itself, the commands that run it, `lib.rs`, which
/// declares it, and this file.
const MAY_USE_THE_SIMULATOR: &[&str] =
    &["simulator", "demo.rs", "main.rs", "lib.rs", "layering.rs"];

/// The crate paths the simulator may use (a grouped `use crate::{…}` must be split to pass).
const SIMULATOR_MAY_USE: &[&str] = &[
    "crate::clock",
    "crate::consent",
    "crate::jws",
    "crate::wire::body",
    "crate::wire::credentials",
    "crate::wire::oauth",
    "crate::wire::server",
];

#[test]
fn the_product_does_not_use_the_simulator() {
    let offending: Vec<String> = code_lines()
        .filter(|line| !MAY_USE_THE_SIMULATOR.contains(&line.top_level.as_str()))
        .filter(|line| names_the_simulator(&line.code))
        .map(|line| line.to_string())
        .collect();
    assert!(
        offending.is_empty(),
        "the product uses the simulator:\n{}",
        offending.join("\n")
    );
}

/// Fails listing every line of the folder `top_level` that uses more than `may_use`.
fn assert_uses_only(top_level: &str, may_use: &[&str], what: &str) {
    let offending: Vec<String> = code_lines()
        .filter(|line| line.top_level == top_level)
        .filter(|line| uses_more_than(&line.code, may_use))
        .map(|line| line.to_string())
        .collect();
    assert!(offending.is_empty(), "{what}:\n{}", offending.join("\n"));
}

#[test]
fn the_simulator_uses_only_shared_plumbing() {
    assert_uses_only(
        "simulator",
        SIMULATOR_MAY_USE,
        "the simulator uses more of the product than its shared plumbing",
    );
}

/// The HTTP plumbing knows nothing of the product: it may use only itself.
const PLUMBING_MAY_USE: &[&str] = &["crate::wire"];

#[test]
fn the_plumbing_uses_nothing_of_the_product() {
    assert_uses_only(
        "wire",
        PLUMBING_MAY_USE,
        "the plumbing in wire/ uses the product",
    );
}

/// Tracing knows nothing of the product either: callers name their spans and attributes. It
/// registers its own metrics through the shared helpers.
const TRACING_MAY_USE: &[&str] = &["crate::otel", "crate::metrics"];

#[test]
fn tracing_uses_nothing_of_the_product() {
    assert_uses_only("otel", TRACING_MAY_USE, "otel/ uses the product");
}

#[test]
fn the_checks_see_what_they_look_for() {
    for (code, names) in [
        ("use crate::simulator::Simulator;", true),
        ("use crate::{app, simulator};", true),
        ("let simulator_addr = addr;", false),
    ] {
        assert_eq!(names_the_simulator(code), names, "{code}");
    }
    for (code, outside) in [
        ("use crate::cache::ConsentCache;", true),
        ("crate::http::bodyguard()", true),
        ("use crate::http::{body, routes};", true),
        ("use crate::wire::body::{self, Body};", false),
        (
            "let id = crate::consent::ContactId::from_path_segment(s);",
            false,
        ),
    ] {
        assert_eq!(uses_more_than(code, SIMULATOR_MAY_USE), outside, "{code}");
    }
}

fn names_the_simulator(code: &str) -> bool {
    code.split(|c: char| !is_identifier_char(c))
        .any(|word| word == "simulator")
}

/// Whether `code` names a `crate::` path outside `allowed` (each a whole path prefix).
fn uses_more_than(code: &str, allowed: &[&str]) -> bool {
    code.match_indices("crate::").any(|(at, _)| {
        let path = &code[at..];
        !allowed.iter().any(|prefix| {
            path.strip_prefix(prefix)
                .is_some_and(|rest| !rest.starts_with(is_identifier_char))
        })
    })
}

fn is_identifier_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// One line of Rust source, its comment cut off.
struct CodeLine {
    /// The file or folder directly under `src/` it belongs to.
    top_level: String,
    file: PathBuf,
    number: usize,
    code: String,
}

impl std::fmt::Display for CodeLine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}:{}: {}",
            self.file.display(),
            self.number,
            self.code.trim()
        )
    }
}

/// Every line of every `.rs` file under `src/`, without its `//` comment (a `//` inside a
/// string cuts it short too, which can only hide a use, never invent one).
fn code_lines() -> impl Iterator<Item = CodeLine> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    rust_files(&src).into_iter().flat_map(move |file| {
        let relative = file.strip_prefix(&src).unwrap_or(&file).to_path_buf();
        let top_level = relative
            .components()
            .next()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .unwrap_or_default();
        let text = fs::read_to_string(&file)
            .unwrap_or_else(|err| panic!("cannot read {}: {err}", file.display()));
        text.lines()
            .enumerate()
            .map(|(index, line)| CodeLine {
                top_level: top_level.clone(),
                file: relative.clone(),
                number: index + 1,
                code: line.split("//").next().unwrap_or_default().to_owned(),
            })
            .collect::<Vec<_>>()
    })
}

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let entries =
        fs::read_dir(dir).unwrap_or_else(|err| panic!("cannot list {}: {err}", dir.display()));
    let mut files = Vec::new();
    for entry in entries {
        let path = entry
            .unwrap_or_else(|err| panic!("cannot list {}: {err}", dir.display()))
            .path();
        if path.is_dir() {
            files.extend(rust_files(&path));
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            files.push(path);
        }
    }
    files
}
