//! Keeps the documentation true and self-contained.
//!
//! - The key tables of `docs/configuration.md` are generated from `config/default.toml` (every
//!   key, its default, its comment; the `[[clients]]` keys from the commented example there):
//!   any difference fails, and `UPDATE_CONFIG_DOC=1 cargo test --test integration docs::` rewrites them.
//!   `config/default.toml` itself is held to the configuration structs by a unit test in
//!   `src/config/load.rs`, so the reference cannot drift from the code.
//! - Nothing in the repository points outside it (a sibling folder, a path of the machine it
//!   was written on), and every repository path a Markdown document names (a link, or a path in
//!   backticks) exists.
//! - The README opens with the two commands a newcomer runs.
//! - `tests/README.md` maps every test module of the integration binary.
//! - Every "rule N" the code, the tests and the documents cite is defined in
//!   `docs/CONSISTENCY.md`, and a file that cites rules names that document.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};

const DEFAULTS: &str = "config/default.toml";
const REFERENCE: &str = "docs/configuration.md";
const BEGIN: &str =
    "<!-- BEGIN generated from config/default.toml by tests/integration/docs.rs: edit the comments there, \
                     then run `UPDATE_CONFIG_DOC=1 cargo test --test integration docs::` -->";
const END: &str = "<!-- END generated -->";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(relative: &str) -> String {
    fs::read_to_string(root().join(relative)).unwrap_or_else(|e| panic!("read {relative}: {e}"))
}

// ---------------------------------------------------------------------------------------------
// The configuration reference

/// One key of the reference: its name, its default (or example) as TOML, its comment.
struct Key {
    name: String,
    value: String,
    about: Vec<String>,
}

/// A table of the file (`[server]`), or the commented `[[clients]]` example.
struct Section {
    header: String,
    intro: Vec<String>,
    keys: Vec<Key>,
    /// The `[[clients]]` example: its values are examples, not defaults.
    example: bool,
}

/// `key = value   # comment` split into its parts; the `#` of the comment is the first one
/// outside a string.
fn split_key_line(line: &str) -> Option<(String, String, Option<String>)> {
    let (key, rest) = line.split_once('=')?;
    let key = key.trim();
    if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return None;
    }
    let mut in_string = false;
    let mut escaped = false;
    let mut comment_at = None;
    for (at, c) in rest.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if in_string => escaped = true,
            '"' => in_string = !in_string,
            '#' if !in_string => {
                comment_at = Some(at);
                break;
            }
            _ => {}
        }
    }
    let (value, comment) = match comment_at {
        Some(at) => (&rest[..at], Some(rest[at + 1..].trim().to_owned())),
        None => (rest, None),
    };
    Some((key.to_owned(), value.trim().to_owned(), comment))
}

/// A value as TOML renders it (so `"a"` and `'a'` read the same), checked to parse.
fn normalised(value: &str, at: &str) -> String {
    let table: toml::Table = toml::from_str(&format!("v = {value}"))
        .unwrap_or_else(|e| panic!("{at}: `{value}` is not a TOML value: {e}"));
    table["v"].to_string()
}

/// The text of a comment line (`# text` → `text`), `None` for other lines.
fn comment_text(line: &str) -> Option<&str> {
    let rest = line.strip_prefix('#')?;
    Some(rest.strip_prefix(' ').unwrap_or(rest))
}

