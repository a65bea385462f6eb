//! The serde settings of a mask sampler: which strategy, on which grid, how many patches.

use serde::{Deserialize, Serialize};

use crate::error::{invalid, Result};

/// Which mask generator to use.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum MaskStrategy {
    /// Rectangular blocks of random area and aspect ratio (BEiT's default).
    #[default]
    Blockwise,
    /// `num_masking_patches` cells drawn uniformly without replacement (Table 4 ablation
    /// "− blockwise masking").
    Random,
}

/// Mask generation settings, as found in a pre-training config.
///
/// Defaults (`MaskingConfig::default()`) are the BEiT-base recipe at 224 px with 16 px patches:
/// a 14×14 grid, 75 masked patches (≈40%), blocks of at least 16 patches, no per-block cap beyond
/// the target, aspect ratio log-uniform in [0.3, 1/0.3], blockwise.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct MaskingConfig {
    /// `blockwise` (default) or `random`.
    pub strategy: MaskStrategy,
    /// Patch grid `[height, width]` (image size / patch size). Default `[14, 14]`.
    pub input_size: [usize; 2],
    /// Masked patches aimed at per image. Default 75. Blockwise masks never exceed it and stop a
    /// little short about a third of the time, exactly like the reference.
    pub num_masking_patches: usize,
    /// Smallest block area drawn (`--min_mask_patches_per_block`). Default 16. Blockwise only.
    pub min_num_patches: usize,
    /// Largest block area drawn; `None` (default) means `num_masking_patches`. Blockwise only.
    pub max_num_patches: Option<usize>,
    /// Lower end of the log-uniform aspect-ratio range. Default 0.3. Blockwise only.
    pub min_aspect: f64,
    /// Upper end of the aspect-ratio range; `None` (default) means `1 / min_aspect`.
    pub max_aspect: Option<f64>,
}

impl Default for MaskingConfig {
    fn default() -> Self {
        Self {
            strategy: MaskStrategy::Blockwise,
            input_size: [14, 14],
            num_masking_patches: 75,
            min_num_patches: 16,
            max_num_patches: None,
            min_aspect: 0.3,
            max_aspect: None,
        }
    }
}

impl MaskingConfig {
    /// The default settings on another grid with another target (e.g. `[7, 7]`, 20).
    pub fn new(input_size: [usize; 2], num_masking_patches: usize) -> Self {
        Self {
            input_size,
            num_masking_patches,
            ..Self::default()
        }
    }

    /// Check every field; the error names the field and the value.
    pub fn validate(&self) -> Result<()> {
        let [h, w] = self.input_size;
        if h == 0 || w == 0 {
            return Err(invalid(
                "input_size",
                format!("must be positive, got {h}x{w}"),
            ));
        }
        let n = h * w;
        if self.num_masking_patches == 0 || self.num_masking_patches > n {
            return Err(invalid(
                "num_masking_patches",
                format!(
                    "must be between 1 and the {n} patches of the {h}x{w} grid, got {}",
                    self.num_masking_patches
                ),
            ));
        }
        if self.strategy == MaskStrategy::Random {
            return Ok(());
        }
        // A block side must be strictly smaller than the grid side (reference rule), so a grid
        // with a side of 1 can never receive a block.
        if h < 2 || w < 2 {
            return Err(invalid(
                "input_size",
                format!("blockwise masking needs a grid of at least 2x2, got {h}x{w}"),
            ));
        }
        if self.max_num_patches == Some(0) {
            return Err(invalid("max_num_patches", "must be at least 1, got 0"));
        }
        if !(self.min_aspect.is_finite() && self.min_aspect > 0.0) {
            return Err(invalid(
                "min_aspect",
                format!("must be a positive number, got {}", self.min_aspect),
            ));
        }
        if let Some(a) = self.max_aspect {
            if !(a.is_finite() && a > 0.0) {
                return Err(invalid(
                    "max_aspect",
                    format!("must be a positive number, got {a}"),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_serde_defaults_and_kebab_case() {
        let cfg: MaskingConfig = serde_json::from_str(r#"{"strategy": "random"}"#).unwrap();
        assert_eq!(cfg.strategy, MaskStrategy::Random);
        assert_eq!(cfg.num_masking_patches, 75);
        assert_eq!(cfg.min_num_patches, 16);
        assert_eq!(cfg.input_size, [14, 14]);
        let err = serde_json::from_str::<MaskingConfig>(r#"{"num_mask": 3}"#).unwrap_err();
        assert!(err.to_string().contains("num_mask"), "{err}");
    }
}
