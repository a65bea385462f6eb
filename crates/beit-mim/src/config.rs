//! The `[masking]` table of a pre-training recipe: the mask sampler, with counts that default to
//! the paper's proportions on any patch grid, and [`MaskingConfig::build`], which makes the sampler.

use serde::{Deserialize, Serialize};

use crate::error::{MimError, Result};
use crate::masking::MaskingGenerator;
use crate::masking_config::{MaskStrategy, MaskingConfig};
use crate::random_masking::RandomMasking;
use crate::sampler::MaskSampler;

/// How to mask, independent of the grid: counts default to the paper's proportions (75 of 196
/// patches, blocks of at least 16 of 196), scaled to the model's patch grid by
/// [`MaskingSpec::on_grid`].
///
/// ```
/// let spec: beit_mim::MaskingSpec = serde_json::from_str(r#"{"strategy": "random"}"#).unwrap();
/// let cfg = spec.on_grid(7).unwrap();
/// assert_eq!((cfg.num_masking_patches, cfg.min_num_patches), (20, 4));
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MaskingSpec {
    /// `blockwise` (BEiT) or `random` (Table 4 ablation).
    pub strategy: MaskStrategy,
    /// Masked patches per image; default `round(mask_ratio x N)`.
    pub num_masking_patches: Option<usize>,
    /// Fraction masked when `num_masking_patches` is not given (0.4).
    pub mask_ratio: f64,
    /// Smallest block; default 16 at 196 patches, scaled with the grid (4 at 7x7).
    pub min_num_patches: Option<usize>,
    /// Largest block (default: the target).
    pub max_num_patches: Option<usize>,
    /// Smallest aspect ratio of a block (0.3).
    pub min_aspect: f64,
    /// Largest aspect ratio (default `1 / min_aspect`).
    pub max_aspect: Option<f64>,
}

impl Default for MaskingSpec {
    fn default() -> Self {
        Self {
            strategy: MaskStrategy::Blockwise,
            num_masking_patches: None,
            mask_ratio: 0.4,
            min_num_patches: None,
            max_num_patches: None,
            min_aspect: 0.3,
            max_aspect: None,
        }
    }
}

impl MaskingSpec {
    /// The sampler settings on a `grid` x `grid` patch grid (checked).
    pub fn on_grid(&self, grid: usize) -> Result<MaskingConfig> {
        let n = grid * grid;
        if !(self.mask_ratio > 0.0 && self.mask_ratio < 1.0) {
            return Err(MimError::InvalidConfig {
                field: "mask_ratio",
                reason: format!("must be in (0, 1), got {}", self.mask_ratio),
            });
        }
        let target = self
            .num_masking_patches
            .unwrap_or_else(|| ((self.mask_ratio * n as f64).round() as usize).max(1));
        // unilm's 16 of 196 patches, in proportion to the grid.
        let min_block = self
            .min_num_patches
            .unwrap_or_else(|| ((16.0 * n as f64 / 196.0).round() as usize).max(1));
        let cfg = MaskingConfig {
            strategy: self.strategy,
            input_size: [grid, grid],
            num_masking_patches: target,
            min_num_patches: min_block,
            max_num_patches: self.max_num_patches,
            min_aspect: self.min_aspect,
            max_aspect: self.max_aspect,
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

impl MaskingConfig {
    /// Validate and build the selected sampler.
    pub fn build(&self) -> Result<Box<dyn MaskSampler>> {
        Ok(match self.strategy {
            MaskStrategy::Blockwise => Box::new(MaskingGenerator::new(self)?),
            MaskStrategy::Random => Box::new(RandomMasking::new(self)?),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_scale_with_the_grid_and_typos_are_refused() {
        let m = MaskingSpec::default();
        let c = m.on_grid(7).unwrap();
        assert_eq!((c.num_masking_patches, c.min_num_patches), (20, 4));
        let c = m.on_grid(14).unwrap();
        assert_eq!((c.num_masking_patches, c.min_num_patches), (78, 16));
        let bad = MaskingSpec {
            mask_ratio: 1.5,
            ..MaskingSpec::default()
        };
        assert!(bad
            .on_grid(14)
            .unwrap_err()
            .to_string()
            .contains("mask_ratio"));
        let err = serde_json::from_str::<MaskingSpec>(r#"{"strategi": "random"}"#).unwrap_err();
        assert!(err.to_string().contains("strategi"), "{err}");
    }
}