/// Reads the sections, keys, defaults and comments of `config/default.toml`.
fn parse_defaults(text: &str) -> Vec<Section> {
    let mut sections: Vec<Section> = Vec::new();
    // Comment lines at the left margin since the last blank line: the next section's intro.
    let mut pending: Vec<String> = Vec::new();
    let mut in_example = false;
    for (number, line) in text.lines().enumerate() {
        let at = format!("{DEFAULTS}:{}", number + 1);
        let trimmed = line.trim();
        if trimmed.is_empty() {
            pending.clear();
            in_example = false;
            continue;
        }
        if in_example {
            // `# key = value  # comment` or `#      # continued comment`.
            let inner = comment_text(line).unwrap_or_else(|| panic!("{at}: example not commented"));
            let section = sections.last_mut().expect("in a section");
            if let Some(more) = inner.trim_start().strip_prefix('#') {
                let key = section.keys.last_mut().expect("a continued key");
                key.about.push(more.trim().to_owned());
            } else if let Some((name, value, comment)) = split_key_line(inner) {
                section.keys.push(Key {
                    name,
                    value: normalised(&value, &at),
                    about: comment.into_iter().collect(),
                });
            } else if !inner.trim().is_empty() {
                panic!("{at}: neither a key nor a comment in the [[clients]] example");
            }
            continue;
        }
        if line.starts_with('#') {
            let text = comment_text(line).unwrap_or_default();
            if text.trim() == "[[clients]]" {
                sections.push(Section {
                    header: "[[clients]]".into(),
                    intro: std::mem::take(&mut pending),
                    keys: Vec::new(),
                    example: true,
                });
                in_example = true;
            } else {
                pending.push(text.to_owned());
            }
            continue;
        }
        if let Some(name) = trimmed.strip_prefix('[').and_then(|t| t.strip_suffix(']')) {
            sections.push(Section {
                header: format!("[{name}]"),
                intro: std::mem::take(&mut pending),
                keys: Vec::new(),
                example: false,
            });
            continue;
        }
        let section = sections
            .last_mut()
            .unwrap_or_else(|| panic!("{at}: a key before any section"));
        if let Some(more) = trimmed.strip_prefix('#') {
            // An indented comment continues the previous key's.
            let key = section.keys.last_mut().expect("a continued key");
            key.about.push(more.trim().to_owned());
        } else {
            let (name, value, comment) =
                split_key_line(line).unwrap_or_else(|| panic!("{at}: not `key = value`"));
            section.keys.push(Key {
                name,
                value: normalised(&value, &at),
                about: comment.into_iter().collect(),
            });
        }
    }
    sections
}

fn escape_cell(text: &str) -> String {
    text.replace('|', "\\|")
}

/// The reference's generated part: one table per section.
fn render(sections: &[Section]) -> String {
    let mut out = String::new();
    for section in sections {
        let _ = writeln!(out, "\n### `{}`\n", section.header);
        let intro: Vec<&str> = section
            .intro
            .iter()
            .map(|l| l.trim())
            .filter(|l| !l.is_empty())
            .collect();
        if !intro.is_empty() {
            let _ = writeln!(out, "{}\n", intro.join(" "));
        }
        let value_column = if section.example {
            "example"
        } else {
            "default"
        };
        let _ = writeln!(
            out,
            "| key | {value_column} | what it does |\n|---|---|---|"
        );
        for key in &section.keys {
            let _ = writeln!(
                out,
                "| `{}` | `{}` | {} |",
                key.name,
                escape_cell(&key.value),
                escape_cell(&key.about.join(" "))
            );
        }
    }
    out
}

#[test]
fn the_defaults_are_read_completely() {
    let text = read(DEFAULTS);
    let sections = parse_defaults(&text);
    let table: toml::Table = toml::from_str(&text).expect("default.toml parses");
    // Every key of the file, with the value TOML reads, and nothing else.
    let mut seen = 0;
    for section in sections.iter().filter(|s| !s.example) {
        let name = section.header.trim_matches(['[', ']']);
        let values = table[name].as_table().expect("a table");
        assert_eq!(values.len(), section.keys.len(), "[{name}]");
        for key in &section.keys {
            assert_eq!(
                values[&key.name].to_string(),
                key.value,
                "{name}.{}",
                key.name
            );
            assert!(!key.about.is_empty(), "{name}.{} has no comment", key.name);
            seen += 1;
        }
    }
    assert_eq!(
        seen,
        table
            .values()
            .filter_map(|v| v.as_table())
            .map(|t| t.len())
            .sum::<usize>()
    );
    let clients = sections.iter().find(|s| s.example).expect("[[clients]]");
    let names: Vec<&str> = clients.keys.iter().map(|k| k.name.as_str()).collect();
    assert!(
        names.contains(&"api_key_file") && names.contains(&"permissions"),
        "{names:?}"
    );
    // Continuation lines are kept, in order.
    let listen_backlog = &sections[0]
        .keys
        .iter()
        .find(|k| k.name == "listen_backlog")
        .unwrap();
    assert_eq!(listen_backlog.about.len(), 2);
}

