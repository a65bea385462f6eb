//! [`TrainLoop`]: a training run driven one micro-batch at a time, the public face of the engine.
//!
//! The caller owns the model and the data; the loop owns everything else, by concern:
//!
//! * the update ([`crate::update::Updater`]): data-parallel reductions, clipping, AdamW with the
//!   scheduled lr and weight decay;
//! * the records ([`crate::records::Records`]): `metrics.jsonl`, log lines, progress bar, plot;
//! * the checkpoint policy ([`crate::checkpoint_policy::CheckpointPolicy`]): when to save, what
//!   to keep, how a run directory is opened or resumed;
//! * the trainer state (step, epoch, data position, best metric) and the run's generator.
//!
//! Per micro-batch the caller computes the loss (a scalar tensor whose graph reaches the model's
//! `Var`s) and hands it to [`TrainLoop::micro_step`], which back-propagates `loss / accum_steps`,
//! sums the gradients, and after `accum_steps` micro-batches takes an optimizer step, logs a
//! record and saves a checkpoint when one is due.
//!
//! Data position: an epoch is `steps_per_epoch = batches_per_epoch / accum_steps` optimizer
//! steps; a trailing incomplete accumulation is not drawn. [`TrainLoop::position`] says which
//! micro-batch of which epoch to feed next. Draw all randomness from [`TrainLoop::rng`] (or from
//! generators derived from `(seed, epoch, index)` with [`TrainRng::derive`]); the generator is
//! saved with each checkpoint, so a resumed run (see [`TrainLoop::resume`]) continues bit for bit.
//! A model with its own generator for dropout / drop path (beit-model's `StochasticRng`) should be
//! reseeded from it before each forward pass ([`crate::StepContext::reseed_stochastic`] does it
//! under [`crate::fit`]); data augmentation likewise.
//!
//! Data-parallel runs: the collective is handed in ([`TrainLoop::open_in`] and siblings); the
//! plain constructors run as a single process.
//!
//! # What the step reads back
//!
//! On an accelerator a read of a device value waits for all the queued work, so the step keeps
//! its values on the device and reads back only:
//!
//! * the logged values, once at step 1, every `log_every` steps, at an epoch's end and before a
//!   checkpoint (a resumed or finishing run included): the losses and device metrics of every
//!   micro-batch since the previous read, and the gradient norms not read yet, in one read of a
//!   small vector. Each step's record is then folded and written exactly as if it had been
//!   read at its end (same means, same order in `metrics.jsonl`); steps in between return a
//!   [`StepReport`] without a record;
//! * with clipping on, the global gradient norm, one scalar per optimizer step (clipping needs
//!   it on the host).
//!
//! Every read goes through [`crate::host::read_values`], which counts them; tests pin the count
//! per run, so a read added inside the step fails them. A data-parallel run also reads each
//! micro-batch's loss and metrics for its host all-reduce: that is the transport's, not the
//! step's; a single process never does.
//!
//! Non-finite values: a non-finite loss still stops the run with [`TrainError::NonFinite`]
//! naming its step, found at the read that brings it back, and no checkpoint or model is ever
//! written with non-finite weights (every checkpoint reads first). With clipping on, a
//! non-finite loss gives a non-finite gradient norm, which skips the update and reads at once,
//! so the weights stay those of the step before. Without clipping, a non-finite gradient norm
//! known on the host (f32 gradients on the CPU) skips the update as before; one left on the
//! device is found at the next read and stops the run (`"gradient norm"`), as a non-finite
//! loss found there does; the weights of the steps in between are not saved.
//!
//! Records of `metrics.jsonl` (one JSON object per line):
//!
//! * `{"kind":"step","step":s,"epoch":e,"loss":…,"lr":…,"wd":…,"grad_norm":…,<caller metrics>…,"images_per_sec":…}`
//!   (plus `"comm_seconds"`, the time in collectives, in a data-parallel run)
//!   for every optimizer step, written when it is read back (`"skipped":true` when a non-finite
//!   gradient norm skipped the update; `images_per_sec` is the mean of the steps read together);
//! * `{"kind":"epoch","step":s,"epoch":e,"loss":…,<caller metrics>…}` with sample-weighted epoch means;
//! * `{"kind":"eval","step":s,"epoch":e,…}` from [`TrainLoop::record_eval`].

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle::Tensor;
use candle_nn::VarMap;
use serde_json::Value;

