//! Geometric transforms with torchvision semantics: `RandomResizedCrop`, `Resize` (shorter side or
//! squash), `CenterCrop` and horizontal flip.

use image::RgbImage;
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::error::{DataError, Result};
use crate::resize::{resize_region, Filter};

/// A crop rectangle in pixels: `left, top, width, height` (Pillow's box is
/// `(left, top, left + width, top + height)`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CropBox {
    /// First column.
    pub left: u32,
    /// First row.
    pub top: u32,
    /// Width in pixels (> 0).
    pub width: u32,
    /// Height in pixels (> 0).
    pub height: u32,
}

impl CropBox {
    /// The whole of a `width` x `height` image.
    pub fn full(width: u32, height: u32) -> Self {
        CropBox {
            left: 0,
            top: 0,
            width,
            height,
        }
    }

    /// Mirror the box horizontally inside an image `image_width` wide.
    pub fn flipped(self, image_width: u32) -> Self {
        CropBox {
            left: image_width - self.left - self.width,
            ..self
        }
    }

    fn tuple(self) -> (u32, u32, u32, u32) {
        (self.left, self.top, self.width, self.height)
    }
}

/// Python's `round()` (half to even), used by torchvision for crop sizes and offsets.
pub(crate) fn py_round(x: f64) -> f64 {
    x.round_ties_even()
}

/// `RandomResizedCrop(size, scale, ratio, interpolation)` from torchvision / timm: draw an area
/// fraction in `scale` and a log-uniform aspect ratio in `ratio`, up to 10 times, until the box fits;
/// otherwise fall back to the largest central crop with a clamped ratio.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RandomResizedCrop {
    /// Output `(height, width)`.
    pub size: (u32, u32),
    /// Range of the crop area as a fraction of the image area (default 0.08..1).
    pub scale: (f64, f64),
    /// Range of the crop aspect ratio width/height (default 3/4..4/3).
    pub ratio: (f64, f64),
    /// Resampling filter (default bicubic as in BEiT; torchvision defaults to bilinear).
    pub interpolation: Filter,
}

impl RandomResizedCrop {
    /// A square `size` crop with the default scale (0.08, 1), ratio (3/4, 4/3) and bicubic filter.
    pub fn new(size: u32) -> Self {
        RandomResizedCrop {
            size: (size, size),
            scale: (0.08, 1.0),
            ratio: (3.0 / 4.0, 4.0 / 3.0),
            interpolation: Filter::Bicubic,
        }
    }

    /// Check the parameters; called by the pipelines that own a crop.
    pub fn validate(&self) -> Result<()> {
        let (s0, s1) = self.scale;
        let (r0, r1) = self.ratio;
        if self.size.0 == 0 || self.size.1 == 0 {
            return Err(DataError::param("size", "must be positive"));
        }
        if !(s0 > 0.0 && s0 <= s1) {
            return Err(DataError::param(
                "scale",
                format!("expected 0 < min <= max, got ({s0}, {s1})"),
            ));
        }
        if !(r0 > 0.0 && r0 <= r1) {
            return Err(DataError::param(
                "ratio",
                format!("expected 0 < min <= max, got ({r0}, {r1})"),
            ));
        }
        Ok(())
    }

    /// Draw a crop box for an image of `width` x `height` (torchvision's `get_params`).
    pub fn sample_box<R: Rng + ?Sized>(&self, width: u32, height: u32, rng: &mut R) -> CropBox {
        let area = width as f64 * height as f64;
        let (lr0, lr1) = (self.ratio.0.ln(), self.ratio.1.ln());
        for _ in 0..10 {
            let target_area = area * uniform(rng, self.scale.0, self.scale.1);
            let aspect = uniform(rng, lr0, lr1).exp();
            let w = py_round((target_area * aspect).sqrt());
            let h = py_round((target_area / aspect).sqrt());
            if w > 0.0 && w <= width as f64 && h > 0.0 && h <= height as f64 {
                let (w, h) = (w as u32, h as u32);
                let top = rng.random_range(0..=height - h);
                let left = rng.random_range(0..=width - w);
                return CropBox {
                    left,
                    top,
                    width: w,
                    height: h,
                };
            }
        }
        center_fallback(width, height, self.ratio)
    }

    /// Crop `b` out of `img` and resize it to [`RandomResizedCrop::size`].
    pub fn apply_box(&self, img: &RgbImage, b: CropBox) -> Result<RgbImage> {
        resize_region(img, b.tuple(), self.size.1, self.size.0, self.interpolation)
    }
}

/// torchvision's fallback: the whole image if its ratio is in range, else the largest central box
/// with the nearest allowed ratio.
fn center_fallback(width: u32, height: u32, ratio: (f64, f64)) -> CropBox {
    let in_ratio = width as f64 / height as f64;
    let (w, h) = if in_ratio < ratio.0 {
        (
            width,
            (py_round(width as f64 / ratio.0) as u32).clamp(1, height),
        )
    } else if in_ratio > ratio.1 {
        (
            (py_round(height as f64 * ratio.1) as u32).clamp(1, width),
            height,
        )
    } else {
        (width, height)
    };
    CropBox {
        left: (width - w) / 2,
        top: (height - h) / 2,
        width: w,
        height: h,
    }
}

