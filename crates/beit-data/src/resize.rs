//! Pillow-compatible image resampling.
//!
//! Reproduces `PIL.Image.resize` for 8-bit RGB images (the path torchvision, timm, unilm and the Hugging
//! Face processors take): a separable convolution whose kernel support grows with the downscale factor
//! (so downscaling is antialiased), horizontal pass first, 8-bit intermediate, and fixed-point weights
//! with 22 fractional bits. Matching these details keeps our outputs within one grey level of Pillow's.

use image::RgbImage;
use serde::{Deserialize, Serialize};

use crate::error::{DataError, Result};

/// Resampling filter, named as in Pillow / torchvision `InterpolationMode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Filter {
    /// Nearest neighbour (Pillow `NEAREST`, 0).
    Nearest,
    /// Box filter (Pillow `BOX`, 4).
    Box,
    /// Triangle filter (Pillow `BILINEAR`, 2).
    Bilinear,
    /// Hamming-windowed filter (Pillow `HAMMING`, 5).
    Hamming,
    /// Keys cubic with a = -0.5 (Pillow `BICUBIC`, 3).
    Bicubic,
    /// Three-lobe Lanczos (Pillow `LANCZOS`, 1).
    Lanczos,
}

impl Filter {
    /// Parse a name as users write it (`bicubic`, `bilinear`, `lanczos`, `nearest`, `box`, `hamming`,
    /// also `antialias` for Lanczos as in older Pillow) or Pillow's integer code.
    pub fn parse(name: &str) -> Result<Self> {
        Ok(match name.trim().to_ascii_lowercase().as_str() {
            "nearest" | "0" => Filter::Nearest,
            "lanczos" | "antialias" | "1" => Filter::Lanczos,
            "bilinear" | "linear" | "2" => Filter::Bilinear,
            "bicubic" | "cubic" | "3" => Filter::Bicubic,
            "box" | "4" => Filter::Box,
            "hamming" | "5" => Filter::Hamming,
            other => {
                return Err(DataError::param(
                    "interpolation",
                    format!(
                        "unknown filter `{other}` (expected nearest, bilinear, bicubic, lanczos, box or hamming)"
                    ),
                ))
            }
        })
    }

    /// Half-width of the kernel at scale 1.
    fn support(self) -> f64 {
        match self {
            Filter::Nearest | Filter::Box => 0.5,
            Filter::Bilinear | Filter::Hamming => 1.0,
            Filter::Bicubic => 2.0,
            Filter::Lanczos => 3.0,
        }
    }

    /// Kernel value at distance `x` (in input pixels at scale 1).
    fn eval(self, x: f64) -> f64 {
        match self {
            Filter::Nearest => 0.0, // handled separately
            Filter::Box => {
                if (-0.5..0.5).contains(&x) {
                    1.0
                } else {
                    0.0
                }
            }
            Filter::Bilinear => (1.0 - x.abs()).max(0.0),
            Filter::Hamming => {
                let x = x.abs();
                if x == 0.0 {
                    1.0
                } else if x >= 1.0 {
                    0.0
                } else {
                    let px = x * std::f64::consts::PI;
                    px.sin() / px * (0.54 + 0.46 * px.cos())
                }
            }
            Filter::Bicubic => {
                // Keys' cubic convolution with a = -0.5, as Pillow.
                const A: f64 = -0.5;
                let x = x.abs();
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
            Filter::Lanczos => {
                if (-3.0..3.0).contains(&x) {
                    sinc(x) * sinc(x / 3.0)
                } else {
                    0.0
                }
            }
        }
    }
}

fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        1.0
    } else {
        let px = x * std::f64::consts::PI;
        px.sin() / px
    }
}

/// Fractional bits of the fixed-point weights (Pillow: 32 - 8 - 2).
const PRECISION_BITS: u32 = 22;

/// Per-output-pixel kernel windows for one axis: output `i` reads `len[i]` inputs from `start[i]`
/// with weights `weights[i * ksize ..]`.
struct Kernel {
    start: Vec<usize>,
    len: Vec<usize>,
    ksize: usize,
    weights: Vec<i32>,
}

