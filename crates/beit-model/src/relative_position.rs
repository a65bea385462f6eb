//! Relative position bias: the `(2Wh-1)(2Ww-1) + 3` table, its index, and resizing to other windows.

use std::collections::HashMap;
use std::sync::Mutex;

use candle::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;

use crate::interpolate::{bilinear_weights, kron_2d, not_a_knot_spline_weights};

/// Rows of the bias table for a `(wh, ww)` patch window: every relative offset plus 3 CLS entries.
pub fn num_relative_distance(window: (usize, usize)) -> usize {
    (2 * window.0 - 1) * (2 * window.1 - 1) + 3
}

/// Index into the bias table for each (query, key) token pair, `(N+1)^2` row-major, CLS first.
///
/// Patch pairs index their offset `(dh + Wh - 1) * (2Ww - 1) + (dw + Ww - 1)`; the last three rows
/// of the table are CLS-to-patch, patch-to-CLS and CLS-to-CLS.
pub fn relative_position_index(window: (usize, usize)) -> Vec<u32> {
    let (wh, ww) = window;
    let area = wh * ww;
    let n = area + 1;
    let r = num_relative_distance(window) as u32;
    let mut index = vec![0u32; n * n];
    for p in 0..area {
        let (hp, wp) = ((p / ww) as i64, (p % ww) as i64);
        for q in 0..area {
            let (hq, wq) = ((q / ww) as i64, (q % ww) as i64);
            let dh = hp - hq + wh as i64 - 1;
            let dw = wp - wq + ww as i64 - 1;
            index[(p + 1) * n + q + 1] = (dh * (2 * ww as i64 - 1) + dw) as u32;
        }
    }
    for j in 1..n {
        index[j] = r - 3; // CLS query -> patch key
        index[j * n] = r - 2; // patch query -> CLS key
    }
    index[0] = r - 1;
    index
}

/// The gather index of a window, and the table resize matrix when the window is not the table's.
type WindowTensors = (Tensor, Option<Tensor>);

/// A relative position bias table (per layer or shared), producing the additive attention bias.
#[derive(Debug)]
pub struct RelativePositionBias {
    table: Tensor,
    window: (usize, usize),
    num_heads: usize,
    /// Per-window index (and resize matrix when the window differs from the table's).
    cache: Mutex<HashMap<(usize, usize), WindowTensors>>,
}

impl Clone for RelativePositionBias {
    fn clone(&self) -> Self {
        Self {
            table: self.table.clone(),
            window: self.window,
            num_heads: self.num_heads,
            cache: Mutex::new(HashMap::new()),
        }
    }
}

