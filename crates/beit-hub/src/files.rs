//! The files that make up a checkpoint, and how they are picked out of a directory.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use crate::HubError;

/// Model configuration (`BeitConfig`).
pub const CONFIG: &str = "config.json";
/// Image preprocessing configuration (`BeitImageProcessor`); optional.
pub const PREPROCESSOR_CONFIG: &str = "preprocessor_config.json";
/// Single-file safetensors weights.
pub const SAFETENSORS: &str = "model.safetensors";
/// Index of sharded safetensors weights.
pub const SAFETENSORS_INDEX: &str = "model.safetensors.index.json";
/// PyTorch pickle weights (zip format).
pub const PYTORCH_BIN: &str = "pytorch_model.bin";

/// Where the weights of a checkpoint are, in order of preference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WeightFiles {
    /// `model.safetensors`.
    Safetensors(PathBuf),
    /// `model.safetensors.index.json` and the shards it lists (each once, sorted by name).
    ShardedSafetensors {
        /// The index file.
        index: PathBuf,
        /// The shard files.
        shards: Vec<PathBuf>,
    },
    /// `pytorch_model.bin`, a PyTorch zip pickle (readable with `candle::pickle`).
    PytorchBin(PathBuf),
}

impl WeightFiles {
    /// Every weight file (the index excluded).
    pub fn paths(&self) -> Vec<&Path> {
        match self {
            WeightFiles::Safetensors(p) | WeightFiles::PytorchBin(p) => vec![p.as_path()],
            WeightFiles::ShardedSafetensors { shards, .. } => {
                shards.iter().map(PathBuf::as_path).collect()
            }
        }
    }
}

/// A resolved checkpoint: everything a loader needs, as paths on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelFiles {
    /// The directory holding the files (for a cached checkpoint, its snapshot directory).
    pub dir: PathBuf,
    /// `config.json`.
    pub config: PathBuf,
    /// `preprocessor_config.json`, when present.
    pub preprocessor_config: Option<PathBuf>,
    /// The weights.
    pub weights: WeightFiles,
    /// For a cached hub checkpoint, the repo id and the commit of the snapshot.
    pub hub: Option<HubOrigin>,
}

/// Where a cached checkpoint came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubOrigin {
    /// `org/name`.
    pub repo: String,
    /// The revision asked for (branch, tag or commit).
    pub revision: String,
    /// The commit hash of the snapshot.
    pub commit: String,
}

/// A file that the resolver looked for and did not find, or found broken.
#[derive(Debug)]
pub(crate) enum Lookup {
    /// Present (symlinks followed).
    Found(PathBuf),
    /// Absent.
    Missing,
    /// A symlink whose target is gone.
    Dangling(PathBuf),
}

pub(crate) fn lookup(dir: &Path, name: &str) -> Lookup {
    let path = dir.join(name);
    if path.is_file() {
        Lookup::Found(path)
    } else if path.symlink_metadata().is_ok() && !path.exists() {
        Lookup::Dangling(path)
    } else {
        Lookup::Missing
    }
}

/// Why [`pick_files`] could not assemble a checkpoint, before it is turned into a [`HubError`] that
/// fits the context (local directory or cache).
#[derive(Debug)]
pub(crate) enum PickError {
    /// A file is absent; the name says which.
    Missing(String),
    /// A symlink in the directory is dangling.
    Dangling(PathBuf),
    /// Any other error, already final.
    Other(Box<HubError>),
}

