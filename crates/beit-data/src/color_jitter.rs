//! `ColorJitter(brightness, contrast, saturation, hue)` as torchvision runs it on PIL images (which
//! is where timm's and unilm's transforms apply it, before `ToTensor`): the four adjustments in a
//! random order, each with a factor drawn uniformly, each computed with Pillow's 8-bit arithmetic.
//!
//! Pillow's `ImageEnhance` blends the image with a "degenerate" one (black for brightness, the
//! image's mean grey level rounded to an integer for contrast, each pixel's luma for saturation):
//! `d + f * (v - d)` in f32, clipped and **truncated** to 8 bits after every adjustment. The
//! truncation matters in training: it darkens by about half a level per step and turns more of a
//! dark background into exact black than float arithmetic rounded once at the end would (on
//! Fashion-MNIST with jitter 0.4, 21.5% vs 20.3% of the pixels; docs/training-parity.md).
//! Brightness, contrast and saturation here are bit-exact with Pillow (`tests/parity.rs`). Hue is
//! the exception: it rotates the hue in f32 HSV and rounds (torchvision's tensor arithmetic), where
//! Pillow converts to 8-bit HSV and back; BEiT's recipes use no hue jitter.

use image::RgbImage;
use rand::seq::SliceRandom;
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::error::{DataError, Result};
use crate::geometry::{uniform, CropBox};

/// Jitter strengths, as torchvision's `ColorJitter` arguments: brightness/contrast/saturation `b`
/// draw a factor in `[max(0, 1 - b), 1 + b]`; hue `h` (at most 0.5) draws a shift in `[-h, h]`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ColorJitter {
    /// Brightness strength.
    pub brightness: f32,
    /// Contrast strength.
    pub contrast: f32,
    /// Saturation strength.
    pub saturation: f32,
    /// Hue strength, in `[0, 0.5]`.
    pub hue: f32,
}

/// One adjustment of a drawn jitter, with torchvision's `adjust_*` meaning.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Op {
    /// Multiply by the factor (blend with black).
    Brightness(f32),
    /// Blend with the mean grey level of the whole image.
    Contrast(f32),
    /// Blend with each pixel's grey level.
    Saturation(f32),
    /// Rotate the hue by this fraction of a turn.
    Hue(f32),
}

/// A drawn jitter: the adjustments in the order they apply.
#[derive(Debug, Clone, PartialEq)]
pub struct JitterDraw {
    ops: Vec<Op>,
}

impl JitterDraw {
    /// A jitter with given adjustments (for reproducing a specific draw, e.g. in parity tests).
    pub fn new(ops: Vec<Op>) -> Self {
        JitterDraw { ops }
    }

    /// The adjustments, in order.
    pub fn ops(&self) -> &[Op] {
        &self.ops
    }
}

impl ColorJitter {
    /// Same strength for brightness, contrast and saturation, no hue (BEiT uses 0.4).
    pub fn uniform(strength: f32) -> Self {
        ColorJitter {
            brightness: strength,
            contrast: strength,
            saturation: strength,
            hue: 0.0,
        }
    }

    /// Check the strengths (non-negative, hue at most 0.5).
    pub fn validate(&self) -> Result<()> {
        for (name, v) in [
            ("brightness", self.brightness),
            ("contrast", self.contrast),
            ("saturation", self.saturation),
            ("hue", self.hue),
        ] {
            if !(v >= 0.0 && v.is_finite()) {
                return Err(DataError::param(name, format!("{v} must be >= 0")));
            }
        }
        if self.hue > 0.5 {
            return Err(DataError::param(
                "hue",
                format!("{} must be <= 0.5", self.hue),
            ));
        }
        Ok(())
    }

