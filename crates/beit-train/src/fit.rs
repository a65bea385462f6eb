//! [`fit`]: the one epoch loop of the workspace.
//!
//! A training recipe supplies a [`TrainTask`] (the loss of a micro-batch, an evaluation, what to
//! do when the evaluation improves) and the micro-batches of each epoch; [`fit`] drives a
//! [`TrainLoop`] through the whole run:
//!
//! * **resume**: a resumed run re-produces the interrupted epoch's first batches and drops them
//!   (augmentation depends only on `(seed, epoch, index)`), so it continues bit for bit; a
//!   streamed source ([`EpochSource`], [`fit_source`]) instead reopens the epoch at the
//!   [`DataPosition`](crate::DataPosition) saved with the checkpoint, each rank at its own;
//! * **short epochs**: when unreadable files leave an epoch short of its planned micro-batches,
//!   the epoch is topped up from supplementary, deterministic passes ([`top_up_epoch`]), so the
//!   schedule and resume positions stay exact;
//! * **stop-after**: stop at an optimizer-step boundary once that many steps are done (a
//!   checkpoint is written by [`TrainLoop::finish`]); `--resume` continues;
//! * **evaluation cadence**: every `eval_every` epochs and at the end, logged as an `eval` record;
//!   a resumed run whose last epoch ended without its evaluation (interrupted during it) runs it;
//! * **best model**: the watched metric's best value is recovered from the log on resume, and
//!   [`TrainTask::on_best`] runs each time it improves (exports, `best.json`);
//! * **randomness**: the task draws from the loop's checkpointed generator, handed to every call
//!   as [`StepContext::rng`]; the model's dropout / drop-path generator is reseeded from it by
//!   [`StepContext::reseed_stochastic`]; nothing is reseeded by hand elsewhere.
//!
//! Metrics, curves, checkpoints and the progress bar are the [`TrainLoop`]'s.

use std::collections::BTreeMap;

use beit_model::layers::StochasticRng;
use rand::RngCore;

use crate::data_position::resume_position;
use crate::epoch_source::{EpochFn, EpochSource};
use crate::error::TrainError;
use crate::metrics::read_jsonl;
use crate::records::StepRecord;
use crate::rng::TrainRng;
use crate::train_loop::{BestMetric, Position, StepOutput, TrainLoop, TrainSummary};

/// What [`fit`] hands a task with each micro-batch.
pub struct StepContext<'a> {
    /// Which micro-batch of which epoch this is.
    pub position: Position,
    /// The run's generator (checkpointed): draw masks, dropout and drop-path seeds from it.
    pub rng: &'a mut TrainRng,
    /// Set by a task whose loss is a mean over something other than the micro-batch's samples
    /// (e.g. masked patches): the number of terms. Used to weight the ranks of a data-parallel
    /// run ([`TrainLoop::micro_step_weighted`]); `None` means the batch size.
    pub loss_weight: Option<f64>,
    /// This process's rank and the world size (`(0, 1)` in a single process). In a
    /// data-parallel run each rank gets its own shard of every micro-batch.
    pub rank_and_size: (usize, usize),
}

impl StepContext<'_> {
    /// The positions in the global micro-batch of this rank's `local` samples: `k·N + r` for its
    /// `k`-th sample (rank `r` of `N`; `0..local` in a single process).
    pub fn global_positions(&self, local: usize) -> Vec<u64> {
        let (rank, size) = self.rank_and_size;
        (0..local).map(|k| (k * size + rank) as u64).collect()
    }

    /// Reseed the model's dropout / drop-path generator for a micro-batch of `local` samples on
    /// this rank: one draw of the run's generator seeds the step, and each sample is keyed by
    /// its position in the global micro-batch, so that the draws depend neither on the number
    /// of processes nor on where a resumed run started. Call it once per step, before the
    /// forward pass.
    pub fn reseed_stochastic(&mut self, stochastic: &StochasticRng, local: usize) {
        let positions = self.global_positions(local);
        stochastic.reseed_for_samples(self.rng.next_u64(), positions);
    }
}