/// Pick config, optional preprocessor config and weights out of `dir`, preferring safetensors, then
/// sharded safetensors, then `pytorch_model.bin`.
pub(crate) fn pick_files(dir: &Path) -> Result<ModelFiles, PickError> {
    let found = |name: &str| -> Result<Option<PathBuf>, PickError> {
        match lookup(dir, name) {
            Lookup::Found(p) => Ok(Some(p)),
            Lookup::Missing => Ok(None),
            Lookup::Dangling(p) => Err(PickError::Dangling(p)),
        }
    };
    let config = found(CONFIG)?.ok_or_else(|| PickError::Missing(CONFIG.to_string()))?;
    let preprocessor_config = found(PREPROCESSOR_CONFIG)?;
    let weights = if let Some(p) = found(SAFETENSORS)? {
        WeightFiles::Safetensors(p)
    } else if let Some(index) = found(SAFETENSORS_INDEX)? {
        let mut shards = Vec::new();
        for shard in shard_names(&index).map_err(|e| PickError::Other(Box::new(e)))? {
            match found(&shard)? {
                Some(p) => shards.push(p),
                None => return Err(PickError::Missing(shard)),
            }
        }
        WeightFiles::ShardedSafetensors { index, shards }
    } else if let Some(p) = found(PYTORCH_BIN)? {
        WeightFiles::PytorchBin(p)
    } else {
        return Err(PickError::Missing(SAFETENSORS.to_string()));
    };
    Ok(ModelFiles {
        dir: dir.to_path_buf(),
        config,
        preprocessor_config,
        weights,
        hub: None,
    })
}

/// The shard file names listed in a `model.safetensors.index.json` (`weight_map` values), sorted and
/// without duplicates.
pub fn shard_names(index: &Path) -> Result<Vec<String>, HubError> {
    let text = std::fs::read_to_string(index).map_err(|e| HubError::io("cannot read", index, e))?;
    shard_names_from_json(&text).map_err(|message| HubError::BadJson {
        path: index.to_path_buf(),
        message,
    })
}

pub(crate) fn shard_names_from_json(text: &str) -> Result<Vec<String>, String> {
    let value: serde_json::Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
    let map = value
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or("no `weight_map` object")?;
    let mut names = BTreeSet::new();
    for (tensor, file) in map {
        let file = file
            .as_str()
            .ok_or_else(|| format!("weight_map[{tensor:?}] is not a string"))?;
        // Shards live next to the index; refuse paths that would escape the directory.
        if file.is_empty()
            || Path::new(file).is_absolute()
            || Path::new(file)
                .components()
                .any(|c| matches!(c, std::path::Component::ParentDir))
        {
            return Err(format!(
                "weight_map[{tensor:?}] = {file:?} is not a file name"
            ));
        }
        names.insert(file.to_string());
    }
    if names.is_empty() {
        return Err("`weight_map` is empty".into());
    }
    Ok(names.into_iter().collect())
}

/// Resolve a local directory (or a weights file inside one) into its checkpoint files.
pub(crate) fn resolve_local(path: &Path) -> Result<ModelFiles, HubError> {
    let dir = path;
    pick_files(dir).map_err(|e| match e {
        PickError::Missing(name) if name == CONFIG => HubError::MissingConfig {
            dir: dir.to_path_buf(),
        },
        PickError::Missing(name) if name == SAFETENSORS => HubError::MissingWeights {
            dir: dir.to_path_buf(),
        },
        PickError::Missing(shard) => HubError::MissingShard {
            index: dir.join(SAFETENSORS_INDEX),
            shard,
            dir: dir.to_path_buf(),
        },
        PickError::Dangling(p) => HubError::io(
            "dangling symlink",
            p,
            std::io::Error::from(std::io::ErrorKind::NotFound),
        ),
        PickError::Other(e) => *e,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_index_parsing() {
        let json = r#"{"metadata":{"total_size":10},"weight_map":{
            "a.weight":"model-00002-of-00002.safetensors",
            "b.weight":"model-00001-of-00002.safetensors",
            "c.weight":"model-00001-of-00002.safetensors"}}"#;
        assert_eq!(
            shard_names_from_json(json).unwrap(),
            vec![
                "model-00001-of-00002.safetensors",
                "model-00002-of-00002.safetensors"
            ]
        );
        assert!(shard_names_from_json(r#"{"weight_map":{}}"#)
            .unwrap_err()
            .contains("empty"));
        assert!(shard_names_from_json(r#"{"weight_map":{"a":"../x"}}"#)
            .unwrap_err()
            .contains("not a file name"));
        assert!(shard_names_from_json(r#"{"x":1}"#)
            .unwrap_err()
            .contains("weight_map"));
    }
}