/// Kernel windows resampling `in_size` pixels (a region starting at 0) to `out_size`.
fn kernel(in_size: usize, out_size: usize, filter: Filter) -> Kernel {
    let scale = in_size as f64 / out_size as f64;
    let filter_scale = scale.max(1.0);
    let support = filter.support() * filter_scale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut k = Kernel {
        start: Vec::with_capacity(out_size),
        len: Vec::with_capacity(out_size),
        ksize,
        weights: vec![0; out_size * ksize],
    };
    let mut tmp = vec![0f64; ksize];
    for i in 0..out_size {
        let center = (i as f64 + 0.5) * scale;
        // Truncation toward zero as in C's (int) cast, then clamp to the region.
        let lo = ((center - support + 0.5) as i64).max(0) as usize;
        let hi = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        let n = hi.saturating_sub(lo).min(ksize);
        let mut total = 0.0;
        for (j, t) in tmp.iter_mut().enumerate().take(n) {
            *t = filter.eval((j as f64 + lo as f64 - center + 0.5) / filter_scale);
            total += *t;
        }
        let row = &mut k.weights[i * ksize..(i + 1) * ksize];
        for j in 0..n {
            let w = if total != 0.0 { tmp[j] / total } else { 0.0 };
            // Round half away from zero, as Pillow's conversion to fixed point.
            let f = w * (1u32 << PRECISION_BITS) as f64;
            row[j] = if f < 0.0 {
                (f - 0.5) as i32
            } else {
                (f + 0.5) as i32
            };
        }
        k.start.push(lo);
        k.len.push(n);
    }
    k
}

#[inline]
fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Transpose a `width` x `height` RGB image stored with `stride` bytes per row into `out`
/// (`height` x `width`, rows of `height * 3` bytes).
fn transpose_rgb(src: &[u8], stride: usize, width: usize, height: usize, out: &mut [u8]) {
    const TILE: usize = 32;
    for y0 in (0..height).step_by(TILE) {
        for x0 in (0..width).step_by(TILE) {
            for y in y0..(y0 + TILE).min(height) {
                let row = &src[y * stride..];
                for x in x0..(x0 + TILE).min(width) {
                    let o = (x * height + y) * 3;
                    out[o..o + 3].copy_from_slice(&row[x * 3..x * 3 + 3]);
                }
            }
        }
    }
}

/// Resample along rows: output row `y` is the weighted sum of input rows `k.start[y] - row0 ..`,
/// each `row_len` bytes, in Pillow's fixed point.
fn vertical_pass(src: &[u8], row_len: usize, k: &Kernel, row0: usize, out: &mut [u8]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2, checked just above.
            unsafe { vertical_pass_avx2(src, row_len, k, row0, out) };
            return;
        }
    }
    vertical_pass_body(src, row_len, k, row0, out);
}

/// [`vertical_pass_body`] compiled with AVX2 enabled, so that the row loops use 8-lane integer
/// multiplies.
///
/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn vertical_pass_avx2(src: &[u8], row_len: usize, k: &Kernel, row0: usize, out: &mut [u8]) {
    vertical_pass_body(src, row_len, k, row0, out);
}

#[inline(always)]
fn vertical_pass_body(src: &[u8], row_len: usize, k: &Kernel, row0: usize, out: &mut [u8]) {
    let mut acc = vec![0i32; row_len];
    for (y, out_row) in out.chunks_exact_mut(row_len).enumerate() {
        acc.fill(1 << (PRECISION_BITS - 1));
        let ws = &k.weights[y * k.ksize..y * k.ksize + k.len[y]];
        for (j, &w) in ws.iter().enumerate() {
            let r = k.start[y] + j - row0;
            let in_row = &src[r * row_len..(r + 1) * row_len];
            // Wrapping ops: the sums provably fit in i32 (as in Pillow), and unchecked arithmetic
            // lets the loop vectorise even in builds with overflow checks.
            for (a, &p) in acc.iter_mut().zip(in_row) {
                *a = a.wrapping_add((p as i32).wrapping_mul(w));
            }
        }
        for (o, &a) in out_row.iter_mut().zip(&acc) {
            *o = clip8(a);
        }
    }
}

