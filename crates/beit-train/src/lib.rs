//! Training engine for BEiT on candle: what `torch.optim` + unilm's `utils.py` provide and
//! candle-nn lacks.
//!
//! The engine never sees the model type. It works on **named parameters**: `candle::Var`s in a
//! `candle_nn::VarMap`, named with Hugging Face `transformers` BEiT keys
//! (`beit.embeddings.cls_token`, `beit.encoder.layer.3.output.dense.weight`, `lm_head.weight`,
//! `classifier.bias`, …). What a name means (layer id, no-decay, role at init) is the model's
//! knowledge, asked through `beit_model::param_info::ParamInfo` (`*_with` entry points take it as a
//! trait object; the plain ones use BEiT's). Initialising a model from scratch is the model's too
//! (`beit_model::init`), fed by the engine's seeded [`TrainRng`].
//!
//! # How the pieces fit
//!
//! ```text
//!  VarMap (model, initialised by beit_model::init with a TrainRng)
//!        │
//!        └──► param_groups::build_param_groups    layer id → lr scale d^(L+1-id); decay / no-decay
//!                   │
//!                   ▼
//!  fit::fit(TrainLoop, task, epoch batches)      the one epoch loop: resume skip, short-epoch top-up,
//!        │                                       stop-after, evaluation cadence, best-model hook;
//!        │                                       StepContext: the step's position, generator, reseeding
//!        ▼
//!  train_loop::TrainLoop  (train_config::TrainConfig)   the public face: micro_step, record_eval, finish
//!        ├── accumulate::GradAccumulator              update_freq micro-batches
//!        ├── update::Updater          the update:     distributed all-reduce → clip::clip_grad_norm
//!        │                                            → optimizer::AdamW at schedule's lr / wd
//!        ├── records::Records         the records:    metrics::MetricsWriter (metrics.jsonl),
//!        │                                            progress::TrainProgress, plot::plot_metrics;
//!        │                                            pending::Pending (step values on the device
//!        │                                            until a log step reads them: host::read_values)
//!        ├── checkpoint_policy::CheckpointPolicy      when to save, keep-last-N, best, resume;
//!        │                                            files through checkpoint::CheckpointManager
//!        └── rng::TrainRng                            seeded ChaCha12 with saveable position
//! ```
//!
//! Seeds are derived by the workspace's one scheme, the `beit-rng` crate.
//!
//! Data-parallel runs ([`distributed`], feature `mpi` for the MPI world, `nccl` for the gradients
//! all-reduced on the GPUs by NCCL): the caller creates the collective and hands it to
//! [`TrainLoop::open_in`] (or [`TrainLoop::new_in`] / [`TrainLoop::resume_in`]); the loop
//! all-reduces and averages the gradients before clipping, logs global losses, writes files on
//! rank 0 only and compares a weight checksum across ranks at every checkpoint. The plain
//! constructors are the single-process path.
//!
//! [`losses`] has the fine-tuning losses (label smoothing, soft targets) and top-k accuracy,
//! [`eval`] the classification metrics of an evaluation pass. [`precision::Precision`] tells the
//! model which dtype to compute in (bf16 on CUDA with f32 master weights, f32 on CPU); drop path
//! and dropout belong to the model, whose generator [`StepContext::reseed_stochastic`] reseeds
//! from the [`rng::TrainRng`] that [`fit`] hands to every step ([`StepContext::rng`]).
//!
//! # A training run in outline
//!
//! ```no_run
//! # use beit_train::*;
//! # fn model_loss(_: &candle_nn::VarMap, _: &Vec<f32>, _: &mut TrainRng) -> candle::Result<candle::Tensor> { todo!() }
//! # fn main() -> anyhow::Result<()> {
//! struct Task { varmap: candle_nn::VarMap }
//! impl TrainTask for Task {
//!     type Batch = Vec<f32>;
//!     type Error = anyhow::Error;
//!     fn train_step(&mut self, batch: Vec<f32>, ctx: &mut StepContext<'_>) -> anyhow::Result<StepOutput> {
//!         let loss = model_loss(&self.varmap, &batch, ctx.rng)?;
//!         Ok(StepOutput { loss, batch_size: 64, metrics: vec![] })
//!     }
//!     // evaluate() and on_best() have defaults (no evaluation).
//! }
//! let varmap = candle_nn::VarMap::new();
//! // ... build the model through VarBuilder::from_varmap(&varmap, DType::F32, &device) ...
//! # use beit_model::init::{init_beit, InitConfig};
//! init_beit(&varmap, &InitConfig::pretrain(12, 0.1), &mut TrainRng::derive(0, &[0]))?;
//! let groups = build_param_groups(named_vars(&varmap), &GroupingConfig::pretrain(12))?;
//! let cfg = TrainConfig {
//!     epochs: 800, batches_per_epoch: 625, lr: 1.5e-3, min_lr: 1e-5, warmup_epochs: 10,
//!     clip_grad: Some(3.0), checkpoint_each_epoch: true, show_progress: true,
//!     ..TrainConfig::default()
//! };
//! let out = std::path::Path::new("runs/pretrain");
//! let tl = TrainLoop::new(cfg, varmap.clone(), groups, out, serde_json::json!({}))?;
//! let done = fit(
//!     tl,
//!     &mut Task { varmap },
//!     // The micro-batches of an epoch: a function of the epoch (and the seed) only.
//!     |epoch| Ok((0..625).map(move |i| Ok(vec![epoch as f32, i as f32]))),
//!     &FitOptions::default(),
//! )?;
//! # let _ = done; Ok(()) }
//! ```
//!
//! Resuming is the same with [`TrainLoop::resume`] in place of [`TrainLoop::new`]; the loop
//! restores weights, optimizer moments, schedule and data position and the generator, so on CPU
//! the resumed loss curve is bit-identical to an uninterrupted run (tested with a toy MLP and with
//! a tiny `beit-model` MIM run, dropout and drop path included). [`TrainLoop::new`] refuses a
//! directory that already holds checkpoints, so an earlier run is never overwritten by accident.
//!
//! # Conventions
//!
//! * Errors are [`TrainError`]; every file-related error names the file (and the tensor or JSON
//!   line where that applies).
//! * Nothing here prints: logs go through `tracing` (`beit_train=debug` for more), the progress
//!   bar is hidden unless stderr is a terminal.
//! * Numerical references: `scripts/fixtures/train_fixtures.py` writes `fixtures/train/*.json` from
//!   PyTorch / timm / numpy (AdamW with groups, `clip_grad_norm_`, unilm's cosine scheduler,
//!   label-smoothing and soft-target cross-entropy, top-k accuracy).

