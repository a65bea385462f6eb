//! The MIM section of a pre-training config: what to predict and how to mask.

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::masking::MaskingConfig;
use crate::sampler::MaskSampler;
use crate::target::MimTarget;

/// Masked-image-modeling settings, meant to be embedded in the pre-training config
/// (e.g. a `[mim]` table). Every field has the BEiT default, so an empty table is the paper's
/// recipe: visual-token targets, blockwise masking of 75 of 196 patches.
///
/// ```
/// let cfg: beit_mim::MimConfig = serde_json::from_str(
///     r#"{"target": "pixel-regression", "masking": {"input_size": [7, 7], "num_masking_patches": 20, "min_num_patches": 4}}"#,
/// ).unwrap();
/// assert_eq!(cfg.target, beit_mim::MimTarget::PixelRegression);
/// assert_eq!(cfg.masking.min_aspect, 0.3);
/// ```
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
#[serde(default, deny_unknown_fields)]
pub struct MimConfig {
    /// `visual-tokens` (default), `pixel-regression` or `all-tokens`.
    pub target: MimTarget,
    /// Mask generation (blockwise by default).
    pub masking: MaskingConfig,
}

impl MimConfig {
    /// Check the masking settings (the target needs no check).
    pub fn validate(&self) -> Result<()> {
        self.masking.validate()
    }

    /// The mask sampler these settings describe.
    pub fn sampler(&self) -> Result<Box<dyn MaskSampler>> {
        self.masking.build()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_section_is_the_paper_recipe() {
        let cfg: MimConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(cfg, MimConfig::default());
        assert_eq!(cfg.target, MimTarget::VisualTokens);
        let s = cfg.sampler().unwrap();
        assert_eq!((s.grid(), s.num_masking_patches()), ((14, 14), 75));
        let err = serde_json::from_str::<MimConfig>(r#"{"targets": "all-tokens"}"#).unwrap_err();
        assert!(err.to_string().contains("targets"), "{err}");
        let err = serde_json::from_str::<MimConfig>(r#"{"target": "pixels"}"#).unwrap_err();
        assert!(err.to_string().contains("pixels"), "{err}");
    }
}