/// Resize an RGB image to `width` x `height` the way `PIL.Image.resize(size, filter)` does.
///
/// Panics never; a zero target size is an error.
pub fn resize(img: &RgbImage, width: u32, height: u32, filter: Filter) -> Result<RgbImage> {
    let (w, h) = img.dimensions();
    resize_region(img, (0, 0, w, h), width, height, filter)
}

/// Crop `region = (left, top, width, height)` out of `img` and resize it to `width` x `height`:
/// `PIL.Image.crop(...).resize(...)`, i.e. torchvision's `resized_crop`, without copying the crop.
pub fn resize_region(
    img: &RgbImage,
    region: (u32, u32, u32, u32),
    width: u32,
    height: u32,
    filter: Filter,
) -> Result<RgbImage> {
    let (iw, ih) = img.dimensions();
    check_region((iw, ih), region, width, height)?;
    let (left, top, rw, rh) = region;
    let crop = Crop {
        src: img.as_raw(),
        stride: iw as usize * 3,
        left: left as usize,
        top: top as usize,
        width: rw as usize,
        height: rh as usize,
    };
    let (ow, oh) = (width as usize, height as usize);
    let out = if filter == Filter::Nearest {
        resize_nearest(&crop, ow, oh)
    } else {
        resize_separable(&crop, ow, oh, filter)
    };
    Ok(RgbImage::from_raw(width, height, out).expect("buffer size matches"))
}

/// A non-empty output size and a region inside the image, or an error naming the parameter.
fn check_region(
    (iw, ih): (u32, u32),
    (left, top, rw, rh): (u32, u32, u32, u32),
    width: u32,
    height: u32,
) -> Result<()> {
    if width == 0 || height == 0 {
        return Err(DataError::param(
            "size",
            format!("cannot resize to {width}x{height}"),
        ));
    }
    if rw == 0
        || rh == 0
        || left as u64 + rw as u64 > iw as u64
        || top as u64 + rh as u64 > ih as u64
    {
        return Err(DataError::param(
            "region",
            format!("crop ({left}, {top}, {rw}, {rh}) does not fit in a {iw}x{ih} image"),
        ));
    }
    Ok(())
}

/// The region of an RGB buffer being resized (checked to fit).
struct Crop<'a> {
    src: &'a [u8],
    /// Bytes per image row.
    stride: usize,
    left: usize,
    top: usize,
    width: usize,
    height: usize,
}

impl Crop<'_> {
    /// The bytes from pixel `(x, y)` of the region to the end of the image.
    fn at(&self, x: usize, y: usize) -> &[u8] {
        &self.src[(self.top + y) * self.stride + (self.left + x) * 3..]
    }
}

/// Nearest-neighbour resampling as Pillow picks the source pixels.
fn resize_nearest(crop: &Crop, ow: usize, oh: usize) -> Vec<u8> {
    // Pillow maps output pixel centres through an affine transform whose coordinates are
    // accumulated in floating point (start at half a step, add one step per pixel) and then
    // truncated; accumulating the same way reproduces its picks at exact integer boundaries.
    let coords = |n_out: usize, n_in: usize| -> Vec<usize> {
        let step = n_in as f64 / n_out as f64;
        let mut at = step * 0.5;
        (0..n_out)
            .map(|_| {
                let i = (at as usize).min(n_in - 1);
                at += step;
                i
            })
            .collect()
    };
    let xs = coords(ow, crop.width);
    let ys = coords(oh, crop.height);
    let mut out = vec![0u8; ow * oh * 3];
    for (y, &sy) in ys.iter().enumerate() {
        for (x, &sx) in xs.iter().enumerate() {
            out[(y * ow + x) * 3..(y * ow + x) * 3 + 3].copy_from_slice(&crop.at(sx, sy)[..3]);
        }
    }
    out
}

