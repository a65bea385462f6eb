//! Downloading a checkpoint into the standard cache through `hf-hub`.
//!
//! `hf-hub` 0.5 writes `blobs/<etag>.part`, renames it to `blobs/<etag>` without checking it, and
//! leaves the `.part` (and a `.lock`) behind when a transfer fails. To keep the real cache free of
//! partial or unchecked files, `hf-hub` downloads into a private staging cache
//! (`<cache>/.beit-staging/<pid>-<n>/`, on the same file system). Each finished blob is checked
//! against the size and hash the hub announced and only then moved (an atomic rename) into
//! `blobs/`, after which the snapshot symlink and `refs/<revision>` are written as
//! `huggingface_hub` writes them. The staging folder is removed on success and on error; one left by
//! a killed process is removed by the next fetch.

use std::path::{Path, PathBuf};

use hf_hub::api::sync::{Api, ApiBuilder, ApiError, ApiRepo};
use hf_hub::{Cache, Repo, RepoType};

use crate::cache::{symlink_relative, temp_sibling, CachedRepo};
use crate::files::{
    shard_names, ModelFiles, CONFIG, PREPROCESSOR_CONFIG, PYTORCH_BIN, SAFETENSORS,
    SAFETENSORS_INDEX,
};
use crate::spec::is_repo_id;
use crate::verify::verify_blob;
use crate::{HubConfig, HubError};

/// How a fetch ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FetchOutcome {
    /// Everything was already in the cache; the network was not used.
    Cached,
    /// Files were downloaded (or linked from blobs already present).
    Downloaded {
        /// Each file of the checkpoint with its size in bytes and whether it was transferred
        /// (`false`: its blob was already in the cache).
        files: Vec<FetchedFile>,
    },
}

/// One file of a fetched checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchedFile {
    /// Path within the repository.
    pub name: String,
    /// Size in bytes as announced by the hub.
    pub size: u64,
    /// Whether it was transferred now.
    pub transferred: bool,
}

/// The result of [`fetch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchReport {
    /// The resolved files in the cache.
    pub files: ModelFiles,
    /// Whether anything was downloaded.
    pub outcome: FetchOutcome,
}

/// Make checkpoint `repo` at `revision` (default `main`) available in the cache of `hub` and resolve
/// it.
///
/// A checkpoint already complete in the cache is returned without any network access. Otherwise,
/// unless `hub.offline`, the repository listing is fetched and `config.json`,
/// `preprocessor_config.json` (when the repository has one) and the weights (`model.safetensors`,
/// else the sharded safetensors and their index, else `pytorch_model.bin`) are downloaded from
/// `hub.endpoint`, with an `indicatif` progress bar per file on stderr when `progress` is set.
pub fn fetch(
    repo: &str,
    revision: Option<&str>,
    hub: &HubConfig,
    progress: bool,
) -> Result<FetchReport, HubError> {
    if !is_repo_id(repo) {
        return Err(HubError::InvalidSpec {
            spec: repo.to_string(),
        });
    }
    let revision = revision.unwrap_or("main");
    let cached = CachedRepo::new(&hub.cache_dir, repo);
    match cached.resolve(revision) {
        Ok(files) => {
            return Ok(FetchReport {
                files,
                outcome: FetchOutcome::Cached,
            })
        }
        Err(HubError::NotCached { detail, .. }) if hub.offline => {
            return Err(HubError::Offline {
                repo: repo.to_string(),
                revision: revision.to_string(),
                cache: hub.cache_dir.clone(),
                detail,
            })
        }
        // Missing files, or a dangling link that a fresh download repairs.
        Err(HubError::NotCached { .. } | HubError::BrokenCacheEntry { .. }) if !hub.offline => {}
        Err(e) => return Err(e),
    }
    Downloader::new(repo, revision, hub)?.run(&cached, progress)
}

struct Downloader<'a> {
    repo: &'a str,
    revision: &'a str,
    hub: &'a HubConfig,
    api: Api,
    staging: Staging,
}

impl<'a> Downloader<'a> {
    fn new(repo: &'a str, revision: &'a str, hub: &'a HubConfig) -> Result<Self, HubError> {
        let staging = Staging::new(&hub.cache_dir);
        let api = ApiBuilder::from_cache(Cache::new(staging.dir.clone()))
            .with_endpoint(hub.endpoint.clone())
            .with_token(hub.token.clone())
            .with_progress(false)
            .with_retries(0)
            .build()
            .map_err(|e| HubError::Unreachable {
                endpoint: hub.endpoint.clone(),
                repo: repo.to_string(),
                message: format!("cannot set up the HTTP client: {e}"),
            })?;
        Ok(Self {
            repo,
            revision,
            hub,
            api,
            staging,
        })
    }

