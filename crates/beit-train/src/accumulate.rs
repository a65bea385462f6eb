//! Gradient accumulation over micro-batches (unilm `--update_freq`).
//!
//! Each micro-batch's loss is divided by the number of micro-batches before `backward`, and the
//! parameter gradients are summed here; after the last micro-batch the sum is the gradient of
//! the mean loss, and one optimizer step is taken.

use candle::{backprop::GradStore, Var};

use crate::error::Result;

/// Sums the gradients of a fixed set of parameters over several backward passes.
#[derive(Debug, Default)]
pub struct GradAccumulator {
    grads: Option<GradStore>,
    micro_batches: usize,
}

impl GradAccumulator {
    /// An empty accumulator.
    pub fn new() -> Self {
        Self::default()
    }

    /// Add the gradients of `vars` from one backward pass; gradients of intermediate tensors in
    /// `grads` are dropped so they do not stay alive across micro-batches.
    pub fn add(&mut self, mut grads: GradStore, vars: &[Var]) -> Result<()> {
        self.micro_batches += 1;
        let acc = self.grads.get_or_insert_with(GradStore::default);
        for v in vars {
            let Some(g) = grads.remove(v.as_tensor()) else {
                continue;
            };
            let sum = match acc.remove(v.as_tensor()) {
                Some(prev) => (prev + g)?,
                None => g,
            };
            acc.insert(v.as_tensor(), sum);
        }
        Ok(())
    }

    /// Number of micro-batches added since the last [`GradAccumulator::take`].
    pub fn micro_batches(&self) -> usize {
        self.micro_batches
    }

    /// Take the accumulated gradients and reset.
    pub fn take(&mut self) -> GradStore {
        self.micro_batches = 0;
        self.grads.take().unwrap_or_default()
    }
}
