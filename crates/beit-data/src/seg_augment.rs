//! mmsegmentation's training pipeline for semantic segmentation, on an image and its label map
//! together: random rescale, random crop with a cap on the share of one class, horizontal flip,
//! photometric distortion, normalisation, padding (labels padded with the ignore index).
//!
//! The steps and their defaults are those of mmseg's ADE20K pipeline as unilm's BEiT recipe uses
//! it (`Resize(img_scale=(2560, 640), ratio_range=(0.5, 2.0))`, `RandomCrop(crop_size=(640,
//! 640), cat_max_ratio=0.75)`, `RandomFlip(prob=0.5)`, `PhotoMetricDistortion()`, `Normalize`,
//! `Pad(size=(640, 640), pad_val=0, seg_pad_val=255)`). Label maps are always resized with the
//! nearest neighbour, so no label is ever blended with another.

use image::RgbImage;
use rand::{Rng, RngCore};

use crate::error::{DataError, Result};
use crate::normalize::Normalize;
use crate::resize::{resize, Filter};
use crate::segmentation::{LabelMap, IGNORE_INDEX};

/// The training transform of a segmentation pair.
#[derive(Debug, Clone, PartialEq)]
pub struct SegTrainTransform {
    /// Square crop side (640).
    pub crop_size: u32,
    /// mmseg `img_scale` `(long, short)` bounds before the ratio ((2560, 640)).
    pub scale: (u32, u32),
    /// Range of the random ratio applied to `scale` ((0.5, 2.0)).
    pub ratio_range: (f64, f64),
    /// Maximum share of the most frequent class in a crop (0.75; 1.0 disables), ignored pixels
    /// excluded; up to 10 crops are drawn to satisfy it.
    pub cat_max_ratio: f64,
    /// Horizontal flip probability (0.5).
    pub hflip: f64,
    /// Apply mmseg's `PhotoMetricDistortion` (true).
    pub photometric: bool,
    /// Image resampling filter (bilinear, as mmseg's `Resize`).
    pub interpolation: Filter,
    /// Normalisation after the distortion (mean = std = 0.5 by default, i.e. mmseg's 127.5).
    pub normalize: Normalize,
}

impl Default for SegTrainTransform {
    fn default() -> Self {
        Self {
            crop_size: 640,
            scale: (2560, 640),
            ratio_range: (0.5, 2.0),
            cat_max_ratio: 0.75,
            hflip: 0.5,
            photometric: true,
            interpolation: Filter::Bilinear,
            normalize: Normalize::HALF,
        }
    }
}

/// A transformed pair: CHW normalised pixels and the label map, both `crop_size` square.
#[derive(Debug, Clone, PartialEq)]
pub struct SegSample {
    /// `3 * side * side` values, channel-major.
    pub pixels: Vec<f32>,
    /// `side * side` labels (255 = ignored, including the padding).
    pub labels: Vec<u8>,
    /// The side.
    pub side: u32,
}

impl SegTrainTransform {
    /// Check the settings; errors name the field.
    pub fn validate(&self) -> Result<()> {
        if self.crop_size == 0 {
            return Err(DataError::param("crop_size", "must be positive"));
        }
        if self.scale.0 == 0 || self.scale.1 == 0 {
            return Err(DataError::param("scale", "both sides must be positive"));
        }
        let (lo, hi) = self.ratio_range;
        if !(lo.is_finite() && hi.is_finite() && lo > 0.0 && lo <= hi) {
            return Err(DataError::param(
                "ratio_range",
                format!("needs 0 < low <= high, got [{lo}, {hi}]"),
            ));
        }
        if !(self.cat_max_ratio > 0.0 && self.cat_max_ratio <= 1.0) {
            return Err(DataError::param(
                "cat_max_ratio",
                format!("must lie in (0, 1], got {}", self.cat_max_ratio),
            ));
        }
        if !(0.0..=1.0).contains(&self.hflip) {
            return Err(DataError::param(
                "hflip",
                format!("must lie in [0, 1], got {}", self.hflip),
            ));
        }
        Ok(())
    }

