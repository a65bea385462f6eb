//! `ColorJitter(brightness, contrast, saturation, hue)` with torchvision's semantics: the four
//! adjustments in a random order, each with a factor drawn uniformly.

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

#[inline]
fn gray(p: [f32; 3]) -> f32 {
    // ITU-R 601-2 luma, as torchvision's rgb_to_grayscale.
    0.2989 * p[0] + 0.587 * p[1] + 0.114 * p[2]
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

/// One row of pixels as three f32 channel buffers, values in `[0, 1]`: the adjustments run as
/// tight loops over them, which vectorise, while the data stays in the L1 cache.
struct Row {
    r: Vec<f32>,
    g: Vec<f32>,
    b: Vec<f32>,
    lut: [f32; 256],
}

impl Row {
    fn new(width: usize) -> Self {
        Row {
            r: vec![0.0; width],
            g: vec![0.0; width],
            b: vec![0.0; width],
            lut: std::array::from_fn(|i| i as f32 / 255.0),
        }
    }

    /// Load interleaved RGB bytes (exactly `width` pixels).
    fn load(&mut self, px: &[u8]) {
        for (i, p) in px.chunks_exact(3).enumerate() {
            self.r[i] = self.lut[p[0] as usize];
            self.g[i] = self.lut[p[1] as usize];
            self.b[i] = self.lut[p[2] as usize];
        }
    }

    /// Write back as interleaved RGB bytes, rounding.
    fn store(&self, out: &mut [u8]) {
        let to_u8 = |v: f32| (v * 255.0 + 0.5) as u8;
        for (i, o) in out.chunks_exact_mut(3).enumerate() {
            o[0] = to_u8(self.r[i]);
            o[1] = to_u8(self.g[i]);
            o[2] = to_u8(self.b[i]);
        }
    }

    /// Sum of the grey levels of the row.
    fn gray_sum(&self) -> f64 {
        // Eight partial sums: independent chains, so the loop vectorises.
        let mut acc = [0f32; 8];
        let chunks = self
            .r
            .chunks_exact(8)
            .zip(self.g.chunks_exact(8))
            .zip(self.b.chunks_exact(8));
        for ((r, g), b) in chunks {
            for (k, a) in acc.iter_mut().enumerate() {
                *a += gray([r[k], g[k], b[k]]);
            }
        }
        let n = self.r.len();
        let full = n - n % 8;
        let mut total: f64 = acc.iter().map(|&v| v as f64).sum();
        for i in full..n {
            total += gray([self.r[i], self.g[i], self.b[i]]) as f64;
        }
        total
    }

    fn each_channel(&mut self, f: impl Fn(&mut [f32])) {
        f(&mut self.r);
        f(&mut self.g);
        f(&mut self.b);
    }

    /// Apply one adjustment to the row.
    fn apply(&mut self, op: Op, contrast_mean: f32) {
        match op {
            Op::Brightness(f) => self.each_channel(|p| {
                for v in p {
                    *v = (*v * f).min(1.0);
                }
            }),
            Op::Contrast(f) => {
                let add = (1.0 - f) * contrast_mean;
                self.each_channel(|p| {
                    for v in p {
                        *v = (f * *v + add).clamp(0.0, 1.0);
                    }
                })
            }
            Op::Saturation(f) => {
                let k = 1.0 - f;
                for ((r, g), b) in self
                    .r
                    .iter_mut()
                    .zip(self.g.iter_mut())
                    .zip(self.b.iter_mut())
                {
                    let grey = k * gray([*r, *g, *b]);
                    *r = (f * *r + grey).clamp(0.0, 1.0);
                    *g = (f * *g + grey).clamp(0.0, 1.0);
                    *b = (f * *b + grey).clamp(0.0, 1.0);
                }
            }
            Op::Hue(shift) => {
                for ((r, g), b) in self
                    .r
                    .iter_mut()
                    .zip(self.g.iter_mut())
                    .zip(self.b.iter_mut())
                {
                    [*r, *g, *b] = shift_hue([*r, *g, *b], shift);
                }
            }
        }
    }
}

impl JitterDraw {
    /// Mean grey level of the whole image as it is when the contrast step runs (torchvision
    /// computes it on the full image, after the adjustments drawn before it).
    fn contrast_mean(&self, img: &RgbImage) -> f32 {
        let Some(pos) = self.ops.iter().position(|o| matches!(o, Op::Contrast(_))) else {
            return 0.0;
        };
        let prefix = &self.ops[..pos];
        let n = (img.width() as f64 * img.height() as f64).max(1.0);
        match prefix {
            [] | [Op::Brightness(_)] => {
                // Per-channel maps only: exact mean from the channel histograms.
                let f = match prefix {
                    [Op::Brightness(f)] => *f,
                    _ => 1.0,
                };
                let mut hist = [[0u64; 256]; 3];
                for px in img.as_raw().chunks_exact(3) {
                    hist[0][px[0] as usize] += 1;
                    hist[1][px[1] as usize] += 1;
                    hist[2][px[2] as usize] += 1;
                }
                let mean = |c: usize| -> f64 {
                    (0..256)
                        .map(|v| hist[c][v] as f64 * ((v as f32 / 255.0) * f).min(1.0) as f64)
                        .sum::<f64>()
                        / n
                };
                (0.2989 * mean(0) + 0.587 * mean(1) + 0.114 * mean(2)) as f32
            }
            _ => {
                let w = img.width() as usize;
                let mut row = Row::new(w);
                let mut total = 0f64;
                for px in img.as_raw().chunks_exact(w * 3) {
                    row.load(px);
                    for &op in prefix {
                        row.apply(op, 0.0);
                    }
                    total += row.gray_sum();
                }
                (total / n) as f32
            }
        }
    }

    /// Apply to the region `b` of `img` and return that region only. Every step is per-pixel except
    /// the contrast mean, which is taken over the whole image, so this equals jittering the whole
    /// image and then cropping, at the cost of the crop only.
    pub fn apply_region(&self, img: &RgbImage, b: CropBox) -> RgbImage {
        if self.ops.is_empty() {
            return image::imageops::crop_imm(img, b.left, b.top, b.width, b.height).to_image();
        }
        let mean = self.contrast_mean(img);
        let (w, h) = (b.width as usize, b.height as usize);
        let stride = img.width() as usize * 3;
        let src = img.as_raw();
        let mut out = vec![0u8; w * h * 3];
        let mut row = Row::new(w);
        for (y, out_row) in out.chunks_exact_mut(w * 3).enumerate() {
            row.load(&src[(b.top as usize + y) * stride + b.left as usize * 3..][..w * 3]);
            for &op in &self.ops {
                row.apply(op, mean);
            }
            row.store(out_row);
        }
        RgbImage::from_raw(b.width, b.height, out).expect("buffer size matches")
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
