//! [`DecodeOptions`]: the limits every decoder (the `image` crate, libjpeg) works under.

use serde::{Deserialize, Serialize};

/// Limits applied while decoding, so that a huge or malicious file cannot exhaust memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DecodeOptions {
    /// Largest accepted width or height, in pixels.
    pub max_side: u32,
    /// Largest accepted number of pixels (Pillow refuses above ~179 MP by default; we use the same
    /// bound).
    pub max_pixels: u64,
    /// Largest allocation the decoder may make, in bytes.
    pub max_alloc: u64,
}

impl Default for DecodeOptions {
    fn default() -> Self {
        DecodeOptions {
            max_side: 65_535,
            max_pixels: 178_956_970,
            max_alloc: 1 << 30,
        }
    }
}
