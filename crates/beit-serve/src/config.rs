//! The server's settings: batching, queue and request limits.

use std::time::Duration;

use beit_data::DecodeOptions;

use crate::error::{Result, ServeError};

/// How the server batches and bounds requests.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Most images in one forward pass (also the most images one request may carry).
    pub max_batch: usize,
    /// Longest a request waits for others to join its batch.
    pub max_wait: Duration,
    /// Most requests waiting for the model; one more is answered 503 with `Retry-After`.
    pub queue_capacity: usize,
    /// Largest accepted request body, in bytes (413 above).
    pub max_body_bytes: usize,
    /// Decoding limits of every image (the decompression-bomb guard; 422 above them).
    pub decode: DecodeOptions,
    /// Longest a request may take from arrival to answer (504 after).
    pub request_timeout: Duration,
    /// Largest `top_k` a client may ask for.
    pub max_top_k: usize,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            max_batch: 16,
            max_wait: Duration::from_millis(5),
            queue_capacity: 256,
            max_body_bytes: 16 << 20,
            decode: DecodeOptions {
                max_side: 16_384,
                max_pixels: 40_000_000,
                max_alloc: 256 << 20,
            },
            request_timeout: Duration::from_secs(30),
            max_top_k: 1000,
        }
    }
}

impl ServeConfig {
    /// Reject settings that would make the server unusable.
    pub fn validate(&self) -> Result<()> {
        let bad = |name, reason: &str| ServeError::Config {
            name,
            reason: reason.to_string(),
        };
        if self.max_batch == 0 {
            return Err(bad("max-batch", "must be at least 1"));
        }
        if self.queue_capacity == 0 {
            return Err(bad("queue", "must be at least 1"));
        }
        if self.max_body_bytes == 0 {
            return Err(bad("max-body-bytes", "must be at least 1"));
        }
        if self.request_timeout.is_zero() {
            return Err(bad("timeout-ms", "must be positive"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_batch_is_rejected() {
        assert!(ServeConfig::default().validate().is_ok());
        let cfg = ServeConfig {
            max_batch: 0,
            ..ServeConfig::default()
        };
        assert!(cfg
            .validate()
            .unwrap_err()
            .to_string()
            .contains("max-batch"));
    }
}
