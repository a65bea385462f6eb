//! The features file of `beit-cli embed` (read by `beit-cli knn`): one safetensors file with
//! `features` `(N, C)` f32 and `labels` `(N)` i64 (-1 when unlabelled), and in its metadata the
//! image `paths` and `classes` (JSON arrays), `pool`, `layer` and `model`. Written to a temporary
//! file beside the target, then renamed: a reader never sees half a file.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use candle::{Device, Tensor};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

/// The content of a features file.
#[derive(Debug, Clone)]
pub struct FeatureFile {
    /// `(N, C)` row-major.
    pub features: Vec<f32>,
    /// Width `C`.
    pub dim: usize,
    /// One label per row, -1 when unknown.
    pub labels: Vec<i64>,
    /// One path (or sample description) per row.
    pub paths: Vec<String>,
    /// Class names in label order (empty when unlabelled).
    pub classes: Vec<String>,
    /// Other metadata: `pool`, `layer`, `model`.
    pub meta: HashMap<String, String>,
}

impl FeatureFile {
    /// Number of rows.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether there are no rows.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The features as a tensor `(N, C)`.
    pub fn tensor(&self, device: &Device) -> Result<Tensor> {
        Ok(Tensor::from_slice(
            &self.features,
            (self.len(), self.dim),
            device,
        )?)
    }

    /// Write atomically to `path` (temporary file in the same folder, then rename).
    pub fn write(&self, path: &Path) -> Result<()> {
        ensure!(
            self.features.len() == self.len() * self.dim,
            "features and labels disagree in rows"
        );
        let feats: Vec<u8> = self.features.iter().flat_map(|v| v.to_le_bytes()).collect();
        let labels: Vec<u8> = self.labels.iter().flat_map(|v| v.to_le_bytes()).collect();
        let tensors = [
            (
                "features",
                TensorView::new(Dtype::F32, vec![self.len(), self.dim], &feats)?,
            ),
            (
                "labels",
                TensorView::new(Dtype::I64, vec![self.len()], &labels)?,
            ),
        ];
        let mut meta = self.meta.clone();
        meta.insert("paths".into(), serde_json::to_string(&self.paths)?);
        meta.insert("classes".into(), serde_json::to_string(&self.classes)?);
        let tmp = temp_path(path);
        safetensors::serialize_to_file(tensors, Some(meta), &tmp)
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, path)
            .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
    }

    /// Read a file written by [`FeatureFile::write`] (or any safetensors file with `features`
    /// f32 `(N, C)` and `labels` i64 `(N)`; metadata optional).
    pub fn read(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let (_, header) = SafeTensors::read_metadata(&bytes)
            .with_context(|| format!("{}: not a safetensors file", path.display()))?;
        let st = SafeTensors::deserialize(&bytes)?;
        let f = st
            .tensor("features")
            .with_context(|| format!("{}: no `features` tensor", path.display()))?;
        let l = st
            .tensor("labels")
            .with_context(|| format!("{}: no `labels` tensor", path.display()))?;
        if f.dtype() != Dtype::F32 || f.shape().len() != 2 {
            bail!(
                "{}: `features` must be f32 (N, C), found {:?} {:?}",
                path.display(),
                f.dtype(),
                f.shape()
            );
        }
        if l.dtype() != Dtype::I64 || l.shape() != [f.shape()[0]] {
            bail!(
                "{}: `labels` must be i64 (N), found {:?} {:?}",
                path.display(),
                l.dtype(),
                l.shape()
            );
        }
        let meta = header.metadata().clone().unwrap_or_default();
        let list = |key: &str| -> Result<Vec<String>> {
            match meta.get(key) {
                Some(s) => serde_json::from_str(s)
                    .with_context(|| format!("{}: metadata `{key}`", path.display())),
                None => Ok(Vec::new()),
            }
        };
        Ok(FeatureFile {
            features: f
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap_or_default()))
                .collect(),
            dim: f.shape()[1],
            labels: l
                .data()
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap_or_default()))
                .collect(),
            paths: list("paths")?,
            classes: list("classes")?,
            meta,
        })
    }
}

fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.safetensors");
        let f = FeatureFile {
            features: vec![1., 2., 3., 4., 5., 6.],
            dim: 3,
            labels: vec![0, -1],
            paths: vec!["a.png".into(), "b.png".into()],
            classes: vec!["x".into()],
            meta: [("pool".to_string(), "mean".to_string())]
                .into_iter()
                .collect(),
        };
        f.write(&path).unwrap();
        let g = FeatureFile::read(&path).unwrap();
        assert_eq!(
            (g.features, g.dim, g.labels, g.paths, g.classes),
            (f.features, 3, f.labels, f.paths, f.classes)
        );
        assert_eq!(g.meta["pool"], "mean");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