use crate::accumulate::GradAccumulator;
use crate::checkpoint::{Checkpoint, TrainerState, BEST_DIR, STATE_FILE};
use crate::checkpoint_policy::{self, CheckpointPolicy};
use crate::data_position::{gather_positions, DataPosition};
use crate::distributed::{self, Collective, SingleProcess};
use crate::error::{Result, TrainError};
use crate::metrics::MetricsWriter;
use crate::optimizer::AdamW;
use crate::param_groups::ParamGroup;
use crate::progress::TrainProgress;
use crate::records::{Records, StepRecord, METRICS_FILE};
use crate::rng::TrainRng;
use crate::step_value::StepValue;
use crate::train_config::TrainConfig;
use crate::update::Updater;

/// What the caller's forward pass returns for one micro-batch.
#[derive(Debug, Clone)]
pub struct StepOutput {
    /// Scalar loss (mean over the micro-batch), any float dtype, attached to the graph.
    pub loss: Tensor,
    /// Number of samples in the micro-batch (weights the averages and the images/s).
    pub batch_size: usize,
    /// Extra metrics of the micro-batch (e.g. `mlm_acc`, `acc1`), averaged by batch size: keep
    /// those computed on the device there (`StepValue::from(tensor)`), they are read with the
    /// logged values.
    pub metrics: Vec<(String, StepValue)>,
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
    /// Learning rate used (before the groups' lr scales).
    pub lr: f64,
    /// Weight decay used.
    pub weight_decay: f64,
    /// This step completed an epoch.
    pub epoch_end: bool,
    /// A checkpoint was written after this step.
    pub checkpoint: Option<PathBuf>,
    /// The step's record (loss, gradient norm, metrics, ...) when its values were read back at
    /// this step: at step 1, every `log_every` steps, at an epoch's end and with a checkpoint.
    /// Otherwise `None`: the values are still on the device, and [`TrainSummary`] has the
    /// first and last steps of the run.
    pub record: Option<StepRecord>,
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
    /// The record of the first optimizer step this loop took.
    pub first_step: Option<StepRecord>,
    /// The record of the last optimizer step.
    pub last_step: Option<StepRecord>,
}

/// Drives a training run; see the module documentation.
pub struct TrainLoop {
    cfg: TrainConfig,
    varmap: VarMap,
    updater: Updater,
    accum: GradAccumulator,
    records: Records,
    checkpoints: CheckpointPolicy,
    state: TrainerState,
    rng: TrainRng,
    /// The first and the latest step records read back by this loop.
    read: (Option<StepRecord>, Option<StepRecord>),
    data_position: Option<DataPosition>,
}

impl std::fmt::Debug for TrainLoop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrainLoop")
            .field("cfg", &self.cfg)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

/// The single-process world of the plain constructors.
fn single_process() -> Arc<dyn Collective> {
    Arc::new(SingleProcess)
}

impl TrainLoop {
    /// Start a fresh single-process run writing into `out_dir` (metrics, checkpoints, plot).
    /// `groups` are the optimizer groups over `varmap`'s trainable parameters; `run_config` is
    /// stored in every checkpoint for the record.
    pub fn new(
        cfg: TrainConfig,
        varmap: VarMap,
        groups: Vec<ParamGroup>,
        out_dir: &Path,
        run_config: Value,
    ) -> Result<Self> {
        Self::new_in(single_process(), cfg, varmap, groups, out_dir, run_config)
    }

    /// [`TrainLoop::new`] in the data-parallel `world`: rank 0 opens the run directory and
    /// writes; every rank starts from rank 0's initial weights.
    pub fn new_in(
        world: Arc<dyn Collective>,
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
        let primary = world.rank() == 0;
        let writer = if primary {
            checkpoint_policy::refuse_earlier_run(out_dir)?;
            Some(MetricsWriter::create(out_dir.join(METRICS_FILE))?)
        } else {
            // Rank 0 checks and creates the run directory first.
            world.barrier("opening the run directory")?;
            None
        };
        let parts = (cfg, varmap, groups);
        let tl = Self::assemble(world.clone(), parts, out_dir, state, rng, writer)?;
        if primary && world.size() > 1 {
            world.barrier("opening the run directory")?;
        }
        // Every rank starts from rank 0's initial weights.
        distributed::broadcast_vars(&*world, &tl.varmap)?;
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
        Self::open_in(
            single_process(),
            cfg,
            varmap,
            groups,
            out_dir,
            resume,
            run_config,
        )
    }