    /// Apply the pipeline to `img` and `labels` (same size) with draws from `rng`.
    pub fn apply(
        &self,
        img: &RgbImage,
        labels: &LabelMap,
        rng: &mut dyn RngCore,
    ) -> Result<SegSample> {
        if img.dimensions() != (labels.width, labels.height) {
            return Err(DataError::param(
                "labels",
                format!(
                    "label map is {}x{} but the image is {}x{}",
                    labels.width,
                    labels.height,
                    img.width(),
                    img.height()
                ),
            ));
        }
        // 1. Random rescale, keeping the aspect ratio (mmcv `imrescale`).
        let ratio = rng.random_range(self.ratio_range.0..=self.ratio_range.1);
        let (long, short) = (self.scale.0 as f64 * ratio, self.scale.1 as f64 * ratio);
        let (w, h) = img.dimensions();
        let factor = (long / w.max(h) as f64).min(short / w.min(h) as f64);
        let nw = ((w as f64 * factor + 0.5) as u32).max(1);
        let nh = ((h as f64 * factor + 0.5) as u32).max(1);
        let img = resize(img, nw, nh, self.interpolation)?;
        let labels = resize_labels_nearest(labels, nw, nh);

        // 2. Random crop; redrawn (up to 10 times) while one class covers too much of it.
        let c = self.crop_size;
        let draw = |rng: &mut dyn RngCore| {
            let y = rng.random_range(0..=nh.saturating_sub(c));
            let x = rng.random_range(0..=nw.saturating_sub(c));
            (x, y, c.min(nw), c.min(nh))
        };
        let mut bbox = draw(rng);
        if self.cat_max_ratio < 1.0 {
            for _ in 0..10 {
                let mut counts = [0u64; 256];
                for_each_in(&labels, bbox, |v| counts[v as usize] += 1);
                counts[IGNORE_INDEX as usize] = 0;
                let present = counts.iter().filter(|&&n| n > 0).count();
                let total: u64 = counts.iter().sum();
                let max = counts.iter().copied().max().unwrap_or(0);
                if present > 1 && (max as f64) / (total as f64) < self.cat_max_ratio {
                    break;
                }
                bbox = draw(rng);
            }
        }
        let (x0, y0, cw, ch) = bbox;
        let mut crop_img = image::imageops::crop_imm(&img, x0, y0, cw, ch).to_image();
        let mut crop_lab = Vec::with_capacity((cw * ch) as usize);
        for_each_in(&labels, bbox, |v| crop_lab.push(v));

        // 3. Horizontal flip.
        if rng.random::<f64>() < self.hflip {
            image::imageops::flip_horizontal_in_place(&mut crop_img);
            for row in crop_lab.chunks_mut(cw as usize) {
                row.reverse();
            }
        }

        // 4. Photometric distortion (on 0..255 values, clipped after each step).
        let mut px: Vec<f32> = crop_img.as_raw().iter().map(|&v| v as f32).collect();
        if self.photometric {
            photometric_distortion(&mut px, rng);
        }

        // 5. Normalise and 6. pad to the crop size (pixels 0 after normalising, labels 255).
        let side = c as usize;
        let mut pixels = vec![0f32; 3 * side * side];
        let mut out_labels = vec![IGNORE_INDEX; side * side];
        let n = &self.normalize;
        for y in 0..ch as usize {
            for x in 0..cw as usize {
                let i = y * cw as usize + x;
                for k in 0..3 {
                    let v = px[3 * i + k] / 255.0;
                    pixels[(k * side + y) * side + x] = (v - n.mean[k]) / n.std[k];
                }
                out_labels[y * side + x] = crop_lab[i];
            }
        }
        Ok(SegSample {
            pixels,
            labels: out_labels,
            side: c,
        })
    }
}

/// Visit the labels inside `(x, y, w, h)` row by row.
fn for_each_in(labels: &LabelMap, (x0, y0, w, h): (u32, u32, u32, u32), mut f: impl FnMut(u8)) {
    let lw = labels.width as usize;
    for y in y0 as usize..(y0 + h) as usize {
        for &v in &labels.labels[y * lw + x0 as usize..y * lw + (x0 + w) as usize] {
            f(v);
        }
    }
}

