//! The DALL-E dVAE encoder: pixels -> logits over the visual vocabulary.

use std::path::Path;

use candle::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use crate::blocks::{conv_params, Conv, ResBlock};
use crate::error::{Result, TokenizerError};
use crate::weights::WeightsFile;
use crate::VisualTokenizer;

/// Kernel sizes of the four convolutions of an encoder block's residual path.
const ENCODER_KERNELS: [usize; 4] = [3, 3, 3, 1];

/// Architecture of a DALL-E-style encoder. The defaults are OpenAI's published encoder
/// (53.8M parameters, 8192 codes, 8x downsampling).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EncoderConfig {
    /// Number of resolution groups; each but the last ends in a 2x2 max-pool, so the
    /// downsampling factor is `2^(group_count - 1)`. Default 4.
    pub group_count: usize,
    /// Width of the first group; group `g` (0-based) is `n_hid * 2^g` wide. Default 256.
    pub n_hid: usize,
    /// Residual blocks per group. Default 2.
    pub n_blk_per_group: usize,
    /// Image channels. Default 3.
    pub input_channels: usize,
    /// Number of codes. Default 8192.
    pub vocab_size: usize,
}

impl Default for EncoderConfig {
    fn default() -> Self {
        Self {
            group_count: 4,
            n_hid: 256,
            n_blk_per_group: 2,
            input_channels: 3,
            vocab_size: 8192,
        }
    }
}

impl EncoderConfig {
    /// Spatial downsampling factor, `2^(group_count - 1)`.
    pub fn downsample(&self) -> usize {
        1 << (self.group_count - 1)
    }

    /// Check the fields; `context` names the source in errors.
    pub fn validate(&self, context: &str) -> Result<()> {
        super::validate_common(
            context,
            self.group_count,
            self.n_hid,
            self.n_blk_per_group,
            self.vocab_size,
        )?;
        if self.input_channels == 0 {
            return Err(TokenizerError::Config {
                context: context.into(),
                field: "input_channels".into(),
                reason: "must be at least 1".into(),
            });
        }
        Ok(())
    }

    /// (input width, output width) of block `i` of group `g` (both 0-based).
    fn block_widths(&self, g: usize, i: usize) -> (usize, usize) {
        let width = self.n_hid << g;
        let n_in = match (g, i) {
            (0, 0) => self.n_hid,
            (_, 0) => self.n_hid << (g - 1),
            _ => width,
        };
        (n_in, width)
    }

    /// Every parameter's `dall_e` state-dict name and shape.
    pub fn param_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let mut out = conv_params("blocks.input", self.input_channels, self.n_hid, 7);
        for g in 0..self.group_count {
            for i in 0..self.n_blk_per_group {
                let (n_in, n_out) = self.block_widths(g, i);
                let prefix = format!("blocks.group_{}.block_{}", g + 1, i + 1);
                out.extend(ResBlock::params(&prefix, n_in, n_out, ENCODER_KERNELS));
            }
        }
        let top = self.n_hid << (self.group_count - 1);
        out.extend(conv_params("blocks.output.conv", top, self.vocab_size, 1));
        out
    }

    /// Total number of parameters.
    pub fn num_params(&self) -> usize {
        super::count_params(&self.param_shapes())
    }

    /// Read the architecture off the tensor names and shapes of a weights file.
    pub fn infer(weights: &WeightsFile) -> Result<Self> {
        let (group_count, n_blk_per_group) = super::infer_layout(weights)?;
        let input = weights.dims("blocks.input.w")?;
        let output = weights.dims("blocks.output.conv.w")?;
        let bad = |key: &str, reason: String| TokenizerError::BadTensor {
            path: weights.path.clone(),
            key: key.into(),
            reason,
        };
        if input.len() != 4 || output.len() != 4 {
            return Err(bad(
                "blocks.input.w",
                "convolution kernels must be 4-d".into(),
            ));
        }
        let cfg = Self {
            group_count,
            n_hid: input[0],
            n_blk_per_group,
            input_channels: input[1],
            vocab_size: output[0],
        };
        cfg.validate(&weights.path.display().to_string())?;
        weights.check(&cfg.param_shapes())?;
        Ok(cfg)
    }
}

/// The DALL-E encoder: 7x7 input convolution, `group_count` groups of residual blocks with a
/// max-pool between groups, then ReLU and a 1x1 convolution to `vocab_size` logits.
#[derive(Debug, Clone)]
pub struct Encoder {
    cfg: EncoderConfig,
    input: Conv,
    groups: Vec<Vec<ResBlock>>,
    output: Conv,
    input_size: usize,
}

