//! Every dependency a workspace member declares is used by that member's sources: normal
//! dependencies from `src/`, dev-dependencies from `src/`, `tests/`, `examples/` or `benches/`,
//! build dependencies from `build.rs`. A dependency is used when its code name (the key in
//! `Cargo.toml`, `-` read as `_`, so `candle = { package = "candle-core" }` is `candle`) appears
//! as `name::`, `use name` or `extern crate name`.

mod workspace;

use std::path::{Path, PathBuf};

/// `(crate, dependency)` pairs declared only for the features they turn on (never named in code),
/// each with the reason. Empty today; add a pair with a comment saying which feature it is for.
const FEATURE_ONLY: &[(&str, &str)] = &[];

/// Where each dependency table's crates may be referenced from, relative to the member.
const TABLES: &[(&str, &[&str])] = &[
    ("dependencies", &["src"]),
    ("dev-dependencies", &["src", "tests", "examples", "benches"]),
    ("build-dependencies", &["build.rs"]),
];

#[test]
fn every_declared_dependency_is_referenced() {
    let mut unused = Vec::new();
    for member in workspace::members() {
        let manifest = workspace::read_toml(&member.join("Cargo.toml"));
        let name = manifest["package"]["name"]
            .as_str()
            .expect("package.name")
            .to_string();
        for (table, places) in TABLES {
            let code = sources_text(&member, places);
            for dep in declared(&manifest, table) {
                let allowed = FEATURE_ONLY.contains(&(name.as_str(), dep.as_str()));
                if !allowed && !references(&code, &dep.replace('-', "_")) {
                    unused.push(format!(
                        "{name}: [{table}] `{dep}` is never referenced in {places:?}"
                    ));
                }
            }
        }
    }
    assert!(
        unused.is_empty(),
        "unused dependencies (remove them, move them to the right table, or list a \
         feature-only one in FEATURE_ONLY):\n{}",
        unused.join("\n")
    );
}

/// The keys of `table` and of every `[target.*.table]`.
fn declared(manifest: &toml::Table, table: &str) -> Vec<String> {
    let mut tables: Vec<&toml::Value> = manifest.get(table).into_iter().collect();
    if let Some(targets) = manifest.get("target").and_then(|t| t.as_table()) {
        tables.extend(targets.values().filter_map(|t| t.get(table)));
    }
    tables
        .iter()
        .filter_map(|t| t.as_table())
        .flat_map(|t| t.keys().cloned())
        .collect()
}

/// Whether `code` names the crate `name`.
fn references(code: &str, name: &str) -> bool {
    occurs_at_word_start(code, &format!("{name}::"))
        || code.contains(&format!("use {name};"))
        || code.contains(&format!("use {name} as "))
        || code.contains(&format!("extern crate {name}"))
}

/// The text of the member's Rust files under `places`, with the files they pull in through
/// `#[path = "…"]` (a shared test module of another crate, say).
fn sources_text(member: &Path, places: &[&str]) -> String {
    let mut files: Vec<PathBuf> = Vec::new();
    for place in places {
        let path = member.join(place);
        if path.is_file() {
            files.push(path);
        } else {
            files.extend(workspace::rust_files(&path));
        }
    }
    let mut text = String::new();
    let mut i = 0;
    while i < files.len() {
        let code = workspace::code_text(&files[i]);
        for included in path_includes(&files[i], &code) {
            if !files.contains(&included) {
                files.push(included);
            }
        }
        text.push_str(&code);
        text.push('\n');
        i += 1;
    }
    text
}

/// The files named by `#[path = "…"]` attribute lines in `code` (a `mod.rs` brings its whole
/// folder).
fn path_includes(file: &Path, code: &str) -> Vec<PathBuf> {
    let dir = file.parent().expect("a source file has a folder");
    let mut out = Vec::new();
    for line in code.lines().map(str::trim) {
        let Some(rest) = line.strip_prefix("#[path") else {
            continue;
        };
        let mut quoted = rest.split('"');
        let Some(target) = quoted.nth(1) else {
            continue;
        };
        let target = dir.join(target);
        if target.file_name().is_some_and(|n| n == "mod.rs") {
            out.extend(workspace::rust_files(
                target.parent().expect("mod.rs has a folder"),
            ));
        } else {
            out.push(target);
        }
    }
    out
}

/// Whether `word` occurs in `text` with no identifier character right before it.
pub fn occurs_at_word_start(text: &str, word: &str) -> bool {
    text.match_indices(word).any(|(i, _)| {
        !text[..i]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '$')
    })
}
