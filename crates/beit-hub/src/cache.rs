//! The on-disk layout of the Hugging Face cache, as `huggingface_hub` writes it:
//!
//! ```text
//! <cache>/models--<org>--<name>/
//!     blobs/<etag>                          file contents (etag = sha256 for LFS files, git sha1 else)
//!     refs/<revision>                       text file holding the commit hash a branch/tag points to
//!     snapshots/<commit>/<file>             relative symlink to ../../blobs/<etag>
//!     .no_exist/<commit>/<file>             empty marker: the file does not exist at that commit
//! ```

use std::path::{Path, PathBuf};

use crate::files::{pick_files, HubOrigin, ModelFiles, PickError};
use crate::HubError;

/// One model repository inside a cache root.
#[derive(Debug, Clone)]
pub struct CachedRepo {
    root: PathBuf,
    repo: String,
}

impl CachedRepo {
    /// The repository `repo` (`org/name`) in the cache rooted at `cache_dir`.
    pub fn new(cache_dir: impl Into<PathBuf>, repo: &str) -> Self {
        Self {
            root: cache_dir.into(),
            repo: repo.to_string(),
        }
    }

    /// `org/name`.
    pub fn repo(&self) -> &str {
        &self.repo
    }

    /// The cache root.
    pub fn cache_dir(&self) -> &Path {
        &self.root
    }

    /// `<cache>/models--org--name`.
    pub fn dir(&self) -> PathBuf {
        self.root
            .join(format!("models--{}", self.repo.replace('/', "--")))
    }

    /// `blobs/<etag>`.
    pub fn blob_path(&self, etag: &str) -> PathBuf {
        self.dir().join("blobs").join(etag)
    }

    /// `refs/<revision>` (a revision such as `refs/pr/1` becomes nested folders, as upstream).
    pub fn ref_path(&self, revision: &str) -> PathBuf {
        self.dir().join("refs").join(revision)
    }

    /// `snapshots/<commit>`.
    pub fn snapshot_dir(&self, commit: &str) -> PathBuf {
        self.dir().join("snapshots").join(commit)
    }

    /// `.no_exist/<commit>/<file>`.
    pub fn no_exist_path(&self, commit: &str, file: &str) -> PathBuf {
        self.dir().join(".no_exist").join(commit).join(file)
    }

    /// The commit a revision designates in this cache: a full commit hash stands for itself when its
    /// snapshot exists; a branch or tag is looked up in `refs/`.
    pub fn commit_for(&self, revision: &str) -> Option<String> {
        if is_commit_hash(revision) && self.snapshot_dir(revision).is_dir() {
            return Some(revision.to_string());
        }
        let text = std::fs::read_to_string(self.ref_path(revision)).ok()?;
        let commit = text.trim();
        (!commit.is_empty()).then(|| commit.to_string())
    }

    /// Resolve the checkpoint at `revision` from the cache alone (no network).
    ///
    /// The error is [`HubError::NotCached`] (naming the missing file when the snapshot exists but is
    /// incomplete), [`HubError::BrokenCacheEntry`] for a dangling symlink, or a parse error of the
    /// shard index.
    pub fn resolve(&self, revision: &str) -> Result<ModelFiles, HubError> {
        let not_cached = |detail: String| HubError::NotCached {
            repo: self.repo.clone(),
            revision: revision.to_string(),
            cache: self.root.clone(),
            detail,
        };
        let Some(commit) = self.commit_for(revision) else {
            return Err(not_cached(String::new()));
        };
        let snapshot = self.snapshot_dir(&commit);
        if !snapshot.is_dir() {
            return Err(not_cached(format!(
                ": refs/{revision} points to commit {commit} but {} is missing",
                snapshot.display()
            )));
        }
        match pick_files(&snapshot) {
            Ok(mut files) => {
                files.hub = Some(HubOrigin {
                    repo: self.repo.clone(),
                    revision: revision.to_string(),
                    commit,
                });
                Ok(files)
            }
            Err(PickError::Missing(name)) => Err(not_cached(format!(
                ": snapshot {commit} has no {name}{}",
                if name == crate::files::SAFETENSORS {
                    " (nor sharded safetensors, nor pytorch_model.bin)"
                } else {
                    ""
                }
            ))),
            Err(PickError::Dangling(path)) => Err(HubError::BrokenCacheEntry {
                repo: self.repo.clone(),
                path,
                snapshot,
            }),
            Err(PickError::Other(e)) => Err(*e),
        }
    }
}

/// A full 40-hex-digit git commit hash.
pub fn is_commit_hash(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Make a symlink `link` -> `target` with a path relative to `link`'s folder, as `huggingface_hub`
/// does (so the cache can be moved as a whole). An existing entry at `link` is replaced atomically:
/// the link is made under a temporary name and renamed over it, so concurrent fetches of the same
/// checkpoint never see a missing or half-made entry.
pub(crate) fn symlink_relative(target: &Path, link: &Path) -> Result<(), HubError> {
    let parent = link.parent().expect("link path has a parent");
    std::fs::create_dir_all(parent).map_err(|e| HubError::io("cannot create", parent, e))?;
    let rel = relative_path(target, parent);
    let tmp = temp_sibling(link);
    #[cfg(unix)]
    let made = std::os::unix::fs::symlink(&rel, &tmp);
    #[cfg(windows)]
    let made = std::os::windows::fs::symlink_file(&rel, &tmp).or_else(|_| {
        // Windows without developer mode cannot make symlinks; huggingface_hub then copies.
        std::fs::copy(target, &tmp).map(|_| ())
    });
    made.map_err(|e| HubError::io("cannot create symlink", &tmp, e))?;
    std::fs::rename(&tmp, link).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        HubError::io("cannot create symlink", link, e)
    })
}

/// A unique temporary name next to `path` (per process and per call), for write-then-rename.
pub(crate) fn temp_sibling(path: &Path) -> PathBuf {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("f");
    path.with_file_name(format!(".{name}.tmp-{}-{n}", std::process::id()))
}

/// `target` expressed relative to directory `base` (both inside the same cache root).
fn relative_path(target: &Path, base: &Path) -> PathBuf {
    let t: Vec<_> = target.components().collect();
    let b: Vec<_> = base.components().collect();
    let common = t.iter().zip(&b).take_while(|(x, y)| x == y).count();
    let mut out = PathBuf::new();
    for _ in common..b.len() {
        out.push("..");
    }
    for c in &t[common..] {
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_names() {
        let c = CachedRepo::new("/c", "microsoft/beit-base-patch16-224");
        assert_eq!(
            c.dir(),
            PathBuf::from("/c/models--microsoft--beit-base-patch16-224")
        );
        assert_eq!(
            c.ref_path("refs/pr/1"),
            PathBuf::from("/c/models--microsoft--beit-base-patch16-224/refs/refs/pr/1")
        );
        assert_eq!(
            relative_path(
                Path::new("/c/m/blobs/abc"),
                Path::new("/c/m/snapshots/0123/sub")
            ),
            PathBuf::from("../../../blobs/abc")
        );
        assert!(is_commit_hash("0123456789abcdef0123456789abcdef01234567"));
        assert!(!is_commit_hash("main"));
    }
}
