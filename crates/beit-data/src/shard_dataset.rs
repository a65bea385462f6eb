//! Tar shards as a [`Dataset`]. The loader streams them (see `shard_stream`); `get` is random
//! access by reading the shard up to the sample, meant for small uses (a limited validation set,
//! a single lookup), not for epochs.

use std::path::PathBuf;
use std::sync::Arc;

use crate::dataset::{Dataset, Sample};
use crate::decode::{decode_bytes, DecodeOptions};
use crate::error::{DataError, Result};
use crate::shard_set::ShardSet;
use crate::tar_shard::{read_shard, RawSample};

impl ShardSet {
    /// The shard holding sample `index` and the sample's position in it.
    fn locate(&self, index: usize) -> Result<(PathBuf, usize)> {
        let mut rest = index;
        for s in self.shards() {
            if rest < s.samples {
                return Ok((s.path.clone(), rest));
            }
            rest -= s.samples;
        }
        Err(DataError::OutOfRange {
            index,
            len: self.total_samples(),
        })
    }

    /// The `index`-th sample of all shards, still encoded.
    pub fn raw(&self, index: usize) -> Result<RawSample> {
        let (shard, mut k) = self.locate(index)?;
        let mut found = None;
        read_shard(&shard, self.classes(), &mut |item| {
            if k == 0 {
                found = Some(item);
                return false;
            }
            k -= 1;
            true
        });
        found.unwrap_or_else(|| {
            Err(DataError::Format {
                path: shard,
                reason: format!("holds fewer samples than its count (sample {index} missing)"),
            })
        })
    }
}

/// Decode a streamed sample into RGB, errors naming shard and key.
pub fn decode_raw(raw: &RawSample, opts: &DecodeOptions) -> Result<Sample> {
    let name = PathBuf::from(raw.describe());
    Ok(Sample {
        image: decode_bytes(&raw.image, &name, opts)?,
        label: raw.label,
    })
}

impl Dataset for ShardSet {
    fn len(&self) -> usize {
        self.total_samples()
    }

    fn get(&self, index: usize) -> Result<Sample> {
        decode_raw(&self.raw(index)?, &DecodeOptions::default())
    }

    fn class_names(&self) -> Option<Vec<String>> {
        (!self.classes().is_empty()).then(|| self.classes().to_vec())
    }

    fn describe(&self, index: usize) -> String {
        match self.locate(index) {
            Ok((shard, k)) => format!("{} (sample {k})", shard.display()),
            Err(_) => format!("sample {index}"),
        }
    }

    fn shards(&self) -> Option<Arc<ShardSet>> {
        Some(Arc::new(self.clone()))
    }
}
