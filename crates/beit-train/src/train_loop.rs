//! [`TrainLoop`]: the optimizer, schedules, accumulation, clipping, metrics, progress and
//! checkpoints of a run, driven one micro-batch at a time.
//!
//! The caller owns the model and the data; the loop owns everything else. Per micro-batch the
//! caller computes the loss (a scalar tensor whose graph reaches the model's `Var`s) and hands it
//! to [`TrainLoop::micro_step`], which back-propagates `loss / accum_steps`, sums the gradients,
//! and after `accum_steps` micro-batches clips them, applies AdamW with the scheduled lr and
//! weight decay, logs a JSONL record and saves a checkpoint when one is due.
//!
//! Data position: an epoch is `steps_per_epoch = batches_per_epoch / accum_steps` optimizer
//! steps; a trailing incomplete accumulation is not drawn. [`TrainLoop::position`] says which
//! micro-batch of which epoch to feed next. Draw all randomness from [`TrainLoop::rng`] (or from
//! generators derived from `(seed, epoch, index)` with [`TrainRng::derive`]); the generator is
//! saved with each checkpoint, so a resumed run (see [`TrainLoop::resume`]) continues bit for bit.
//! A model with its own generator for dropout / drop path (beit-model's `StochasticRng`) should be
//! reseeded from it before each forward pass, e.g. `model.backbone().rng().reseed(rng.next_u64())`
//! (as `tests/with_model.rs` does); data augmentation likewise.
//!
//! Records of `metrics.jsonl` (one JSON object per line):
//!
//! * `{"kind":"step","step":s,"epoch":e,"loss":…,"lr":…,"wd":…,"grad_norm":…,<caller metrics>…,"images_per_sec":…}`
//!   (plus `"comm_seconds"`, the time in collectives, in a data-parallel run)
//!   after every optimizer step (`"skipped":true` when a non-finite gradient norm skipped the update);
//! * `{"kind":"epoch","step":s,"epoch":e,"loss":…,<caller metrics>…}` with sample-weighted epoch means;
//! * `{"kind":"eval","step":s,"epoch":e,…}` from [`TrainLoop::record_eval`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle::{DType, Tensor, Var};
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::accumulate::GradAccumulator;
use crate::checkpoint::{Checkpoint, CheckpointManager, TrainerState};
use crate::clip::{clip_grad_norm, global_grad_norm};
use crate::dist::{self, Collective};
use crate::error::{Result, TrainError};
use crate::metrics::{MetricAverager, MetricsWriter, Throughput};
use crate::optimizer::{AdamW, AdamWConfig};
use crate::param_groups::ParamGroup;
use crate::plot::{plot_metrics, PlotOptions};
use crate::progress::TrainProgress;
use crate::rng::TrainRng;
use crate::schedule::{CosineSchedule, LrSchedule, PolySchedule, ScheduleKind};

/// File name of the metrics log inside the run directory.
pub const METRICS_FILE: &str = "metrics.jsonl";
/// File name of the curves plot inside the run directory.
pub const PLOT_FILE: &str = "curves.png";

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

/// What the caller's forward pass returns for one micro-batch.
#[derive(Debug, Clone)]
pub struct StepOutput {
    /// Scalar loss (mean over the micro-batch), any float dtype, attached to the graph.
    pub loss: Tensor,
    /// Number of samples in the micro-batch (weights the averages and the images/s).
    pub batch_size: usize,
    /// Extra metrics of the micro-batch (e.g. `mlm_acc`, `acc1`), averaged by batch size.
    pub metrics: Vec<(String, f64)>,
}

/// Where the data stream stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    /// Optimizer steps completed.
    pub step: u64,
    /// Current epoch (0-based).
    pub epoch: u64,
    /// Index of the next micro-batch within the epoch.
    pub batch_in_epoch: u64,
}