/// The recipe-specific part of a training run.
pub trait TrainTask {
    /// One micro-batch.
    type Batch;
    /// The recipe's error type (the engine's errors convert into it).
    type Error: From<TrainError>;

    /// Forward pass of one micro-batch in training mode: its loss (attached to the graph) and
    /// metrics.
    fn train_step(
        &mut self,
        batch: Self::Batch,
        ctx: &mut StepContext<'_>,
    ) -> Result<StepOutput, Self::Error>;

    /// Evaluate the model now (called every `eval_every` epochs and at the end). The default
    /// has no evaluation.
    fn evaluate(&mut self) -> Result<Vec<(String, f64)>, Self::Error> {
        Ok(Vec::new())
    }

    /// The watched metric improved to the values in `metrics` (after `at.step` steps). Called
    /// on rank 0 only (the rank that writes files).
    fn on_best(
        &mut self,
        _metrics: &BTreeMap<String, f64>,
        _at: Position,
    ) -> Result<(), Self::Error> {
        Ok(())
    }
}

/// How [`fit`] runs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FitOptions {
    /// Evaluate every this many epochs (and after the last); `None` never evaluates.
    pub eval_every: Option<u64>,
    /// The evaluation metric that picks the best model ([`TrainTask::on_best`]).
    pub best: Option<BestMetric>,
    /// Stop once this many optimizer steps are done (at a step boundary).
    pub stop_after: Option<u64>,
}

/// An evaluation's metrics and when it ran.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalRecord {
    /// Optimizer steps done when it ran.
    pub step: u64,
    /// Epochs completed when it ran.
    pub epochs_done: u64,
    /// The metrics.
    pub metrics: BTreeMap<String, f64>,
}

/// What a [`fit`] call did.
#[derive(Debug, Clone)]
pub struct FitOutcome {
    /// The run's files (last checkpoint, metrics, curves).
    pub summary: TrainSummary,
    /// All scheduled steps are done (false when `stop_after` cut the run short).
    pub finished: bool,
    /// The first optimizer step of this invocation.
    pub first_step: Option<StepRecord>,
    /// The last optimizer step of this invocation.
    pub last_step: Option<StepRecord>,
    /// The latest evaluation (of this invocation or, after a resume, of the log).
    pub last_eval: Option<EvalRecord>,
    /// The best evaluation by [`FitOptions::best`] over the whole run.
    pub best_eval: Option<EvalRecord>,
}

/// Supplementary passes allowed to top up a short epoch.
const MAX_TOP_UPS: u64 = 3;

/// Bit where the supplementary passes of an epoch start in the epoch id: pass `k` of epoch `e`
/// is `e + k·2^40`, an id no real epoch reaches, so its shuffle and augmentations (keyed by the
/// id) differ from every real epoch's and from the other passes'.
pub const TOP_UP_SHIFT: u32 = 40;

/// The epoch id handed to `epoch_batches` for supplementary pass `pass` (1, 2, ...) of `epoch`,
/// which tops up an epoch that ran short of micro-batches (unreadable files).
pub fn top_up_epoch(epoch: u64, pass: u64) -> u64 {
    epoch + (pass << TOP_UP_SHIFT)
}

/// Run (or continue) training to the end of the schedule, or to `opts.stop_after` steps.
///
/// `epoch_batches(e)` returns the micro-batches of epoch `e` in order; it must be a function of
/// `e` alone (plus the run's seed), so that resumed and supplementary passes see the same data.
pub fn fit<T, I>(
    tl: TrainLoop,
    task: &mut T,
    epoch_batches: impl FnMut(u64) -> Result<I, T::Error>,
    opts: &FitOptions,
) -> Result<FitOutcome, T::Error>
where
    T: TrainTask,
    I: Iterator<Item = Result<T::Batch, T::Error>>,
{
    fit_source(tl, task, &mut EpochFn(epoch_batches), opts)
}