    /// Draw the order and factors.
    pub fn sample<R: Rng + ?Sized>(&self, rng: &mut R) -> JitterDraw {
        let mut order = [0usize, 1, 2, 3];
        order.shuffle(rng);
        let factor =
            |rng: &mut R, s: f32| uniform(rng, (1.0 - s as f64).max(0.0), 1.0 + s as f64) as f32;
        let mut ops = Vec::with_capacity(4);
        for k in order {
            match k {
                0 if self.brightness > 0.0 => {
                    ops.push(Op::Brightness(factor(rng, self.brightness)))
                }
                1 if self.contrast > 0.0 => ops.push(Op::Contrast(factor(rng, self.contrast))),
                2 if self.saturation > 0.0 => {
                    ops.push(Op::Saturation(factor(rng, self.saturation)))
                }
                3 if self.hue > 0.0 => {
                    ops.push(Op::Hue(
                        uniform(rng, -self.hue as f64, self.hue as f64) as f32
                    ))
                }
                _ => {}
            }
        }
        JitterDraw { ops }
    }

    /// Draw and apply to a whole image.
    pub fn apply<R: Rng + ?Sized>(&self, img: &RgbImage, rng: &mut R) -> RgbImage {
        let draw = self.sample(rng);
        let (w, h) = img.dimensions();
        draw.apply_region(img, CropBox::full(w, h))
    }
}

/// Pillow's `convert("L")` of one RGB pixel (ITU-R 601-2 luma in 16-bit fixed point, rounded).
#[inline]
fn luma(r: u8, g: u8, b: u8) -> u8 {
    ((r as u32 * 19595 + g as u32 * 38470 + b as u32 * 7471 + 0x8000) >> 16) as u8
}

/// Pillow's `Image.blend(degenerate, image, f)` for one value: `d + f * (v - d)` in f32,
/// clipped to `[0, 255]` and truncated (not rounded) to 8 bits.
#[inline]
fn blend(d: u8, v: u8, f: f32) -> u8 {
    let t = d as f32 + f * (v as f32 - d as f32);
    if t <= 0.0 {
        0
    } else if t >= 255.0 {
        255
    } else {
        t as u8
    }
}

fn shift_hue(p: [f32; 3], shift: f32) -> [f32; 3] {
    let [r, g, b] = p;
    let max = r.max(g).max(b);
    let min = r.min(g).min(b);
    let delta = max - min;
    if delta == 0.0 {
        return p;
    }
    let v = max;
    let s = delta / max;
    let mut h = if max == r {
        ((g - b) / delta).rem_euclid(6.0)
    } else if max == g {
        (b - r) / delta + 2.0
    } else {
        (r - g) / delta + 4.0
    } / 6.0;
    h = (h + shift).rem_euclid(1.0);
    let h6 = h * 6.0;
    let i = h6.floor();
    let f = h6 - i;
    let p_ = v * (1.0 - s);
    let q = v * (1.0 - s * f);
    let t = v * (1.0 - s * (1.0 - f));
    match (i as i32).rem_euclid(6) {
        0 => [v, t, p_],
        1 => [q, v, p_],
        2 => [p_, v, t],
        3 => [p_, q, v],
        4 => [t, p_, v],
        _ => [v, p_, q],
    }
}

/// One adjustment ready to run on 8-bit pixels.
enum Step {
    /// Brightness and contrast map each channel value on its own: a lookup table.
    Lut(Box<[u8; 256]>),
    /// Blend with the pixel's own luma.
    Saturation(f32),
    /// Rotate the hue (f32 HSV, rounded back to 8 bits).
    Hue(f32),
}

impl Step {
    fn lut(f: impl Fn(u8) -> u8) -> Step {
        Step::Lut(Box::new(std::array::from_fn(|v| f(v as u8))))
    }

    /// Apply to interleaved RGB bytes in place.
    fn run(&self, px: &mut [u8]) {
        match self {
            Step::Lut(t) => px.iter_mut().for_each(|v| *v = t[*v as usize]),
            Step::Saturation(f) => {
                for p in px.chunks_exact_mut(3) {
                    let l = luma(p[0], p[1], p[2]);
                    for v in p.iter_mut() {
                        *v = blend(l, *v, *f);
                    }
                }
            }
            Step::Hue(shift) => {
                for p in px.chunks_exact_mut(3) {
                    let q = shift_hue(
                        [
                            p[0] as f32 / 255.0,
                            p[1] as f32 / 255.0,
                            p[2] as f32 / 255.0,
                        ],
                        *shift,
                    );
                    for (v, c) in p.iter_mut().zip(q) {
                        *v = (c * 255.0 + 0.5).clamp(0.0, 255.0) as u8;
                    }
                }
            }
        }
    }
}

