//! [`TrainConfig`]: the engine settings of a run (the recipe's optimisation part) and the
//! schedules they imply.

use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};
use crate::optimizer::AdamWConfig;
use crate::schedule::{CosineSchedule, LrSchedule, PolySchedule, ScheduleKind};

fn one() -> u64 {
    1
}

/// Engine settings of a run (the recipe's optimisation part).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Number of epochs.
    pub epochs: u64,
    /// Micro-batches the data source provides per epoch.
    pub batches_per_epoch: u64,
    /// Micro-batches per optimizer step (unilm `--update_freq`).
    #[serde(default = "one")]
    pub accum_steps: u64,
    /// Peak learning rate.
    pub lr: f64,
    /// Final learning rate of the schedule (`--min_lr`).
    pub min_lr: f64,
    /// The learning-rate schedule: warm-up + cosine (default) or mmseg's warm-up + poly.
    #[serde(default)]
    pub lr_schedule: ScheduleKind,
    /// Exponent of the poly schedule (mmseg `power`, 1.0).
    #[serde(default = "default_poly_power")]
    pub poly_power: f64,
    /// Warm-up epochs.
    pub warmup_epochs: u64,
    /// Warm-up steps overriding `warmup_epochs` (used only when `warmup_epochs > 0`, as unilm).
    #[serde(default)]
    pub warmup_steps: Option<u64>,
    /// Weight decay at the start.
    pub weight_decay: f64,
    /// Weight decay at the end (cosine); `None` keeps it constant.
    #[serde(default)]
    pub weight_decay_end: Option<f64>,
    /// Clip gradients to this global norm.
    #[serde(default)]
    pub clip_grad: Option<f64>,
    /// AdamW betas and eps.
    #[serde(default)]
    pub adamw: AdamWConfig,
    /// Seed of the loop's random generator.
    pub seed: u64,
    /// Log a line every this many optimizer steps.
    #[serde(default = "default_log_every")]
    pub log_every: u64,
    /// Save a checkpoint every this many optimizer steps.
    #[serde(default)]
    pub checkpoint_every: Option<u64>,
    /// Save a checkpoint at the end of every epoch.
    #[serde(default)]
    pub checkpoint_each_epoch: bool,
    /// Step checkpoints to keep.
    #[serde(default = "default_keep_last")]
    pub keep_last: usize,
    /// Draw the progress bar (still hidden when stderr is not a terminal).
    #[serde(default)]
    pub show_progress: bool,
}

fn default_poly_power() -> f64 {
    1.0
}

/// mmseg's `warmup_ratio` of the poly schedule's linear warm-up (unilm's ADE20K recipe).
pub const POLY_WARMUP_RATIO: f64 = 1e-6;

fn default_log_every() -> u64 {
    10
}
fn default_keep_last() -> usize {
    2
}

impl Default for TrainConfig {
    /// One epoch of one micro-batch per step at lr 1e-3 (cosine to 0 without warm-up), weight
    /// decay 0.05 constant, no clipping, default AdamW betas, seed 0, a log line every 10 steps,
    /// no intermediate checkpoints (the last step is always saved), 2 step checkpoints kept, no
    /// progress bar. Set `batches_per_epoch` and `epochs` for a real run.
    fn default() -> Self {
        Self {
            epochs: 1,
            batches_per_epoch: 1,
            accum_steps: 1,
            lr: 1e-3,
            min_lr: 0.0,
            lr_schedule: ScheduleKind::Cosine,
            poly_power: default_poly_power(),
            warmup_epochs: 0,
            warmup_steps: None,
            weight_decay: 0.05,
            weight_decay_end: None,
            clip_grad: None,
            adamw: AdamWConfig::default(),
            seed: 0,
            log_every: default_log_every(),
            checkpoint_every: None,
            checkpoint_each_epoch: false,
            keep_last: default_keep_last(),
            show_progress: false,
        }
    }
}

impl TrainConfig {
    /// Optimizer steps per epoch.
    pub fn steps_per_epoch(&self) -> u64 {
        self.batches_per_epoch / self.accum_steps.max(1)
    }

    /// Optimizer steps of the whole run.
    pub fn total_steps(&self) -> u64 {
        self.epochs * self.steps_per_epoch()
    }

    /// Check the values.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(TrainError::Config(m));
        if self.accum_steps == 0 {
            return bad("accum_steps must be at least 1".into());
        }
        if self.steps_per_epoch() == 0 {
            return bad(format!(
                "{} batches per epoch do not make one step of {} accumulated batches",
                self.batches_per_epoch, self.accum_steps
            ));
        }
        if self.epochs == 0 {
            return bad("epochs must be at least 1".into());
        }
        if !(self.lr.is_finite() && self.lr >= 0.0 && self.min_lr.is_finite() && self.min_lr >= 0.0)
        {
            return bad(format!(
                "lr {} / min_lr {} must be finite and >= 0",
                self.lr, self.min_lr
            ));
        }
        if let Some(c) = self.clip_grad {
            if c.is_nan() || c <= 0.0 {
                return bad(format!("clip_grad must be > 0, got {c}"));
            }
        }
        if self.log_every == 0 {
            return bad("log_every must be at least 1".into());
        }
        Ok(())
    }

    /// The per-step learning-rate schedule. Both kinds take their warm-up length the same way
    /// (`warmup_epochs` epochs, replaced by `warmup_steps` when both are set).
    pub fn lr_schedule(&self) -> Result<LrSchedule> {
        let cosine = CosineSchedule::from_epochs(
            self.lr,
            self.min_lr,
            self.epochs,
            self.steps_per_epoch(),
            self.warmup_epochs,
            self.warmup_steps,
        )?;
        Ok(match self.lr_schedule {
            ScheduleKind::Cosine => LrSchedule::Cosine(cosine),
            ScheduleKind::Poly => LrSchedule::Poly(PolySchedule::new(
                self.lr,
                self.min_lr,
                cosine.total_steps,
                cosine.warmup_steps,
                self.poly_power,
                POLY_WARMUP_RATIO,
            )?),
        })
    }

    /// The per-step weight-decay schedule (no warm-up).
    pub fn wd_schedule(&self) -> Result<CosineSchedule> {
        CosineSchedule::new(
            self.weight_decay,
            self.weight_decay_end.unwrap_or(self.weight_decay),
            self.total_steps(),
            0,
        )
    }
}
