//! Gradient clipping by global norm, as `torch.nn.utils.clip_grad_norm_`.
//!
//! The global norm is the L2 norm of all gradients taken together. When it exceeds `max_norm`,
//! every gradient is multiplied by `max_norm / (norm + 1e-6)`; otherwise nothing changes. The
//! pre-clip norm is returned (unilm logs it as `grad_norm`).
//!
//! The squares of contiguous f32 gradients on the CPU are summed straight from their buffers (in
//! f64, without temporaries); other gradients go through tensor ops on their device.

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

/// The global L2 norm of the gradients of `vars` (parameters without a gradient are ignored).
pub fn global_grad_norm(grads: &GradStore, vars: &[Var]) -> Result<f64> {
    let mut total = 0f64;
    // Gradients not handled on the host: squares summed on their device, read back once.
    let mut device_sums = Vec::new();
    for g in vars.iter().filter_map(|v| grads.get(v.as_tensor())) {
        match cpu_sum_sq(g) {
            Some(s) => total += s,
            None => device_sums.push(g.to_dtype(DType::F32)?.sqr()?.sum_all()?),
        }
    }
    if !device_sums.is_empty() {
        total += Tensor::stack(&device_sums, 0)?
            .sum_all()?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
    }
    Ok(total.sqrt())
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
