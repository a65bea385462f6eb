//! `beit-cli`: run, train and inspect BEiT models.

mod args;
mod commands;
mod memory;

use clap::{Parser, Subcommand};

/// BEiT (BERT Pre-Training of Image Transformers) in Rust.
///
/// Loads the published `microsoft/beit-*` checkpoints (Hugging Face layout), pre-trains with masked
/// image modeling, fine-tunes, evaluates and benchmarks.
#[derive(Parser)]
#[command(name = "beit-cli", version, about, long_about = None, propagate_version = true)]
struct Cli {
    /// Log filter (tracing `EnvFilter` syntax), e.g. `info`, `debug`, `beit_train=debug`.
    #[arg(long, global = true, env = "BEIT_LOG", default_value = "info")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Classify images with a BEiT classifier (directory or hub id).
    Predict(commands::predict::PredictArgs),
    /// Draw self-attention maps of a query patch (or CLS) over an image.
    Attention(commands::attention::AttentionArgs),
    /// Draw blockwise (or random) MIM masks; print them as JSON or a PNG grid.
    Mask(commands::mask::MaskArgs),
    /// Visual tokenizer: encode images, reconstruct them, train a dVAE.
    #[command(subcommand)]
    Tokenizer(commands::tokenizer::TokenizerCommand),
    /// Masked-image-modeling pre-training.
    Pretrain(commands::pretrain::PretrainArgs),
    /// Fine-tune an image classifier (layer decay, mixup/cutmix, label smoothing).
    Finetune(commands::finetune::FinetuneArgs),
    /// Evaluate a classifier: top-1/top-5 and a confusion summary.
    Eval(commands::eval::EvalArgs),
    /// Linear probe on frozen, average-pooled features of one block.
    LinearProbe(commands::linear_probe::LinearProbeArgs),
    /// The one-command demo: tokenizer -> MIM pre-training -> fine-tuning on Fashion-MNIST.
    Demo(commands::demo::DemoArgs),
    /// Throughput benchmark (images/s) of inference or a training step.
    Bench(commands::bench::BenchArgs),
    /// Datasets: pack an ImageFolder into tar shards, inspect a `--data` source.
    #[command(subcommand)]
    Data(commands::data::DataCommand),
    /// Semantic segmentation of images (class per pixel; label and overlay PNGs).
    Segment(commands::segment::SegmentArgs),
    /// Fine-tune a semantic segmentation model (UperNet, unilm's ADE20K recipe).
    FinetuneSeg(commands::finetune_seg::FinetuneSegArgs),
    /// Evaluate a segmentation model: mIoU, mAcc, aAcc, per-class IoU (mmseg's accumulation).
    EvalSeg(commands::eval_seg::EvalSegArgs),
    /// Serve a checkpoint over HTTP (classify, embed) with dynamic batching.
    Serve(commands::serve::ServeArgs),
    /// Write the pooled features of every image of a dataset (safetensors, with labels and paths).
    Embed(commands::embed::EmbedArgs),
    /// Weighted k-NN top-1/top-5 of features from `embed` (DINO's evaluation).
    Knn(commands::knn::KnnArgs),
    /// Run the parity fixtures on a device in f32 or bf16 against the committed outputs.
    Verify(commands::verify::VerifyArgs),
}

fn main() {
    let cli = Cli::parse();
    // Under `mpirun` / `srun` (feature `mpi`): one process of a data-parallel job.
    #[cfg(feature = "mpi")]
    let (world, mpi) = beit_recipes::distributed::init_from_launcher().unwrap_or_else(|e| {
        eprintln!("error: starting MPI: {e:#}");
        std::process::exit(1)
    });
    #[cfg(not(feature = "mpi"))]
    let world = beit_recipes::World::default();
    let rank = world.rank();
    // Rank 0 logs; the others only warn.
    init_tracing(if rank == 0 { cli.log.as_str() } else { "warn" });
    memory::configure();
    let result = match cli.command {
        Command::Predict(a) => commands::predict::run(a),
        Command::Attention(a) => commands::attention::run(a),
        Command::Mask(a) => commands::mask::run(a),
        Command::Tokenizer(c) => commands::tokenizer::run(c, &world),
        Command::Pretrain(a) => commands::pretrain::run(a, &world),
        Command::Finetune(a) => commands::finetune::run(a, &world),
        Command::Eval(a) => commands::eval::run(a),
        Command::LinearProbe(a) => commands::linear_probe::run(a, &world),
        Command::Demo(a) => commands::demo::run(a, &world),
        Command::Bench(a) => commands::bench::run(a),
        Command::Data(c) => commands::data::run(c),
        Command::Segment(a) => commands::segment::run(a),
        Command::EvalSeg(a) => commands::eval_seg::run(a),
        Command::FinetuneSeg(a) => commands::finetune_seg::run(a, &world),
        Command::Serve(a) => commands::serve::run(a),
        Command::Embed(a) => commands::embed::run(a),
        Command::Knn(a) => commands::knn::run(a),
        Command::Verify(a) => commands::verify::run(a),
    };
    if let Err(err) = result {
        // One clear line (with its causes) and a non-zero exit; no panic, no backtrace noise.
        match rank {
            0 => eprintln!("error: {err:#}"),
            r => eprintln!("error: rank {r}: {err:#}"),
        }
        #[cfg(feature = "mpi")]
        beit_recipes::distributed::abort_job(&world, mpi, 1);
        std::process::exit(1);
    }
}

fn init_tracing(filter: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}