/// Python's `random.uniform(a, b)`.
pub(crate) fn uniform<R: Rng + ?Sized>(rng: &mut R, a: f64, b: f64) -> f64 {
    a + (b - a) * rng.random::<f64>()
}

/// Output size of torchvision's `Resize(size)` with an integer `size`: the shorter side becomes
/// `size`, the longer side `int(size * long / short)`. Returns `(width, height)`.
pub fn shorter_side_size(width: u32, height: u32, size: u32) -> (u32, u32) {
    let (short, long) = if width <= height {
        (width, height)
    } else {
        (height, width)
    };
    let new_long = ((size as f64 * long as f64 / short as f64) as u32).max(1);
    if width <= height {
        (size, new_long)
    } else {
        (new_long, size)
    }
}

/// torchvision `Resize(size)` (shorter side to `size`, aspect kept).
pub fn resize_shorter_side(img: &RgbImage, size: u32, filter: Filter) -> Result<RgbImage> {
    let (w, h) = img.dimensions();
    let (nw, nh) = shorter_side_size(w, h, size);
    if (nw, nh) == (w, h) {
        return Ok(img.clone());
    }
    crate::resize::resize(img, nw, nh, filter)
}

/// The central `width` x `height` box of an image (torchvision `CenterCrop` offsets:
/// `round((W - w) / 2)` with Python rounding). Requires the box to fit.
pub fn center_box(img_w: u32, img_h: u32, width: u32, height: u32) -> CropBox {
    let left = py_round((img_w as f64 - width as f64) / 2.0) as u32;
    let top = py_round((img_h as f64 - height as f64) / 2.0) as u32;
    CropBox {
        left,
        top,
        width,
        height,
    }
}

/// torchvision `CenterCrop((height, width))`; an image smaller than the crop is padded with black
/// first, as torchvision does.
pub fn center_crop(img: &RgbImage, width: u32, height: u32) -> RgbImage {
    let (w, h) = img.dimensions();
    if w < width || h < height {
        // Pad symmetrically (extra pixel on the right/bottom), then crop the centre.
        let pw = width.max(w);
        let ph = height.max(h);
        let mut padded = RgbImage::new(pw, ph);
        let (ox, oy) = ((pw - w) / 2, (ph - h) / 2);
        image::imageops::replace(&mut padded, img, ox as i64, oy as i64);
        return center_crop(&padded, width, height);
    }
    let b = center_box(w, h, width, height);
    image::imageops::crop_imm(img, b.left, b.top, b.width, b.height).to_image()
}

/// Mirror an image left-right in place.
pub fn hflip(img: &mut RgbImage) {
    image::imageops::flip_horizontal_in_place(img);
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, SeedableRng};

    #[test]
    fn random_resized_crop_boxes_fit_and_respect_bounds() {
        let rrc = RandomResizedCrop::new(224);
        let mut rng = StdRng::seed_from_u64(3);
        let mut total_frac = 0.0;
        for _ in 0..2000 {
            let b = rrc.sample_box(451, 300, &mut rng);
            assert!(b.left + b.width <= 451 && b.top + b.height <= 300);
            let frac = (b.width * b.height) as f64 / (451.0 * 300.0);
            assert!((0.07..=1.0).contains(&frac), "{b:?}");
            total_frac += frac;
        }
        // torchvision's get_params on a 451x300 image gives a mean area fraction of 0.390 (20000
        // draws): boxes that do not fit are redrawn, which favours small ones.
        let mean = total_frac / 2000.0;
        assert!((0.37..0.41).contains(&mean), "{mean}");
    }

    #[test]
    fn fallback_is_central_with_clamped_ratio() {
        // A very wide image: no random box with ratio <= 4/3 can reach 90% area, so the fallback runs.
        let rrc = RandomResizedCrop {
            scale: (0.9, 1.0),
            ..RandomResizedCrop::new(8)
        };
        let mut rng = StdRng::seed_from_u64(0);
        let b = rrc.sample_box(1000, 100, &mut rng);
        assert_eq!(
            b,
            CropBox {
                left: 433,
                top: 0,
                width: 133,
                height: 100
            }
        );
    }

    #[test]
    fn torchvision_resize_and_center_crop_sizes() {
        assert_eq!(shorter_side_size(451, 300, 256), (384, 256));
        assert_eq!(shorter_side_size(300, 451, 256), (256, 384));
        // Python round(0.5) == 0, round(1.5) == 2.
        assert_eq!(
            center_box(225, 227, 224, 224),
            CropBox {
                left: 0,
                top: 2,
                width: 224,
                height: 224
            }
        );
        let small = RgbImage::from_pixel(3, 2, image::Rgb([9, 9, 9]));
        let c = center_crop(&small, 5, 4);
        assert_eq!(c.dimensions(), (5, 4));
        assert_eq!(c.get_pixel(0, 0).0, [0, 0, 0]);
        assert_eq!(c.get_pixel(2, 2).0, [9, 9, 9]);
    }
}
