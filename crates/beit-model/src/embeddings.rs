//! Patch embedding, CLS token, optional `[M]` mask token and optional absolute position embedding.

use std::collections::HashMap;
use std::sync::Mutex;

use candle::{DType, ModuleT, Result, Tensor};
use candle_nn::VarBuilder;

use crate::config::BeitConfig;
use crate::interpolate::{bicubic_weights, kron_2d};
use crate::layers::{Dropout, StochasticRng};

/// `beit.embeddings`: turns pixels `(B, C, H, W)` into tokens `(B, 1 + N, hidden)`.
#[derive(Debug)]
pub struct BeitEmbeddings {
    cls_token: Tensor,
    mask_token: Option<Tensor>,
    /// Conv weight `(hidden, channels, p, p)` and bias: a stride-p, kernel-p convolution.
    patch_weight: Tensor,
    patch_bias: Tensor,
    position_embeddings: Option<Tensor>,
    patch_size: usize,
    grid: usize,
    dropout: Dropout,
    /// Bicubic resize matrices of the position embedding, per patch grid.
    pos_resize: Mutex<HashMap<(usize, usize), Tensor>>,
}

impl BeitEmbeddings {
    /// Load under `vb` (= `beit.embeddings`).
    pub fn new(cfg: &BeitConfig, vb: VarBuilder, rng: StochasticRng) -> Result<Self> {
        let c = cfg.hidden_size;
        let zeros = candle_nn::Init::Const(0.0);
        let cls_token = vb.get_with_hints((1, 1, c), "cls_token", zeros)?;
        let mask_token = if cfg.use_mask_token {
            Some(vb.get_with_hints((1, 1, c), "mask_token", zeros)?)
        } else {
            None
        };
        let p = cfg.patch_size;
        let pvb = vb.pp("patch_embeddings").pp("projection");
        let patch_weight = pvb.get_with_hints(
            (c, cfg.num_channels, p, p),
            "weight",
            candle_nn::Init::Randn {
                mean: 0.,
                stdev: 0.02,
            },
        )?;
        let patch_bias = pvb.get_with_hints(c, "bias", zeros)?;
        let position_embeddings = if cfg.use_absolute_position_embeddings {
            Some(vb.get_with_hints((1, cfg.num_patches() + 1, c), "position_embeddings", zeros)?)
        } else {
            None
        };
        Ok(Self {
            cls_token,
            mask_token,
            patch_weight,
            patch_bias,
            position_embeddings,
            patch_size: p,
            grid: cfg.grid_size(),
            dropout: Dropout::new(cfg.hidden_dropout_prob, rng),
            pos_resize: Mutex::new(HashMap::new()),
        })
    }

    /// Patch grid `(gh, gw)` of an input of `(height, width)` pixels.
    pub fn grid_of(&self, height: usize, width: usize) -> Result<(usize, usize)> {
        let p = self.patch_size;
        if !height.is_multiple_of(p) || !width.is_multiple_of(p) || height == 0 || width == 0 {
            candle::bail!(
                "input of {height}x{width} pixels is not a multiple of the patch size {p}"
            );
        }
        Ok((height / p, width / p))
    }

    /// Embed `pixels` `(B, C, H, W)`; `bool_masked_pos` `(B, N)` (any dtype, non-zero = masked)
    /// replaces masked patches by the mask token.
    pub fn forward(
        &self,
        pixels: &Tensor,
        bool_masked_pos: Option<&Tensor>,
        train: bool,
    ) -> Result<Tensor> {
        let (b, ch, h, w) = pixels.dims4()?;
        let (gh, gw) = self.grid_of(h, w)?;
        let p = self.patch_size;
        let hidden = self.patch_weight.dim(0)?;
        // A stride-p convolution with kernel p is a matmul over non-overlapping patches.
        let patches = pixels
            .reshape((b, ch, gh, p, gw, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .reshape((b * gh * gw, ch * p * p))?;
        let kernel = self.patch_weight.reshape((hidden, ch * p * p))?;
        // (The fused linear also skips the gradient of the pixels, which nothing needs.)
        let mut x = beit_kernels::linear(&patches, &kernel, Some(&self.patch_bias))?.reshape((
            b,
            gh * gw,
            hidden,
        ))?;
        if let Some(mask) = bool_masked_pos {
            let token = self.mask_token.as_ref().ok_or_else(|| {
                candle::Error::Msg(
                    "a mask was given but the config has `use_mask_token: false`".into(),
                )
            })?;
            let (mb, mn) = mask.dims2()?;
            if (mb, mn) != (b, gh * gw) {
                candle::bail!(
                    "bool_masked_pos has shape ({mb}, {mn}), expected ({b}, {})",
                    gh * gw
                );
            }
            let w = mask.ne(0u32)?.to_dtype(x.dtype())?.unsqueeze(2)?;
            let keep = w.affine(-1.0, 1.0)?;
            x = (x.broadcast_mul(&keep)? + w.broadcast_mul(token)?)?;
        }
        let cls = self.cls_token.broadcast_as((b, 1, hidden))?;
        let mut x = Tensor::cat(&[&cls.to_dtype(x.dtype())?, &x], 1)?;
        if let Some(pos) = &self.position_embeddings {
            x = x.broadcast_add(
                &self
                    .position_embeddings_for((gh, gw))?
                    .to_dtype(pos.dtype())?,
            )?;
        }
        self.dropout.forward_t(&x, train)
    }

    /// The absolute position embedding for a patch grid: bicubic resampling (as `transformers`'
    /// `interpolate_pos_encoding`) when the grid differs from the config's.
    fn position_embeddings_for(&self, grid: (usize, usize)) -> Result<Tensor> {
        let pos = self
            .position_embeddings
            .as_ref()
            .expect("checked by caller");
        if grid == (self.grid, self.grid) {
            return Ok(pos.clone());
        }
        let m = {
            let mut cache = self.pos_resize.lock().expect("pos cache lock");
            match cache.get(&grid) {
                Some(m) => m.clone(),
                None => {
                    let g = self.grid;
                    let m = kron_2d(
                        &bicubic_weights(g, grid.0),
                        g,
                        grid.0,
                        &bicubic_weights(g, grid.1),
                        g,
                        grid.1,
                    );
                    let m = Tensor::from_vec(m, (grid.0 * grid.1, g * g), pos.device())?;
                    cache.insert(grid, m.clone());
                    m
                }
            }
        };
        let cls = pos.narrow(1, 0, 1)?;
        let patches = pos.narrow(1, 1, self.grid * self.grid)?.squeeze(0)?;
        let resized = m
            .matmul(&patches.to_dtype(DType::F32)?)?
            .to_dtype(pos.dtype())?;
        Tensor::cat(&[&cls, &resized.unsqueeze(0)?], 1)
    }
}