#[test]
fn the_configuration_reference_is_generated_from_the_defaults() {
    let doc = read(REFERENCE);
    let expected = render(&parse_defaults(&read(DEFAULTS)));
    let begin = doc.find(BEGIN).unwrap_or_else(|| {
        panic!("{REFERENCE} lacks the line\n{BEGIN}\nbefore its generated part")
    });
    let after_begin = begin + BEGIN.len();
    let end = doc[after_begin..]
        .find(END)
        .map(|at| at + after_begin)
        .unwrap_or_else(|| panic!("{REFERENCE} lacks the line\n{END}\nafter its generated part"));
    let current = &doc[after_begin..end];
    let wanted = format!("\n{expected}\n");
    if current == wanted {
        return;
    }
    if std::env::var_os("UPDATE_CONFIG_DOC").is_some() {
        let updated = format!("{}{wanted}{}", &doc[..after_begin], &doc[end..]);
        fs::write(root().join(REFERENCE), updated).expect("write the reference");
        return;
    }
    let first_difference = current
        .lines()
        .zip(wanted.lines())
        .find(|(a, b)| a != b)
        .map(|(a, b)| format!("\n  now:    {a}\n  wanted: {b}"))
        .unwrap_or_else(|| "\n  (one is longer)".into());
    panic!(
        "{REFERENCE} is out of date with {DEFAULTS}; run `UPDATE_CONFIG_DOC=1 cargo test --test \
         docs` and commit the result. First difference:{first_difference}"
    );
}

// ---------------------------------------------------------------------------------------------
// Self-contained documentation

/// Folders that are not the repository's own text: build output, installed packages (every
/// `.venv*` virtualenv the scripts make), VCS, tool caches.
const NOT_OURS: [&str; 5] = [
    "target",
    "node_modules",
    ".git",
    ".schemathesis",
    ".hypothesis",
];

fn is_ours(name: &std::ffi::OsStr) -> bool {
    !NOT_OURS.iter().any(|skip| name == *skip)
        && !name.to_str().is_some_and(|name| name.starts_with(".venv"))
}

fn collect_files(dir: &Path, into: &mut Vec<PathBuf>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        // A worktree's `.git` is a file naming where the repository lives.
        if !is_ours(&entry.file_name()) {
            continue;
        }
        if path.is_dir() {
            collect_files(&path, into);
        } else {
            into.push(path);
        }
    }
}

#[test]
fn nothing_in_the_repository_points_outside_it() {
    let outside = [
        "../shared",
        "/work/",
        "CONTRACT.md",
        "talkdesk-api.md",
        "/notes/",
    ];
    let mut files = Vec::new();
    collect_files(&root(), &mut files);
    let this_file = root().join(file!());
    let mut found = Vec::new();
    for file in files.iter().filter(|f| **f != this_file) {
        // Binary files are not read.
        let Ok(text) = fs::read_to_string(file) else {
            continue;
        };
        for (number, line) in text.lines().enumerate() {
            if let Some(word) = outside.iter().find(|w| line.contains(*w)) {
                found.push(format!("{}:{}: {word}", file.display(), number + 1));
            }
        }
    }
    assert!(files.len() > 50, "only {} files found", files.len());
    assert!(
        found.is_empty(),
        "references outside the repository:\n{}",
        found.join("\n")
    );
}

/// Repository paths a Markdown text names: relative link targets, and code spans that start
/// with a top-level folder of the repository (globs and placeholders left out).
fn named_paths(text: &str) -> Vec<String> {
    const TOP: [&str; 8] = [
        "src/", "docs/", "deploy/", "scripts/", "config/", "tests/", "benches/", ".ci/",
    ];
    let mut paths = Vec::new();
    for (at, _) in text.match_indices("](") {
        let target = &text[at + 2..];
        let target = &target[..target.find(')').unwrap_or(target.len())];
        let target = target.split('#').next().unwrap_or_default();
        if !target.is_empty() && !target.contains("://") && !target.starts_with("mailto:") {
            paths.push(target.to_owned());
        }
    }
    for span in text.split('`').skip(1).step_by(2) {
        let candidate = span.split_whitespace().next().unwrap_or_default();
        if TOP.iter().any(|top| candidate.starts_with(top))
            && !candidate.contains(['*', '{', '<', '$'])
        {
            // `tests/integration/cli.rs:12` names a line of tests/integration/cli.rs.
            let path = candidate.split(':').next().unwrap_or_default();
            paths.push(path.trim_end_matches([',', '.']).to_owned());
        }
    }
    paths
}

