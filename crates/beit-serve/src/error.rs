//! Errors of starting the server (request errors are HTTP answers: see `api.rs`).

use std::path::PathBuf;

/// Why the server could not start or stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The checkpoint could not be resolved or loaded.
    #[error("loading model `{spec}`: {source:#}")]
    Model {
        /// The `--model` argument.
        spec: String,
        /// What went wrong.
        source: anyhow::Error,
    },
    /// A configuration value out of range.
    #[error("invalid setting `{name}`: {reason}")]
    Config {
        /// The setting's name (as the command-line flag).
        name: &'static str,
        /// Why it is rejected.
        reason: String,
    },
    /// Binding or serving the socket failed.
    #[error("{what}: {source}")]
    Io {
        /// The operation (and address) that failed.
        what: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The batching thread could not be started or panicked.
    #[error("batching thread: {0}")]
    Worker(String),
    /// A file given to the server could not be read.
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, ServeError>;