    fn api_repo(&self, revision: &str) -> ApiRepo {
        self.api.repo(Repo::with_revision(
            self.repo.to_string(),
            RepoType::Model,
            revision.to_string(),
        ))
    }

    fn run(self, cached: &CachedRepo, progress: bool) -> Result<FetchReport, HubError> {
        crate::probe::probe(&self.hub.endpoint, self.hub.connect_timeout).map_err(|message| {
            HubError::Unreachable {
                endpoint: self.hub.endpoint.clone(),
                repo: self.repo.to_string(),
                message,
            }
        })?;
        let info = self
            .api_repo(self.revision)
            .info()
            .map_err(|e| self.request_error(e, "repository info", true))?;
        let commit = info.sha.trim().to_string();
        let names: Vec<String> = info.siblings.into_iter().map(|s| s.rfilename).collect();
        let has = |n: &str| names.iter().any(|x| x == n);
        let missing = |what: &str| HubError::RemoteMissing {
            repo: self.repo.to_string(),
            revision: self.revision.to_string(),
            what: what.to_string(),
            files: names.join(", "),
        };
        if !has(CONFIG) {
            return Err(missing(CONFIG));
        }
        // Every file is then requested at the commit the listing named, so a branch that moves
        // during the download cannot mix two versions.
        let pinned = self.api_repo(&commit);
        let mut fetched = Vec::new();
        fetched.push(self.fetch_file(&pinned, cached, &commit, CONFIG, progress)?);
        let has_preprocessor = has(PREPROCESSOR_CONFIG);
        if has_preprocessor {
            fetched.push(self.fetch_file(
                &pinned,
                cached,
                &commit,
                PREPROCESSOR_CONFIG,
                progress,
            )?);
        }
        if has(SAFETENSORS) {
            fetched.push(self.fetch_file(&pinned, cached, &commit, SAFETENSORS, progress)?);
        } else if has(SAFETENSORS_INDEX) {
            fetched.push(self.fetch_file(&pinned, cached, &commit, SAFETENSORS_INDEX, progress)?);
            let index = cached.snapshot_dir(&commit).join(SAFETENSORS_INDEX);
            for shard in shard_names(&index)? {
                fetched.push(self.fetch_file(&pinned, cached, &commit, &shard, progress)?);
            }
        } else if has(PYTORCH_BIN) {
            fetched.push(self.fetch_file(&pinned, cached, &commit, PYTORCH_BIN, progress)?);
        } else {
            return Err(missing(
                "weights (model.safetensors, model.safetensors.index.json or pytorch_model.bin)",
            ));
        }
        if !has_preprocessor {
            // Record the absence the way huggingface_hub does, so offline loaders need not ask.
            let marker = cached.no_exist_path(&commit, PREPROCESSOR_CONFIG);
            write_atomic(&marker, b"")?;
        }
        if self.revision != commit {
            write_atomic(&cached.ref_path(self.revision), commit.as_bytes())?;
        }
        drop(self.staging);
        let files = cached.resolve(self.revision)?;
        Ok(FetchReport {
            files,
            outcome: FetchOutcome::Downloaded { files: fetched },
        })
    }