#[test]
fn every_path_the_documents_name_exists() {
    let mut files = vec![
        root().join("README.md"),
        root().join("benches/README.md"),
        root().join("tests/README.md"),
    ];
    collect_files(&root().join("docs"), &mut files);
    collect_files(&root().join("deploy"), &mut files);
    let mut missing = Vec::new();
    for file in files
        .iter()
        .filter(|f| f.extension().is_some_and(|e| e == "md"))
    {
        let text = fs::read_to_string(file).expect("read a document");
        let base = file.parent().expect("a folder");
        for path in named_paths(&text) {
            // Links are relative to the document; code spans name paths from the root.
            let exists = base.join(&path).exists() || root().join(&path).exists();
            if !exists {
                missing.push(format!("{}: {path}", file.display()));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "named but missing:\n{}",
        missing.join("\n")
    );
}

const RULES: &str = "docs/CONSISTENCY.md";

/// The numbers of the rules `docs/CONSISTENCY.md` defines (`## Rule N: …`).
fn defined_rules() -> Vec<u32> {
    read(RULES)
        .lines()
        .filter_map(|line| line.strip_prefix("## Rule "))
        .filter_map(|rest| rest.split(':').next()?.parse().ok())
        .collect()
}

/// The rule numbers `text` cites: "rule 2", "Rule 6:", "rules 5 and 6", "rules 1–6" (every
/// number of a range), "rule 5's".
fn cited_rules(text: &str) -> Vec<u32> {
    let mut cited = Vec::new();
    let words: Vec<&str> = text.split_whitespace().collect();
    for (at, word) in words.iter().enumerate() {
        let word = word.trim_start_matches(|c: char| !c.is_alphanumeric());
        if !matches!(word, "rule" | "Rule" | "rules" | "Rules") {
            continue;
        }
        let mut numbers = Vec::new();
        for next in &words[at + 1..] {
            let bounds: Vec<u32> = next
                .split(['–', '-'])
                .map_while(|part| {
                    let digits: String = part.chars().take_while(char::is_ascii_digit).collect();
                    digits.parse().ok()
                })
                .collect();
            match bounds[..] {
                [one] => numbers.push(one),
                [first, last] => numbers.extend(first..=last),
                _ if *next == "and" && !numbers.is_empty() => continue,
                _ => break,
            }
            if !next.ends_with(',') && !next.chars().all(|c| c.is_ascii_digit() || c == '–') {
                break;
            }
        }
        cited.extend(numbers);
    }
    cited
}

/// Whether `text` cites a numbered rule as the contract's ("the contract's rule 2", "contract
/// rules 5 and 6"), which no document of the repository defines.
fn cites_the_contract(text: &str) -> bool {
    text.match_indices("contract").any(|(at, _)| {
        let rest = &text[at..];
        let rest = rest
            .strip_prefix("contract's ")
            .or_else(|| rest.strip_prefix("contract "));
        rest.is_some_and(|rest| {
            let next_two: Vec<&str> = rest.split_whitespace().take(2).collect();
            !cited_rules(&next_two.join(" ")).is_empty()
        })
    })
}

#[test]
fn every_rule_cited_is_defined_in_the_consistency_document() {
    let defined = defined_rules();
    assert_eq!(
        defined,
        (1..=7).collect::<Vec<_>>(),
        "{RULES} defines rules 1 to 7"
    );
    let mut files = Vec::new();
    collect_files(&root(), &mut files);
    let skip = [root().join(file!()), root().join(RULES)];
    let mut problems = Vec::new();
    let mut citing = 0;
    for file in files.iter().filter(|f| !skip.contains(f)) {
        let Ok(text) = fs::read_to_string(file) else {
            continue;
        };
        if cites_the_contract(&text) {
            problems.push(format!(
                "{}: cites the contract's rules, not {RULES}",
                file.display()
            ));
        }
        let cited = cited_rules(&text);
        if cited.is_empty() {
            continue;
        }
        citing += 1;
        if !text.contains("CONSISTENCY.md") {
            problems.push(format!(
                "{}: cites rules without naming {RULES}",
                file.display()
            ));
        }
        for rule in cited.iter().filter(|rule| !defined.contains(rule)) {
            problems.push(format!(
                "{}: rule {rule} is not defined in {RULES}",
                file.display()
            ));
        }
    }
    assert!(
        citing > 10,
        "only {citing} files cite rules: the check reads too little"
    );
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// Every test module of the integration binary has its row in `tests/README.md`'s map.
#[test]
fn the_tests_map_names_every_test_module() {
    let map = read("tests/README.md");
    let mut missing = Vec::new();
    for (declaring, folder) in [
        ("tests/integration/main.rs", "tests/integration/"),
        (
            "tests/integration/external/mod.rs",
            "tests/integration/external/",
        ),
    ] {
        for module in read(declaring)
            .lines()
            .filter_map(|line| line.strip_prefix("mod ")?.strip_suffix(';'))
            .filter(|module| !matches!(*module, "support" | "external"))
        {
            let file = format!("`{folder}{module}.rs`");
            if !map.contains(&file) {
                missing.push(file);
            }
        }
    }
    assert!(
        missing.is_empty(),
        "tests/README.md does not map: {}",
        missing.join(", ")
    );
}

#[test]
fn the_checks_see_what_they_look_for() {
    assert_eq!(
        cited_rules("rule 2 and rule 6: (rules 5 and 6), rules 1–3; Rule 5's bound, rule 9."),
        [2, 6, 5, 6, 1, 2, 3, 5, 9]
    );
    assert!(cited_rules("a rule of thumb, the rules of docs, 2 rules").is_empty());
    assert!(cites_the_contract("as the contract's rule 2 says"));
    assert!(cites_the_contract("(contract rules 5 and 6)"));
    assert!(!cites_the_contract(
        "the contract's rule for `{contact_id}`, rule 2"
    ));
    let paths = named_paths(
        "see [the guide](docs/guide.md#top), [site](https://x.org), `src/main.rs`, \
         `deploy/prometheus/tests/*.yml`, `cargo run`, `tests/integration/cli.rs:12`",
    );
    assert_eq!(
        paths,
        ["docs/guide.md", "src/main.rs", "tests/integration/cli.rs"]
    );
    assert_eq!(
        split_key_line(r#"a = "x # y"   # the comment"#),
        Some(("a".into(), r#""x # y""#.into(), Some("the comment".into())))
    );
}

#[test]
fn the_readme_opens_with_the_two_commands() {
    let readme = read("README.md");
    let first_block = readme
        .split("```")
        .nth(1)
        .expect("a code block in the README");
    let before = readme.split("```").next().unwrap_or_default();
    assert!(
        before.lines().filter(|l| !l.trim().is_empty()).count() <= 1,
        "only the title comes before the commands:\n{before}"
    );
    assert!(
        first_block.contains("cargo run --release -- demo"),
        "{first_block}"
    );
    assert!(
        first_block.contains("bash scripts/test.sh"),
        "{first_block}"
    );
}

/// The documented Redis ACL rule (`docs/cluster.md`) is the one every cluster test runs under.
#[test]
fn the_documented_redis_acl_rule_is_the_one_the_cluster_tests_run_under() {
    let readme = read("docs/cluster.md");
    let words = |text: &str| text.split_whitespace().collect::<Vec<_>>().join(" ");
    let rule = words(crate::support::redis_server::PROXY_ACL_RULE);
    let quoted: Vec<String> = readme
        .lines()
        .filter(|line| line.starts_with("ACL SETUSER"))
        .map(words)
        .collect();
    assert_eq!(
        quoted,
        [rule],
        "docs/cluster.md's ACL rule(s) and the harness's"
    );
}
