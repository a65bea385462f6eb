//! Resolve and fetch BEiT checkpoints through the Hugging Face hub and its local cache.
//!
//! - [`resolve_model`] turns what a user passes as `--model` (a local directory, or a hub id such as
//!   `microsoft/beit-base-patch16-224[@revision]`) into paths: `config.json`, the optional
//!   `preprocessor_config.json`, and the weights ([`WeightFiles`]). Hub ids are resolved from the
//!   local cache only, unless downloading is explicitly allowed.
//! - [`fetch`] downloads a checkpoint with the `hf-hub` crate into the standard cache
//!   (`models--org--name/{blobs,refs,snapshots}`, as `huggingface_hub` lays it out), checking each
//!   file's size and hash before it enters the cache.
//! - [`HubConfig`] reads `HF_HUB_CACHE`/`HF_HOME`/..., `HF_ENDPOINT`, `HF_TOKEN` and `HF_HUB_OFFLINE`
//!   with `huggingface_hub`'s precedence; [`cache_dir`] is the cache root it implies.
//! - [`known_checkpoints`] lists the published checkpoints of the family (BEiT, timm BEiT v1/v2,
//!   data2vec-vision, DiT).
//!
//! Errors ([`HubError`]) name the repository, file or directory, and say how to fix the problem.

mod cache;
mod env;
mod error;
mod fetch;
mod files;
mod known;
mod probe;
mod resolve;
mod spec;
mod verify;

pub use cache::{is_commit_hash, CachedRepo};
pub use env::{cache_dir, HubConfig, DEFAULT_CONNECT_TIMEOUT, DEFAULT_ENDPOINT};
pub use error::HubError;
pub use fetch::{fetch, FetchOutcome, FetchReport, FetchedFile, STAGING_DIR};
pub use files::{
    shard_names, HubOrigin, ModelFiles, WeightFiles, CONFIG, PREPROCESSOR_CONFIG, PYTORCH_BIN,
    SAFETENSORS, SAFETENSORS_INDEX,
};
pub use known::{find_known, known_checkpoints, Family, Head, KnownCheckpoint};
pub use resolve::{resolve_model, ResolveOptions};
pub use spec::{is_repo_id, ModelSpec};
pub use verify::verify_blob;