/// Pillow's separable convolution resampling: a horizontal pass over the rows the vertical pass
/// reads, then the vertical pass; a pass whose size does not change is skipped.
fn resize_separable(crop: &Crop, ow: usize, oh: usize, filter: Filter) -> Vec<u8> {
    let (rw, rh) = (crop.width, crop.height);
    let kv = (rh != oh).then(|| kernel(rh, oh, filter));
    // Rows of the region the vertical pass reads: only those need the horizontal pass.
    let (row0, row1) = match &kv {
        Some(k) => {
            let last = oh - 1;
            (k.start[0], k.start[last] + k.len[last])
        }
        None => (0, rh),
    };
    let mid_w = if rw != ow { ow } else { rw };
    let mid = horizontal_pass(crop, row0, row1 - row0, ow, filter);
    match kv {
        None => mid,
        Some(k) => {
            let mut out = vec![0u8; oh * mid_w * 3];
            vertical_pass(&mid, mid_w * 3, &k, row0, &mut out);
            out
        }
    }
}

/// `rows` rows of the region from `row0`, resampled to `ow` pixels wide (copied when the width
/// does not change), into an 8-bit buffer. It is computed as a vertical pass on the transposed
/// rows: the same integer sums, but over contiguous memory, which vectorises.
fn horizontal_pass(crop: &Crop, row0: usize, rows: usize, ow: usize, filter: Filter) -> Vec<u8> {
    let rw = crop.width;
    if rw == ow {
        let mut mid = vec![0u8; rows * rw * 3];
        for (r, out_row) in mid.chunks_exact_mut(rw * 3).enumerate() {
            out_row.copy_from_slice(&crop.at(0, row0 + r)[..rw * 3]);
        }
        return mid;
    }
    let kh = kernel(rw, ow, filter);
    let mut t = vec![0u8; rw * rows * 3];
    transpose_rgb(crop.at(0, row0), crop.stride, rw, rows, &mut t);
    let mut t_out = vec![0u8; ow * rows * 3];
    vertical_pass(&t, rows * 3, &kh, 0, &mut t_out);
    let mut mid = vec![0u8; rows * ow * 3];
    transpose_rgb(&t_out, rows * 3, rows, ow, &mut mid);
    mid
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ramp(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([(x * 7 + y * 3) as u8, (x * y) as u8, 200])
        })
    }

    #[test]
    fn identity_size_is_a_copy() {
        let img = ramp(17, 9);
        for f in [
            Filter::Bilinear,
            Filter::Bicubic,
            Filter::Lanczos,
            Filter::Nearest,
        ] {
            assert_eq!(resize(&img, 17, 9, f).unwrap(), img);
        }
    }

    #[test]
    fn constant_image_stays_constant() {
        let img = RgbImage::from_pixel(50, 31, image::Rgb([10, 128, 250]));
        for f in [
            Filter::Bilinear,
            Filter::Bicubic,
            Filter::Lanczos,
            Filter::Box,
            Filter::Hamming,
        ] {
            for (w, h) in [(7, 5), (100, 80), (50, 12)] {
                let out = resize(&img, w, h, f).unwrap();
                assert!(out.pixels().all(|p| p.0 == [10, 128, 250]), "{f:?} {w}x{h}");
            }
        }
    }

    #[test]
    fn region_equals_crop_then_resize() {
        let img = ramp(40, 30);
        let crop = image::imageops::crop_imm(&img, 5, 3, 20, 17).to_image();
        let a = resize(&crop, 11, 9, Filter::Bicubic).unwrap();
        let b = resize_region(&img, (5, 3, 20, 17), 11, 9, Filter::Bicubic).unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn bad_sizes_are_errors() {
        let img = ramp(10, 10);
        assert!(resize(&img, 0, 5, Filter::Bicubic).is_err());
        assert!(resize_region(&img, (5, 5, 6, 2), 4, 4, Filter::Bicubic).is_err());
        assert!(Filter::parse("cubicle").is_err());
        assert_eq!(Filter::parse("BICUBIC").unwrap(), Filter::Bicubic);
    }
}
