//! Task heads: image classification and masked image modeling.

use candle::{Module, Result, Tensor};
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
    /// efficient form for the MIM loss (`lm_head` on ~40% of the tokens). Reads the mask back to
    /// find the masked patches; a training step that knows them on the host calls
    /// [`Self::forward_masked_rows`] instead.
    pub fn forward_masked(
        &self,
        pixels: &Tensor,
        bool_masked_pos: &Tensor,
        opts: ForwardOptions,
    ) -> Result<MimOutput> {
        let queries = masked_queries(bool_masked_pos)?;
        self.forward_masked_rows(pixels, bool_masked_pos, &queries, opts)
    }

    /// [`Self::forward_masked`] with the masked patches given on the host, so nothing is read
    /// back from the device: `queries` holds, per image, the token rows (patch index + 1, after
    /// the CLS token) of the patches that `bool_masked_pos` masks, increasing.
    pub fn forward_masked_rows(
        &self,
        pixels: &Tensor,
        bool_masked_pos: &Tensor,
        queries: &QueryRows,
        opts: ForwardOptions,
    ) -> Result<MimOutput> {
        if opts.output_hidden_states || opts.output_attentions {
            let (features, backbone) = self.features(pixels, Some(bool_masked_pos), opts)?;
            let rows = patch_rows(&features, queries)?;
            return Ok(MimOutput {
                logits: self.lm_logits(&rows)?,
                backbone,
            });
        }
        // Only the masked patches reach the loss: the last block, the final LayerNorm and
        // `lm_head` run on those rows alone (token j + 1 is patch j, after the CLS token).
        let hidden = self
            .beit
            .forward_rows(pixels, Some(bool_masked_pos), opts, queries)?;
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

/// Rows of patch features `(B, N, C)` at the token rows `queries` (patch index + 1), as `(M, C)`.
fn patch_rows(features: &Tensor, queries: &QueryRows) -> Result<Tensor> {
    let (b, n, _) = features.dims3()?;
    if queries.batch() != b
        || (0..b).any(|i| queries.of(i).iter().any(|&r| r == 0 || r as usize > n))
    {
        candle::bail!(
            "query rows for {} images do not fit {b} x {n} patches",
            queries.batch()
        );
    }
    // Token row r is patch r - 1 (after the CLS token).
    let idx = queries.flat_indices(n).into_iter().map(|i| i - 1).collect();
    rows_at(features, idx)
}

/// Rows `idx` of `x` `(B, N, C)` seen as `(B*N, C)`, as `(M, C)` (gradients flow to `x`).
fn rows_at(x: &Tensor, idx: Vec<u32>) -> Result<Tensor> {
    let (b, n, c) = x.dims3()?;
    let m = idx.len();
    let idx = Tensor::from_vec(idx, m, x.device())?;
    x.reshape((b * n, c))?.index_select(&idx, 0)
}

/// The token rows (patch index + 1, after the CLS token) of the masked patches of each image.
fn masked_queries(mask: &Tensor) -> Result<QueryRows> {
    masked_patches(mask, 1)
}

thread_local! {
    static MASK_READS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// How many times this thread has read a mask back from the device to find the masked patches
/// ([`BeitForMaskedImageModeling::forward_masked`], [`masked_rows`]). A training step passes
/// them from the host ([`BeitForMaskedImageModeling::forward_masked_rows`]); tests pin this
/// count to show that it reads nothing.
pub fn mask_reads() -> u64 {
    MASK_READS.with(std::cell::Cell::get)
}

/// The masked positions of each image of a `(B, N)` mask (non-zero = masked), plus `offset`.
fn masked_patches(mask: &Tensor, offset: u32) -> Result<QueryRows> {
    let (b, n) = mask.dims2()?;
    MASK_READS.with(|r| r.set(r.get() + 1));
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
    let (b, n, _) = x.dims3()?;
    if mask.elem_count() != b * n {
        candle::bail!("mask has {} entries, expected {}", mask.elem_count(), b * n);
    }
    rows_at(
        x,
        masked_patches(&mask.reshape((b, n))?, 0)?.flat_indices(n),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle::{DType, Device};
    use candle_nn::VarMap;

    fn tiny() -> Result<BeitForMaskedImageModeling> {
        let cfg = crate::config::tests::tiny_mim();
        let vm = VarMap::new();
        BeitForMaskedImageModeling::new(
            &cfg,
            VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu),
        )
    }

    #[test]
    fn host_rows_give_the_logits_of_the_mask_without_reading_it() -> Result<()> {
        let model = tiny()?;
        let dev = Device::Cpu;
        let pixels = Tensor::arange(0f32, 2. * 3. * 256., &dev)?
            .affine(1e-3, -0.5)?
            .sin()?
            .reshape((2, 3, 16, 16))?;
        let flags: Vec<u8> = (0..32).map(|i| u8::from(i % 3 == 0)).collect();
        let rows: Vec<Vec<u32>> = (0..2)
            .map(|b| {
                (0..16)
                    .filter(|j| flags[b * 16 + j] != 0)
                    .map(|j| j as u32 + 1)
                    .collect()
            })
            .collect();
        let (mask, queries) = (
            Tensor::from_vec(flags, (2, 16), &dev)?,
            QueryRows::new(&rows)?,
        );
        for opts in [
            ForwardOptions::default(),
            ForwardOptions {
                output_hidden_states: true,
                ..ForwardOptions::default()
            },
        ] {
            let read = model.forward_masked(&pixels, &mask, opts)?.logits;
            let before = mask_reads();
            let host = model
                .forward_masked_rows(&pixels, &mask, &queries, opts)?
                .logits;
            assert_eq!(mask_reads(), before);
            assert_eq!(read.dims(), [11, 12]);
            assert_eq!(read.to_vec2::<f32>()?, host.to_vec2::<f32>()?);
        }
        Ok(())
    }
}
