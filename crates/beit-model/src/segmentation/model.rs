//! [`BeitForSemanticSegmentation`]: backbone features -> neck -> UperNet (+ FCN auxiliary head).

use std::sync::Arc;

use candle::{DType, Result, Tensor, D};
use candle_nn::VarBuilder;

use super::blocks::BatchNorm2d;
use super::config::SegmentationConfig;
use super::heads::{FcnHead, Neck, UperHead};
use super::resize::resize_bilinear;
use super::sync_bn::BatchStatsSync;
use crate::config::BeitConfig;
use crate::model::{BeitModel, BeitOutput, ForwardOptions};

/// `BeitForSemanticSegmentation` as `transformers` computes it, with its parameter names:
/// `beit.*` (no pooler), `fpn1.*`, `fpn2.*`, `decode_head.*`, `auxiliary_head.*`.
#[derive(Debug)]
pub struct BeitForSemanticSegmentation {
    beit: BeitModel,
    seg: SegmentationConfig,
    neck: Neck,
    decode_head: UperHead,
    auxiliary_head: Option<FcnHead>,
    patch_size: usize,
    num_labels: usize,
}

/// Output of [`BeitForSemanticSegmentation::forward`].
#[derive(Debug, Clone)]
pub struct SegmentationOutput {
    /// `(B, num_labels, H/4, W/4)`.
    pub logits: Tensor,
    /// `(B, num_labels, H/16, W/16)` from the auxiliary head, when the model has one.
    pub auxiliary_logits: Option<Tensor>,
    /// The backbone's outputs (every hidden state; attentions when asked).
    pub backbone: BeitOutput,
}

impl BeitForSemanticSegmentation {
    /// Build under `vb` (the checkpoint's root) from `cfg` and its segmentation fields.
    pub fn new(cfg: &BeitConfig, vb: VarBuilder) -> Result<Self> {
        let seg = SegmentationConfig::from_config(cfg)?;
        Self::with_segmentation_config(cfg, seg, vb)
    }

    /// Build with explicit segmentation settings (validated against `cfg`).
    pub fn with_segmentation_config(
        cfg: &BeitConfig,
        seg: SegmentationConfig,
        vb: VarBuilder,
    ) -> Result<Self> {
        seg.validate(cfg)?;
        let c = cfg.hidden_size;
        let std = cfg.initializer_range;
        let num_labels = cfg.num_labels();
        let beit = BeitModel::new(cfg, vb.pp("beit"), false)?;
        let neck = Neck::new(c, std, vb.clone())?;
        let decode_head = UperHead::new(c, num_labels, &seg, std, vb.pp("decode_head"))?;
        let auxiliary_head = if seg.use_auxiliary_head {
            Some(FcnHead::new(
                c,
                num_labels,
                &seg,
                std,
                vb.pp("auxiliary_head"),
            )?)
        } else {
            None
        };
        Ok(Self {
            beit,
            seg,
            neck,
            decode_head,
            auxiliary_head,
            patch_size: cfg.patch_size,
            num_labels,
        })
    }

    /// The backbone.
    pub fn backbone(&self) -> &BeitModel {
        &self.beit
    }

    /// The segmentation settings.
    pub fn segmentation_config(&self) -> &SegmentationConfig {
        &self.seg
    }

    /// Number of classes.
    pub fn num_labels(&self) -> usize {
        self.num_labels
    }

    /// Every BatchNorm of the neck and heads (for inspecting running statistics).
    pub fn batch_norms(&self) -> Vec<&BatchNorm2d> {
        let mut all = self.neck.batch_norms();
        all.extend(self.decode_head.batch_norms());
        if let Some(aux) = &self.auxiliary_head {
            all.extend(aux.batch_norms());
        }
        all
    }

    /// Synchronise the training statistics of every BatchNorm across the processes of `sync`
    /// (mmseg's `SyncBN`; see [`BatchNorm2d::synchronise`]), or stop synchronising (`None`).
    pub fn synchronise_batch_norms(&mut self, sync: Option<Arc<dyn BatchStatsSync>>) {
        let mut all = self.neck.batch_norms_mut();
        all.extend(self.decode_head.batch_norms_mut());
        if let Some(aux) = &mut self.auxiliary_head {
            all.extend(aux.batch_norms_mut());
        }
        for bn in all {
            bn.synchronise(sync.clone());
        }
    }

