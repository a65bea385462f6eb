//! The DALL-E dVAE decoder: codes -> pixel distribution parameters.

use std::path::Path;

use candle::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use crate::blocks::{conv_params, Conv, ResBlock};
use crate::error::{Result, TokenizerError};
use crate::pixels::unmap_pixels;
use crate::weights::WeightsFile;

/// Kernel sizes of the four convolutions of a decoder block's residual path.
const DECODER_KERNELS: [usize; 4] = [1, 3, 3, 3];

/// Architecture of a DALL-E-style decoder. The defaults are OpenAI's published decoder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DecoderConfig {
    /// Number of resolution groups; each but the last ends in a nearest 2x upsampling. Default 4.
    pub group_count: usize,
    /// Channels of the 1x1 convolution applied to the one-hot codes. Default 128.
    pub n_init: usize,
    /// Width of the last group; group `g` (0-based) is `n_hid * 2^(group_count - 1 - g)` wide.
    /// Default 256.
    pub n_hid: usize,
    /// Residual blocks per group. Default 2.
    pub n_blk_per_group: usize,
    /// Image channels; the decoder outputs twice as many maps (mean and log-scale). Default 3.
    pub output_channels: usize,
    /// Number of codes. Default 8192.
    pub vocab_size: usize,
}

impl Default for DecoderConfig {
    fn default() -> Self {
        Self {
            group_count: 4,
            n_init: 128,
            n_hid: 256,
            n_blk_per_group: 2,
            output_channels: 3,
            vocab_size: 8192,
        }
    }
}

impl DecoderConfig {
    /// Spatial upsampling factor, `2^(group_count - 1)`.
    pub fn upsample(&self) -> usize {
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
        for (field, v) in [
            ("n_init", self.n_init),
            ("output_channels", self.output_channels),
        ] {
            if v == 0 {
                return Err(TokenizerError::Config {
                    context: context.into(),
                    field: field.into(),
                    reason: "must be at least 1".into(),
                });
            }
        }
        Ok(())
    }

    /// (input width, output width) of block `i` of group `g` (both 0-based).
    fn block_widths(&self, g: usize, i: usize) -> (usize, usize) {
        let top = self.group_count - 1;
        let width = self.n_hid << (top - g);
        let n_in = match (g, i) {
            (0, 0) => self.n_init,
            (_, 0) => self.n_hid << (top - g + 1),
            _ => width,
        };
        (n_in, width)
    }

    /// Every parameter's `dall_e` state-dict name and shape.
    pub fn param_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let mut out = conv_params("blocks.input", self.vocab_size, self.n_init, 1);
        for g in 0..self.group_count {
            for i in 0..self.n_blk_per_group {
                let (n_in, n_out) = self.block_widths(g, i);
                let prefix = format!("blocks.group_{}.block_{}", g + 1, i + 1);
                out.extend(ResBlock::params(&prefix, n_in, n_out, DECODER_KERNELS));
            }
        }
        out.extend(conv_params(
            "blocks.output.conv",
            self.n_hid,
            2 * self.output_channels,
            1,
        ));
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
        if input.len() != 4 || output.len() != 4 || output[0] % 2 != 0 {
            return Err(TokenizerError::BadTensor {
                path: weights.path.clone(),
                key: "blocks.output.conv.w".into(),
                reason: format!(
                    "expected 4-d kernels and an even number of output maps, found {output:?}"
                ),
            });
        }
        let cfg = Self {
            group_count,
            n_init: input[0],
            n_hid: output[1],
            n_blk_per_group,
            output_channels: output[0] / 2,
            vocab_size: input[1],
        };
        cfg.validate(&weights.path.display().to_string())?;
        weights.check(&cfg.param_shapes())?;
        Ok(cfg)
    }
}

/// The DALL-E decoder: 1x1 convolution of the codes to `n_init` channels, `group_count` groups of
/// residual blocks with nearest 2x upsampling between groups, then ReLU and a 1x1 convolution to
/// `2 * output_channels` maps: logit-space means, then log-scales.
#[derive(Debug, Clone)]
pub struct Decoder {
    cfg: DecoderConfig,
    input: Conv,
    groups: Vec<Vec<ResBlock>>,
    output: Conv,
}

impl Decoder {
    /// Build from a `VarBuilder` whose names are `dall_e`'s.
    pub fn new(cfg: &DecoderConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate("decoder config")?;
        let n_layers = cfg.group_count * cfg.n_blk_per_group;
        let vb = vb.pp("blocks");
        let input = Conv::new(cfg.vocab_size, cfg.n_init, 1, vb.pp("input"))?;
        let mut groups = Vec::with_capacity(cfg.group_count);
        for g in 0..cfg.group_count {
            let gvb = vb.pp(format!("group_{}", g + 1));
            let mut blocks = Vec::with_capacity(cfg.n_blk_per_group);
            for i in 0..cfg.n_blk_per_group {
                let (n_in, n_out) = cfg.block_widths(g, i);
                blocks.push(ResBlock::new(
                    n_in,
                    n_out,
                    DECODER_KERNELS,
                    n_layers,
                    gvb.pp(format!("block_{}", i + 1)),
                )?);
            }
            groups.push(blocks);
        }
        let output = Conv::new(
            cfg.n_hid,
            2 * cfg.output_channels,
            1,
            vb.pp("output").pp("conv"),
        )?;
        Ok(Self {
            cfg: cfg.clone(),
            input,
            groups,
            output,
        })
    }

