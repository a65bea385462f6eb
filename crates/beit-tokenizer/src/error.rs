//! The crate's error type: every failure names the file, key or field involved.

use std::path::PathBuf;

/// Errors from loading, running or training a visual tokenizer.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// A tensor operation failed (shape mismatch, device error, ...).
    #[error(transparent)]
    Candle(#[from] candle::Error),
    /// Reading or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A weights file lacks a tensor the architecture needs.
    #[error("{}: missing tensor `{key}`", path.display())]
    MissingTensor {
        /// The weights file.
        path: PathBuf,
        /// The state-dict name that was looked up.
        key: String,
    },
    /// A weights file holds a tensor of the wrong shape, or an inconsistent set of tensors.
    #[error("{}: tensor `{key}`: {reason}", path.display())]
    BadTensor {
        /// The weights file.
        path: PathBuf,
        /// The state-dict name.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A configuration value is invalid.
    #[error("{context}: field `{field}`: {reason}")]
    Config {
        /// The file or structure holding the field.
        context: String,
        /// The field name.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A pickled PyTorch file could not be understood.
    #[error("{}: {reason}", path.display())]
    Pickle {
        /// The pickle file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// An image could not be decoded or written.
    #[error("{}: {source}", path.display())]
    Image {
        /// The image file.
        path: PathBuf,
        /// The underlying error.
        source: image::ImageError,
    },
    /// The input tensor does not fit the model.
    #[error("bad input: {0}")]
    Input(String),
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, TokenizerError>;

impl TokenizerError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}