    /// The four backbone feature maps `(B, C, H/p, W/p)`: `hidden_states[k - 1]` for each `k` of
    /// `out_indices`, CLS token dropped.
    pub fn features(&self, backbone: &BeitOutput, grid: (usize, usize)) -> Result<Vec<Tensor>> {
        self.seg
            .out_indices
            .iter()
            .map(|&k| {
                let Some(h) = backbone.hidden_states.get(k - 1) else {
                    candle::bail!("out_indices entry {k} has no hidden state");
                };
                let (b, t, c) = h.dims3()?;
                h.narrow(1, 1, t - 1)?
                    .transpose(1, 2)?
                    .reshape((b, c, grid.0, grid.1))
            })
            .collect()
    }

    /// Logits for `pixels` `(B, C, H, W)` (H and W multiples of the patch size). `opts.train`
    /// switches dropout, stochastic depth and the BatchNorms to training mode.
    pub fn forward(&self, pixels: &Tensor, opts: ForwardOptions) -> Result<SegmentationOutput> {
        let (_, _, h, w) = pixels.dims4()?;
        let p = self.patch_size;
        if h % p != 0 || w % p != 0 {
            candle::bail!("input {h}x{w} is not a multiple of the patch size {p}");
        }
        let backbone = self.beit.forward(
            pixels,
            None,
            ForwardOptions {
                output_hidden_states: true,
                ..opts
            },
        )?;
        let features = self.features(&backbone, (h / p, w / p))?;
        let levels = self.neck.forward(&features, opts.train)?;
        let logits = self.decode_head.forward(&levels, opts.train)?;
        let auxiliary_logits = match &self.auxiliary_head {
            Some(head) => Some(head.forward(&levels, opts.train)?),
            None => None,
        };
        Ok(SegmentationOutput {
            logits,
            auxiliary_logits,
            backbone,
        })
    }

    /// `transformers`' loss: both logit maps resized bilinearly to the label size, pixel-wise
    /// cross-entropy ignoring `semantic_loss_ignore_index`, `main + auxiliary_loss_weight * aux`.
    /// `labels` `(B, H, W)`, any integer dtype.
    pub fn loss(&self, out: &SegmentationOutput, labels: &Tensor) -> Result<Tensor> {
        if self.num_labels < 2 {
            candle::bail!("the number of labels should be greater than one");
        }
        let ignore = self.seg.semantic_loss_ignore_index;
        let main = upsampled_cross_entropy(&out.logits, labels, ignore)?;
        match &out.auxiliary_logits {
            Some(aux) => {
                let aux = upsampled_cross_entropy(aux, labels, ignore)?;
                main + (aux * self.seg.auxiliary_loss_weight)?
            }
            None => Ok(main),
        }
    }
}

/// Cross-entropy of `logits` `(B, K, h, w)`, resized bilinearly to the `(B, H, W)` `labels`,
/// averaged over the pixels whose label is not `ignore_index` (NaN when every pixel is ignored,
/// as PyTorch). A label outside `0..K` (other than `ignore_index`) is an error.
pub fn upsampled_cross_entropy(
    logits: &Tensor,
    labels: &Tensor,
    ignore_index: i64,
) -> Result<Tensor> {
    let (b, k, _, _) = logits.dims4()?;
    let (lb, h, w) = labels.dims3()?;
    if lb != b {
        candle::bail!("labels batch {lb} does not match logits batch {b}");
    }
    let up = resize_bilinear(logits, h, w)?;
    let flat = up.permute((0, 2, 3, 1))?.reshape((b * h * w, k))?;
    let log_probs = candle_nn::ops::log_softmax(&flat, D::Minus1)?;
    let raw = labels
        .flatten_all()?
        .to_dtype(DType::I64)?
        .to_vec1::<i64>()?;
    let mut keep = vec![0f32; raw.len()];
    let mut targets = vec![0u32; raw.len()];
    for (i, &l) in raw.iter().enumerate() {
        if l == ignore_index {
            continue;
        }
        if l < 0 || l >= k as i64 {
            candle::bail!(
                "label {l} is outside 0..{k} (and is not the ignore index {ignore_index})"
            );
        }
        keep[i] = 1.0;
        targets[i] = l as u32;
    }
    let count: f32 = keep.iter().sum();
    let dev = logits.device();
    let n = raw.len();
    let targets = Tensor::from_vec(targets, (n, 1), dev)?;
    let keep = Tensor::from_vec(keep, n, dev)?.to_dtype(logits.dtype())?;
    let picked = log_probs.gather(&targets, 1)?.squeeze(1)?;
    let total = (picked * keep)?.sum_all()?;
    total.neg()? / count as f64
}