/// The result of one optimizer step.
#[derive(Debug, Clone, PartialEq)]
pub struct StepReport {
    /// Optimizer steps completed (1 after the first).
    pub step: u64,
    /// Epoch the step belonged to.
    pub epoch: u64,
    /// Mean loss over the step's micro-batches.
    pub loss: f64,
    /// Learning rate used (before the groups' lr scales).
    pub lr: f64,
    /// Weight decay used.
    pub weight_decay: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// The update was skipped because the gradient norm was not finite.
    pub skipped: bool,
    /// Means of the caller's metrics over the step.
    pub metrics: BTreeMap<String, f64>,
    /// Samples per second over the step (wall time between steps).
    pub images_per_sec: f64,
    /// This step completed an epoch.
    pub epoch_end: bool,
    /// A checkpoint was written after this step.
    pub checkpoint: Option<PathBuf>,
}

/// Which evaluation metric selects the best checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct BestMetric {
    /// Name of the metric in the evaluation record (e.g. `acc1`).
    pub name: String,
    /// Larger is better (accuracy) or smaller is better (loss).
    pub higher_is_better: bool,
}

/// What [`TrainLoop::finish`] leaves behind.
#[derive(Debug, Clone)]
pub struct TrainSummary {
    /// Optimizer steps completed.
    pub steps: u64,
    /// The last checkpoint.
    pub checkpoint: PathBuf,
    /// The metrics log.
    pub metrics: PathBuf,
    /// The curves plot, if it could be drawn.
    pub plot: Option<PathBuf>,
}

/// Drives a training run; see the module documentation.
pub struct TrainLoop {
    cfg: TrainConfig,
    varmap: VarMap,
    optimizer: AdamW,
    vars: Vec<Var>,
    lr_sched: LrSchedule,
    wd_sched: CosineSchedule,
    accum: GradAccumulator,
    step_avg: MetricAverager,
    epoch_avg: MetricAverager,
    step_samples: u64,
    throughput: Throughput,
    state: TrainerState,
    rng: TrainRng,
    /// The log; `None` on ranks other than 0 (only rank 0 writes).
    metrics: Option<MetricsWriter>,
    metrics_path: PathBuf,
    checkpoints: CheckpointManager,
    progress: TrainProgress,
    last_saved: Option<(u64, PathBuf)>,
    warned_missing_grads: bool,
    /// The data-parallel world ([`dist::world`] when the loop was opened).
    world: Arc<dyn Collective>,
    /// Seconds spent in collectives (waits for slower ranks included) since the last step.
    comm_seconds: f64,
}

