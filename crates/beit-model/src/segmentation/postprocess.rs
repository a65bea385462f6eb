//! From logits to label maps: `post_process_semantic_segmentation` with `target_sizes` (bilinear
//! resize of the logits to the original image size, then argmax over classes), and mmseg's
//! sliding-window accumulation.

use candle::{DType, Device, Result, Tensor};

use super::resize::{bilinear_matrix, resize_bilinear};

/// Rows of the output computed at once: bounds the memory of a resize to `K x ROWS x W` floats.
const ROWS_PER_CHUNK: usize = 64;

/// The class map `(height, width)` (row-major) of one image's logits `(K, h, w)`: the logits
/// resized bilinearly (`align_corners=False`) to `height x width`, then the first class of
/// largest score per pixel. Works in bands of rows, so a large photo never holds the full
/// `K x height x width` score volume.
pub fn label_map(logits: &Tensor, height: usize, width: usize) -> Result<Vec<u32>> {
    let (k, h, _) = logits.dims3()?;
    if height == 0 || width == 0 || k == 0 {
        candle::bail!("label_map: empty size ({k} classes, {height}x{width})");
    }
    let logits = logits.to_dtype(DType::F32)?;
    // Width first for all rows: (K, h, width).
    let x = resize_bilinear(&logits.unsqueeze(0)?, h, width)?.squeeze(0)?;
    let x = x.to_device(&Device::Cpu)?;
    let rows = bilinear_matrix(h, height);
    let mut out = Vec::with_capacity(height * width);
    // (h, K * width) so that a band of output rows is one matmul.
    let planes = x.transpose(0, 1)?.contiguous()?.reshape((h, k * width))?;
    for start in (0..height).step_by(ROWS_PER_CHUNK) {
        let n = ROWS_PER_CHUNK.min(height - start);
        let band = Tensor::from_slice(&rows[start * h..(start + n) * h], (n, h), &Device::Cpu)?;
        let scores = band.matmul(&planes)?.to_vec2::<f32>()?;
        for row in &scores {
            for col in 0..width {
                let mut best = 0usize;
                let mut best_v = row[col];
                for c in 1..k {
                    let v = row[c * width + col];
                    if v > best_v {
                        best_v = v;
                        best = c;
                    }
                }
                out.push(best as u32);
            }
        }
    }
    Ok(out)
}

/// mmseg's sliding-window plan: the top-left corners of `crop x crop` windows every `stride`
/// pixels over an `h x w` image, the last window of each axis moved back to end at the border.
/// Windows never exceed the image (a side shorter than `crop` gets one window of that side).
pub fn sliding_windows(
    h: usize,
    w: usize,
    crop: usize,
    stride: usize,
) -> Vec<(usize, usize, usize, usize)> {
    let grids = |n: usize| n.saturating_sub(crop).div_ceil(stride) + 1;
    let mut out = Vec::new();
    for gy in 0..grids(h) {
        for gx in 0..grids(w) {
            let y2 = (gy * stride + crop).min(h);
            let x2 = (gx * stride + crop).min(w);
            let y1 = y2.saturating_sub(crop);
            let x1 = x2.saturating_sub(crop);
            out.push((y1, x1, y2 - y1, x2 - x1));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_map_is_argmax_of_the_resized_logits() -> Result<()> {
        let dev = Device::Cpu;
        let logits = Tensor::randn(0f32, 1., (5, 7, 9), &dev)?;
        let (hh, ww) = (150, 37); // more rows than one band
        let got = label_map(&logits, hh, ww)?;
        let full = resize_bilinear(&logits.unsqueeze(0)?, hh, ww)?
            .squeeze(0)?
            .argmax(0)?
            .flatten_all()?
            .to_vec1::<u32>()?;
        let same = got.iter().zip(&full).filter(|(a, b)| a == b).count();
        // Both are the same sums, possibly added in another order: allow a near-tie or two.
        assert!(same + 2 >= full.len(), "{same} of {}", full.len());
        Ok(())
    }

    #[test]
    fn windows_follow_mmseg() {
        // ADE: 640 crops, stride 426 over 640x1000: 2 columns, the last one moved back to 360.
        assert_eq!(
            sliding_windows(640, 1000, 640, 426),
            vec![(0, 0, 640, 640), (0, 360, 640, 640)]
        );
        assert_eq!(sliding_windows(100, 100, 640, 426), vec![(0, 0, 100, 100)]);
        let w = sliding_windows(1500, 640, 640, 426);
        assert_eq!(w.len(), 4);
        assert_eq!(w[3], (860, 0, 640, 640));
    }
}
