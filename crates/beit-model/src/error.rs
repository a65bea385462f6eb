//! Errors of the model crate: each names the file, key, parameter or field at fault.

use std::path::PathBuf;

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, BeitError>;

/// What can go wrong building, loading or saving a BEiT model.
#[derive(Debug, thiserror::Error)]
pub enum BeitError {
    /// A `config.json` that does not parse or violates an invariant.
    #[error("invalid BEiT config{}: {message}", path.as_ref().map(|p| format!(" {}", p.display())).unwrap_or_default())]
    Config {
        /// The file, when the config came from one.
        path: Option<PathBuf>,
        /// What is wrong, naming the field.
        message: String,
    },
    /// A file that cannot be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A checkpoint file that is not a readable safetensors/pickle/index file.
    #[error("cannot read checkpoint {}: {message}", path.display())]
    Checkpoint {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// The checkpoint's tensors do not match what the config describes.
    #[error("checkpoint {source_name} does not match the config:\n{report}")]
    Mismatch {
        /// The checkpoint (file or directory) that was loaded.
        source_name: String,
        /// One line per missing key, unexpected key and shape mismatch.
        report: String,
    },
    /// Bad input to a forward pass (image size, mask shape...).
    #[error("{0}")]
    Input(String),
    /// A parameter the model has no rule for, or that is not where it should be.
    #[error("parameter `{name}`: {message}")]
    Parameter {
        /// The parameter name (Hugging Face key).
        name: String,
        /// What is wrong.
        message: String,
    },
    /// Initialisation settings that cannot be carried out (truncation bounds, depth).
    #[error("invalid initialisation: {0}")]
    Init(String),
    /// An error from candle.
    #[error(transparent)]
    Candle(#[from] candle::Error),
}

impl From<BeitError> for candle::Error {
    fn from(e: BeitError) -> Self {
        match e {
            BeitError::Candle(c) => c,
            other => candle::Error::Msg(other.to_string()),
        }
    }
}
