//! The crate's error type.

use std::path::PathBuf;

/// Everything that can go wrong in the training engine.
///
/// File-related variants always carry the path, so a user sees which file was missing,
/// truncated or malformed.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle::Error),

    /// Reading or writing a file or directory failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// A JSON file could not be parsed or written.
    #[error("{path}: invalid JSON: {source}")]
    Json {
        /// The file involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: serde_json::Error,
    },

    /// A checkpoint is missing, incomplete or does not match the model/optimizer.
    #[error("checkpoint {path}: {message}")]
    Checkpoint {
        /// The checkpoint directory or file involved.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },

    /// Optimizer state does not match the parameters it is loaded into.
    #[error("optimizer state: {0}")]
    OptimizerState(String),

    /// A configuration value is out of range or inconsistent.
    #[error("invalid training configuration: {0}")]
    Config(String),

    /// A parameter name the engine does not know how to treat.
    #[error("parameter `{name}`: {message}")]
    Parameter {
        /// The parameter name (Hugging Face key).
        name: String,
        /// What is wrong.
        message: String,
    },

    /// The loss or the gradients stopped being finite.
    #[error("non-finite {what} at step {step}: {value}")]
    NonFinite {
        /// `"loss"` or `"gradient norm"`.
        what: &'static str,
        /// The optimizer step at which it happened.
        step: u64,
        /// The offending value.
        value: f64,
    },

    /// A collective operation of a data-parallel run (MPI, NCCL) failed or was called on
    /// inconsistent inputs.
    #[error("{what}: {message}")]
    Collective {
        /// The collective (e.g. `gradient all-reduce`).
        what: String,
        /// What went wrong.
        message: String,
    },

    /// Drawing a plot failed.
    #[error("plot {path}: {message}")]
    Plot {
        /// The PNG being written.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
}

/// Shorthand for results of this crate.
pub type Result<T> = std::result::Result<T, TrainError>;

/// Attach a path to an I/O error.
pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> TrainError {
    let path = path.into();
    move |source| TrainError::Io { path, source }
}