/// [`fit`] on the micro-batches of `source`; a streamed source's position after each micro-batch
/// is saved with the checkpoints, and a resumed run reopens the interrupted epoch there.
pub fn fit_source<T, S>(
    mut tl: TrainLoop,
    task: &mut T,
    source: &mut S,
    opts: &FitOptions,
) -> Result<FitOutcome, T::Error>
where
    T: TrainTask,
    S: EpochSource<Batch = T::Batch, Error = T::Error>,
{
    let (mut last_eval, mut best_eval) = evals_from_log(&tl, opts.best.as_ref())?;
    // Resumed at an epoch boundary whose evaluation never ran (interrupted during it).
    let pos = tl.position();
    if pos.step > 0
        && pos.batch_in_epoch == 0
        && eval_due(&tl, opts)
        && last_eval.as_ref().map(|e| e.step) != Some(pos.step)
    {
        evaluate(&mut tl, task, opts, &mut last_eval, &mut best_eval)?;
    }

    let stop_at = opts.stop_after.unwrap_or(u64::MAX);
    let accum = tl.config().accum_steps.max(1);
    let mut stopped = false;
    'epochs: while !tl.is_done() {
        let epoch = tl.position().epoch;
        let mut feed = EpochFeed::new(&tl, source)?;
        while !tl.is_done() && tl.position().epoch == epoch {
            let pos = tl.position();
            if pos.step >= stop_at && pos.batch_in_epoch % accum == 0 {
                stopped = true;
                break 'epochs;
            }
            let planned = tl.config().batches_per_epoch;
            let batch = feed.next_batch::<T::Error>(source, planned)?;
            tl.set_data_position(source.position(&feed.batches));
            train_micro_batch(&mut tl, task, batch)?;
        }
        if tl.position().batch_in_epoch == 0 && eval_due(&tl, opts) {
            evaluate(&mut tl, task, opts, &mut last_eval, &mut best_eval)?;
        }
    }
    let finished = tl.is_done() && !stopped;
    let summary = tl.finish()?;
    Ok(FitOutcome {
        first_step: summary.first_step.clone(),
        last_step: summary.last_step.clone(),
        summary,
        finished,
        last_eval,
        best_eval,
    })
}

/// An evaluation is due: every `eval_every` epochs and at the end.
fn eval_due(tl: &TrainLoop, opts: &FitOptions) -> bool {
    let Some(every) = opts.eval_every else {
        return false;
    };
    let epochs_done = tl.position().epoch;
    tl.is_done() || (epochs_done > 0 && epochs_done % every.max(1) == 0)
}

/// The task's step on one micro-batch, handed to the loop.
fn train_micro_batch<T: TrainTask>(
    tl: &mut TrainLoop,
    task: &mut T,
    batch: T::Batch,
) -> Result<(), T::Error> {
    let position = tl.position();
    let rank_and_size = (tl.world().rank(), tl.world().size());
    let mut ctx = StepContext {
        position,
        rng: tl.rng(),
        loss_weight: None,
        rank_and_size,
    };
    let out = task.train_step(batch, &mut ctx)?;
    let loss_weight = ctx.loss_weight;
    tl.micro_step_weighted(out, loss_weight)?;
    Ok(())
}

/// The micro-batches of one epoch: those a resumed run already trained on are skipped (or, for a
/// streamed source, not read again), and a short epoch is topped up from supplementary passes.
struct EpochFeed<S: EpochSource> {
    epoch: u64,
    batches: S::Iter,
    skip: u64,
    produced: u64,
    top_ups: u64,
}

impl<S: EpochSource> EpochFeed<S> {
    /// The feed of the loop's current epoch, from the loop's position in it.
    fn new(tl: &TrainLoop, source: &mut S) -> Result<Self, S::Error> {
        let Position {
            epoch,
            batch_in_epoch: done,
            ..
        } = tl.position();
        let saved = &tl.state().data_positions;
        if let Some(pos) = resume_position(saved, &**tl.world(), epoch, done) {
            if let Some(batches) = source.epoch_from(pos) {
                tracing::info!(
                    "epoch {epoch}: reading on from the saved data position ({} items, {done} \
                     micro-batches)",
                    pos.items
                );
                return Ok(Self::at(epoch, batches?, done, done));
            }
        }
        Ok(Self::at(epoch, source.epoch(epoch)?, done, 0))
    }

