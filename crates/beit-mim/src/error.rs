//! The error type of this crate.

/// Everything that can go wrong while building a mask sampler or computing a MIM loss.
#[derive(Debug, thiserror::Error)]
pub enum MimError {
    /// A masking or loss configuration field has an unusable value.
    #[error("invalid masking config: `{field}` {reason}")]
    InvalidConfig {
        /// The offending field, as spelled in the serde config.
        field: &'static str,
        /// Why it was rejected, including the value.
        reason: String,
    },
    /// A tensor handed to a loss helper does not have the expected shape or dtype.
    #[error("{what}: {reason}")]
    BadInput {
        /// Which argument (e.g. `features`, `mask`, `labels`).
        what: &'static str,
        /// What was expected and what was found.
        reason: String,
    },
    /// The batch has no masked position, so a masked-only loss would be a 0/0.
    #[error("the mask selects no position: a masked-only MIM loss is undefined for this batch")]
    NoMaskedPositions,
    /// The selected training target needs an input the caller did not provide.
    #[error("MIM target `{target}` needs {needed}")]
    MissingInput {
        /// The target (kebab-case, as in the config).
        target: &'static str,
        /// What is missing.
        needed: &'static str,
    },
    /// The loss became NaN or infinite; training must stop and keep the last good checkpoint.
    #[error("non-finite loss {value} at step {step}: stopping (the last good checkpoint is kept)")]
    NonFiniteLoss {
        /// The optimisation step at which it happened.
        step: u64,
        /// The loss value (NaN or ±inf).
        value: f32,
    },
    /// An error raised by candle.
    #[error(transparent)]
    Candle(#[from] candle::Error),
}

/// Shorthand for results of this crate.
pub type Result<T> = std::result::Result<T, MimError>;

pub(crate) fn bad_input(what: &'static str, reason: impl Into<String>) -> MimError {
    MimError::BadInput {
        what,
        reason: reason.into(),
    }
}

pub(crate) fn invalid(field: &'static str, reason: impl Into<String>) -> MimError {
    MimError::InvalidConfig {
        field,
        reason: reason.into(),
    }
}
