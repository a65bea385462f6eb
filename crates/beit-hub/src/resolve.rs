//! `--model` resolution: a local directory, or a hub id looked up in the cache.

use crate::fetch::fetch;
use crate::files::{resolve_local, ModelFiles};
use crate::spec::ModelSpec;
use crate::{CachedRepo, HubConfig, HubError};

/// How [`resolve_model`] may find a checkpoint.
#[derive(Debug, Clone)]
pub struct ResolveOptions {
    /// Cache root, endpoint, token and offline mode (default: from the environment).
    pub hub: HubConfig,
    /// Revision for hub ids given without `@revision` (default `main`).
    pub revision: Option<String>,
    /// Download a checkpoint missing from the cache (default `false`: resolution never touches the
    /// network unless asked, e.g. by a `--download` flag).
    pub allow_download: bool,
    /// Show a progress bar per downloaded file.
    pub progress: bool,
}

impl Default for ResolveOptions {
    fn default() -> Self {
        Self {
            hub: HubConfig::from_env(),
            revision: None,
            allow_download: false,
            progress: true,
        }
    }
}

impl ResolveOptions {
    /// Cache-only resolution with the environment's settings.
    pub fn offline_from_env() -> Self {
        Self::default()
    }

    /// Use another hub configuration (e.g. a test cache).
    pub fn with_hub(mut self, hub: HubConfig) -> Self {
        self.hub = hub;
        self
    }

    /// Set the default revision.
    pub fn with_revision(mut self, revision: impl Into<String>) -> Self {
        self.revision = Some(revision.into());
        self
    }

    /// Allow or forbid downloading.
    pub fn with_download(mut self, allow: bool) -> Self {
        self.allow_download = allow;
        self
    }
}

/// Resolve `spec` (what the user passed as `--model`) to the files of a checkpoint.
///
/// - An existing directory must hold `config.json` and weights (`model.safetensors`, sharded
///   safetensors with `model.safetensors.index.json`, or `pytorch_model.bin`, in that order of
///   preference); `preprocessor_config.json` is picked up when present.
/// - Otherwise `spec` must be a hub id `org/name[@revision]`, resolved from the Hugging Face cache
///   (`refs/<revision>` -> `snapshots/<commit>/`). When it is not cached the error says how to fetch
///   it, unless `opts.allow_download` is set, in which case it is downloaded (see [`fetch`]).
///
/// ```no_run
/// let files = beit_hub::resolve_model("microsoft/beit-base-patch16-224", &Default::default())?;
/// println!("config: {}", files.config.display());
/// # Ok::<(), beit_hub::HubError>(())
/// ```
pub fn resolve_model(spec: &str, opts: &ResolveOptions) -> Result<ModelFiles, HubError> {
    match ModelSpec::parse(spec)? {
        ModelSpec::Local(dir) => resolve_local(&dir),
        ModelSpec::Hub { repo, revision } => {
            let revision = revision
                .or_else(|| opts.revision.clone())
                .unwrap_or_else(|| "main".to_string());
            let cached = CachedRepo::new(&opts.hub.cache_dir, &repo);
            match cached.resolve(&revision) {
                Ok(files) => Ok(files),
                Err(HubError::NotCached { detail, .. }) if opts.hub.offline => {
                    Err(HubError::Offline {
                        repo,
                        cache: opts.hub.cache_dir.clone(),
                        detail,
                        revision,
                    })
                }
                Err(HubError::NotCached { .. } | HubError::BrokenCacheEntry { .. })
                    if opts.allow_download =>
                {
                    Ok(fetch(&repo, Some(&revision), &opts.hub, opts.progress)?.files)
                }
                Err(e) => Err(e),
            }
        }
    }
}