    fn at(epoch: u64, batches: S::Iter, skip: u64, produced: u64) -> Self {
        Self {
            epoch,
            batches,
            skip,
            produced,
            top_ups: 0,
        }
    }

    /// The next micro-batch to train on (`planned`: the epoch's micro-batches, for the error).
    fn next_batch<E>(&mut self, source: &mut S, planned: u64) -> Result<S::Batch, E>
    where
        E: From<S::Error> + From<TrainError>,
    {
        let epoch = self.epoch;
        loop {
            if let Some(b) = self.batches.next() {
                let b = b?;
                self.produced += 1;
                if self.produced > self.skip {
                    return Ok(b);
                }
                continue;
            }
            self.top_ups += 1;
            if self.top_ups > MAX_TOP_UPS {
                return Err(TrainError::Config(format!(
                    "epoch {epoch}: the data ran out after {} of {planned} micro-batches, \
                     {MAX_TOP_UPS} supplementary passes included",
                    self.produced
                ))
                .into());
            }
            tracing::warn!(
                "epoch {epoch}: fewer micro-batches than planned (unreadable files?); topping up \
                 from a supplementary pass"
            );
            self.batches = source.epoch(top_up_epoch(epoch, self.top_ups))?;
        }
    }
}

/// Run the task's evaluation, log it, and call `on_best` when the watched metric improved.
fn evaluate<T: TrainTask>(
    tl: &mut TrainLoop,
    task: &mut T,
    opts: &FitOptions,
    last_eval: &mut Option<EvalRecord>,
    best_eval: &mut Option<EvalRecord>,
) -> Result<(), T::Error> {
    let metrics = task.evaluate()?;
    if metrics.is_empty() {
        return Ok(());
    }
    let pairs: Vec<(&str, f64)> = metrics.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    tl.record_eval(&pairs, None)?;
    let pos = tl.position();
    let record = EvalRecord {
        step: pos.step,
        epochs_done: pos.epoch,
        metrics: metrics.into_iter().collect(),
    };
    if let Some(best) = &opts.best {
        let value = record.metrics.get(&best.name).copied().ok_or_else(|| {
            TrainError::Config(format!(
                "the best-model metric `{}` is not among the evaluation metrics ({})",
                best.name,
                record
                    .metrics
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })?;
        if improves(best, value, best_eval.as_ref()) {
            if tl.world().rank() == 0 {
                task.on_best(&record.metrics, pos)?;
            }
            *best_eval = Some(record.clone());
        }
    }
    *last_eval = Some(record);
    Ok(())
}

fn improves(best: &BestMetric, value: f64, so_far: Option<&EvalRecord>) -> bool {
    let Some(prev) = so_far.and_then(|r| r.metrics.get(&best.name)) else {
        return value.is_finite();
    };
    value.is_finite()
        && if best.higher_is_better {
            value > *prev
        } else {
            value < *prev
        }
}

/// The latest and the best `eval` records of the run's log (a resumed run's history).
fn evals_from_log(
    tl: &TrainLoop,
    best: Option<&BestMetric>,
) -> Result<(Option<EvalRecord>, Option<EvalRecord>), TrainError> {
    if tl.position().step == 0 || !tl.metrics_path().exists() {
        return Ok((None, None));
    }
    let (mut last, mut best_rec) = (None, None);
    for r in read_jsonl(tl.metrics_path())? {
        if r.get("kind").and_then(|v| v.as_str()) != Some("eval") {
            continue;
        }
        let num = |k: &str| r.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
        let metrics: BTreeMap<String, f64> = r
            .iter()
            .filter(|(k, _)| !matches!(k.as_str(), "kind" | "step" | "epoch"))
            .filter_map(|(k, v)| v.as_f64().map(|v| (k.clone(), v)))
            .collect();
        let rec = EvalRecord {
            step: num("step"),
            epochs_done: num("epoch"),
            metrics,
        };
        if let Some(b) = best {
            if let Some(&v) = rec.metrics.get(&b.name) {
                if improves(b, v, best_rec.as_ref()) {
                    best_rec = Some(rec.clone());
                }
            }
        }
        last = Some(rec);
    }
    Ok((last, best_rec))
}
