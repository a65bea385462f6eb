//! `docs/architecture.md` stays true: its crate table lists exactly the workspace members, and
//! every item it names in code spans (`beit_train::fit`, `MaskSampler::sample_at`, ...) still
//! exists in the sources.

mod workspace;

use std::collections::{BTreeMap, BTreeSet};

fn architecture_doc() -> String {
    let path = workspace::root().join("docs/architecture.md");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// The package name of every workspace member.
fn member_names() -> BTreeSet<String> {
    workspace::members()
        .iter()
        .map(|dir| {
            let manifest = workspace::read_toml(&dir.join("Cargo.toml"));
            manifest["package"]["name"]
                .as_str()
                .expect("package.name is a string")
                .to_string()
        })
        .collect()
}

/// The first cell of each row of the crate table (rows whose first cell is a code span).
fn documented_crates(doc: &str) -> BTreeSet<String> {
    let table = doc
        .split("| crate | one job |")
        .nth(1)
        .expect("docs/architecture.md has a `| crate | one job | ... |` table");
    table
        .lines()
        .skip(2)
        .take_while(|l| l.starts_with('|'))
        .filter_map(|l| l.split('|').nth(1))
        .map(|cell| cell.trim().trim_matches('`').to_string())
        .collect()
}

#[test]
fn the_crate_table_lists_every_workspace_member() {
    let doc = architecture_doc();
    let listed = documented_crates(&doc);
    let members = member_names();
    let missing: Vec<_> = members.difference(&listed).collect();
    let extra: Vec<_> = listed.difference(&members).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "docs/architecture.md's crate table is out of date: members not listed {missing:?}, \
         listed but not members {extra:?}"
    );
}

/// The workspace crates each member's `[dependencies]` names.
fn manifest_graph() -> BTreeMap<String, BTreeSet<String>> {
    workspace::members()
        .iter()
        .map(|dir| {
            let manifest = workspace::read_toml(&dir.join("Cargo.toml"));
            let name = manifest["package"]["name"]
                .as_str()
                .unwrap_or("")
                .to_string();
            let deps = manifest
                .get("dependencies")
                .and_then(|d| d.as_table())
                .map(|t| {
                    t.keys()
                        .filter(|k| k.starts_with("beit-"))
                        .cloned()
                        .collect()
                })
                .unwrap_or_default();
            (name, deps)
        })
        .collect()
}

/// The `crate ─► a, b` lines of the document's crate graph.
fn documented_graph(doc: &str) -> BTreeMap<String, BTreeSet<String>> {
    doc.lines()
        .filter_map(|l| l.split_once(" ─► "))
        .map(|(name, deps)| {
            let deps = deps
                .split(',')
                .map(str::trim)
                .filter(|d| !d.is_empty() && *d != "(none)")
                .map(str::to_string)
                .collect();
            (name.trim().to_string(), deps)
        })
        .collect()
}

#[test]
fn the_crate_graph_is_the_manifests_graph() {
    let documented = documented_graph(&architecture_doc());
    let actual = manifest_graph();
    for (name, deps) in &actual {
        assert_eq!(
            documented.get(name),
            Some(deps),
            "docs/architecture.md's crate graph line for `{name}` differs from its Cargo.toml"
        );
    }
    assert_eq!(
        documented.len(),
        actual.len(),
        "docs/architecture.md's crate graph draws crates that are not workspace members"
    );
}

/// Every `a::b` path in the document (code spans and code blocks), e.g. `beit_train::fit` or
/// `MaskSampler::sample_at`.
fn named_paths(doc: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for word in doc.split(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':')) {
        let word = word.trim_matches(':');
        if word.contains("::") && word.split("::").all(|s| !s.is_empty()) {
            out.insert(word.to_string());
        }
    }
    out
}

/// Whether `name` is declared as an item (fn, struct, enum, trait, type, const, mod, or a
/// module file) anywhere in the workspace's sources.
fn declared(name: &str, sources: &str, files: &BTreeSet<String>) -> bool {
    let kinds = [
        "fn", "struct", "enum", "trait", "type", "const", "static", "mod",
    ];
    kinds
        .iter()
        .any(|k| sources.contains(&format!("{k} {name}")))
        || files.contains(name)
        || name.starts_with("beit_")
}

#[test]
fn every_named_item_exists() {
    let mut sources = String::new();
    let mut files = BTreeSet::new();
    for dir in workspace::members() {
        for file in workspace::rust_files(&dir.join("src")) {
            sources.push_str(&workspace::code_text(&file));
            sources.push('\n');
            if let Some(stem) = file.file_stem() {
                files.insert(stem.to_string_lossy().into_owned());
            }
            if let Some(parent) = file.parent().and_then(|p| p.file_name()) {
                files.insert(parent.to_string_lossy().into_owned());
            }
        }
    }
    let doc = architecture_doc();
    let stale: Vec<String> = named_paths(&doc)
        .into_iter()
        .filter(|path| {
            path.split("::")
                .any(|segment| !declared(segment, &sources, &files))
        })
        .collect();
    assert!(
        stale.is_empty(),
        "docs/architecture.md names items that no longer exist: {stale:?}"
    );
}