/// Resize a label map with the nearest neighbour (OpenCV's `INTER_NEAREST`: output pixel `i`
/// reads source pixel `floor(i · in / out)`), never mixing labels.
pub fn resize_labels_nearest(labels: &LabelMap, width: u32, height: u32) -> LabelMap {
    let (iw, ih) = (labels.width as usize, labels.height as usize);
    let (ow, oh) = (width as usize, height as usize);
    let src = |i: usize, n_in: usize, n_out: usize| ((i * n_in) / n_out).min(n_in - 1);
    let xs: Vec<usize> = (0..ow).map(|x| src(x, iw, ow)).collect();
    let mut out = Vec::with_capacity(ow * oh);
    for y in 0..oh {
        let row = &labels.labels[src(y, ih, oh) * iw..][..iw];
        out.extend(xs.iter().map(|&x| row[x]));
    }
    LabelMap {
        width,
        height,
        labels: out,
    }
}

/// mmseg's `PhotoMetricDistortion` on interleaved RGB values in `0..=255`: random brightness
/// (delta in ±32), then random contrast (×0.5–1.5) either before or after the HSV steps,
/// random saturation (×0.5–1.5) and random hue (±18 on OpenCV's 0–180 scale); each step has
/// probability 1/2 and the values are clipped to `0..=255` after each.
pub fn photometric_distortion(px: &mut [f32], rng: &mut dyn RngCore) {
    let clip = |px: &mut [f32]| px.iter_mut().for_each(|v| *v = v.clamp(0.0, 255.0));
    if rng.random_bool(0.5) {
        let delta = rng.random_range(-32.0f32..=32.0);
        px.iter_mut().for_each(|v| *v += delta);
        clip(px);
    }
    let contrast_first = rng.random_bool(0.5);
    let contrast = |px: &mut [f32], rng: &mut dyn RngCore| {
        if rng.random_bool(0.5) {
            let alpha = rng.random_range(0.5f32..=1.5);
            px.iter_mut().for_each(|v| *v *= alpha);
            clip(px);
        }
    };
    if contrast_first {
        contrast(px, rng);
    }
    let saturation = rng.random_bool(0.5).then(|| rng.random_range(0.5f32..=1.5));
    let hue = rng
        .random_bool(0.5)
        .then(|| rng.random_range(-18.0f32..=18.0));
    if saturation.is_some() || hue.is_some() {
        for p in px.chunks_exact_mut(3) {
            let (mut h, mut s, v) = rgb_to_hsv(p[0], p[1], p[2]);
            if let Some(a) = saturation {
                s = (s * a).clamp(0.0, 1.0);
            }
            if let Some(d) = hue {
                // Degrees: OpenCV's hue unit is 2 degrees.
                h = (h + 2.0 * d).rem_euclid(360.0);
            }
            let (r, g, b) = hsv_to_rgb(h, s, v);
            p[0] = r.clamp(0.0, 255.0);
            p[1] = g.clamp(0.0, 255.0);
            p[2] = b.clamp(0.0, 255.0);
        }
    }
    if !contrast_first {
        contrast(px, rng);
    }
}

/// RGB (0..=255) to hue in degrees, saturation and value (0..=255).
fn rgb_to_hsv(r: f32, g: f32, b: f32) -> (f32, f32, f32) {
    let max = r.max(g).max(b);
    let min = r.min(g).min(b);
    let d = max - min;
    let s = if max > 0.0 { d / max } else { 0.0 };
    let h = if d == 0.0 {
        0.0
    } else if max == r {
        60.0 * ((g - b) / d)
    } else if max == g {
        60.0 * ((b - r) / d) + 120.0
    } else {
        60.0 * ((r - g) / d) + 240.0
    };
    (h.rem_euclid(360.0), s, max)
}

