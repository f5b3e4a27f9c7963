//! The dependency rules of the module tree, checked on the source (the compiler cannot tell,
//! since everything lives in one library):
//! - the top-level modules stand on floors ([`FLOORS`]), and each imports only from floors
//!   below its own: no arrow runs up or sideways, so no circle can form;
//! - inside a folder, the files (and subfolders) import each other without a circle;
//! - the HTTP plumbing (`wire/`) and tracing (`otel/`) use nothing of the product;
//! - the product never uses the simulator, and the simulator uses only the plumbing (the
//!   listener, body helpers, credential parsing, the OAuth token-endpoint plumbing) and the
//!   consent domain.

use std::fs;
use std::path::{Path, PathBuf};

/// The top-level modules of `src/`, bottom floor first. A module may import from the floors
/// below its own, never from its own or one above. `docs/ARCHITECTURE.md` draws the same.
const FLOORS: &[&[&str]] = &[
    // Foundations: each imports nothing of the product.
    &["wire", "clock", "build_info", "consent", "jws"],
    // The configuration (its validation parses keys with `jws`).
    &["config"],
    // What every component uses: the error type, the metrics registry, logging, rustls (whose
    // roots may come from a configured file).
    &["error", "metrics", "logging", "tls"],
    // Who the caller is; tracing (it registers its own metrics, and knows nothing else).
    &["auth", "otel"],
    // One request as it travels down (it names the caller).
    &["request"],
    // The consent-answer cache; the Talkdesk client; the audit trail of writes.
    &["cache", "upstream", "audit"],
    // Cluster mode: drives the cache, and holds the fleet's token for the client.
    &["cluster"],
    // The consent operations.
    &["service"],
    // The proxy's handlers.
    &["http"],
    // What the commands run: the proxy's wiring, the Talkdesk stand-in.
    &["app", "simulator"],
    // The demo: the proxy and the simulator in one process.
    &["demo"],
    // The command line.
    &["main"],
];

/// Files that name every module by their nature: the crate root, and this file.
const ABOVE_THE_FLOORS: &[&str] = &["lib.rs", "layering.rs"];

/// The floor of a top-level module (`cache`) or file (`demo.rs`).
fn floor_of(top_level: &str) -> Option<usize> {
    let module = top_level.strip_suffix(".rs").unwrap_or(top_level);
    FLOORS.iter().position(|floor| floor.contains(&module))
}

#[test]
fn every_top_level_module_has_a_floor() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let entries =
        fs::read_dir(&src).unwrap_or_else(|err| panic!("cannot list {}: {err}", src.display()));
    let mut homeless = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let is_module = entry.path().is_dir() || name.ends_with(".rs");
        if is_module && !ABOVE_THE_FLOORS.contains(&name.as_str()) && floor_of(&name).is_none() {
            homeless.push(name);
        }
    }
    assert!(
        homeless.is_empty(),
        "top-level modules on no floor of FLOORS: {homeless:?}"
    );
}

#[test]
fn no_module_imports_from_its_floor_or_above() {
    let mut offending = Vec::new();
    for line in code_lines() {
        if ABOVE_THE_FLOORS.contains(&line.top_level.as_str()) {
            continue;
        }
        let Some(own) = floor_of(&line.top_level) else {
            continue; // every_top_level_module_has_a_floor reports it
        };
        let own_module = line.top_level.trim_end_matches(".rs");
        for used in modules_named(&line.code) {
            match used.as_deref().map(floor_of) {
                Ok(Some(floor)) if floor < own || used.as_deref() == Ok(own_module) => {}
                Ok(Some(_)) => offending.push(format!("{line}  ({own_module} may not use it)")),
                Ok(None) => offending.push(format!("{line}  (a module on no floor)")),
                Err(problem) => offending.push(format!("{line}  ({problem})")),
            }
        }
    }
    assert!(
        offending.is_empty(),
        "imports that do not point down the floors:\n{}",
        offending.join("\n")
    );
}

