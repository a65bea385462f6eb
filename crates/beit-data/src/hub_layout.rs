//! The file layout of a dataset downloaded from the Hugging Face hub: Parquet files named
//! `<split>-<shard>-of-<count>.parquet` (`train-00000-of-00004.parquet`,
//! `validation-00000-of-00001.parquet`, `test-...`; older uploads add `-<fingerprint>`), or
//! `<split>.parquet`, directly in the dataset's folder or under its `data/` folder. Split names
//! hold no `-` (the hub's rule), so the split is the file name up to its first `-` or `.`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::error::Result;
use crate::shard_format::ShardFormat;
use crate::shard_spec::shard_files_in;

/// Validation split names, in order of preference.
pub const VAL_SPLITS: [&str; 3] = ["validation", "val", "test"];

/// The Parquet files of a hub dataset, by split.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubSplits {
    /// The folder holding the files (the root or its `data/`).
    pub dir: PathBuf,
    /// Split name -> its files, sorted by name.
    pub splits: BTreeMap<String, Vec<PathBuf>>,
}

/// The split a hub file name belongs to (`train` for `train-00000-of-00004.parquet`).
pub fn split_of(file_name: &str) -> Option<&str> {
    let stem = file_name.strip_suffix(".parquet")?;
    let split = stem.split(['-', '.']).next()?;
    let ok = !split.is_empty() && split.chars().all(|c| c.is_alphanumeric() || c == '_');
    ok.then_some(split)
}

/// The hub layout of `root`, if `root` (or `root/data`) holds Parquet files named by split with
/// a `train` split among them.
pub fn hub_splits(root: &Path) -> Result<Option<HubSplits>> {
    for dir in [root.to_path_buf(), root.join("data")] {
        if !dir.is_dir() {
            continue;
        }
        let mut splits: BTreeMap<String, Vec<PathBuf>> = BTreeMap::new();
        for path in shard_files_in(&dir)? {
            if ShardFormat::of(&path) != ShardFormat::Parquet {
                continue;
            }
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
            if let Some(split) = name.as_deref().and_then(split_of) {
                splits.entry(split.to_string()).or_default().push(path);
            }
        }
        if splits.contains_key("train") {
            return Ok(Some(HubSplits { dir, splits }));
        }
    }
    Ok(None)
}

impl HubSplits {
    /// The training files.
    pub fn train(&self) -> &[PathBuf] {
        self.splits.get("train").map_or(&[], Vec::as_slice)
    }

    /// The validation split (`validation`, `val` or `test`, the first present) and its files.
    pub fn val(&self) -> Option<(&str, &[PathBuf])> {
        VAL_SPLITS
            .iter()
            .find_map(|s| self.splits.get(*s).map(|f| (*s, f.as_slice())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_from_hub_names() {
        assert_eq!(split_of("train-00000-of-00004.parquet"), Some("train"));
        assert_eq!(
            split_of("validation-00000-of-00001-a1b2c3.parquet"),
            Some("validation")
        );
        assert_eq!(split_of("test.parquet"), Some("test"));
        assert_eq!(split_of("train-0.tar"), None);
        assert_eq!(split_of("-x.parquet"), None);
    }
}
