//! Pixel-regression target ("− visual tokens" in Table 4): patchify, per-patch normalisation,
//! and the linear head that predicts the pixels of a masked patch.

use candle::{Module, Tensor, D};
use candle_nn::{Init, Linear, VarBuilder};

use crate::error::{bad_input, Result};

/// Name of the head's parameters in a checkpoint (`pixel_head.weight`, `pixel_head.bias`).
pub const PIXEL_HEAD_NAME: &str = "pixel_head";

/// Variance floor of [`normalize_patches`] (the value MAE uses for its normalised-pixel target).
pub const PATCH_NORM_EPS: f64 = 1e-6;

/// Cut images into non-overlapping `patch × patch` squares, in the row-major patch order of the
/// patch embedding. Each patch is flattened as `(row, column, channel)`.
///
/// # Shapes
/// - `pixels`: `(B, C, H, W)` with `H` and `W` multiples of `patch`; output
///   `(B, (H/patch)·(W/patch), patch·patch·C)`.
pub fn patchify(pixels: &Tensor, patch: usize) -> Result<Tensor> {
    let (b, c, h, w) = pixels.dims4().map_err(|_| {
        bad_input(
            "pixels",
            format!("expected (B, C, H, W), got {:?}", pixels.dims()),
        )
    })?;
    if patch == 0 || h % patch != 0 || w % patch != 0 {
        return Err(bad_input(
            "pixels",
            format!("image {h}x{w} is not a whole number of {patch}x{patch} patches"),
        ));
    }
    let (gh, gw) = (h / patch, w / patch);
    let x = pixels.reshape(vec![b, c, gh, patch, gw, patch])?;
    // (b, c, gh, p, gw, q) -> (b, gh, gw, p, q, c)
    let x = x.permute((0, 2, 4, 3, 5, 1))?;
    Ok(x.reshape((b, gh * gw, patch * patch * c))?)
}

/// Normalise each patch vector (last dimension) to zero mean and unit variance:
/// `(x − mean) / sqrt(var + 1e-6)` with the unbiased variance, as MAE's normalised-pixel target.
/// Makes the regression target independent of the patch's brightness and contrast.
pub fn normalize_patches(patches: &Tensor) -> Result<Tensor> {
    let p = patches.dim(D::Minus1)?;
    if p < 2 {
        return Err(bad_input(
            "patches",
            format!("need at least 2 values per patch to normalise, got {p}"),
        ));
    }
    let mean = patches.mean_keepdim(D::Minus1)?;
    let centred = patches.broadcast_sub(&mean)?;
    let var = (centred.sqr()?.sum_keepdim(D::Minus1)? / (p - 1) as f64)?;
    Ok(centred.broadcast_div(&(var + PATCH_NORM_EPS)?.sqrt()?)?)
}

/// Mean squared error between predicted and target pixels of the masked patches.
pub fn pixel_mse(pred: &Tensor, target: &Tensor) -> Result<Tensor> {
    if pred.dims() != target.dims() {
        return Err(bad_input(
            "pixel target",
            format!(
                "prediction {:?} and target {:?} differ",
                pred.dims(),
                target.dims()
            ),
        ));
    }
    Ok(candle_nn::loss::mse(pred, target)?)
}

/// A linear layer from the encoder width to the `patch·patch·channels` pixels of one patch.
#[derive(Debug, Clone)]
pub struct PixelRegressionHead {
    linear: Linear,
    patch_size: usize,
    channels: usize,
}

impl PixelRegressionHead {
    /// Create or load `pixel_head.{weight,bias}` under `vb` (the model's root builder). New
    /// weights are drawn N(0, 0.02) with zero bias, like BEiT's other heads.
    pub fn new(hidden: usize, patch_size: usize, channels: usize, vb: VarBuilder) -> Result<Self> {
        let vb = vb.pp(PIXEL_HEAD_NAME);
        let out = patch_size * patch_size * channels;
        let weight = vb.get_with_hints(
            (out, hidden),
            "weight",
            Init::Randn {
                mean: 0.0,
                stdev: 0.02,
            },
        )?;
        let bias = vb.get_with_hints(out, "bias", Init::Const(0.0))?;
        Ok(Self {
            linear: Linear::new(weight, Some(bias)),
            patch_size,
            channels,
        })
    }

    /// Patch side the head predicts.
    pub fn patch_size(&self) -> usize {
        self.patch_size
    }

    /// Values predicted per patch (`patch·patch·channels`).
    pub fn out_dim(&self) -> usize {
        self.patch_size * self.patch_size * self.channels
    }
}

impl Module for PixelRegressionHead {
    /// `(..., hidden)` features → `(..., patch·patch·channels)` pixels.
    fn forward(&self, xs: &Tensor) -> candle::Result<Tensor> {
        self.linear.forward(xs)
    }
}