impl Encoder {
    /// Build from a `VarBuilder` whose names are `dall_e`'s (`blocks.input.w`, ...). `input_size`
    /// is the image side length the encoder expects (112 for DALL-E in BEiT).
    pub fn new(cfg: &EncoderConfig, input_size: usize, vb: VarBuilder) -> Result<Self> {
        cfg.validate("encoder config")?;
        let n_layers = cfg.group_count * cfg.n_blk_per_group;
        let vb = vb.pp("blocks");
        let input = Conv::new(cfg.input_channels, cfg.n_hid, 7, vb.pp("input"))?;
        let mut groups = Vec::with_capacity(cfg.group_count);
        for g in 0..cfg.group_count {
            let gvb = vb.pp(format!("group_{}", g + 1));
            let mut blocks = Vec::with_capacity(cfg.n_blk_per_group);
            for i in 0..cfg.n_blk_per_group {
                let (n_in, n_out) = cfg.block_widths(g, i);
                blocks.push(ResBlock::new(
                    n_in,
                    n_out,
                    ENCODER_KERNELS,
                    n_layers,
                    gvb.pp(format!("block_{}", i + 1)),
                )?);
            }
            groups.push(blocks);
        }
        let top = cfg.n_hid << (cfg.group_count - 1);
        let output = Conv::new(top, cfg.vocab_size, 1, vb.pp("output").pp("conv"))?;
        Ok(Self {
            cfg: cfg.clone(),
            input,
            groups,
            output,
            input_size,
        })
    }

    /// Load a safetensors file with `dall_e` names; the architecture is inferred from the
    /// shapes, the input size from the `input_size` metadata (default 112, as in BEiT).
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let weights = WeightsFile::read(path, device)?;
        Self::from_weights(&weights)
    }

    /// Build from tensors already read (see [`Encoder::load`]).
    pub fn from_weights(weights: &WeightsFile) -> Result<Self> {
        let cfg = EncoderConfig::infer(weights)?;
        let input_size = weights.input_size()?.unwrap_or(112);
        let device = weights
            .tensors
            .values()
            .next()
            .map(|t| t.device().clone())
            .unwrap_or(Device::Cpu);
        let tensors = weights
            .tensors
            .iter()
            .map(|(k, v)| Ok((k.clone(), v.to_dtype(DType::F32)?)))
            .collect::<candle::Result<_>>()?;
        let vb = VarBuilder::from_tensors(tensors, DType::F32, &device);
        Self::new(&cfg, input_size, vb)
    }

    /// The architecture.
    pub fn config(&self) -> &EncoderConfig {
        &self.cfg
    }

    /// Logits `(B, vocab, H/d, W/d)` for mapped pixels `(B, C, H, W)` (see
    /// [`crate::pixels::map_pixels`]); H and W must be multiples of the downsampling factor d.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (_, c, h, w) = x.dims4().map_err(|_| {
            TokenizerError::Input(format!(
                "encoder input must be (B, C, H, W), got {:?}",
                x.dims()
            ))
        })?;
        let d = self.cfg.downsample();
        if c != self.cfg.input_channels || h % d != 0 || w % d != 0 {
            return Err(TokenizerError::Input(format!(
                "encoder wants (B, {}, H, W) with H and W multiples of {d}, got {:?}",
                self.cfg.input_channels,
                x.dims()
            )));
        }
        let mut h = self.input.forward(&x.to_dtype(DType::F32)?)?;
        for (g, blocks) in self.groups.iter().enumerate() {
            for block in blocks {
                h = block.forward(&h)?;
            }
            if g + 1 < self.groups.len() {
                h = h.max_pool2d(2)?;
            }
        }
        Ok(self.output.forward(&h.relu()?)?)
    }
}

impl VisualTokenizer for Encoder {
    fn tokenize(&self, pixels_mapped: &Tensor) -> Result<Tensor> {
        Ok(self.forward(pixels_mapped)?.argmax(1)?)
    }

    fn vocab_size(&self) -> usize {
        self.cfg.vocab_size
    }

    fn input_size(&self) -> usize {
        self.input_size
    }

    fn downsample(&self) -> usize {
        self.cfg.downsample()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_size_parameter_count_matches_dall_e() {
        // 53,786,240 parameters and 74 tensors, as printed by scripts/fixtures/tokenizer_fixtures.py --full.
        let cfg = EncoderConfig::default();
        assert_eq!(cfg.num_params(), 53_786_240);
        assert_eq!(cfg.param_shapes().len(), 74);
        assert_eq!(cfg.downsample(), 8);
    }

    #[test]
    fn rejects_bad_config() {
        let cfg = EncoderConfig {
            n_hid: 10,
            ..Default::default()
        };
        let err = cfg.validate("test.toml").unwrap_err().to_string();
        assert!(err.contains("n_hid"), "{err}");
    }
}