    /// [`TrainLoop::open`] in the data-parallel `world`.
    pub fn open_in(
        world: Arc<dyn Collective>,
        cfg: TrainConfig,
        varmap: VarMap,
        groups: Vec<ParamGroup>,
        out_dir: &Path,
        resume: Option<&Path>,
        run_config: Value,
    ) -> Result<Self> {
        match resume {
            Some(ck) => Self::resume_in(world, cfg, varmap, groups, out_dir, ck, run_config),
            None => Self::new_in(world, cfg, varmap, groups, out_dir, run_config),
        }
    }

    /// Continue a single-process run from `checkpoint` (a checkpoint directory, or a run
    /// directory whose newest checkpoint is used): loads the weights into `varmap`, the optimizer
    /// state, the schedule and data position and the random generator; metric records written
    /// after that checkpoint are dropped from `out_dir/metrics.jsonl`, and so are the step
    /// checkpoints after it.
    pub fn resume(
        cfg: TrainConfig,
        varmap: VarMap,
        groups: Vec<ParamGroup>,
        out_dir: &Path,
        checkpoint: &Path,
        run_config: Value,
    ) -> Result<Self> {
        Self::resume_in(
            single_process(),
            cfg,
            varmap,
            groups,
            out_dir,
            checkpoint,
            run_config,
        )
    }

    /// [`TrainLoop::resume`] in the data-parallel `world`: rank 0 trims the log and the abandoned
    /// checkpoints; every rank reads the checkpoint, and their weights are compared.
    pub fn resume_in(
        world: Arc<dyn Collective>,
        cfg: TrainConfig,
        varmap: VarMap,
        groups: Vec<ParamGroup>,
        out_dir: &Path,
        checkpoint: &Path,
        run_config: Value,
    ) -> Result<Self> {
        cfg.validate()?;
        let primary = world.rank() == 0;
        if !primary {
            // Rank 0 trims the log and the abandoned checkpoints first.
            world.barrier("opening the checkpoint to resume")?;
        }
        let ck = Checkpoint::open(checkpoint)?;
        ck.load_model(&varmap)?;
        let (state, rng) = resumed_state(&ck, &cfg, run_config)?;
        let writer = if primary {
            checkpoint_policy::drop_abandoned(out_dir, state.step)?;
            Some(MetricsWriter::resume(
                out_dir.join(METRICS_FILE),
                state.step,
            )?)
        } else {
            None
        };
        let parts = (cfg, varmap, groups);
        let mut tl = Self::assemble(world.clone(), parts, out_dir, state, rng, writer)?;
        tl.updater.optimizer_mut().load(&ck.optimizer_path())?;
        if primary && world.size() > 1 {
            world.barrier("opening the checkpoint to resume")?;
        }
        // All ranks read the same checkpoint (a shared file system); the comparison makes sure.
        if world.size() > 1 {
            distributed::check_in_sync(
                &*world,
                distributed::weights_checksum(&tl.varmap)?,
                &format!("resuming from {}", ck.dir.display()),
            )?;
        }
        tl.checkpoints.mark_saved(tl.state.step, ck.dir.clone());
        tracing::info!(
            "resumed from {} at step {} (epoch {}, batch {})",
            ck.dir.display(),
            tl.state.step,
            tl.state.epoch,
            tl.state.batch_in_epoch
        );
        Ok(tl)
    }

