//! Our own discrete VAE: the DALL-E encoder/decoder design at configurable (smaller) widths,
//! vocabulary size, downsampling factor and image size, for domains where no published tokenizer
//! fits. It is stored with `dall_e`'s state-dict names, so [`crate::dalle::Encoder::load`] and
//! [`crate::dalle::Decoder::load`] read a trained dVAE exactly like OpenAI's.

use std::collections::HashMap;
use std::path::Path;

use candle::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};
use serde::{Deserialize, Serialize};

use crate::dalle::{Decoder, DecoderConfig, Encoder, EncoderConfig};
use crate::error::{Result, TokenizerError};
use crate::weights::{save_weights, META_INPUT_SIZE};

/// File name of the encoder inside an exported tokenizer folder.
pub const ENCODER_FILE: &str = "encoder.safetensors";
/// File name of the decoder inside an exported tokenizer folder.
pub const DECODER_FILE: &str = "decoder.safetensors";

/// Architecture of our dVAE. Defaults (a 112 px, 8192-code tokenizer at a quarter of DALL-E's
/// widths): `image_size = 112`, `channels = 3`, `vocab_size = 8192`, `downsample = 8`,
/// `n_hid = 64`, `n_init = 64`, `n_blk_per_group = 2`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DvaeConfig {
    /// Side length of the (square) images the tokenizer is trained on and expects.
    pub image_size: usize,
    /// Image channels (1 for grey images, 3 for RGB).
    pub channels: usize,
    /// Number of codes.
    pub vocab_size: usize,
    /// Pixels per token along each side; a power of two (`2^(groups - 1)`).
    pub downsample: usize,
    /// Width of the encoder's first group and of the decoder's last group (a multiple of 4).
    pub n_hid: usize,
    /// Channels of the decoder's first 1x1 convolution over the codes.
    pub n_init: usize,
    /// Residual blocks per group.
    pub n_blk_per_group: usize,
}

impl Default for DvaeConfig {
    fn default() -> Self {
        Self {
            image_size: 112,
            channels: 3,
            vocab_size: 8192,
            downsample: 8,
            n_hid: 64,
            n_init: 64,
            n_blk_per_group: 2,
        }
    }
}

impl DvaeConfig {
    /// Number of resolution groups: `log2(downsample) + 1`.
    pub fn group_count(&self) -> usize {
        self.downsample.trailing_zeros() as usize + 1
    }

    /// Tokens along each side of an image: `image_size / downsample`.
    pub fn tokens_per_side(&self) -> usize {
        self.image_size / self.downsample
    }

    /// The encoder's architecture.
    pub fn encoder_config(&self) -> EncoderConfig {
        EncoderConfig {
            group_count: self.group_count(),
            n_hid: self.n_hid,
            n_blk_per_group: self.n_blk_per_group,
            input_channels: self.channels,
            vocab_size: self.vocab_size,
        }
    }

    /// The decoder's architecture.
    pub fn decoder_config(&self) -> DecoderConfig {
        DecoderConfig {
            group_count: self.group_count(),
            n_init: self.n_init,
            n_hid: self.n_hid,
            n_blk_per_group: self.n_blk_per_group,
            output_channels: self.channels,
            vocab_size: self.vocab_size,
        }
    }

    /// Check every field; `context` (e.g. the config file) is named in errors.
    pub fn validate(&self, context: &str) -> Result<()> {
        let err = |field: &str, reason: String| {
            Err(TokenizerError::Config {
                context: context.into(),
                field: field.into(),
                reason,
            })
        };
        if self.downsample == 0 || !self.downsample.is_power_of_two() {
            return err(
                "downsample",
                format!("{} is not a power of two", self.downsample),
            );
        }
        if self.image_size == 0 || !self.image_size.is_multiple_of(self.downsample) {
            return err(
                "image_size",
                format!(
                    "{} is not a positive multiple of downsample ({})",
                    self.image_size, self.downsample
                ),
            );
        }
        if self.channels != 1 && self.channels != 3 {
            return err(
                "channels",
                format!("{} (only 1 or 3 are supported)", self.channels),
            );
        }
        self.encoder_config().validate(context)?;
        self.decoder_config().validate(context)
    }
}

/// A trainable dVAE: encoder and decoder whose parameters live in one [`VarMap`] under the
/// prefixes `encoder.` and `decoder.` followed by `dall_e`'s names.
pub struct Dvae {
    cfg: DvaeConfig,
    varmap: VarMap,
    /// The encoder (pixels -> logits).
    pub encoder: Encoder,
    /// The decoder (codes -> logit-Laplace parameters).
    pub decoder: Decoder,
}