#[test]
fn no_circle_between_the_files_of_a_folder() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut circles = Vec::new();
    for folder in folders(&src) {
        let siblings = sibling_uses(&src, &folder);
        for (file, uses) in &siblings {
            for used in uses {
                if let Some(path) = path_back(&siblings, used, file) {
                    circles.push(format!(
                        "{}: {file} -> {}",
                        folder.strip_prefix(&src).unwrap_or(&folder).display(),
                        path.join(" -> ")
                    ));
                }
            }
        }
    }
    assert!(
        circles.is_empty(),
        "files of one folder that import each other (directly or around a circle):\n{}",
        circles.join("\n")
    );
}

/// Every folder under `dir`, `dir` included.
fn folders(dir: &Path) -> Vec<PathBuf> {
    let mut found = vec![dir.to_path_buf()];
    for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
        if entry.path().is_dir() {
            found.extend(folders(&entry.path()));
        }
    }
    found
}

/// For each module of `folder` (its files but `mod.rs`, and its subfolders as `name/mod.rs`),
/// the sibling modules its code outside `#[cfg(test)]` names: `super::x` (or a group
/// `super::{x, y}`) and `crate::…::folder::x`.
fn sibling_uses(src: &Path, folder: &Path) -> Vec<(String, Vec<String>)> {
    let mut modules = Vec::new();
    for entry in fs::read_dir(folder).into_iter().flatten().flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if path.is_dir() && path.join("mod.rs").exists() {
            modules.push((name, path.join("mod.rs")));
        } else if let Some(stem) = name.strip_suffix(".rs").filter(|stem| *stem != "mod") {
            modules.push((stem.to_owned(), path));
        }
    }
    let names: Vec<String> = modules.iter().map(|(name, _)| name.clone()).collect();
    let relative = folder.strip_prefix(src).unwrap_or(folder);
    let crate_path: String = relative
        .components()
        .map(|c| format!("::{}", c.as_os_str().to_string_lossy()))
        .collect();
    modules
        .iter()
        .map(|(name, file)| {
            let text = fs::read_to_string(file).unwrap_or_default();
            let code: String = text
                .split("#[cfg(test)]")
                .next()
                .unwrap_or_default()
                .lines()
                .map(|line| without_strings(line.split("//").next().unwrap_or_default()))
                .collect::<Vec<_>>()
                .join("\n");
            let uses = names
                .iter()
                .filter(|other| *other != name)
                .filter(|other| names_sibling(&code, other, &crate_path))
                .cloned()
                .collect();
            (name.clone(), uses)
        })
        .collect()
}

/// Whether `code` names the sibling module `name` (see [`sibling_uses`]).
fn names_sibling(code: &str, name: &str, crate_path: &str) -> bool {
    let whole_word = |rest: &str| {
        rest.strip_prefix(name)
            .is_some_and(|after| !after.starts_with(is_identifier_char))
    };
    let by_super = code.match_indices("super::").any(|(at, _)| {
        let before = &code[..at];
        if before.ends_with("super::") || before.ends_with(is_identifier_char) {
            return false;
        }
        let rest = &code[at + "super::".len()..];
        match rest.strip_prefix('{') {
            Some(group) => group[..group.find('}').unwrap_or(group.len())]
                .split(',')
                .any(|item| whole_word(item.trim())),
            None => whole_word(rest),
        }
    });
    let by_crate = !crate_path.is_empty()
        && code
            .match_indices(&format!("crate{crate_path}::"))
            .any(|(at, matched)| whole_word(&code[at + matched.len()..]));
    by_super || by_crate
}

/// A path of imports from `from` back to `to`, if there is one (a circle through both).
fn path_back(graph: &[(String, Vec<String>)], from: &str, to: &str) -> Option<Vec<String>> {
    let mut seen = vec![from.to_owned()];
    let mut paths = vec![vec![from.to_owned()]];
    while let Some(path) = paths.pop() {
        let last = path.last()?;
        let Some((_, uses)) = graph.iter().find(|(name, _)| name == last) else {
            continue;
        };
        for next in uses {
            let mut longer = path.clone();
            longer.push(next.clone());
            if next == to {
                return Some(longer);
            }
            if !seen.contains(next) {
                seen.push(next.clone());
                paths.push(longer);
            }
        }
    }
    None
}