/// The inverse of [`rgb_to_hsv`].
fn hsv_to_rgb(h: f32, s: f32, v: f32) -> (f32, f32, f32) {
    let c = v * s;
    let hp = h / 60.0;
    let x = c * (1.0 - (hp.rem_euclid(2.0) - 1.0).abs());
    let (r, g, b) = match hp as u32 {
        0 => (c, x, 0.0),
        1 => (x, c, 0.0),
        2 => (0.0, c, x),
        3 => (0.0, x, c),
        4 => (x, 0.0, c),
        _ => (c, 0.0, x),
    };
    let m = v - c;
    (r + m, g + m, b + m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    #[test]
    fn nearest_label_resize_never_blends() {
        let m = LabelMap {
            width: 2,
            height: 2,
            labels: vec![1, 2, 3, 4],
        };
        let up = resize_labels_nearest(&m, 4, 3);
        assert_eq!(up.labels, vec![1, 1, 2, 2, 1, 1, 2, 2, 3, 3, 4, 4]);
        let up = resize_labels_nearest(&m, 4, 4);
        let down = resize_labels_nearest(&up, 2, 2);
        assert_eq!(down.labels, vec![1, 2, 3, 4]);
    }

    #[test]
    fn hsv_round_trips() {
        for &(r, g, b) in &[(10.0, 200.0, 30.0), (255.0, 0.0, 128.0), (7.0, 7.0, 7.0)] {
            let (h, s, v) = rgb_to_hsv(r, g, b);
            let (r2, g2, b2) = hsv_to_rgb(h, s, v);
            assert!((r - r2).abs() < 1e-3 && (g - g2).abs() < 1e-3 && (b - b2).abs() < 1e-3);
        }
    }

    #[test]
    fn pipeline_keeps_labels_aligned_and_pads_with_ignore() -> Result<()> {
        // Left half class 1 on a dark image, right half class 2 on a bright one.
        let (w, h) = (40u32, 20u32);
        let img = RgbImage::from_fn(w, h, |x, _| {
            if x < w / 2 {
                image::Rgb([0, 0, 0])
            } else {
                image::Rgb([255, 255, 255])
            }
        });
        let labels = LabelMap {
            width: w,
            height: h,
            labels: (0..w * h)
                .map(|i| if i % w < w / 2 { 1 } else { 2 })
                .collect(),
        };
        let t = SegTrainTransform {
            crop_size: 32,
            scale: (80, 20),
            photometric: false,
            normalize: Normalize::IDENTITY,
            ..SegTrainTransform::default()
        };
        t.validate()?;
        let mut rng = StdRng::seed_from_u64(3);
        let mut saw_pad = false;
        for _ in 0..20 {
            let s = t.apply(&img, &labels, &mut rng)?;
            assert_eq!(s.labels.len(), 32 * 32);
            // The image is resized bilinearly, the labels with the nearest neighbour: only the
            // pixels next to the class boundary may be blended.
            let (mut labelled, mut off) = (0, 0);
            for (i, &l) in s.labels.iter().enumerate() {
                let v = s.pixels[i]; // red channel, 0..1
                match l {
                    1 | 2 => {
                        labelled += 1;
                        off += usize::from((l == 1) != (v < 0.5));
                    }
                    255 => {
                        saw_pad = true;
                        assert_eq!(v, 0.0);
                    }
                    other => panic!("label {other} appeared"),
                }
            }
            assert!(
                off * 10 <= labelled,
                "{off} of {labelled} pixels misaligned"
            );
        }
        // The ratio draws images shorter than 32 px at times: padded with 255.
        assert!(saw_pad);
        assert!(SegTrainTransform {
            cat_max_ratio: 0.0,
            ..t.clone()
        }
        .validate()
        .is_err());
        Ok(())
    }

    #[test]
    fn photometric_distortion_stays_in_range() {
        let mut rng = StdRng::seed_from_u64(0);
        let mut changed = false;
        for _ in 0..10 {
            let mut px: Vec<f32> = (0..300).map(|i| (i % 256) as f32).collect();
            let before = px.clone();
            photometric_distortion(&mut px, &mut rng);
            assert!(px.iter().all(|v| (0.0..=255.0).contains(v)));
            changed |= px != before;
        }
        assert!(changed);
    }
}
