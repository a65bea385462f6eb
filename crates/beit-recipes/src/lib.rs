//! BEiT's recipes as library functions: every training and evaluation job that `beit-cli` runs,
//! callable from Rust code and tests.
//!
//! | job | function | what it runs |
//! |---|---|---|
//! | [`tokenizer::TokenizerJob`] | [`tokenizer::train_tokenizer`] | our dVAE, Gumbel-softmax relaxation |
//! | [`pretrain::PretrainJob`] | [`pretrain::pretrain`] | masked image modeling (and the Table 4 ablations) |
//! | [`finetune::FinetuneJob`] | [`finetune::finetune`] | image classification, the unilm recipe |
//! | [`finetune_seg::FinetuneSegJob`] | [`finetune_seg::finetune_seg`] | semantic segmentation, unilm's ADE20K recipe |
//! | [`linear_probe::LinearProbeJob`] | [`linear_probe::linear_probe`] | a linear head on frozen block features |
//! | [`evaluate::EvalJob`] | [`evaluate::eval_classifier`] | top-1/top-5, per class, confusions |
//! | [`seg_eval::SegPredictor`] | [`seg_eval::score_pairs`] | mIoU/mAcc/aAcc of a split (`eval-seg`, segmentation validation) |
//! | [`segment`] | [`segment::segment_image`] | one image to a label map, its PNGs |
//! | [`demo::DemoJob`] | [`demo::demo`] | tokenizer -> pre-training -> fine-tuning vs random init |
//! | [`bench::BenchJob`] | [`bench::measure`] | time the forward/backward steps of a model |
//!
//! Every training job runs the same way, through [`runner`]: parse the device and prepare the
//! run directory ([`runner::start`]), build its model, optimizer groups
//! ([`config::TrainSection::grouping`]: the one place `layer_decay` is read) and data, open the
//! engine with the resolved recipe written as `config.toml` ([`runner::open_loop`]), then
//! [`beit_train::fit`] its [`beit_train::TrainTask`] with [`runner::evaluated`] options (a job on a
//! beit-data loader fits [`loader_epochs::LoaderEpochs`] with [`beit_train::fit_source`], which
//! saves a streamed loader's position with the checkpoints); a new
//! best model is recorded by [`runner::write_best`], and a fine-tuning run reports a
//! [`runner::FinetuneOutcome`]. A recipe file is its config, its task and an entry function.
//!
//! Each job holds a config read from a TOML recipe with [`config::load_config`] (the same
//! schema in every command: `model`, `output`, `device`, `[data]`, `[architecture]`, `[aug]`,
//! `[train]`), and each training job is a [`beit_train::TrainTask`] driven by the one epoch loop,
//! [`beit_train::fit`]. The functions log through `tracing` and return what they produced; they
//! print nothing (the CLI does).
//!
//! The data flow of one step, each arrow one function:
//!
//! ```text
//! image -> views (beit_data transforms, Loader) -> tokens / masks (beit_tokenizer, beit_mim)
//!       -> model (beit_model) -> loss (beit_mim / beit_train::losses) -> engine (beit_train::fit)
//! ```
//!
//! `docs/architecture.md` draws it for a pre-training and a fine-tuning step.

pub mod bench;
pub mod classifier;
pub mod config;
pub mod demo;
pub mod device;
pub mod distributed;
pub mod embed;
pub mod evaluate;
pub mod feature_file;
pub mod features;
pub mod finetune;
pub mod finetune_seg;
pub mod knn;
pub mod linear_probe;
pub mod loader_epochs;
pub mod model_source;
pub mod predictions;
pub mod pretrain;
pub mod runner;
pub mod seg_data;
pub mod seg_eval;
pub mod segment;
pub mod tensor_batches;
pub mod tokenizer;
pub mod verify;

pub use config::{load_config, parse_set, set_dotted, write_resolved_config, TrainSection};
pub use demo::{demo, DemoConfig, DemoJob, DemoOutcome};
pub use device::{parse_device, DeviceSpec};
pub use distributed::World;
pub use evaluate::{eval_classifier, evaluate, EvalJob, EvalReport};
pub use finetune::{finetune, FinetuneConfig, FinetuneJob};
pub use finetune_seg::{finetune_seg, FinetuneSegConfig, FinetuneSegJob, FinetuneSegOutcome};
pub use linear_probe::{linear_probe, LinearProbeConfig, LinearProbeJob, LinearProbeOutcome};
pub use model_source::{load_model, LoadedModel};
pub use pretrain::{pretrain, PretrainConfig, PretrainJob, PretrainOutcome};
pub use runner::FinetuneOutcome;
pub use tokenizer::{train_tokenizer, TokenizerConfig, TokenizerJob, TokenizerOutcome};
