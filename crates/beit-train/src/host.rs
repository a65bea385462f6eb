//! Reading values back from the device: the one place the engine does it, counted.
//!
//! On an accelerator every read (`to_vec*`, `to_scalar`) waits for the device to finish all the
//! work queued before it, so a training step that reads stalls the stream and leaves the device
//! idle while the host catches up. The engine therefore reads only where it must (see
//! [`crate::train_loop`]: the logged values every `log_every` steps, the gradient norm when
//! clipping is on) and always through [`read_values`], which counts the reads of the calling
//! thread ([`reads`]); tests pin the count per step, so a new read inside the step fails them.
//! Reading the tensors of a CPU run costs no stall, but it is counted the same way, so the
//! count does not depend on the device.

use std::cell::Cell;

use candle::{DType, Tensor};

use crate::error::Result;

thread_local! {
    static READS: Cell<u64> = const { Cell::new(0) };
}

/// Reads done by [`read_values`] on this thread since it started.
pub fn reads() -> u64 {
    READS.with(Cell::get)
}

/// Read `tensors` (any float dtype, any shape, all on one device) back to the host, flattened
/// and concatenated in order, as f64: one read, whatever their number. They travel as f32
/// unless one of them is f64, so every value arrives exactly (an f32, bf16 or f16 value is an
/// f32 value) and devices without f64 are served too.
///
/// The read is counted even when `tensors` is empty (the values the caller needs were all
/// computed on the host, as the gradient norm of f32 CPU gradients is): a count is a point
/// where the step needs values on the host, so a CPU run counts what an accelerator run reads.
pub fn read_values(tensors: &[Tensor]) -> Result<Vec<f64>> {
    READS.with(|r| r.set(r.get() + 1));
    if tensors.is_empty() {
        return Ok(Vec::new());
    }
    let dtype = if tensors.iter().any(|t| t.dtype() == DType::F64) {
        DType::F64
    } else {
        DType::F32
    };
    let flat = tensors
        .iter()
        .map(|t| t.flatten_all()?.to_dtype(dtype))
        .collect::<candle::Result<Vec<_>>>()?;
    let all = Tensor::cat(&flat, 0)?;
    Ok(match dtype {
        DType::F64 => all.to_vec1::<f64>()?,
        _ => all.to_vec1::<f32>()?.into_iter().map(f64::from).collect(),
    })
}

/// [`read_values`] of one tensor holding a single value.
pub fn read_scalar(t: &Tensor) -> Result<f64> {
    Ok(read_values(std::slice::from_ref(t))?[0])
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle::Device;

    #[test]
    fn one_read_brings_every_value_back_exactly() -> Result<()> {
        let dev = Device::Cpu;
        let before = reads();
        let a = Tensor::new(0.1f32, &dev)?;
        let b = Tensor::new(&[1.5f32, -2.25], &dev)?.to_dtype(DType::BF16)?;
        assert_eq!(read_values(&[a, b])?, vec![f64::from(0.1f32), 1.5, -2.25]);
        assert_eq!(reads(), before + 1);
        let c = Tensor::new(0.1f64, &dev)?;
        assert_eq!(read_scalar(&c)?, 0.1);
        assert_eq!(read_values(&[])?, Vec::<f64>::new());
        assert_eq!(reads(), before + 3);
        Ok(())
    }
}