impl Dvae {
    /// A freshly initialised dVAE: kernels drawn from `N(0, 1 / fan_in)` (as `dall_e` does) with a
    /// seeded RNG, biases zero.
    pub fn new(cfg: &DvaeConfig, seed: u64, device: &Device) -> Result<Self> {
        cfg.validate("dvae config")?;
        let varmap = VarMap::new();
        let dvae = Self::build(cfg, varmap, device)?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        for (name, var) in dvae.named_vars() {
            let dims = var.dims().to_vec();
            if name.ends_with(".w") {
                let fan_in: usize = dims[1..].iter().product();
                let normal = Normal::new(0f32, (1.0 / fan_in as f32).sqrt())
                    .map_err(|e| TokenizerError::Input(e.to_string()))?;
                let n: usize = dims.iter().product();
                let values: Vec<f32> = (0..n).map(|_| normal.sample(&mut rng)).collect();
                var.set(&Tensor::from_vec(values, dims, device)?)?;
            }
        }
        Ok(dvae)
    }

    fn build(cfg: &DvaeConfig, varmap: VarMap, device: &Device) -> Result<Self> {
        // `VarBuilder::get` creates missing variables with `Init::Const(0)`; `new` then fills the
        // kernels with seeded values, and `load_tensors` overwrites everything on resume.
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
        let encoder = Encoder::new(&cfg.encoder_config(), cfg.image_size, vb.pp("encoder"))?;
        let decoder = Decoder::new(&cfg.decoder_config(), vb.pp("decoder"))?;
        Ok(Self {
            cfg: cfg.clone(),
            varmap,
            encoder,
            decoder,
        })
    }

    /// The architecture.
    pub fn config(&self) -> &DvaeConfig {
        &self.cfg
    }

    /// The parameters, for an optimizer (names as [`Dvae::named_vars`]).
    pub fn varmap(&self) -> &VarMap {
        &self.varmap
    }

    /// Every trainable variable with its full name (`encoder.blocks...`, `decoder.blocks...`),
    /// sorted by name so that iteration order is deterministic.
    pub fn named_vars(&self) -> Vec<(String, Var)> {
        let data = self.varmap.data().lock().expect("VarMap mutex poisoned");
        let mut vars: Vec<(String, Var)> =
            data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        vars
    }

    /// Current values of the parameters under `prefix` (`"encoder."` or `"decoder."`), with the
    /// prefix removed: `dall_e`'s state-dict names.
    pub fn tensors(&self, prefix: &str) -> HashMap<String, Tensor> {
        self.named_vars()
            .into_iter()
            .filter_map(|(k, v)| {
                k.strip_prefix(prefix)
                    .map(|name| (name.to_string(), v.as_tensor().detach()))
            })
            .collect()
    }

    /// Overwrite the parameters from `tensors` keyed by full name (a checkpoint); `origin` names
    /// the source in errors. Every variable must be present with its shape.
    pub fn load_tensors(&self, tensors: &HashMap<String, Tensor>, origin: &Path) -> Result<()> {
        for (name, var) in self.named_vars() {
            let t = tensors
                .get(&name)
                .ok_or_else(|| TokenizerError::MissingTensor {
                    path: origin.to_path_buf(),
                    key: name.clone(),
                })?;
            if t.dims() != var.dims() {
                return Err(TokenizerError::BadTensor {
                    path: origin.to_path_buf(),
                    key: name,
                    reason: format!("expected shape {:?}, found {:?}", var.dims(), t.dims()),
                });
            }
            var.set(&t.to_dtype(DType::F32)?.to_device(var.device())?)?;
        }
        Ok(())
    }

    /// Write `encoder.safetensors` and `decoder.safetensors` into `dir` in `dall_e`'s layout, with
    /// the image size and this config in the header metadata.
    pub fn export(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| TokenizerError::io(dir, e))?;
        let mut meta = HashMap::new();
        meta.insert(META_INPUT_SIZE.to_string(), self.cfg.image_size.to_string());
        meta.insert(
            "dvae_config".to_string(),
            serde_json::to_string(&self.cfg).expect("config serialises"),
        );
        save_weights(
            &self.tensors("encoder."),
            meta.clone(),
            &dir.join(ENCODER_FILE),
        )?;
        save_weights(&self.tensors("decoder."), meta, &dir.join(DECODER_FILE))
    }
}
