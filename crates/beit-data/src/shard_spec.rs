//! Which shard files a `--data` value names: a brace pattern
//! (`/data/in22k/train-{000000..013999}.tar`, `/data/{a,b}/shard-{0..3}.tar`), a single `.tar`
//! file, or a folder whose `*.tar` files are the shards (sorted by name).

use std::path::{Path, PathBuf};

use crate::error::{DataError, Result};

/// Largest number of names one pattern may expand to (a typo such as `{0..99999999}` must not
/// exhaust memory).
pub const MAX_EXPANSION: usize = 10_000_000;

fn bad(pattern: &str, reason: impl Into<String>) -> DataError {
    DataError::param("data.source", format!("`{pattern}`: {}", reason.into()))
}

/// The alternatives of one brace group: `a,b,c` or a numeric range `lo..hi` (inclusive, zero-padded
/// to the width of `lo` when `lo` has a leading zero, as WebDataset and bash do).
fn alternatives(pattern: &str, body: &str) -> Result<Vec<String>> {
    if let Some((lo, hi)) = body.split_once("..") {
        let (a, b) = (lo.parse::<u64>(), hi.parse::<u64>());
        let (Ok(a), Ok(b)) = (a, b) else {
            return Err(bad(
                pattern,
                format!("`{{{body}}}` is not a range of integers"),
            ));
        };
        if b < a {
            return Err(bad(pattern, format!("`{{{body}}}` runs backwards")));
        }
        if (b - a) as usize >= MAX_EXPANSION {
            return Err(bad(pattern, format!("`{{{body}}}` names too many shards")));
        }
        let width = if lo.len() > 1 && lo.starts_with('0') {
            lo.len()
        } else {
            0
        };
        return Ok((a..=b).map(|i| format!("{i:0width$}")).collect());
    }
    Ok(body.split(',').map(str::to_string).collect())
}

/// Expand every `{...}` group of `pattern` (groups do not nest), in order: the last group varies
/// fastest.
pub fn expand_braces(pattern: &str) -> Result<Vec<String>> {
    let mut out = vec![String::new()];
    let mut rest = pattern;
    while let Some(open) = rest.find('{') {
        let close = rest[open..]
            .find('}')
            .map(|c| open + c)
            .ok_or_else(|| bad(pattern, "unclosed `{`"))?;
        let body = &rest[open + 1..close];
        if body.contains('{') {
            return Err(bad(pattern, "nested braces are not supported"));
        }
        let alts = alternatives(pattern, body)?;
        if out.len().saturating_mul(alts.len()) > MAX_EXPANSION {
            return Err(bad(pattern, "expands to too many names"));
        }
        let prefix = &rest[..open];
        out = out
            .iter()
            .flat_map(|o| alts.iter().map(move |a| format!("{o}{prefix}{a}")))
            .collect();
        rest = &rest[close + 1..];
    }
    if rest.contains('}') {
        return Err(bad(pattern, "`}` without `{`"));
    }
    Ok(out.into_iter().map(|o| o + rest).collect())
}

/// Whether `spec` looks like a shard pattern or a shard file rather than a folder.
pub fn is_shard_pattern(spec: &str) -> bool {
    spec.contains('{') || spec.ends_with(".tar")
}

/// The `*.tar` files directly in `dir`, sorted by name.
pub fn tar_files_in(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(dir).map_err(|source| DataError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut out: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "tar") && p.is_file())
        .collect();
    out.sort();
    Ok(out)
}

/// The shard files `spec` names: the expansion of a pattern (every file must exist), or the tar
/// files of a folder. Errors name the first missing file, or say that nothing matched.
pub fn shard_paths(spec: &str) -> Result<Vec<PathBuf>> {
    let paths: Vec<PathBuf> = if is_shard_pattern(spec) {
        expand_braces(spec)?
            .into_iter()
            .map(PathBuf::from)
            .collect()
    } else {
        tar_files_in(Path::new(spec))?
    };
    if paths.is_empty() {
        return Err(DataError::Empty(format!("`{spec}` names no tar shard")));
    }
    if let Some(missing) = paths.iter().find(|p| !p.is_file()) {
        return Err(DataError::Io {
            path: missing.clone(),
            source: std::io::ErrorKind::NotFound.into(),
        });
    }
    Ok(paths)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_lists_and_padding() {
        assert_eq!(
            expand_braces("d/train-{000008..000011}.tar").unwrap(),
            [
                "d/train-000008.tar",
                "d/train-000009.tar",
                "d/train-000010.tar",
                "d/train-000011.tar"
            ]
        );
        assert_eq!(
            expand_braces("{a,b}/s-{8..10}.tar").unwrap(),
            [
                "a/s-8.tar",
                "a/s-9.tar",
                "a/s-10.tar",
                "b/s-8.tar",
                "b/s-9.tar",
                "b/s-10.tar"
            ]
        );
        assert_eq!(expand_braces("plain.tar").unwrap(), ["plain.tar"]);
        assert_eq!(expand_braces("x-{0..0}").unwrap(), ["x-0"]);
    }

    #[test]
    fn malformed_patterns_name_the_field() {
        for p in [
            "a-{1..",
            "a-{3..1}",
            "a-{x..2}",
            "a}",
            "a{{1,2}}",
            "{0..99999999999}",
        ] {
            let e = expand_braces(p).unwrap_err().to_string();
            assert!(e.contains("data.source"), "{p}: {e}");
        }
    }
}