/// Pillow's mean of `convert("L")` over the image, rounded to an integer grey level: the reference
/// `ImageEnhance.Contrast` blends with.
fn mean_luma(img: &RgbImage) -> u8 {
    let total: u64 = img
        .as_raw()
        .chunks_exact(3)
        .map(|p| luma(p[0], p[1], p[2]) as u64)
        .sum();
    let n = (img.width() as f64 * img.height() as f64).max(1.0);
    (total as f64 / n + 0.5) as u8
}

impl JitterDraw {
    /// Apply to the region `b` of `img` and return that region only. Every step is per-pixel except
    /// the contrast reference, the mean luma of the whole image as it is when the contrast step
    /// runs; so this equals jittering the whole image and then cropping. A crop smaller than the
    /// image costs the crop, plus the whole image up to the last contrast step.
    pub fn apply_region(&self, img: &RgbImage, b: CropBox) -> RgbImage {
        let mut out = image::imageops::crop_imm(img, b.left, b.top, b.width, b.height).to_image();
        let last_contrast = self.ops.iter().rposition(|o| matches!(o, Op::Contrast(_)));
        // The whole image in step with `out` while a contrast step is ahead and `out` is a crop.
        let mut whole = match last_contrast {
            Some(_) if out.dimensions() != img.dimensions() => Some(img.clone()),
            _ => None,
        };
        for (i, &op) in self.ops.iter().enumerate() {
            let step = match op {
                Op::Brightness(f) => Step::lut(|v| blend(0, v, f)),
                Op::Contrast(f) => {
                    let mean = mean_luma(whole.as_ref().unwrap_or(&out));
                    Step::lut(|v| blend(mean, v, f))
                }
                Op::Saturation(f) => Step::Saturation(f),
                Op::Hue(s) => Step::Hue(s),
            };
            if Some(i) == last_contrast {
                whole = None;
            }
            if let Some(w) = whole.as_mut() {
                step.run(w);
            }
            step.run(&mut out);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, SeedableRng};

    #[test]
    fn hue_round_trip_and_identity() {
        for p in [[0.2f32, 0.5, 0.9], [1.0, 0.0, 0.0], [0.3, 0.3, 0.1]] {
            let q = shift_hue(p, 0.0);
            for c in 0..3 {
                assert!((p[c] - q[c]).abs() < 1e-5, "{p:?} {q:?}");
            }
        }
        // A full turn of hue is the identity, a third of a turn maps red to green.
        let g = shift_hue([1.0, 0.0, 0.0], 1.0 / 3.0);
        assert!((g[1] - 1.0).abs() < 1e-5 && g[0].abs() < 1e-5);
    }

    #[test]
    fn region_equals_full_then_crop() {
        let img = RgbImage::from_fn(20, 10, |x, y| {
            image::Rgb([(x * 12) as u8, (y * 25) as u8, 90])
        });
        let cj = ColorJitter {
            hue: 0.1,
            ..ColorJitter::uniform(0.4)
        };
        let mut rng = StdRng::seed_from_u64(7);
        for _ in 0..5 {
            let d = cj.sample(&mut rng);
            let full = d.apply_region(&img, CropBox::full(20, 10));
            let b = CropBox {
                left: 3,
                top: 2,
                width: 9,
                height: 5,
            };
            let part = d.apply_region(&img, b);
            let crop = image::imageops::crop_imm(&full, 3, 2, 9, 5).to_image();
            assert_eq!(part, crop);
        }
        assert!(ColorJitter { hue: 0.6, ..cj }.validate().is_err());
    }
}
