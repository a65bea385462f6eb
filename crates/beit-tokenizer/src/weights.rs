//! Reading and writing safetensors weight files with DALL-E's state-dict names.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle::{Device, Tensor};

use crate::error::{Result, TokenizerError};

/// Metadata key holding the image side length a tokenizer was made for (our dVAE writes it; the
/// converted DALL-E files lack it and default to 112).
pub const META_INPUT_SIZE: &str = "input_size";

/// The tensors of one safetensors file, with its path for error messages and its header metadata.
#[derive(Debug, Clone)]
pub struct WeightsFile {
    /// Where the tensors came from.
    pub path: PathBuf,
    /// State-dict name -> tensor.
    pub tensors: HashMap<String, Tensor>,
    /// The `__metadata__` of the safetensors header (empty when absent).
    pub metadata: HashMap<String, String>,
}

impl WeightsFile {
    /// Read every tensor of `path` onto `device`.
    pub fn read(path: &Path, device: &Device) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| TokenizerError::io(path, e))?;
        let bad = |reason: String| TokenizerError::BadTensor {
            path: path.to_path_buf(),
            key: "<header>".into(),
            reason,
        };
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|e| bad(format!("not a safetensors file: {e}")))?;
        let metadata = meta.metadata().clone().unwrap_or_default();
        let tensors = candle::safetensors::load_buffer(&bytes, device)
            .map_err(|e| bad(format!("cannot load tensors: {e}")))?;
        Ok(Self {
            path: path.to_path_buf(),
            tensors,
            metadata,
        })
    }

    /// Wrap tensors that did not come from a file (`origin` names them in errors).
    pub fn from_tensors(origin: impl Into<PathBuf>, tensors: HashMap<String, Tensor>) -> Self {
        Self {
            path: origin.into(),
            tensors,
            metadata: HashMap::new(),
        }
    }

    /// Shape of tensor `key`, or a [`TokenizerError::MissingTensor`] naming the file and key.
    pub fn dims(&self, key: &str) -> Result<&[usize]> {
        self.tensors
            .get(key)
            .map(|t| t.dims())
            .ok_or_else(|| TokenizerError::MissingTensor {
                path: self.path.clone(),
                key: key.to_string(),
            })
    }

    /// Whether tensor `key` exists.
    pub fn contains(&self, key: &str) -> bool {
        self.tensors.contains_key(key)
    }

    /// Check that every `(name, shape)` is present with that shape, and that no other tensor is.
    pub fn check(&self, expected: &[(String, Vec<usize>)]) -> Result<()> {
        for (key, shape) in expected {
            let dims = self.dims(key)?;
            if dims != shape.as_slice() {
                return Err(TokenizerError::BadTensor {
                    path: self.path.clone(),
                    key: key.clone(),
                    reason: format!("expected shape {shape:?}, found {dims:?}"),
                });
            }
        }
        if self.tensors.len() != expected.len() {
            let mut extra: Vec<&String> = self
                .tensors
                .keys()
                .filter(|k| !expected.iter().any(|(e, _)| e == *k))
                .collect();
            extra.sort();
            if let Some(first) = extra.first() {
                return Err(TokenizerError::BadTensor {
                    path: self.path.clone(),
                    key: (*first).clone(),
                    reason: format!(
                        "unexpected tensor for this architecture ({} unexpected in all)",
                        extra.len()
                    ),
                });
            }
        }
        Ok(())
    }

    /// The `input_size` metadata entry, if present and valid.
    pub fn input_size(&self) -> Result<Option<usize>> {
        match self.metadata.get(META_INPUT_SIZE) {
            None => Ok(None),
            Some(v) => v.parse().map(Some).map_err(|_| TokenizerError::Config {
                context: self.path.display().to_string(),
                field: META_INPUT_SIZE.into(),
                reason: format!("`{v}` is not an integer"),
            }),
        }
    }
}

/// Write `tensors` (converted to contiguous f32 on the CPU) with header `metadata` to `path`
/// atomically: into a temporary file next to it, then renamed over it, so a crash never leaves a
/// half-written file behind.
pub fn save_weights(
    tensors: &HashMap<String, Tensor>,
    metadata: HashMap<String, String>,
    path: &Path,
) -> Result<()> {
    let mut prepared = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let t = t.to_device(&Device::Cpu)?.contiguous()?;
        prepared.push((name.clone(), t));
    }
    prepared.sort_by(|a, b| a.0.cmp(&b.0));
    let tmp = tmp_path(path);
    let meta = if metadata.is_empty() {
        None
    } else {
        Some(metadata)
    };
    safetensors::serialize_to_file(prepared, meta, &tmp).map_err(|e| TokenizerError::Io {
        path: tmp.clone(),
        source: std::io::Error::other(e.to_string()),
    })?;
    std::fs::rename(&tmp, path).map_err(|e| TokenizerError::io(path, e))
}

/// `dir/.name.tmp` for an atomic write of `dir/name`.
pub(crate) fn tmp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "weights".into());
    path.with_file_name(format!(".{name}.tmp"))
}