impl std::fmt::Debug for TrainLoop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrainLoop")
            .field("cfg", &self.cfg)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl TrainLoop {
    /// Start a fresh run writing into `out_dir` (metrics, checkpoints, plot). `groups` are the
    /// optimizer groups over `varmap`'s trainable parameters; `run_config` is stored in every
    /// checkpoint for the record.
    pub fn new(
        cfg: TrainConfig,
        varmap: VarMap,
        groups: Vec<ParamGroup>,
        out_dir: &Path,
        run_config: Value,
    ) -> Result<Self> {
        cfg.validate()?;
        let rng = TrainRng::seed_from_u64(cfg.seed);
        let train_config = serde_json::to_value(&cfg).unwrap_or(Value::Null);
        let state = TrainerState::new(cfg.seed, rng.state(), train_config, run_config);
        let world = dist::world();
        if world.rank() != 0 {
            // Rank 0 checks and creates the run directory first.
            world.barrier("opening the run directory")?;
            let metrics_path = out_dir.join(METRICS_FILE);
            let tl = Self::assemble(cfg, varmap, groups, out_dir, state, rng, None, metrics_path)?;
            dist::broadcast_vars(&*tl.world, &tl.varmap)?;
            return Ok(tl);
        }
        // A fresh run in a directory of an earlier one would truncate its log, and rotation
        // (newest steps first) would delete the new run's checkpoints in favour of the old ones.
        if out_dir.is_dir() {
            if let Some((step, _)) = CheckpointManager::new(out_dir, 1)?.list()?.pop() {
                return Err(TrainError::Config(format!(
                    "{} already holds checkpoints (latest: step {step}); resume from it or choose \
                     another output directory",
                    out_dir.display()
                )));
            }
        }
        let metrics = MetricsWriter::create(out_dir.join(METRICS_FILE))?;
        let metrics_path = metrics.path().to_path_buf();
        let tl = Self::assemble(
            cfg,
            varmap,
            groups,
            out_dir,
            state,
            rng,
            Some(metrics),
            metrics_path,
        )?;
        if world.size() > 1 {
            world.barrier("opening the run directory")?;
            // Every rank starts from rank 0's initial weights.
            dist::broadcast_vars(&*world, &tl.varmap)?;
        }
        Ok(tl)
    }

    /// [`TrainLoop::resume`] from `resume` when given, else [`TrainLoop::new`].
    pub fn open(
        cfg: TrainConfig,
        varmap: VarMap,
        groups: Vec<ParamGroup>,
        out_dir: &Path,
        resume: Option<&Path>,
        run_config: Value,
    ) -> Result<Self> {
        match resume {
            Some(ck) => Self::resume(cfg, varmap, groups, out_dir, ck, run_config),
            None => Self::new(cfg, varmap, groups, out_dir, run_config),
        }
    }

    /// Continue a run from `checkpoint` (a checkpoint directory, or a run directory whose newest
    /// checkpoint is used): loads the weights into `varmap`, the optimizer state, the schedule
    /// and data position and the random generator; metric records written after that checkpoint
    /// are dropped from `out_dir/metrics.jsonl`.
    pub fn resume(
        cfg: TrainConfig,
        varmap: VarMap,
        groups: Vec<ParamGroup>,
        out_dir: &Path,
        checkpoint: &Path,
        run_config: Value,
    ) -> Result<Self> {
        cfg.validate()?;
        let world = dist::world();
        let primary = world.rank() == 0;
        if !primary {
            // Rank 0 trims the log and the abandoned checkpoints first.
            world.barrier("opening the checkpoint to resume")?;
        }
        let ck = Checkpoint::open(checkpoint)?;
        ck.load_model(&varmap)?;
        let mut state = ck.state.clone();
        let rng = TrainRng::from_state(&state.rng).map_err(|e| TrainError::Checkpoint {
            path: ck.dir.join(crate::checkpoint::STATE_FILE),
            message: e.to_string(),
        })?;
        let train_config = serde_json::to_value(&cfg).unwrap_or(Value::Null);
        if train_config != state.train_config {
            tracing::warn!(
                "resuming {} with a different training configuration; the schedules follow the \
                 new one",
                ck.dir.display()
            );
        }
        if state.step > cfg.total_steps() {
            return Err(TrainError::Checkpoint {
                path: ck.dir.clone(),
                message: format!(
                    "checkpoint is at step {} but the configured run has only {} steps",
                    state.step,
                    cfg.total_steps()
                ),
            });
        }
        state.train_config = train_config;
        state.run_config = run_config;
        // Step checkpoints newer than the one resumed from belong to the abandoned continuation
        // (like the metrics records after it, dropped below); left in place, rotation would keep
        // them and delete the new ones.
        if primary && out_dir.is_dir() {
            for (step, dir) in CheckpointManager::new(out_dir, 1)?.list()? {
                if step > state.step {
                    tracing::warn!(
                        "removing {} (step {step} > resumed step {})",
                        dir.display(),
                        state.step
                    );
                    std::fs::remove_dir_all(&dir).map_err(crate::error::io_err(&dir))?;
                }
            }
        }
        let metrics_path = out_dir.join(METRICS_FILE);
        let metrics = if primary {
            Some(MetricsWriter::resume(&metrics_path, state.step)?)
        } else {
            None
        };
        let mut tl = Self::assemble(
            cfg,
            varmap,
            groups,
            out_dir,
            state,
            rng,
            metrics,
            metrics_path,
        )?;
        tl.optimizer.load(&ck.optimizer_path())?;
        if primary && world.size() > 1 {
            world.barrier("opening the checkpoint to resume")?;
        }
        // All ranks read the same checkpoint (a shared file system); the comparison makes sure.
        dist::check_in_sync(
            &*world,
            dist::weights_checksum(&tl.varmap)?,
            &format!("resuming from {}", ck.dir.display()),
        )?;
        tl.last_saved = Some((tl.state.step, ck.dir.clone()));
        tracing::info!(
            "resumed from {} at step {} (epoch {}, batch {})",
            ck.dir.display(),
            tl.state.step,
            tl.state.epoch,
            tl.state.batch_in_epoch
        );
        Ok(tl)
    }

    #[allow(clippy::too_many_arguments)]
    fn assemble(
        cfg: TrainConfig,
        varmap: VarMap,
        groups: Vec<ParamGroup>,
        out_dir: &Path,
        state: TrainerState,
        rng: TrainRng,
        metrics: Option<MetricsWriter>,
        metrics_path: PathBuf,
    ) -> Result<Self> {
        let world = dist::world();
        let optimizer = AdamW::new(groups, cfg.adamw)?;
        let vars = optimizer.vars();
        let checkpoints = CheckpointManager::new(out_dir, cfg.keep_last)?;
        let progress = if cfg.show_progress && world.rank() == 0 {
            TrainProgress::new(cfg.total_steps(), state.step, "train")
        } else {
            TrainProgress::hidden(cfg.total_steps())
        };
        Ok(Self {
            lr_sched: cfg.lr_schedule()?,
            wd_sched: cfg.wd_schedule()?,
            cfg,
            varmap,
            optimizer,
            vars,
            accum: GradAccumulator::new(),
            step_avg: MetricAverager::new(),
            epoch_avg: MetricAverager::from_sums(&state.epoch_sums),
            step_samples: 0,
            throughput: Throughput::new(),
            state,
            rng,
            metrics,
            metrics_path,
            checkpoints,
            progress,
            last_saved: None,
            warned_missing_grads: false,
            world,
            comm_seconds: 0.0,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &TrainConfig {
        &self.cfg
    }

    /// The trainer state (step, epoch, data position, best metric).
    pub fn state(&self) -> &TrainerState {
        &self.state
    }

    /// The model parameters.
    pub fn varmap(&self) -> &VarMap {
        &self.varmap
    }

    /// The optimizer.
    pub fn optimizer(&self) -> &AdamW {
        &self.optimizer
    }

    /// The run's random generator (data order, augmentation, masking, dropout).
    pub fn rng(&mut self) -> &mut TrainRng {
        &mut self.rng
    }

    /// The progress bar (e.g. to print lines above it).
    pub fn progress(&self) -> &TrainProgress {
        &self.progress
    }

    /// The run directory.
    pub fn out_dir(&self) -> &Path {
        self.checkpoints.dir()
    }

    /// The metrics log.
    pub fn metrics_path(&self) -> &Path {
        &self.metrics_path
    }

    /// The data-parallel world the loop runs in.
    pub fn world(&self) -> &Arc<dyn Collective> {
        &self.world
    }

    fn write_record(&mut self, rec: Map<String, Value>) -> Result<()> {
        match &mut self.metrics {
            Some(m) => m.write(&Value::Object(rec)),
            None => Ok(()),
        }
    }

    /// Scheduled learning rate at optimizer step `step`.
    pub fn lr_at(&self, step: u64) -> f64 {
        self.lr_sched.value(step)
    }

    /// Which micro-batch to feed next.
    pub fn position(&self) -> Position {
        Position {
            step: self.state.step,
            epoch: self.state.epoch,
            batch_in_epoch: self.state.batch_in_epoch,
        }
    }

    /// All optimizer steps are done.
    pub fn is_done(&self) -> bool {
        self.state.step >= self.cfg.total_steps()
    }

    /// Back-propagate one micro-batch; after `accum_steps` of them take an optimizer step and
    /// return its report. Fails on a non-finite loss (as unilm stops), naming the step.
    pub fn micro_step(&mut self, out: StepOutput) -> Result<Option<StepReport>> {
        self.micro_step_weighted(out, None)
    }

    /// [`TrainLoop::micro_step`] for a loss that is a mean over `loss_weight` terms rather than
    /// over the `batch_size` samples (e.g. the masked patches of a MIM batch). It matters only
    /// in a data-parallel run, where each rank's loss then counts in proportion to its terms,
    /// so that the gradient and the logged loss are those of the whole micro-batch: the same
    /// as one process that sees all of it.
    pub fn micro_step_weighted(
        &mut self,
        out: StepOutput,
        loss_weight: Option<f64>,
    ) -> Result<Option<StepReport>> {
        if self.is_done() {
            return Err(TrainError::Config(format!(
                "training already finished ({} steps)",
                self.state.step
            )));
        }
        let loss = out.loss;
        if loss.elem_count() != 1 {
            return Err(TrainError::Config(format!(
                "the loss must be a scalar, got shape {:?}",
                loss.dims()
            )));
        }
        let mut loss_val = loss.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?[0];
        let mut batch_size = out.batch_size as f64;
        let mut metrics = out.metrics;
        // In a data-parallel run, this rank's share of the global micro-batch's loss.
        let mut share = 1.0;
        if self.world.size() > 1 {
            let w = loss_weight.unwrap_or(batch_size);
            let mut sums = vec![loss_val * w, w, batch_size];
            sums.extend(metrics.iter().map(|(_, v)| v * batch_size));
            let t0 = std::time::Instant::now();
            self.world
                .all_reduce_sum_f64("loss all-reduce", &mut sums)?;
            self.comm_seconds += t0.elapsed().as_secs_f64();
            share = w * self.world.size() as f64 / sums[1];
            loss_val = sums[0] / sums[1];
            batch_size = sums[2];
            for ((_, v), s) in metrics.iter_mut().zip(&sums[3..]) {
                *v = s / batch_size;
            }
        }
        if !loss_val.is_finite() {
            return Err(TrainError::NonFinite {
                what: "loss",
                step: self.state.step,
                value: loss_val,
            });
        }
        let accum = self.cfg.accum_steps;
        let scaled = if share != 1.0 {
            (loss * (share / accum as f64))?
        } else if accum > 1 {
            (loss / accum as f64)?
        } else {
            loss
        };
        let grads = scaled.backward()?;
        self.accum.add(grads, &self.vars)?;
        self.step_avg.add("loss", loss_val, batch_size);
        for (k, v) in &metrics {
            self.step_avg.add(k, *v, batch_size);
        }
        self.step_samples += batch_size as u64;
        self.state.batch_in_epoch += 1;
        self.state.samples_seen += batch_size as u64;
        if (self.accum.micro_batches() as u64) < accum {
            return Ok(None);
        }
        self.optimizer_step().map(Some)
    }

    fn optimizer_step(&mut self) -> Result<StepReport> {
        let mut grads = self.accum.take();
        // Data-parallel: every rank continues with the mean of the ranks' gradients.
        let t0 = std::time::Instant::now();
        dist::all_reduce_grads(&*self.world, &mut grads, &self.vars)?;
        self.comm_seconds += t0.elapsed().as_secs_f64();
        let comm_seconds = std::mem::take(&mut self.comm_seconds);
        let it = self.state.step;
        let lr = self.lr_sched.value(it);
        let wd = self.wd_sched.value(it);
        let grad_norm = match self.cfg.clip_grad {
            Some(c) => clip_grad_norm(&mut grads, &self.vars, c)?,
            None => global_grad_norm(&grads, &self.vars)?,
        };
        let skipped = !grad_norm.is_finite();
        if skipped {
            tracing::warn!("step {}: gradient norm {grad_norm}, update skipped", it + 1);
        } else {
            let stats = self.optimizer.step(&grads, lr, wd)?;
            if stats.without_grad > 0 && !self.warned_missing_grads {
                self.warned_missing_grads = true;
                tracing::warn!(
                    "{} of {} parameters received no gradient (not updated)",
                    stats.without_grad,
                    stats.without_grad + stats.updated
                );
            }
        }
        drop(grads);
        self.state.step += 1;
        let step = self.state.step;
        let epoch = self.state.epoch;
        let images_per_sec = {
            let mut t = std::mem::take(&mut self.throughput);
            t.add(self.step_samples);
            t.rate()
        };
        let samples = std::mem::take(&mut self.step_samples) as f64;
        let mut means = self.step_avg.means();
        self.step_avg.reset();
        let loss = means.remove("loss").unwrap_or(f64::NAN);
        self.epoch_avg.add("loss", loss, samples);
        for (k, v) in &means {
            self.epoch_avg.add(k, *v, samples);
        }

        let mut rec = Map::new();
        rec.insert("kind".into(), json!("step"));
        rec.insert("step".into(), json!(step));
        rec.insert("epoch".into(), json!(epoch));
        rec.insert("loss".into(), json!(loss));
        rec.insert("lr".into(), json!(lr));
        rec.insert("wd".into(), json!(wd));
        rec.insert("grad_norm".into(), json!(grad_norm));
        for (k, v) in &means {
            rec.insert(k.clone(), json!(v));
        }
        rec.insert("images_per_sec".into(), json!(images_per_sec));
        if self.world.size() > 1 {
            // Time in the step's collectives (gradient and loss all-reduces, waits included).
            rec.insert("comm_seconds".into(), json!(comm_seconds));
        }
        if skipped {
            rec.insert("skipped".into(), json!(true));
        }
        self.write_record(rec)?;
        self.progress.update(step, loss, lr, images_per_sec);
        if step % self.cfg.log_every == 0 || step == 1 {
            let extra: String = means.iter().map(|(k, v)| format!(" {k} {v:.4}")).collect();
            tracing::info!(
                "step {step}/{} epoch {epoch} loss {loss:.4} lr {lr:.3e} grad_norm {grad_norm:.3}{extra} {images_per_sec:.1} img/s",
                self.cfg.total_steps()
            );
        }

        let epoch_end = step % self.cfg.steps_per_epoch() == 0;
        if epoch_end {
            let means = self.epoch_avg.means();
            self.epoch_avg.reset();
            let mut rec = Map::new();
            rec.insert("kind".into(), json!("epoch"));
            rec.insert("step".into(), json!(step));
            rec.insert("epoch".into(), json!(epoch));
            for (k, v) in &means {
                rec.insert(k.clone(), json!(v));
            }
            self.write_record(rec)?;
            tracing::info!(
                "epoch {epoch} done: {}",
                means
                    .iter()
                    .map(|(k, v)| format!("{k} {v:.4}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            self.state.epoch += 1;
            self.state.batch_in_epoch = 0;
        }
        let due = self
            .cfg
            .checkpoint_every
            .is_some_and(|n| n > 0 && step % n == 0)
            || (epoch_end && self.cfg.checkpoint_each_epoch)
            || self.is_done();
        let checkpoint = if due {
            Some(self.save_checkpoint()?)
        } else {
            None
        };
        self.throughput = Throughput::new();
        Ok(StepReport {
            step,
            epoch,
            loss,
            lr,
            weight_decay: wd,
            grad_norm,
            skipped,
            metrics: means,
            images_per_sec,
            epoch_end,
            checkpoint,
        })
    }

    /// Log evaluation metrics (an `eval` record) and, if `best` is given and the metric
    /// improved, save the full state as the `best` checkpoint. Returns whether it improved.
    pub fn record_eval(
        &mut self,
        metrics: &[(&str, f64)],
        best: Option<&BestMetric>,
    ) -> Result<bool> {
        let mut rec = Map::new();
        rec.insert("kind".into(), json!("eval"));
        rec.insert("step".into(), json!(self.state.step));
        rec.insert("epoch".into(), json!(self.state.epoch));
        for (k, v) in metrics {
            rec.insert((*k).to_string(), json!(v));
        }
        self.write_record(rec)?;
        tracing::info!(
            "eval at step {}: {}",
            self.state.step,
            metrics
                .iter()
                .map(|(k, v)| format!("{k} {v:.4}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let Some(best) = best else {
            return Ok(false);
        };
        let Some(&(_, value)) = metrics.iter().find(|(k, _)| *k == best.name) else {
            return Err(TrainError::Config(format!(
                "best-checkpoint metric `{}` is not among the evaluation metrics",
                best.name
            )));
        };
        let better = value.is_finite()
            && match self.state.best_metric {
                None => true,
                Some(b) if best.higher_is_better => value > b,
                Some(b) => value < b,
            };
        if better {
            self.state.best_metric = Some(value);
            self.state.best_step = Some(self.state.step);
            self.ensure_step_boundary()?;
            self.state.rng = self.rng.state();
            self.state.epoch_sums = self.epoch_avg.sums();
            let dir = if self.world.rank() == 0 {
                self.checkpoints.save_as(
                    crate::checkpoint::BEST_DIR,
                    &self.varmap,
                    &self.optimizer,
                    &self.state,
                )?
            } else {
                self.checkpoints.best_dir()
            };
            tracing::info!("new best {} {value:.4}: saved {}", best.name, dir.display());
        }
        Ok(better)
    }

    fn ensure_step_boundary(&self) -> Result<()> {
        if self.accum.micro_batches() > 0 {
            return Err(TrainError::Config(
                "cannot checkpoint in the middle of a gradient accumulation".into(),
            ));
        }
        Ok(())
    }

    /// Save a checkpoint of the current step now (rotating old ones).
    pub fn save_checkpoint(&mut self) -> Result<PathBuf> {
        self.ensure_step_boundary()?;
        if let Some((s, p)) = &self.last_saved {
            // In a data-parallel run the decision must be the same on every rank (the save
            // involves a collective), so it cannot depend on when rank 0's files appear.
            if *s == self.state.step && (self.world.size() > 1 || p.exists()) {
                return Ok(p.clone());
            }
        }
        self.state.rng = self.rng.state();
        self.state.epoch_sums = self.epoch_avg.sums();
        // Data-parallel: the ranks' weights must agree before rank 0 saves them for all.
        dist::check_in_sync(
            &*self.world,
            dist::weights_checksum(&self.varmap)?,
            &format!("checkpoint at step {}", self.state.step),
        )?;
        let dir = if self.world.rank() == 0 {
            self.checkpoints
                .save(&self.varmap, &self.optimizer, &self.state)?
        } else {
            self.checkpoints.step_dir(self.state.step)
        };
        tracing::debug!("saved checkpoint {}", dir.display());
        self.last_saved = Some((self.state.step, dir.clone()));
        Ok(dir)
    }

    /// End the run: save a final checkpoint (unless the current step is saved already), draw the
    /// curves plot (a plotting failure is logged, not fatal) and close the progress bar.
    pub fn finish(mut self) -> Result<TrainSummary> {
        let checkpoint = self.save_checkpoint()?;
        self.progress.finish();
        let png = self.out_dir().join(PLOT_FILE);
        if self.metrics.is_none() {
            // Not rank 0: nothing to draw.
            return Ok(TrainSummary {
                steps: self.state.step,
                checkpoint,
                metrics: self.metrics_path.clone(),
                plot: None,
            });
        }
        let plot = match plot_metrics(&self.metrics_path, &png, &PlotOptions::default()) {
            Ok(_) => Some(png),
            Err(e) => {
                tracing::warn!("no plot: {e}");
                None
            }
        };
        Ok(TrainSummary {
            steps: self.state.step,
            checkpoint,
            metrics: self.metrics_path.clone(),
            plot,
        })
    }
}
