//! The update of a run: the data-parallel reductions (the loss of the global micro-batch, the
//! mean gradient), gradient clipping and the AdamW step with the scheduled learning rate and
//! weight decay.
//!
//! [`Updater`] owns the optimizer and the schedules and the collective it reduces over; the
//! [`crate::TrainLoop`] hands it the accumulated gradients of each optimizer step.

use std::sync::Arc;
use std::time::Instant;

use candle::backprop::GradStore;
use candle::Var;

use crate::clip::{clip_grad_norm, global_grad_norm};
use crate::distributed::{self, Collective};
use crate::error::Result;
use crate::optimizer::AdamW;
use crate::param_groups::ParamGroup;
use crate::schedule::{CosineSchedule, LrSchedule};
use crate::train_config::TrainConfig;

/// What one optimizer step applied.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Update {
    /// Scheduled learning rate (before the groups' lr scales).
    pub lr: f64,
    /// Scheduled weight decay.
    pub wd: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// The update was skipped because the gradient norm was not finite.
    pub skipped: bool,
    /// Seconds in collectives since the previous step (waits for slower ranks included).
    pub comm_seconds: f64,
}

/// A micro-batch's loss and sample count over all ranks.
#[derive(Debug, Clone, PartialEq)]
pub struct GlobalMicroBatch {
    /// Loss of the global micro-batch.
    pub loss: f64,
    /// Samples of the global micro-batch.
    pub batch_size: f64,
    /// Sample-weighted means of the caller's metrics over the global micro-batch.
    pub metrics: Vec<(String, f64)>,
    /// Factor on this rank's loss so that the mean of the ranks' gradients is the gradient of
    /// the global micro-batch's loss (1 in a single process).
    pub share: f64,
}

/// Optimizer, schedules, clipping and the collective of a run.
pub struct Updater {
    optimizer: AdamW,
    vars: Vec<Var>,
    lr_sched: LrSchedule,
    wd_sched: CosineSchedule,
    clip_grad: Option<f64>,
    world: Arc<dyn Collective>,
    comm_seconds: f64,
    warned_missing_grads: bool,
}

impl Updater {
    /// AdamW over `groups` with `cfg`'s schedules, reducing over `world`.
    pub fn new(
        cfg: &TrainConfig,
        groups: Vec<ParamGroup>,
        world: Arc<dyn Collective>,
    ) -> Result<Self> {
        let optimizer = AdamW::new(groups, cfg.adamw)?;
        Ok(Self {
            vars: optimizer.vars(),
            optimizer,
            lr_sched: cfg.lr_schedule()?,
            wd_sched: cfg.wd_schedule()?,
            clip_grad: cfg.clip_grad,
            world,
            comm_seconds: 0.0,
            warned_missing_grads: false,
        })
    }

    /// The optimizer.
    pub fn optimizer(&self) -> &AdamW {
        &self.optimizer
    }

    /// The optimizer, to restore its state.
    pub fn optimizer_mut(&mut self) -> &mut AdamW {
        &mut self.optimizer
    }

    /// The trainable variables, in the optimizer's order.
    pub fn vars(&self) -> &[Var] {
        &self.vars
    }

    /// The collective the gradients are reduced over.
    pub fn world(&self) -> &Arc<dyn Collective> {
        &self.world
    }

    /// Scheduled learning rate at optimizer step `step`.
    pub fn lr_at(&self, step: u64) -> f64 {
        self.lr_sched.value(step)
    }

    /// The loss, sample count and metrics of the global micro-batch of which this rank computed
    /// `batch_size` samples with mean `loss` (over `loss_weight` terms, the batch size when
    /// `None`). Only a data-parallel run communicates.
    pub fn global_micro_batch(
        &mut self,
        loss: f64,
        batch_size: f64,
        loss_weight: Option<f64>,
        mut metrics: Vec<(String, f64)>,
    ) -> Result<GlobalMicroBatch> {
        let n = self.world.size();
        if n == 1 {
            return Ok(GlobalMicroBatch {
                loss,
                batch_size,
                metrics,
                share: 1.0,
            });
        }
        let w = loss_weight.unwrap_or(batch_size);
        let mut sums = vec![loss * w, w, batch_size];
        sums.extend(metrics.iter().map(|(_, v)| v * batch_size));
        let t0 = Instant::now();
        self.world
            .all_reduce_sum_f64("loss all-reduce", &mut sums)?;
        self.comm_seconds += t0.elapsed().as_secs_f64();
        let batch_size = sums[2];
        for ((_, v), s) in metrics.iter_mut().zip(&sums[3..]) {
            *v = s / batch_size;
        }
        Ok(GlobalMicroBatch {
            loss: sums[0] / sums[1],
            batch_size,
            metrics,
            share: w * n as f64 / sums[1],
        })
    }

    /// Optimizer step `step` (0-based) with the accumulated `grads`: the ranks' mean gradient,
    /// clipped to the global norm, then AdamW at the step's lr and wd. A non-finite norm skips
    /// the update (logged).
    pub fn apply(&mut self, mut grads: GradStore, step: u64) -> Result<Update> {
        // Data-parallel: every rank continues with the mean of the ranks' gradients.
        let t0 = Instant::now();
        distributed::all_reduce_grads(&*self.world, &mut grads, &self.vars)?;
        self.comm_seconds += t0.elapsed().as_secs_f64();
        let comm_seconds = std::mem::take(&mut self.comm_seconds);
        let lr = self.lr_sched.value(step);
        let wd = self.wd_sched.value(step);
        let grad_norm = match self.clip_grad {
            Some(c) => clip_grad_norm(&mut grads, &self.vars, c)?,
            None => global_grad_norm(&grads, &self.vars)?,
        };
        let skipped = !grad_norm.is_finite();
        if skipped {
            tracing::warn!(
                "step {}: gradient norm {grad_norm}, update skipped",
                step + 1
            );
        } else {
            self.adamw_step(&grads, lr, wd)?;
        }
        Ok(Update {
            lr,
            wd,
            grad_norm,
            skipped,
            comm_seconds,
        })
    }

    fn adamw_step(&mut self, grads: &GradStore, lr: f64, wd: f64) -> Result<()> {
        let stats = self.optimizer.step(grads, lr, wd)?;
        if stats.without_grad > 0 && !self.warned_missing_grads {
            self.warned_missing_grads = true;
            tracing::warn!(
                "{} of {} parameters received no gradient (not updated)",
                stats.without_grad,
                stats.without_grad + stats.updated
            );
        }
        Ok(())
    }
}
