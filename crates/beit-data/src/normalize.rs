//! Conversion of RGB images to normalised f32 CHW buffers (`ToTensor` + `Normalize`), and the
//! DALL-E `map_pixels` used for the tokenizer view.

use image::RgbImage;
use serde::{Deserialize, Serialize};

use crate::error::{DataError, Result};

/// ImageNet channel means (timm `IMAGENET_DEFAULT_MEAN`).
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// ImageNet channel standard deviations (timm `IMAGENET_DEFAULT_STD`).
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];
/// The 0.5 mean/std used by the released BEiT checkpoints and the HF processors.
pub const HALF: [f32; 3] = [0.5, 0.5, 0.5];

/// `Normalize(mean, std)` applied after scaling pixels to `[0, 1]`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Normalize {
    /// Per-channel mean (RGB).
    pub mean: [f32; 3],
    /// Per-channel standard deviation (RGB).
    pub std: [f32; 3],
}

impl Normalize {
    /// mean = std = 0.5, mapping `[0, 1]` to `[-1, 1]` (BEiT default, HF processors).
    pub const HALF: Normalize = Normalize {
        mean: HALF,
        std: HALF,
    };
    /// ImageNet mean/std (BEiT 1k recipe with `--imagenet_default_mean_and_std`).
    pub const IMAGENET: Normalize = Normalize {
        mean: IMAGENET_MEAN,
        std: IMAGENET_STD,
    };
    /// No normalisation beyond scaling to `[0, 1]`.
    pub const IDENTITY: Normalize = Normalize {
        mean: [0.0; 3],
        std: [1.0; 3],
    };

    /// Parse a preset name: `half` (or `0.5`, `beit`), `imagenet`, `none`.
    pub fn preset(name: &str) -> Result<Self> {
        match name.trim().to_ascii_lowercase().as_str() {
            "half" | "0.5" | "beit" | "inception" => Ok(Self::HALF),
            "imagenet" => Ok(Self::IMAGENET),
            "none" | "identity" => Ok(Self::IDENTITY),
            other => Err(DataError::param(
                "normalize",
                format!("unknown preset `{other}` (expected half, imagenet or none)"),
            )),
        }
    }

    /// Check that every std is positive and finite.
    pub fn validate(&self) -> Result<()> {
        if self.std.iter().any(|&s| !(s > 0.0 && s.is_finite())) {
            return Err(DataError::param(
                "std",
                format!("{:?}: every entry must be positive", self.std),
            ));
        }
        Ok(())
    }

    /// `ToTensor` then `Normalize`: an image as a `(3, H, W)` f32 buffer.
    pub fn to_chw(&self, img: &RgbImage) -> Chw {
        // Same arithmetic as torchvision: x / 255 in f32, then (x - mean) / std.
        let inv_std = self.std;
        let (w, h) = img.dimensions();
        let plane = (w * h) as usize;
        let mut data = vec![0f32; 3 * plane];
        let (r, rest) = data.split_at_mut(plane);
        let (g, b) = rest.split_at_mut(plane);
        for (i, p) in img.as_raw().chunks_exact(3).enumerate() {
            r[i] = (p[0] as f32 / 255.0 - self.mean[0]) / inv_std[0];
            g[i] = (p[1] as f32 / 255.0 - self.mean[1]) / inv_std[1];
            b[i] = (p[2] as f32 / 255.0 - self.mean[2]) / inv_std[2];
        }
        Chw {
            data,
            height: h as usize,
            width: w as usize,
        }
    }
}

/// Epsilon of the DALL-E logit-Laplace pixel mapping.
pub const LOGIT_LAPLACE_EPS: f32 = 0.1;

/// DALL-E `map_pixels`: `ToTensor` then `x -> (1 - 2 eps) x + eps`, i.e. `[0, 1] -> [0.1, 0.9]`.
pub fn map_pixels(img: &RgbImage) -> Chw {
    let scale = 1.0 - 2.0 * LOGIT_LAPLACE_EPS;
    let mut chw = Normalize::IDENTITY.to_chw(img);
    for v in &mut chw.data {
        *v = scale * *v + LOGIT_LAPLACE_EPS;
    }
    chw
}

/// An f32 image with three channels in planar `(3, height, width)` order.
#[derive(Debug, Clone, PartialEq)]
pub struct Chw {
    /// `3 * height * width` values, channel-major.
    pub data: Vec<f32>,
    /// Rows.
    pub height: usize,
    /// Columns.
    pub width: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn to_chw_is_planar_and_normalised() {
        let img = RgbImage::from_fn(2, 1, |x, _| {
            image::Rgb([if x == 0 { 0 } else { 255 }, 51, 102])
        });
        let c = Normalize::HALF.to_chw(&img);
        assert_eq!((c.height, c.width), (1, 2));
        assert_eq!(
            c.data,
            vec![-1.0, 1.0, -0.6, -0.6, -0.19999999, -0.19999999]
        );
        let m = map_pixels(&img);
        assert!((m.data[0] - 0.1).abs() < 1e-6 && (m.data[1] - 0.9).abs() < 1e-6);
        assert!(Normalize::preset("imagenet").unwrap() == Normalize::IMAGENET);
        assert!(Normalize::preset("foo").is_err());
    }
}
