//! Gradient clipping by global norm, as `torch.nn.utils.clip_grad_norm_`.
//!
//! The global norm is the L2 norm of all gradients taken together. When it exceeds `max_norm`,
//! every gradient is multiplied by `max_norm / (norm + 1e-6)`; otherwise nothing changes. The
//! pre-clip norm is returned (unilm logs it as `grad_norm`).

use candle::{backprop::GradStore, DType, Tensor, Var};

use crate::error::Result;

/// The global L2 norm of the gradients of `vars` (parameters without a gradient are ignored).
///
/// Squares are summed in f32 on the device and read back once.
pub fn global_grad_norm(grads: &GradStore, vars: &[Var]) -> Result<f64> {
    let sums = vars
        .iter()
        .filter_map(|v| grads.get(v.as_tensor()))
        .map(|g| g.to_dtype(DType::F32)?.sqr()?.sum_all())
        .collect::<candle::Result<Vec<_>>>()?;
    if sums.is_empty() {
        return Ok(0.0);
    }
    let total = Tensor::stack(&sums, 0)?.sum_all()?.to_scalar::<f32>()?;
    Ok((total as f64).sqrt())
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
            if let Some(g) = grads.remove(v.as_tensor()) {
                grads.insert(v.as_tensor(), (g * coef)?);
            }
        }
    }
    Ok(norm)
}
