//! No two source files of a crate import each other: for every pair of modules, at most one
//! names the other through a `crate::…` or `super::…` path (in `use` lines or inline). Unit-test
//! modules (`#[cfg(test)] mod …` and what follows) and doc links are not imports.

mod workspace;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// A module's path inside its crate (`[]` for the crate root).
type ModPath = Vec<String>;

#[test]
fn no_two_files_import_each_other() {
    let root = workspace::root();
    let mut pairs = Vec::new();
    for member in workspace::members() {
        let src = member.join("src");
        let modules: BTreeMap<ModPath, PathBuf> = workspace::rust_files(&src)
            .into_iter()
            .map(|f| (module_path(&src, &f), f))
            .collect();
        let edges = imports(&modules);
        for (from, to) in &edges {
            if from < to && edges.contains(&(to.clone(), from.clone())) {
                let shown = |m: &ModPath| {
                    modules[m]
                        .strip_prefix(&root)
                        .unwrap_or(&modules[m])
                        .display()
                        .to_string()
                };
                pairs.push(format!("{} <-> {}", shown(from), shown(to)));
            }
        }
    }
    assert!(
        pairs.is_empty(),
        "files that import each other:\n{}",
        pairs.join("\n")
    );
}

/// `src/a/b.rs` and `src/a/b/mod.rs` are `[a, b]`; `lib.rs` and `main.rs` are `[]`.
fn module_path(src: &Path, file: &Path) -> ModPath {
    let rel = file
        .strip_prefix(src)
        .expect("a file under src/")
        .with_extension("");
    let mut parts: ModPath = rel
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    if matches!(
        parts.last().map(String::as_str),
        Some("lib" | "main" | "mod")
    ) {
        parts.pop();
    }
    parts
}

/// `(importer, imported)` for every module naming another one (the crate root left out: it
/// declares and re-exports every module).
fn imports(modules: &BTreeMap<ModPath, PathBuf>) -> BTreeSet<(ModPath, ModPath)> {
    let mut edges = BTreeSet::new();
    for (me, file) in modules {
        for path in named_paths(&non_test_code(file)) {
            let target = resolve(me, &path, modules);
            if target != *me && !target.is_empty() {
                edges.insert((me.clone(), target));
            }
        }
    }
    edges
}

/// The file's code up to its unit-test module, doc and plain comments dropped.
fn non_test_code(file: &Path) -> String {
    let code = workspace::code_text(file);
    let mut kept = Vec::new();
    let mut lines = code.lines().peekable();
    while let Some(line) = lines.next() {
        let t = line.trim();
        if t == "#[cfg(test)]" && lines.peek().is_some_and(|n| is_mod_block(n)) {
            break;
        }
        if !t.starts_with("//") {
            kept.push(line);
        }
    }
    kept.join("\n")
}

fn is_mod_block(line: &str) -> bool {
    let t = line.trim();
    (t.starts_with("mod ") || t.starts_with("pub mod ")) && t.ends_with('{')
}

/// Every `crate::…` / `super::…` path in `code`, `use` groups (`crate::{a::X, b}`) expanded.
fn named_paths(code: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    for head in ["crate::", "super::"] {
        for (i, _) in code.match_indices(head) {
            let before = code[..i].chars().next_back();
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '$' || c == ':') {
                continue;
            }
            let tree = use_tree(&code[i..]);
            out.extend(expand(&tree.replace(char::is_whitespace, "")));
        }
    }
    out
}

/// The path starting `text`: up to the first character outside a path, or through the
/// matching `}` of a `use` group.
fn use_tree(text: &str) -> &str {
    let mut depth = 0usize;
    for (i, c) in text.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth > 0 => depth -= 1,
            c if depth > 0 || c.is_alphanumeric() || c == '_' || c == ':' => {}
            _ => return &text[..i],
        }
        if depth == 0 && c == '}' {
            return &text[..=i];
        }
    }
    text
}

/// `a::{b::C, d}` into `[[a, b, C], [a, d]]`.
fn expand(tree: &str) -> Vec<Vec<String>> {
    let Some(open) = tree.find('{') else {
        return vec![tree
            .split("::")
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect()];
    };
    let prefix = &tree[..open];
    let body = tree[open + 1..]
        .strip_suffix('}')
        .unwrap_or(&tree[open + 1..]);
    let mut out = Vec::new();
    let (mut depth, mut start) = (0usize, 0);
    for (i, c) in body.char_indices().chain([(body.len(), ',')]) {
        match c {
            '{' => depth += 1,
            '}' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                out.extend(expand(&format!("{prefix}{}", &body[start..i])));
                start = i + 1;
            }
            _ => {}
        }
    }
    out
}

/// The module file a path names: the longest prefix of it that is a module.
fn resolve(me: &ModPath, path: &[String], modules: &BTreeMap<ModPath, PathBuf>) -> ModPath {
    let mut base = Vec::new();
    let mut rest = path;
    if path.first().is_some_and(|h| h == "super") {
        base = me.clone();
        while rest.first().is_some_and(|h| h == "super") {
            base.pop();
            rest = &rest[1..];
        }
    } else {
        rest = &path[1..];
    }
    let full: ModPath = base.into_iter().chain(rest.iter().cloned()).collect();
    (0..=full.len())
        .rev()
        .map(|n| full[..n].to_vec())
        .find(|p| modules.contains_key(p))
        .unwrap_or_default()
}
