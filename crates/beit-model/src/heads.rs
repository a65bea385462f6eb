//! Task heads: image classification and masked image modeling.

use candle::{Device, Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::config::BeitConfig;
use crate::layers::{linear, LayerNorm, Linear};
use crate::model::{BeitModel, BeitOutput, ForwardOptions};
use beit_kernels::QueryRows;

/// `BeitForImageClassification`: pooled features -> `classifier` Linear.
#[derive(Debug)]
pub struct BeitForImageClassification {
    beit: BeitModel,
    classifier: Linear,
}

/// Output of the classifier.
#[derive(Debug, Clone)]
pub struct ClassifierOutput {
    /// `(B, num_labels)`.
    pub logits: Tensor,
    /// The backbone's outputs (hidden states and attentions when asked). From
    /// [`BeitForMaskedImageModeling::forward_masked`] without them, `last_hidden_state` holds the
    /// masked rows only, `(M, C)`.
    pub backbone: BeitOutput,
}

impl BeitForImageClassification {
    /// Build with `beit.*` and `classifier.*` under `vb`.
    pub fn new(cfg: &BeitConfig, vb: VarBuilder) -> Result<Self> {
        let beit = BeitModel::new(cfg, vb.pp("beit"), true)?;
        let classifier = linear(cfg.hidden_size, cfg.num_labels(), true, vb.pp("classifier"))?;
        Ok(Self { beit, classifier })
    }

    /// The backbone.
    pub fn backbone(&self) -> &BeitModel {
        &self.beit
    }

    /// Logits `(B, num_labels)` for `pixels` `(B, C, H, W)`.
    pub fn forward(&self, pixels: &Tensor, opts: ForwardOptions) -> Result<ClassifierOutput> {
        let backbone = self.beit.forward(pixels, None, opts)?;
        let pooled = backbone
            .pooler_output
            .as_ref()
            .expect("classifier backbone has a pooler");
        let logits = self.classifier.forward(pooled)?;
        Ok(ClassifierOutput { logits, backbone })
    }
}

/// `BeitForMaskedImageModeling`: final `layernorm` + `lm_head` over the visual-token vocabulary.
#[derive(Debug)]
pub struct BeitForMaskedImageModeling {
    beit: BeitModel,
    layernorm: LayerNorm,
    lm_head: Linear,
}

/// Output of the MIM model.
#[derive(Debug, Clone)]
pub struct MimOutput {
    /// `(B, N, vocab)` for every patch, or `(M, vocab)` for the M masked patches only.
    pub logits: Tensor,
    /// The backbone's outputs (hidden states and attentions when asked). From
    /// [`BeitForMaskedImageModeling::forward_masked`] without them, `last_hidden_state` holds the
    /// masked rows only, `(M, C)`.
    pub backbone: BeitOutput,
}

impl BeitForMaskedImageModeling {
    /// Build with `beit.*`, `layernorm.*` and `lm_head.*` under `vb`.
    pub fn new(cfg: &BeitConfig, vb: VarBuilder) -> Result<Self> {
        let beit = BeitModel::new(cfg, vb.pp("beit"), false)?;
        let layernorm = LayerNorm::new(cfg.hidden_size, cfg.layer_norm_eps, vb.pp("layernorm"))?;
        let lm_head = linear(cfg.hidden_size, cfg.vocab_size, true, vb.pp("lm_head"))?;
        Ok(Self {
            beit,
            layernorm,
            lm_head,
        })
    }

    /// The backbone.
    pub fn backbone(&self) -> &BeitModel {
        &self.beit
    }

    /// Patch features `(B, N, C)` after the final LayerNorm (CLS dropped), before `lm_head`.
    pub fn features(
        &self,
        pixels: &Tensor,
        bool_masked_pos: Option<&Tensor>,
        opts: ForwardOptions,
    ) -> Result<(Tensor, BeitOutput)> {
        let backbone = self.beit.forward(pixels, bool_masked_pos, opts)?;
        let seq = self.layernorm.forward(&backbone.last_hidden_state)?;
        let n = seq.dim(1)? - 1;
        Ok((seq.narrow(1, 1, n)?, backbone))
    }

    /// Apply `lm_head` to features `(..., C)`.
    pub fn lm_logits(&self, features: &Tensor) -> Result<Tensor> {
        self.lm_head.forward(features)
    }

    /// Logits `(B, N, vocab)` for every patch, as `transformers` returns them.
    pub fn forward(
        &self,
        pixels: &Tensor,
        bool_masked_pos: Option<&Tensor>,
        opts: ForwardOptions,
    ) -> Result<MimOutput> {
        let (features, backbone) = self.features(pixels, bool_masked_pos, opts)?;
        let logits = self.lm_logits(&features)?;
        Ok(MimOutput { logits, backbone })
    }

    /// Logits `(M, vocab)` of the masked patches only, in row-major (batch, patch) order: the
    /// efficient form for the MIM loss (`lm_head` on ~40% of the tokens).
    pub fn forward_masked(
        &self,
        pixels: &Tensor,
        bool_masked_pos: &Tensor,
        opts: ForwardOptions,
    ) -> Result<MimOutput> {
        if opts.output_hidden_states || opts.output_attentions {
            let (features, backbone) = self.features(pixels, Some(bool_masked_pos), opts)?;
            let rows = masked_rows(&features, bool_masked_pos)?;
            return Ok(MimOutput {
                logits: self.lm_logits(&rows)?,
                backbone,
            });
        }
        // Only the masked patches reach the loss: the last block, the final LayerNorm and
        // `lm_head` run on those rows alone (token j + 1 is patch j, after the CLS token).
        let queries = masked_queries(bool_masked_pos)?;
        let hidden = self
            .beit
            .forward_rows(pixels, Some(bool_masked_pos), opts, &queries)?;
        let logits = self.lm_logits(&self.layernorm.forward(&hidden)?)?;
        Ok(MimOutput {
            logits,
            backbone: BeitOutput {
                last_hidden_state: hidden,
                pooler_output: None,
                hidden_states: Vec::new(),
                attentions: Vec::new(),
            },
        })
    }
}

/// The token rows (patch index + 1, after the CLS token) of the masked patches of each image.
fn masked_queries(mask: &Tensor) -> Result<QueryRows> {
    masked_patches(mask, 1)
}

/// The masked positions of each image of a `(B, N)` mask (non-zero = masked), plus `offset`.
fn masked_patches(mask: &Tensor, offset: u32) -> Result<QueryRows> {
    let (b, n) = mask.dims2()?;
    let flags = mask.ne(0u32)?.flatten_all()?.to_vec1::<u8>()?;
    let per_image: Vec<Vec<u32>> = (0..b)
        .map(|i| {
            (0..n)
                .filter(|&j| flags[i * n + j] != 0)
                .map(|j| j as u32 + offset)
                .collect()
        })
        .collect();
    QueryRows::new(&per_image)
}

/// Rows of `x` `(B, N, C)` where `mask` `(B, N)` is non-zero, as `(M, C)` (gradients flow to `x`).
pub fn masked_rows(x: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let (b, n, c) = x.dims3()?;
    if mask.elem_count() != b * n {
        candle::bail!("mask has {} entries, expected {}", mask.elem_count(), b * n);
    }
    let idx = masked_patches(&mask.reshape((b, n))?, 0)?.flat_indices(n);
    let m = idx.len();
    let idx = Tensor::from_vec(idx, m, &Device::Cpu)?.to_device(x.device())?;
    x.reshape((b * n, c))?.index_select(&idx, 0)
}
