//! `manifest.json` beside a folder of tar shards: the classes and, per shard, its samples and
//! their classes, so that a reader knows the size of each shard without opening it.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{DataError, Result};

/// File name of the manifest in a shard folder.
pub const MANIFEST_FILE: &str = "manifest.json";
/// Value of [`ShardManifest::format`].
pub const MANIFEST_FORMAT: &str = "beit-shards/1";

/// One shard of a manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardEntry {
    /// File name, relative to the manifest's folder.
    pub file: String,
    /// Samples in the shard.
    pub samples: usize,
    /// Size of the file in bytes.
    pub bytes: u64,
    /// Samples per class index.
    pub class_counts: BTreeMap<u32, usize>,
}

/// The manifest of one split's shard folder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardManifest {
    /// Always [`MANIFEST_FORMAT`].
    pub format: String,
    /// Class names in label order (empty for unlabelled data).
    pub classes: Vec<String>,
    /// Samples in all shards.
    pub samples: usize,
    /// The shards, in order.
    pub shards: Vec<ShardEntry>,
}

impl ShardManifest {
    /// The manifest of `dir`, if it has one. Errors on an unreadable or malformed file.
    pub fn read(dir: &Path) -> Result<Option<Self>> {
        let path = dir.join(MANIFEST_FILE);
        if !path.is_file() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&path).map_err(|source| DataError::Io {
            path: path.clone(),
            source,
        })?;
        let m: ShardManifest = serde_json::from_str(&text).map_err(|e| DataError::Format {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        if m.format != MANIFEST_FORMAT {
            return Err(DataError::Format {
                path,
                reason: format!("format `{}`, expected `{MANIFEST_FORMAT}`", m.format),
            });
        }
        Ok(Some(m))
    }

    /// Write it as `dir/manifest.json`.
    pub fn write(&self, dir: &Path) -> Result<()> {
        let path = dir.join(MANIFEST_FILE);
        let text = serde_json::to_string_pretty(self).map_err(|e| DataError::Format {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        std::fs::write(&path, text + "\n").map_err(|source| DataError::Io { path, source })
    }
}
