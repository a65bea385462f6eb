//! The kinds of shard file a [`crate::ShardSet`] streams: WebDataset tar files (`.tar`) and
//! Parquet files in the Hugging Face datasets layout (`.parquet`). Both are read front to back,
//! one sample at a time, into the same [`RawSample`]s; everything above this module (epoch plans,
//! the shuffle buffer, resume positions, random access) is shared.

use std::path::Path;

use crate::error::Result;
use crate::parquet_shard;
pub use crate::shard_count::ShardCount;
use crate::tar_shard::{self, RawSample};

/// The format of one shard file, from its extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShardFormat {
    /// A tar file in the WebDataset layout.
    Tar,
    /// A Parquet file with an `image` column (and a `label` column in a labelled set).
    Parquet,
}

/// File extensions of shard files, compared case-insensitively.
pub const SHARD_EXTS: [&str; 2] = ["tar", "parquet"];

impl ShardFormat {
    /// The format of `path` by extension (`.parquet`, else tar).
    pub fn of(path: &Path) -> Self {
        match path.extension() {
            Some(e) if e.eq_ignore_ascii_case("parquet") => ShardFormat::Parquet,
            _ => ShardFormat::Tar,
        }
    }

    /// Whether `path` names a shard file by its extension.
    pub fn is_shard_file(path: &Path) -> bool {
        path.extension()
            .is_some_and(|e| SHARD_EXTS.iter().any(|x| e.eq_ignore_ascii_case(x)))
    }

    /// A word for messages.
    pub fn name(self) -> &'static str {
        match self {
            ShardFormat::Tar => "tar",
            ShardFormat::Parquet => "Parquet",
        }
    }
}

/// Read every sample of `shard` in order, handing each (or its error) to `visit`, which returns
/// whether to go on. With `classes` (a labelled set), a sample without a label is an error; an
/// unreadable or truncated file ends with one error naming it.
pub fn read_shard(
    shard: &Path,
    classes: &[String],
    visit: &mut dyn FnMut(Result<RawSample>) -> bool,
) {
    match ShardFormat::of(shard) {
        ShardFormat::Tar => tar_shard::read_shard(shard, classes, visit),
        ShardFormat::Parquet => parquet_shard::read_shard(shard, classes, visit),
    }
}

/// Count the samples of `shard` (and what it says of its labels).
pub fn count_shard(shard: &Path) -> Result<ShardCount> {
    match ShardFormat::of(shard) {
        ShardFormat::Tar => {
            let (samples, max_label) = tar_shard::count_shard(shard)?;
            Ok(ShardCount {
                samples,
                max_label,
                classes: None,
            })
        }
        ShardFormat::Parquet => parquet_shard::count_shard(shard),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_by_extension() {
        assert_eq!(
            ShardFormat::of(Path::new("a/x.PARQUET")),
            ShardFormat::Parquet
        );
        assert_eq!(ShardFormat::of(Path::new("a/x.tar")), ShardFormat::Tar);
        assert!(ShardFormat::is_shard_file(Path::new(
            "train-00000-of-00004.parquet"
        )));
        assert!(!ShardFormat::is_shard_file(Path::new("x.json")));
    }
}