    fn assemble(
        world: Arc<dyn Collective>,
        (cfg, varmap, groups): (TrainConfig, VarMap, Vec<ParamGroup>),
        out_dir: &Path,
        state: TrainerState,
        rng: TrainRng,
        writer: Option<MetricsWriter>,
    ) -> Result<Self> {
        let total = cfg.total_steps();
        let progress = if cfg.show_progress && world.rank() == 0 {
            TrainProgress::new(total, state.step, "train")
        } else {
            TrainProgress::hidden(total)
        };
        let data_parallel = world.size() > 1;
        let updater = Updater::new(&cfg, groups, world)?;
        let checkpoints = CheckpointPolicy::new(out_dir, &cfg)?;
        let records = Records::new(
            writer,
            out_dir.join(METRICS_FILE),
            progress,
            &state.epoch_sums,
            (cfg.log_every, total),
            data_parallel,
        );
        Ok(Self {
            cfg,
            varmap,
            updater,
            accum: GradAccumulator::new(),
            records,
            checkpoints,
            state,
            rng,
            read: (None, None),
            data_position: None,
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
        self.updater.optimizer()
    }

    /// The run's random generator (data order, augmentation, masking, dropout).
    pub fn rng(&mut self) -> &mut TrainRng {
        &mut self.rng
    }

    /// The progress bar (e.g. to print lines above it).
    pub fn progress(&self) -> &TrainProgress {
        self.records.progress()
    }

    /// The run directory.
    pub fn out_dir(&self) -> &Path {
        self.checkpoints.manager().dir()
    }

    /// The metrics log.
    pub fn metrics_path(&self) -> &Path {
        self.records.path()
    }

    /// The data-parallel world the loop runs in.
    pub fn world(&self) -> &Arc<dyn Collective> {
        self.updater.world()
    }

    /// Scheduled learning rate at optimizer step `step`.
    pub fn lr_at(&self, step: u64) -> f64 {
        self.updater.lr_at(step)
    }

    /// Which micro-batch to feed next.
    pub fn position(&self) -> Position {
        Position {
            step: self.state.step,
            epoch: self.state.epoch,
            batch_in_epoch: self.state.batch_in_epoch,
        }
    }

    /// Record where a streamed data source stands after the micro-batch about to be handed to
    /// [`TrainLoop::micro_step`]; the next checkpoint saves it (every rank's). `None` for data
    /// read by index.
    pub fn set_data_position(&mut self, position: Option<DataPosition>) {
        self.data_position = position;
    }

    /// All optimizer steps are done.
    pub fn is_done(&self) -> bool {
        self.state.step >= self.cfg.total_steps()
    }

    /// Back-propagate one micro-batch; after `accum_steps` of them take an optimizer step and
    /// return its report. A non-finite loss stops the run (as unilm stops) with an error naming
    /// the step, when it is read back (see the module documentation).
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
        let batch_size = out.batch_size as f64;
        let global = self.updater.global_micro_batch(
            StepValue::from(loss.clone()),
            batch_size,
            loss_weight,
            out.metrics,
        )?;
        // A data-parallel run has the global loss on the host already: checked at once.
        if let StepValue::Host(value) = global.loss {
            if !value.is_finite() {
                return Err(TrainError::NonFinite {
                    what: "loss",
                    step: self.state.step,
                    value,
                });
            }
        }
        let accum = self.cfg.accum_steps;
        let scaled = if global.share != 1.0 {
            (loss * (global.share / accum as f64))?
        } else if accum > 1 {
            (loss / accum as f64)?
        } else {
            loss
        };
        self.accum.add(scaled.backward()?, self.updater.vars())?;
        self.records.add_micro_batch(
            self.state.step,
            global.loss,
            global.batch_size,
            global.metrics,
        );
        self.state.batch_in_epoch += 1;
        self.state.samples_seen += global.batch_size as u64;
        if (self.accum.micro_batches() as u64) < accum {
            return Ok(None);
        }
        self.optimizer_step().map(Some)
    }

    /// The update of the accumulated gradients, its records (read back when due), the epoch's
    /// end and a checkpoint when one is due.
    fn optimizer_step(&mut self) -> Result<StepReport> {
        let update = self.updater.apply(self.accum.take(), self.state.step)?;
        self.state.step += 1;
        let (step, epoch) = (self.state.step, self.state.epoch);
        let (lr, weight_decay) = (update.lr, update.wd);
        // A skipped update is read at once: was the loss non-finite too (the run stops)?
        let read_now = update.skipped || step % self.cfg.log_every == 0 || step == 1;
        self.records.step(step, epoch, update);
        let epoch_end = step % self.cfg.steps_per_epoch() == 0;
        let checkpoint_due = self.checkpoints.due(step, epoch_end, self.is_done());
        let read = if read_now || epoch_end || checkpoint_due {
            self.read_back()?
        } else {
            false
        };
        if epoch_end {
            self.records.end_epoch(step, epoch)?;
            self.state.epoch += 1;
            self.state.batch_in_epoch = 0;
        }
        let checkpoint = if checkpoint_due {
            Some(self.save_checkpoint()?)
        } else {
            None
        };
        if read {
            self.records.restart_clock();
        }
        let record = (self.read.1.as_ref())
            .filter(|r| read && r.step == step)
            .cloned();
        Ok(StepReport {
            step,
            epoch,
            lr,
            weight_decay,
            epoch_end,
            checkpoint,
            record,
        })
    }

    /// Read the completed steps' values back and write their records (nothing to do when none
    /// waits); fails on a non-finite loss or gradient norm. Returns whether a read happened.
    fn read_back(&mut self) -> Result<bool> {
        let read = self.records.read_back()?;
        let Some(last) = read.last() else {
            return Ok(false);
        };
        if self.read.0.is_none() {
            self.read.0 = read.first().cloned();
        }
        self.read.1 = Some(last.clone());
        Ok(true)
    }

    /// Log evaluation metrics (an `eval` record) and, if `best` is given and the metric
    /// improved, save the full state as the `best` checkpoint. Returns whether it improved.
    pub fn record_eval(
        &mut self,
        metrics: &[(&str, f64)],
        best: Option<&BestMetric>,
    ) -> Result<bool> {
        // The step records come first in the log.
        self.read_back()?;
        self.records
            .eval(self.state.step, self.state.epoch, metrics)?;
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
            self.save_best(&best.name, value)?;
        }
        Ok(better)
    }

