//! Gradient clipping by global norm, as `torch.nn.utils.clip_grad_norm_`.
//!
//! The global norm is the L2 norm of all gradients taken together. When it exceeds `max_norm`,
//! every gradient is multiplied by `max_norm / (norm + 1e-6)`; otherwise nothing changes. The
//! pre-clip norm is returned (unilm logs it as `grad_norm`).
//!
//! The squares of contiguous f32 gradients on the CPU are summed straight from their buffers (in
//! f64, without temporaries); other gradients go through tensor ops on their device, and their
//! sum is read back once ([`crate::host`]): clipping needs the norm on the host. Without
//! clipping, [`squared_grad_norm`] leaves that sum on the device, to be read with the step's
//! logged values.

use candle::{backprop::GradStore, CpuStorage, DType, Storage, Tensor, Var};

use crate::error::Result;

/// Sum of squares of a contiguous f32 CPU tensor, accumulated in f64; `None` for anything else.
fn cpu_sum_sq(t: &Tensor) -> Option<f64> {
    if !t.device().is_cpu() || t.dtype() != DType::F32 {
        return None;
    }
    let (storage, layout) = t.storage_and_layout();
    let (start, end) = layout.contiguous_offsets()?;
    match &*storage {
        Storage::Cpu(CpuStorage::F32(v)) => Some(
            v[start..end]
                .iter()
                .map(|&x| f64::from(x) * f64::from(x))
                .sum(),
        ),
        _ => None,
    }
}

/// The squared global norm of a set of gradients, in two parts: what was summed on the host
/// (contiguous f32 CPU gradients, in f64) and, for the other gradients, their sum of squares as
/// a scalar f32 tensor on their device, not yet read.
#[derive(Debug, Clone)]
pub struct SquaredNorm {
    /// Sum of squares taken on the host.
    pub host: f64,
    /// Sum of squares still on the device; `None` when every gradient was on the host.
    pub device: Option<Tensor>,
}

impl SquaredNorm {
    /// The norm, given the value of the device part read back (`None` without one): the host
    /// part plus the device part, square-rooted.
    pub fn norm_with(&self, device_value: Option<f64>) -> f64 {
        (self.host + device_value.unwrap_or(0.0)).sqrt()
    }

    /// The norm now: reads the device part back (one counted read, see [`crate::host`]).
    pub fn read(&self) -> Result<f64> {
        let read = crate::host::read_values(self.device.as_slice())?;
        Ok(self.norm_with(read.first().copied()))
    }
}

/// The squared global L2 norm of the gradients of `vars` (parameters without a gradient are
/// ignored), without reading anything back.
pub fn squared_grad_norm(grads: &GradStore, vars: &[Var]) -> Result<SquaredNorm> {
    let mut host = 0f64;
    let mut device_sums = Vec::new();
    for g in vars.iter().filter_map(|v| grads.get(v.as_tensor())) {
        match cpu_sum_sq(g) {
            Some(s) => host += s,
            None => device_sums.push(g.to_dtype(DType::F32)?.sqr()?.sum_all()?),
        }
    }
    let device = if device_sums.is_empty() {
        None
    } else {
        // Detached, so that a pending norm does not keep the gradients alive.
        Some(Tensor::stack(&device_sums, 0)?.sum_all()?.detach())
    };
    Ok(SquaredNorm { host, device })
}

/// The global L2 norm of the gradients of `vars` (parameters without a gradient are ignored).
/// Gradients not on the host are summed on their device and read back once.
pub fn global_grad_norm(grads: &GradStore, vars: &[Var]) -> Result<f64> {
    squared_grad_norm(grads, vars)?.read()
}

/// Clip the gradients of `vars` in `grads` to global norm `max_norm`; returns the norm before
/// clipping. A non-finite norm is returned as is and the gradients are left untouched, so the
/// caller can skip the step.
pub fn clip_grad_norm(grads: &mut GradStore, vars: &[Var], max_norm: f64) -> Result<f64> {
    let norm = global_grad_norm(grads, vars)?;
    if !norm.is_finite() {
        return Ok(norm);
    }
    let coef = max_norm / (norm + 1e-6);
    if coef < 1.0 {
        for v in vars {
            let Some(g) = grads.get(v.as_tensor()) else {
                continue;
            };
            // A new tensor rather than scaling in place: a gradient buffer may be shared.
            let scaled = (g * coef)?;
            grads.insert(v.as_tensor(), scaled);
        }
    }
    Ok(norm)
}
