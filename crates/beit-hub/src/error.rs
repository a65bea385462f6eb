//! The error type of this crate. Every message names the repository, file or directory involved
//! and, where there is one, the command that fixes the problem.

use std::path::PathBuf;

/// Everything that can go wrong while resolving or fetching a checkpoint.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HubError {
    /// The spec is neither an existing directory nor an `org/name[@revision]` hub id.
    #[error(
        "`{spec}` is neither an existing local directory nor a hub id of the form `org/name[@revision]` \
         (e.g. `microsoft/beit-base-patch16-224`)"
    )]
    InvalidSpec {
        /// What the user passed.
        spec: String,
    },

    /// The spec names an existing file rather than a model directory.
    #[error(
        "{path} is a file; pass the directory that holds config.json and the weights (e.g. {dir})"
    )]
    NotADirectory {
        /// The file given.
        path: PathBuf,
        /// Its parent directory.
        dir: PathBuf,
    },

    /// A local directory lacks `config.json`.
    #[error("{dir} has no config.json; a model directory needs config.json next to the weights")]
    MissingConfig {
        /// The directory that was searched.
        dir: PathBuf,
    },

    /// A local directory or cached snapshot has none of the accepted weight files.
    #[error(
        "{dir} has no weights: looked for model.safetensors, model.safetensors.index.json (sharded) \
         and pytorch_model.bin"
    )]
    MissingWeights {
        /// The directory that was searched.
        dir: PathBuf,
    },

    /// A shard listed in `model.safetensors.index.json` is absent.
    #[error("{index} lists shard {shard}, which is missing from {dir}")]
    MissingShard {
        /// The index file.
        index: PathBuf,
        /// The shard file name.
        shard: String,
        /// The directory searched.
        dir: PathBuf,
    },

    /// A JSON file (config or shard index) could not be parsed.
    #[error("cannot parse {path}: {message}")]
    BadJson {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        message: String,
    },

    /// The checkpoint (or the requested revision of it) is not in the local cache, and downloading was
    /// not allowed.
    #[error(
        "{repo} (revision {revision}) is not in the Hugging Face cache ({cache}){detail}; fetch it with \
         `cargo xtask fetch-weights {repo}{flag}` or pass a local directory",
        flag = rev_flag(.revision)
    )]
    NotCached {
        /// Repository id.
        repo: String,
        /// Requested revision.
        revision: String,
        /// Cache root searched.
        cache: PathBuf,
        /// Extra detail (which file is missing), starting with `: ` or empty.
        detail: String,
    },

    /// `HF_HUB_OFFLINE` is set and the checkpoint is not cached.
    #[error(
        "{repo} (revision {revision}) is not in the Hugging Face cache ({cache}){detail} and HF_HUB_OFFLINE \
         is set, so it cannot be downloaded; unset HF_HUB_OFFLINE and run `cargo xtask fetch-weights \
         {repo}{flag}` on a machine that can reach the hub, or copy the cache over",
        flag = rev_flag(.revision)
    )]
    Offline {
        /// Repository id.
        repo: String,
        /// Requested revision.
        revision: String,
        /// Cache root searched.
        cache: PathBuf,
        /// Extra detail (which file is missing), starting with `: ` or empty.
        detail: String,
    },

    /// The cache holds an entry for the file, but the blob it points to is gone.
    #[error(
        "broken cache entry {path} for {repo}: the symlink's target blob is missing; delete {snapshot} and \
         fetch again with `cargo xtask fetch-weights {repo}`"
    )]
    BrokenCacheEntry {
        /// Repository id.
        repo: String,
        /// The dangling snapshot entry.
        path: PathBuf,
        /// The snapshot directory holding it.
        snapshot: PathBuf,
    },

    /// The hub endpoint could not be reached (connection refused, DNS failure, TLS failure, ...).
    #[error(
        "cannot reach the Hugging Face hub at {endpoint} while fetching {repo}: {message}. Check the network \
         or HF_ENDPOINT; nothing was written to the cache"
    )]
    Unreachable {
        /// Endpoint used.
        endpoint: String,
        /// Repository id.
        repo: String,
        /// The underlying error.
        message: String,
    },

    /// The hub answered with an HTTP error status.
    #[error("the hub at {endpoint} answered HTTP {status} for {repo} ({what}){hint}")]
    Http {
        /// Endpoint used.
        endpoint: String,
        /// Repository id.
        repo: String,
        /// What was requested (a file name or `repository info`).
        what: String,
        /// HTTP status code.
        status: u16,
        /// A fix, starting with `; ` or empty.
        hint: String,
    },

    /// The repository (at that revision) has no usable weights or no config.
    #[error("{repo}@{revision} on the hub has no {what}; files there: {files}")]
    RemoteMissing {
        /// Repository id.
        repo: String,
        /// Revision.
        revision: String,
        /// What is missing.
        what: String,
        /// The files the hub lists.
        files: String,
    },

    /// A download finished but its size or hash does not match what the hub announced.
    #[error(
        "download of {file} from {repo} is corrupt ({message}); it was discarded and the cache left \
         unchanged; run the fetch again"
    )]
    Corrupt {
        /// Repository id.
        repo: String,
        /// File name within the repo.
        file: String,
        /// Expected vs. found.
        message: String,
    },

    /// Any other download failure reported by `hf-hub` (interrupted transfer, bad headers, ...).
    #[error(
        "downloading {file} from {repo} failed: {message}; no partial file was left in the cache, run the \
         fetch again"
    )]
    Download {
        /// Repository id.
        repo: String,
        /// File name within the repo.
        file: String,
        /// The underlying error.
        message: String,
    },

    /// A file-system operation failed.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done, e.g. `cannot create`.
        action: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

impl HubError {
    /// Wrap an I/O error with the action and path it concerns.
    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
        source: std::io::Error,
    ) -> Self {
        HubError::Io {
            action,
            path: path.into(),
            source,
        }
    }
}

/// ` --revision REV` for revisions other than `main`, used in fix-it hints.
fn rev_flag(revision: &str) -> String {
    if revision == "main" {
        String::new()
    } else {
        format!(" --revision {revision}")
    }
}
