//! The values of the steps not read back yet.
//!
//! A micro-batch's loss and metrics are tensors on the device ([`StepValue::Device`]); so is the
//! gradient norm of a step without clipping. [`Pending`] keeps them, in order, until
//! [`Pending::read`] brings all of them back in one read (at a log step, an epoch's end, before
//! a checkpoint) and hands the steps over with host values, for the records to fold exactly as
//! if each value had been read at its step.

use crate::clip::SquaredNorm;
use crate::error::Result;
use crate::host;
use crate::step_value::{host_value, push_device, StepValue};
use crate::update::{GradNorm, Update};

/// A micro-batch waiting to be read.
#[derive(Debug)]
struct MicroBatch {
    /// Optimizer steps completed when it was trained (the step its errors name).
    steps_done: u64,
    loss: StepValue,
    batch_size: f64,
    metrics: Vec<(String, StepValue)>,
}

/// A completed optimizer step waiting to be read.
#[derive(Debug)]
struct Step {
    step: u64,
    epoch: u64,
    micro_batches: Vec<MicroBatch>,
    update: Update,
}

/// A micro-batch with its values read.
#[derive(Debug, Clone)]
pub struct ReadMicroBatch {
    /// Optimizer steps completed when it was trained.
    pub steps_done: u64,
    /// Its loss.
    pub loss: f64,
    /// Its samples.
    pub batch_size: f64,
    /// Its metrics, in the order given.
    pub metrics: Vec<(String, f64)>,
}

/// A completed optimizer step with its values read.
#[derive(Debug, Clone)]
pub struct ReadStep {
    /// Optimizer steps completed after it (1 for the first).
    pub step: u64,
    /// Its epoch.
    pub epoch: u64,
    /// Its micro-batches, in order.
    pub micro_batches: Vec<ReadMicroBatch>,
    /// Its update, the gradient norm read.
    pub update: Update,
    /// Its gradient norm before clipping.
    pub grad_norm: f64,
}

/// The micro-batches and steps not read back yet.
#[derive(Debug, Default)]
pub struct Pending {
    steps: Vec<Step>,
    open: Vec<MicroBatch>,
}

impl Pending {
    /// Nothing pending.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether a completed step waits to be read.
    pub fn has_steps(&self) -> bool {
        !self.steps.is_empty()
    }

    /// Add a micro-batch of the step under way (after `steps_done` completed ones). Device
    /// values are kept detached: a loss attached to its graph would keep the micro-batch's
    /// activations alive until the read.
    pub fn add_micro_batch(
        &mut self,
        steps_done: u64,
        loss: StepValue,
        batch_size: f64,
        metrics: Vec<(String, StepValue)>,
    ) {
        self.open.push(MicroBatch {
            steps_done,
            loss: loss.detached(),
            batch_size,
            metrics: (metrics.into_iter())
                .map(|(k, v)| (k, v.detached()))
                .collect(),
        });
    }

    /// Close optimizer step `step` of `epoch` (its micro-batches are those added since the
    /// previous step) with its `update`.
    pub fn close_step(&mut self, step: u64, epoch: u64, update: Update) {
        let micro_batches = std::mem::take(&mut self.open);
        self.steps.push(Step {
            step,
            epoch,
            micro_batches,
            update,
        });
    }

    /// Read every completed step's device values back in one read and return the steps in
    /// order; the micro-batches of the step under way stay pending.
    pub fn read(&mut self) -> Result<Vec<ReadStep>> {
        let steps = std::mem::take(&mut self.steps);
        let mut tensors = Vec::new();
        for s in &steps {
            for mb in &s.micro_batches {
                push_device(&mut tensors, &mb.loss);
                mb.metrics
                    .iter()
                    .for_each(|(_, v)| push_device(&mut tensors, v));
            }
            if let GradNorm::Pending(SquaredNorm {
                device: Some(t), ..
            }) = &s.update.grad_norm
            {
                tensors.push(t.clone());
            }
        }
        let mut values = host::read_values(&tensors)?.into_iter();
        Ok(steps
            .into_iter()
            .map(|s| read_step(s, &mut values))
            .collect())
    }
}

fn read_step(s: Step, values: &mut impl Iterator<Item = f64>) -> ReadStep {
    let micro_batches = (s.micro_batches.into_iter())
        .map(|mb| ReadMicroBatch {
            steps_done: mb.steps_done,
            loss: host_value(mb.loss, values),
            batch_size: mb.batch_size,
            metrics: (mb.metrics.into_iter())
                .map(|(k, v)| (k, host_value(v, values)))
                .collect(),
        })
        .collect();
    let grad_norm = match &s.update.grad_norm {
        GradNorm::Read(n) => *n,
        GradNorm::Pending(sq) => sq.norm_with(
            sq.device
                .as_ref()
                .map(|_| values.next().unwrap_or(f64::NAN)),
        ),
    };
    ReadStep {
        step: s.step,
        epoch: s.epoch,
        micro_batches,
        update: s.update,
        grad_norm,
    }
}
