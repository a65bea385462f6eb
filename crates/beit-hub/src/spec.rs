//! What a user may pass as `--model`: a local directory, or a hub id with an optional revision.

use std::path::{Path, PathBuf};

use crate::HubError;

/// A parsed `--model` argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSpec {
    /// A directory on disk holding `config.json` and weights.
    Local(PathBuf),
    /// A repository on the hub, e.g. `microsoft/beit-base-patch16-224`, and the revision given
    /// after `@`, if any.
    Hub {
        /// `org/name`.
        repo: String,
        /// Branch, tag or commit given as `org/name@revision`.
        revision: Option<String>,
    },
}

impl ModelSpec {
    /// Parse a spec. An existing directory always wins (as in `transformers`' `from_pretrained`);
    /// otherwise the text must be a valid `org/name[@revision]` hub id.
    pub fn parse(spec: &str) -> Result<Self, HubError> {
        let path = Path::new(spec);
        if path.is_dir() {
            return Ok(ModelSpec::Local(path.to_path_buf()));
        }
        if path.is_file() {
            let dir = match path.parent() {
                Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
                _ => std::path::PathBuf::from("."),
            };
            return Err(HubError::NotADirectory {
                path: path.to_path_buf(),
                dir,
            });
        }
        let (repo, revision) = match spec.split_once('@') {
            Some((repo, rev)) if !rev.is_empty() => (repo, Some(rev.to_string())),
            Some(_) => return Err(invalid(spec)),
            None => (spec, None),
        };
        if is_repo_id(repo) {
            Ok(ModelSpec::Hub {
                repo: repo.to_string(),
                revision,
            })
        } else {
            Err(invalid(spec))
        }
    }
}

fn invalid(spec: &str) -> HubError {
    HubError::InvalidSpec {
        spec: spec.to_string(),
    }
}

/// `org/name` where both parts use the characters the hub allows (letters, digits, `-`, `_`, `.`),
/// do not start or end with `-`/`.`, and contain no `--` or `..` (the hub rejects those; `--` would
/// also make the cache folder name ambiguous).
pub fn is_repo_id(id: &str) -> bool {
    let Some((org, name)) = id.split_once('/') else {
        return false;
    };
    let part_ok = |p: &str| {
        !p.is_empty()
            && p.len() <= 96
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            && !p.starts_with(['-', '.'])
            && !p.ends_with(['-', '.'])
            && !p.contains("--")
            && !p.contains("..")
    };
    part_ok(org) && part_ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_hub_ids_and_revisions() {
        assert_eq!(
            ModelSpec::parse("microsoft/beit-base-patch16-224").unwrap(),
            ModelSpec::Hub {
                repo: "microsoft/beit-base-patch16-224".into(),
                revision: None
            }
        );
        assert_eq!(
            ModelSpec::parse("microsoft/beit-base-patch16-224@refs/pr/3").unwrap(),
            ModelSpec::Hub {
                repo: "microsoft/beit-base-patch16-224".into(),
                revision: Some("refs/pr/3".into())
            }
        );
        for bad in [
            "beit",
            "a/b/c",
            "microsoft/",
            "/beit",
            "a--b/c",
            "org/na me",
            "org/name@",
            "-org/x",
        ] {
            let err = ModelSpec::parse(bad).unwrap_err();
            assert!(
                err.to_string().contains(&format!("`{bad}`")),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn existing_directory_wins_over_hub_id() {
        let dir = tempfile::tempdir().unwrap();
        let nested = dir.path().join("org").join("name");
        std::fs::create_dir_all(&nested).unwrap();
        let spec = nested.to_str().unwrap();
        assert_eq!(
            ModelSpec::parse(spec).unwrap(),
            ModelSpec::Local(nested.clone())
        );
        let file = nested.join("model.safetensors");
        std::fs::write(&file, b"x").unwrap();
        let err = ModelSpec::parse(file.to_str().unwrap())
            .unwrap_err()
            .to_string();
        assert!(err.contains("is a file; pass the directory"), "{err}");
        assert!(
            err.contains(&format!("(e.g. {})", nested.display())),
            "{err}"
        );
    }
}