    fn save_best(&mut self, name: &str, value: f64) -> Result<()> {
        self.ensure_step_boundary()?;
        self.snapshot_state()?;
        let manager = self.checkpoints.manager();
        let dir = if self.world().rank() == 0 {
            manager.save_as(
                BEST_DIR,
                &self.varmap,
                self.updater.optimizer(),
                &self.state,
            )?
        } else {
            manager.best_dir()
        };
        tracing::info!("new best {name} {value:.4}: saved {}", dir.display());
        Ok(())
    }

    fn ensure_step_boundary(&self) -> Result<()> {
        if self.accum.micro_batches() > 0 {
            return Err(TrainError::Config(
                "cannot checkpoint in the middle of a gradient accumulation".into(),
            ));
        }
        Ok(())
    }

    /// Read the completed steps back (which fails if one was not finite: no checkpoint holds
    /// non-finite weights), then copy the generator's position, the epoch's running sums and
    /// every rank's data position into the state to save (a collective in a data-parallel run).
    fn snapshot_state(&mut self) -> Result<()> {
        self.read_back()?;
        self.state.rng = self.rng.state();
        self.state.epoch_sums = self.records.epoch_sums();
        self.state.data_positions = gather_positions(&**self.world(), self.data_position)?;
        Ok(())
    }

    /// Save a checkpoint of the current step now (rotating old ones).
    pub fn save_checkpoint(&mut self) -> Result<PathBuf> {
        let step = self.state.step;
        let data_parallel = self.world().size() > 1;
        self.ensure_step_boundary()?;
        if let Some(p) = self.checkpoints.saved_at(step, data_parallel) {
            return Ok(p.clone());
        }
        self.snapshot_state()?;
        // Data-parallel: the ranks' weights must agree before rank 0 saves them for all.
        if data_parallel {
            distributed::check_in_sync(
                &**self.world(),
                distributed::weights_checksum(&self.varmap)?,
                &format!("checkpoint at step {step}"),
            )?;
        }
        let manager = self.checkpoints.manager();
        let dir = if self.world().rank() == 0 {
            manager.save(&self.varmap, self.updater.optimizer(), &self.state)?
        } else {
            manager.step_dir(step)
        };
        tracing::debug!("saved checkpoint {}", dir.display());
        self.checkpoints.mark_saved(step, dir.clone());
        Ok(dir)
    }

    /// End the run: save a final checkpoint (unless the current step is saved already), draw the
    /// curves plot (a plotting failure is logged, not fatal) and close the progress bar.
    pub fn finish(mut self) -> Result<TrainSummary> {
        let checkpoint = self.save_checkpoint()?;
        let plot = self.records.finish(self.out_dir());
        let (first_step, last_step) = self.read;
        Ok(TrainSummary {
            steps: self.state.step,
            checkpoint,
            metrics: self.records.path().to_path_buf(),
            plot,
            first_step,
            last_step,
        })
    }
}

/// The trainer state and generator of checkpoint `ck`, continued under `cfg` and `run_config`.
fn resumed_state(
    ck: &Checkpoint,
    cfg: &TrainConfig,
    run_config: Value,
) -> Result<(TrainerState, TrainRng)> {
    let mut state = ck.state.clone();
    let rng = TrainRng::from_state(&state.rng).map_err(|e| TrainError::Checkpoint {
        path: ck.dir.join(STATE_FILE),
        message: e.to_string(),
    })?;
    let train_config = serde_json::to_value(cfg).unwrap_or(Value::Null);
    if train_config != state.train_config {
        tracing::warn!(
            "resuming {} with a different training configuration; the schedules follow the new \
             one",
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
    Ok((state, rng))
}