impl RelativePositionBias {
    /// Load `relative_position_bias_table` of shape `(R, heads)` under `vb` for the native `window`.
    pub fn new(window: (usize, usize), num_heads: usize, vb: VarBuilder) -> Result<Self> {
        let table = vb.get_with_hints(
            (num_relative_distance(window), num_heads),
            "relative_position_bias_table",
            candle_nn::Init::Const(0.0),
        )?;
        Ok(Self {
            table,
            window,
            num_heads,
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// The table, `(R, heads)`.
    pub fn table(&self) -> &Tensor {
        &self.table
    }

    /// The additive bias `(1, heads, N+1, N+1)` for a `window` of patches.
    ///
    /// At another window than the table's, the offset part of the table is resampled bilinearly
    /// (`align_corners=False`) to the new `(2Wh-1, 2Ww-1)` grid and the 3 CLS rows kept, exactly as
    /// `transformers` does for `interpolate_pos_encoding`.
    pub fn forward(&self, window: (usize, usize)) -> Result<Tensor> {
        let (index, resize) = self.index_for(window, self.table.device())?;
        let table = match resize {
            None => self.table.clone(),
            Some(m) => {
                let rows = num_relative_distance(self.window);
                let offsets = self.table.narrow(0, 0, rows - 3)?;
                let resized = m
                    .matmul(&offsets.to_dtype(m.dtype())?)?
                    .to_dtype(self.table.dtype())?;
                Tensor::cat(&[&resized, &self.table.narrow(0, rows - 3, 3)?], 0)?
            }
        };
        let n = window.0 * window.1 + 1;
        table
            .index_select(&index, 0)?
            .reshape((n, n, self.num_heads))?
            .permute((2, 0, 1))?
            .contiguous()?
            .unsqueeze(0)
    }

    fn index_for(
        &self,
        window: (usize, usize),
        device: &Device,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let mut cache = self.cache.lock().expect("bias cache lock");
        if let Some(hit) = cache.get(&window) {
            return Ok(hit.clone());
        }
        let n = window.0 * window.1 + 1;
        let index = Tensor::from_vec(relative_position_index(window), n * n, device)?;
        let resize = if window == self.window {
            None
        } else {
            let (ih, iw) = (2 * self.window.0 - 1, 2 * self.window.1 - 1);
            let (oh, ow) = (2 * window.0 - 1, 2 * window.1 - 1);
            let m = kron_2d(
                &bilinear_weights(ih, oh),
                ih,
                oh,
                &bilinear_weights(iw, ow),
                iw,
                ow,
            );
            Some(Tensor::from_vec(m, (oh * ow, ih * iw), device)?)
        };
        cache.insert(window, (index.clone(), resize.clone()));
        Ok((index, resize))
    }
}

/// Resize a square relative-position table `(R, heads)` to a new patch-grid side `dst_grid` the way
/// unilm's fine-tuning scripts do: source offsets laid on a geometric grid (dense near 0, stretched
/// outwards) so that it spans the destination range, then an interpolating bicubic spline (scipy
/// `interp2d(kind="cubic")`) evaluated at integer offsets. The 3 CLS rows are kept.
pub fn resize_table_geometric(table: &Tensor, dst_grid: usize) -> Result<Tensor> {
    let (rows, heads) = table.dims2()?;
    let src_side = ((rows - 3) as f64).sqrt().round() as usize;
    if src_side * src_side + 3 != rows {
        candle::bail!(
            "relative position table with {rows} rows is not square (expected side^2 + 3)"
        );
    }
    let dst_side = 2 * dst_grid - 1;
    if src_side == dst_side {
        return Ok(table.clone());
    }
    if src_side < 5 {
        candle::bail!(
            "cannot resize a relative position table of a {}x{} patch grid (need >= 3x3)",
            src_side.div_ceil(2),
            src_side.div_ceil(2)
        );
    }
    let xs = geometric_offsets(src_side, dst_side);
    let half = (dst_side / 2) as f64;
    let ts: Vec<f64> = (0..dst_side).map(|k| -half + k as f64).collect();
    let w = not_a_knot_spline_weights(&xs, &ts);
    // Tensor-product spline on a grid = the 1-D spline along rows, then along columns.
    let m = kron_2d(&w, src_side, dst_side, &w, src_side, dst_side);
    let m = Tensor::from_vec(
        m,
        (dst_side * dst_side, src_side * src_side),
        table.device(),
    )?;
    let offsets = table.narrow(0, 0, rows - 3)?.to_dtype(DType::F32)?;
    let resized = m.matmul(&offsets)?.to_dtype(table.dtype())?;
    let _ = heads;
    Tensor::cat(&[&resized, &table.narrow(0, rows - 3, 3)?], 0)
}

/// Source coordinates of unilm's geometric grid: offsets `0, ±1, ±(1+q), ±(1+q+q^2), ...` with the
/// ratio `q` found by bisection so that the largest offset reaches `dst_side / 2`.
fn geometric_offsets(src_side: usize, dst_side: usize) -> Vec<f64> {
    let steps = src_side / 2;
    let target = (dst_side / 2) as f64;
    let geometric_sum = |q: f64| (1.0 - q.powi(steps as i32)) / (1.0 - q);
    let (mut left, mut right) = (1.01f64, 1.5f64);
    let mut q = left;
    while right - left > 1e-6 {
        q = (left + right) / 2.0;
        if geometric_sum(q) > target {
            right = q;
        } else {
            left = q;
        }
    }
    let mut dis = Vec::with_capacity(steps);
    let mut cur = 1.0;
    for i in 0..steps {
        dis.push(cur);
        cur += q.powi(i as i32 + 1);
    }
    let mut xs: Vec<f64> = dis.iter().rev().map(|d| -d).collect();
    xs.push(0.0);
    xs.extend(dis);
    xs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_matches_the_reference_values() {
        // Values for a 14x14 window: 27 x 27 = 729 relative offsets plus 3 cls entries.
        let idx = relative_position_index((14, 14));
        let n = 197;
        assert_eq!(num_relative_distance((14, 14)), 732);
        assert_eq!(&idx[..3], &[731, 729, 729]);
        assert_eq!(idx[n], 730);
        assert_eq!(idx[n + 1], 364);
        let max_patch = (1..n)
            .flat_map(|i| (1..n).map(move |j| (i, j)))
            .map(|(i, j)| idx[i * n + j])
            .max();
        assert_eq!(max_patch, Some(728));
    }

    #[test]
    fn bias_at_native_window_gathers_the_table() -> Result<()> {
        let dev = Device::Cpu;
        let table = Tensor::arange(0f32, (12 * 2) as f32, &dev)?.reshape((12, 2))?;
        let vb = VarBuilder::from_tensors(
            [("relative_position_bias_table".to_string(), table)]
                .into_iter()
                .collect(),
            DType::F32,
            &dev,
        );
        let rpb = RelativePositionBias::new((2, 2), 2, vb)?;
        let bias = rpb.forward((2, 2))?;
        assert_eq!(bias.dims(), &[1, 2, 5, 5]);
        let b = bias.squeeze(0)?.to_vec3::<f32>()?;
        // Head 1 of the table row 11 (cls-to-cls) = 23; patch 0 -> patch 0 is offset (0,0) = row 4.
        assert_eq!(b[1][0][0], 23.0);
        assert_eq!(b[0][1][1], 8.0);
        // A larger window resamples the table: shape follows the window.
        assert_eq!(rpb.forward((3, 3))?.dims(), &[1, 2, 10, 10]);
        Ok(())
    }

    #[test]
    fn geometric_grid_spans_the_destination() {
        let xs = geometric_offsets(27, 47);
        assert_eq!(xs.len(), 27);
        assert!((xs[26] - 23.0).abs() < 0.01, "{}", xs[26]);
        assert_eq!(xs[13], 0.0);
    }
}