    /// Bring one file into `blobs/` (downloading unless its blob is already there) and link it
    /// into the snapshot of `commit`.
    fn fetch_file(
        &self,
        pinned: &ApiRepo,
        cached: &CachedRepo,
        commit: &str,
        name: &str,
        progress: bool,
    ) -> Result<FetchedFile, HubError> {
        let meta = self
            .api
            .metadata(&pinned.url(name))
            .map_err(|e| self.request_error(e, name, false))?;
        let etag = meta.etag().to_string();
        let size = meta.size() as u64;
        let blob = cached.blob_path(&etag);
        let present = std::fs::metadata(&blob).is_ok_and(|m| m.is_file() && m.len() == size);
        if !present {
            self.staging.create()?;
            let result = if progress {
                let bar = indicatif::ProgressBar::new(size);
                let result = pinned.download_with_progress(name, bar.clone());
                if !bar.is_hidden() {
                    // indicatif leaves the cursor after the finished bar: end its line so the next
                    // bar (or the caller's summary) starts on a fresh one.
                    eprintln!();
                }
                result
            } else {
                pinned.download_with_progress(name, ())
            };
            let pointer = result.map_err(|e| self.request_error(e, name, false))?;
            let staged = std::fs::canonicalize(&pointer)
                .map_err(|e| HubError::io("cannot resolve", &pointer, e))?;
            verify_blob(&staged, size, &etag).map_err(|message| HubError::Corrupt {
                repo: self.repo.to_string(),
                file: name.to_string(),
                message,
            })?;
            let blobs = blob.parent().expect("blob has a parent");
            std::fs::create_dir_all(blobs).map_err(|e| HubError::io("cannot create", blobs, e))?;
            std::fs::rename(&staged, &blob)
                .map_err(|e| HubError::io("cannot move the download into", &blob, e))?;
        }
        symlink_relative(&blob, &cached.snapshot_dir(commit).join(name))?;
        Ok(FetchedFile {
            name: name.to_string(),
            size,
            transferred: !present,
        })
    }

    /// Turn an `hf-hub` error into one that says what failed and how to fix it. `connecting`: the
    /// first request, where a transport failure means the endpoint is unreachable.
    fn request_error(&self, e: ApiError, what: &str, connecting: bool) -> HubError {
        if let ApiError::RequestError(inner) = &e {
            if let ureq::Error::StatusCode(status) = **inner {
                let hint = match status {
                    401 | 403 => format!(
                        "; the repository may be gated or private: set HF_TOKEN to a token with access \
                         (current token: {})",
                        if self.hub.token.is_some() { "set" } else { "none" }
                    ),
                    404 => format!(
                        "; check the repo id and the revision `{}`{}",
                        self.revision,
                        if self.hub.token.is_none() {
                            " (private repositories also need HF_TOKEN)"
                        } else {
                            ""
                        }
                    ),
                    _ => String::new(),
                };
                return HubError::Http {
                    endpoint: self.hub.endpoint.clone(),
                    repo: self.repo.to_string(),
                    what: what.to_string(),
                    status,
                    hint,
                };
            }
            if connecting {
                return HubError::Unreachable {
                    endpoint: self.hub.endpoint.clone(),
                    repo: self.repo.to_string(),
                    message: inner.to_string(),
                };
            }
        }
        HubError::Download {
            repo: self.repo.to_string(),
            file: what.to_string(),
            message: e.to_string(),
        }
    }
}

/// Write `bytes` to `path` through a temporary sibling and a rename, creating parent folders.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), HubError> {
    let parent = path.parent().expect("path has a parent");
    std::fs::create_dir_all(parent).map_err(|e| HubError::io("cannot create", parent, e))?;
    let tmp = temp_sibling(path);
    std::fs::write(&tmp, bytes).map_err(|e| HubError::io("cannot write", &tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| HubError::io("cannot write", path, e))
}

/// Name of the staging area inside a cache root.
pub const STAGING_DIR: &str = ".beit-staging";

/// A private download area inside the cache root, removed when dropped.
struct Staging {
    root: PathBuf,
    dir: PathBuf,
}

impl Staging {
    /// Choose the folder; nothing is created until [`Staging::create`], so a fetch that fails
    /// before its first transfer leaves the file system untouched.
    fn new(cache_dir: &Path) -> Self {
        let root = cache_dir.join(STAGING_DIR);
        // Unique per process and per fetch within it (fetches may run on several threads).
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = root.join(format!("{}-{n}", std::process::id()));
        Self { root, dir }
    }

    fn create(&self) -> Result<(), HubError> {
        if self.dir.is_dir() {
            return Ok(());
        }
        remove_stale(&self.root);
        std::fs::create_dir_all(&self.dir).map_err(|e| HubError::io("cannot create", &self.dir, e))
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
        // Only succeeds when no other fetch is using the staging area.
        let _ = std::fs::remove_dir(&self.root);
    }
}

/// Remove staging folders left by fetches whose process is gone (killed mid-download).
fn remove_stale(root: &Path) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !process_alive(pid) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

fn process_alive(pid: u32) -> bool {
    if cfg!(target_os = "linux") {
        Path::new("/proc").join(pid.to_string()).exists()
    } else {
        // Without a cheap portable check, assume alive: a leftover folder only costs disk space.
        true
    }
}