    /// Load a safetensors file with `dall_e` names; the architecture is inferred from the shapes.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let weights = WeightsFile::read(path, device)?;
        Self::from_weights(&weights)
    }

    /// Build from tensors already read (see [`Decoder::load`]).
    pub fn from_weights(weights: &WeightsFile) -> Result<Self> {
        let cfg = DecoderConfig::infer(weights)?;
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
        Self::new(&cfg, VarBuilder::from_tensors(tensors, DType::F32, &device))
    }

    /// The architecture.
    pub fn config(&self) -> &DecoderConfig {
        &self.cfg
    }

    /// Decoder output `(B, 2C, h*u, w*u)` for code maps `(B, vocab, h, w)`: one-hot codes, or a
    /// relaxed (Gumbel-softmax) sample during training.
    pub fn forward(&self, z: &Tensor) -> Result<Tensor> {
        let (_, v, _, _) = z.dims4().map_err(|_| {
            TokenizerError::Input(format!(
                "decoder input must be (B, vocab, h, w), got {:?}",
                z.dims()
            ))
        })?;
        if v != self.cfg.vocab_size {
            return Err(TokenizerError::Input(format!(
                "decoder input has {v} channels, the vocabulary has {}",
                self.cfg.vocab_size
            )));
        }
        let h = self.input.forward(&z.to_dtype(DType::F32)?)?;
        self.trunk(h)
    }

    /// [`Decoder::forward`] for code maps laid out channels-last, `(B, h, w, vocab)`, as the
    /// Gumbel-softmax samples are (the softmax runs over the last, contiguous dimension).
    pub fn forward_channels_last(&self, z: &Tensor) -> Result<Tensor> {
        let (b, h, w, v) = z.dims4().map_err(|_| {
            TokenizerError::Input(format!(
                "decoder input must be (B, h, w, vocab), got {:?}",
                z.dims()
            ))
        })?;
        if v != self.cfg.vocab_size {
            return Err(TokenizerError::Input(format!(
                "decoder input has {v} codes, the vocabulary has {}",
                self.cfg.vocab_size
            )));
        }
        let n_init = self.cfg.n_init;
        let wt = self.input.weight().reshape((n_init, v))?.t()?;
        let x = z
            .reshape((b * h * w, v))?
            .matmul(&wt)?
            .broadcast_add(self.input.bias())?
            .reshape((b, h, w, n_init))?
            .permute((0, 3, 1, 2))?;
        self.trunk(x)
    }

    /// Decoder output for integer code ids `(B, h, w)`. Equal to [`Decoder::forward`] on their
    /// one-hot encoding, but the first 1x1 convolution becomes a column lookup.
    pub fn forward_ids(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, h, w) = ids.dims3().map_err(|_| {
            TokenizerError::Input(format!("code ids must be (B, h, w), got {:?}", ids.dims()))
        })?;
        let ids = ids.to_dtype(DType::U32)?.flatten_all()?;
        let max = ids.max(0)?.to_scalar::<u32>()? as usize;
        if max >= self.cfg.vocab_size {
            return Err(TokenizerError::Input(format!(
                "code id {max} is outside the vocabulary of {}",
                self.cfg.vocab_size
            )));
        }
        let n_init = self.cfg.n_init;
        let table = self
            .input
            .weight()
            .reshape((n_init, self.cfg.vocab_size))?
            .t()?
            .contiguous()?;
        let x = table
            .index_select(&ids, 0)?
            .broadcast_add(self.input.bias())?
            .reshape((b, h, w, n_init))?
            .permute((0, 3, 1, 2))?
            .contiguous()?;
        self.trunk(x)
    }

    fn trunk(&self, mut h: Tensor) -> Result<Tensor> {
        for (g, blocks) in self.groups.iter().enumerate() {
            for block in blocks {
                h = block.forward(&h)?;
            }
            if g + 1 < self.groups.len() {
                h = beit_kernels::upsample2x(&h)?;
            }
        }
        Ok(self.output.forward(&h.relu()?)?)
    }

    /// Images in `[0, 1]` `(B, C, H, W)` from code ids: `unmap_pixels(sigmoid(means))`.
    pub fn reconstruct(&self, ids: &Tensor) -> Result<Tensor> {
        let out = self.forward_ids(ids)?;
        let c = self.cfg.output_channels;
        Ok(unmap_pixels(&candle_nn::ops::sigmoid(
            &out.narrow(1, 0, c)?,
        )?)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_size_shapes() {
        let cfg = DecoderConfig::default();
        let shapes = cfg.param_shapes();
        assert_eq!(
            shapes[0],
            ("blocks.input.w".to_string(), vec![128, 8192, 1, 1])
        );
        let last = shapes.last().unwrap();
        assert_eq!(last, &("blocks.output.conv.b".to_string(), vec![6]));
        assert_eq!(cfg.upsample(), 8);
    }
}