pub mod accumulate;
mod adamw_cpu;
pub mod checkpoint;
pub mod checkpoint_policy;
pub mod clip;
pub mod data_position;
pub mod distributed;
pub mod epoch_source;
pub mod error;
pub mod eval;
pub mod fit;
pub mod host;
pub mod losses;
pub mod metrics;
pub mod optimizer;
pub mod param_groups;
pub mod pending;
pub mod plot;
pub mod precision;
pub mod progress;
pub mod records;
pub mod rng;
pub mod schedule;
pub mod seg_metrics;
pub mod step_value;
pub mod train_config;
pub mod train_loop;
pub mod update;

pub use accumulate::GradAccumulator;
pub use checkpoint::{
    load_model, save_model, Checkpoint, CheckpointManager, LoadReport, TrainerState,
};
pub use clip::{clip_grad_norm, global_grad_norm, squared_grad_norm, SquaredNorm};
pub use data_position::DataPosition;
pub use epoch_source::{EpochFn, EpochSource};
pub use error::{Result, TrainError};
pub use eval::{ClassificationMetrics, EvalAccumulator};
pub use fit::{
    fit, fit_source, top_up_epoch, EvalRecord, FitOptions, FitOutcome, StepContext, TrainTask,
};
pub use losses::{
    label_smoothing_cross_entropy, soft_target_cross_entropy, target_rank, topk_accuracy,
    topk_accuracy_on_device,
};
pub use metrics::{read_jsonl, MetricAverager, MetricsWriter, Throughput};
pub use optimizer::{AdamW, AdamWConfig, StepStats};
pub use param_groups::{
    build_param_groups, build_param_groups_with, layer_id, named_vars, GroupingConfig, ParamGroup,
};
pub use plot::{plot_metrics, PlotOptions};
pub use precision::Precision;
pub use progress::TrainProgress;
pub use records::{StepRecord, METRICS_FILE, PLOT_FILE};
pub use rng::{RngState, TrainRng};
pub use schedule::{CosineSchedule, LrSchedule, PolySchedule, ScheduleKind};
pub use step_value::StepValue;
pub use train_config::{TrainConfig, POLY_WARMUP_RATIO};
pub use train_loop::{BestMetric, Position, StepOutput, StepReport, TrainLoop, TrainSummary};