/// The top-level modules `code` names through `crate::` (or, in `main.rs`, `consent_proxy::`):
/// `crate::cache::X` names `cache`; `consent_proxy::{logging, App}` names `logging` and `app`
/// (an item of the crate root is looked up among its re-exports). An error for a group that
/// does not close on its line (one `use` per module, please).
fn modules_named(code: &str) -> Vec<Result<String, String>> {
    let code = &without_strings(code);
    let mut named = Vec::new();
    for prefix in ["crate::", "consent_proxy::"] {
        for (at, _) in code.match_indices(prefix) {
            if at > 0 && code[..at].ends_with(is_identifier_char) {
                continue; // `my_crate::` is not `crate::`
            }
            let path = &code[at + prefix.len()..];
            let names: Vec<&str> = match path.strip_prefix('{') {
                Some(group) => match group.find('}') {
                    Some(end) => group[..end]
                        .split(',')
                        .map(|item| item.trim().split("::").next().unwrap_or_default())
                        .filter(|name| !name.is_empty())
                        .collect(),
                    None => {
                        named.push(Err("a `use` group over several lines".to_owned()));
                        continue;
                    }
                },
                None => vec![&path[..path.find(|c| !is_identifier_char(c)).unwrap_or(path.len())]],
            };
            named.extend(names.into_iter().map(|name| match root_reexport(name) {
                Some(module) => Ok(module.to_owned()),
                None => Ok(name.to_owned()),
            }));
        }
    }
    named
}

/// `code` with the contents of its string literals left out (`"a::b"` → `""`): a filter such
/// as `"consent_proxy::http=trace"` names no module.
fn without_strings(code: &str) -> String {
    let mut kept = String::with_capacity(code.len());
    let mut in_string = false;
    let mut escaped = false;
    for c in code.chars() {
        if in_string {
            match (escaped, c) {
                (false, '\\') => escaped = true,
                (false, '"') => {
                    in_string = false;
                    kept.push(c);
                }
                _ => escaped = false,
            }
        } else {
            in_string = c == '"';
            kept.push(c);
        }
    }
    kept
}

/// The module an item re-exported by `lib.rs` comes from (`App` → `app`).
fn root_reexport(item: &str) -> Option<&'static str> {
    match item {
        "App" | "AppHandle" => Some("app"),
        _ => None,
    }
}

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
    let ok = |names: &[&str]| names.iter().map(|n| Ok(n.to_string())).collect::<Vec<_>>();
    assert_eq!(modules_named("use crate::cache::Lookup;"), ok(&["cache"]));
    assert_eq!(
        modules_named("use consent_proxy::{build_info, logging, App};"),
        ok(&["build_info", "logging", "app"])
    );
    assert_eq!(
        modules_named("let x = crate::clock::since_epoch() + crate::upstream::X;"),
        ok(&["clock", "upstream"])
    );
    assert!(modules_named("use crate::{")[0].is_err());
    assert!(modules_named("my_crate::cache").is_empty());
    assert!(modules_named(r#"log_filter("warn,consent_proxy::http=trace")"#).is_empty());
    assert_eq!(
        modules_named(r#"f("a\"b", crate::cache::X)"#),
        ok(&["cache"])
    );
    assert!(floor_of("cache") < floor_of("cluster"));
    assert!(names_sibling("use super::faults::outcome;", "faults", ""));
    assert!(names_sibling(
        "use super::{deliver, faults, Fault};",
        "faults",
        ""
    ));
    assert!(!names_sibling("use super::super::faults;", "faults", ""));
    assert!(!names_sibling("use super::faults_x;", "faults", ""));
    assert!(names_sibling(
        "crate::cluster::shared::keys::X",
        "keys",
        "::cluster::shared"
    ));
    let graph = [
        ("a".to_owned(), vec!["b".to_owned()]),
        ("b".to_owned(), vec!["c".to_owned()]),
        ("c".to_owned(), vec!["a".to_owned()]),
    ];
    assert_eq!(
        path_back(&graph, "b", "a"),
        Some(vec!["b".into(), "c".into(), "a".into()])
    );
    assert_eq!(path_back(&graph[..2], "b", "a"), None);
    assert!(floor_of("demo.rs") > floor_of("app.rs"));
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
