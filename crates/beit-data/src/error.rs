//! The error type of `beit-data`.

use std::path::PathBuf;

/// Everything that can go wrong while reading datasets or building batches.
///
/// Every variant names the file, field or parameter at fault so that a user can fix the input.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// An I/O failure on a specific path.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory being read.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// A file whose content does not follow the expected format.
    #[error("{path}: {reason}")]
    Format {
        /// The file (or embedded resource) at fault.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// An image that could not be decoded.
    #[error("cannot decode image {path}: {reason}")]
    Decode {
        /// The image file.
        path: PathBuf,
        /// The decoder's message.
        reason: String,
    },
    /// A dataset with no samples, or a class folder with no images.
    #[error("empty dataset: {0}")]
    Empty(String),
    /// A parameter out of its valid range.
    #[error("invalid parameter `{name}`: {reason}")]
    InvalidParam {
        /// The parameter's name as the user knows it.
        name: String,
        /// Why it is rejected.
        reason: String,
    },
    /// A sample index past the end of a dataset.
    #[error("sample index {index} out of range for a dataset of {len} samples")]
    OutOfRange {
        /// The requested index.
        index: usize,
        /// The dataset's length.
        len: usize,
    },
    /// An error from candle while building tensors.
    #[error(transparent)]
    Candle(#[from] candle::Error),
}

impl DataError {
    /// Shorthand for an [`DataError::InvalidParam`].
    pub fn param(name: &str, reason: impl Into<String>) -> Self {
        DataError::InvalidParam {
            name: name.to_string(),
            reason: reason.into(),
        }
    }
}

/// `Result` with [`DataError`].
pub type Result<T> = std::result::Result<T, DataError>;
