//! What counting a shard learns without decoding its images (shared by the tar and Parquet
//! readers and [`crate::shard_format`]).

/// What counting a shard learns without decoding images.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ShardCount {
    /// Samples the shard delivers (errors included), as [`crate::shard_format::read_shard`] would.
    pub samples: usize,
    /// The largest label seen, when labels were read.
    pub max_label: Option<u32>,
    /// Class names the file itself declares (a Parquet file's `ClassLabel` names).
    pub classes: Option<Vec<String>>,
}
