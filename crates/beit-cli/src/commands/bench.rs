//! `beit-cli bench`: throughput of inference or of a full training step, randomly initialised
//! (`beit_recipes::bench`).
//!
//! The same workloads are timed for PyTorch + `transformers` by `scripts/bench/bench_peer.py`, and
//! `scripts/bench/bench_compare.py` runs both alternately and prints the ratios (docs/performance.md).

use std::path::PathBuf;

use anyhow::{Context, Result};
use beit_recipes::bench::{measure, phases_json, resolve_config, BenchJob, BenchMode};
use clap::Args;

/// Arguments of `beit-cli bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Workload to time.
    #[arg(long, default_value = "infer")]
    pub mode: BenchMode,
    /// `base`, `large`, or the path of a `config.json` (random weights in every case).
    #[arg(long, default_value = "base")]
    pub model: String,
    /// Images per step.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Square input size in pixels.
    #[arg(long, default_value_t = 224)]
    pub image_size: usize,
    /// Timed steps (after `--warmup` untimed ones).
    #[arg(long, default_value_t = 5)]
    pub iters: usize,
    /// Untimed warm-up steps.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Masked patches per image in `train-mim` (BEiT masks 75 of 196 at 224 px).
    #[arg(long, default_value_t = 75)]
    pub num_masked: usize,
    /// `cpu`, `cuda[:N]`, `metal[:N]`.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Compute dtype: `f32`, or `bf16`/`f16` (weights and activations; master weights stay f32
    /// when training).
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Seed of the input, mask and label draws.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Write the resolved model config (HF `config.json` layout) here, for the PyTorch peer.
    #[arg(long)]
    pub dump_config: Option<PathBuf>,
    /// Print one JSON line instead of a human summary.
    #[arg(long)]
    pub json: bool,
}

/// Run the command.
pub fn run(args: BenchArgs) -> Result<()> {
    let dev = beit_recipes::parse_device(&args.device)?;
    let cfg = resolve_config(&args.model, args.mode, args.image_size)?;
    if let Some(path) = &args.dump_config {
        let text = serde_json::to_string_pretty(&cfg)?;
        std::fs::write(path, text)
            .with_context(|| format!("cannot write the config to {}", path.display()))?;
    }
    let threads = candle::utils::get_num_threads();
    let res = measure(
        &BenchJob {
            mode: args.mode,
            batch: args.batch,
            image_size: args.image_size,
            iters: args.iters,
            warmup: args.warmup,
            num_masked: args.num_masked,
            dtype: args.dtype.clone(),
            seed: args.seed,
        },
        &cfg,
        &dev,
    )?;
    let median = res.median_s();
    let ips = args.batch as f64 / median;
    if args.json {
        let line = serde_json::json!({
            "impl": "beit-rs",
            "mode": args.mode.name(),
            "model": args.model,
            "batch": args.batch,
            "image_size": args.image_size,
            "iters": args.iters,
            "device": args.device,
            "dtype": args.dtype,
            "threads": threads,
            "images_per_s": ips,
            "median_s": median,
            "step_s": res.step_s,
            "phases_median_s": phases_json(&res),
        });
        println!("{line}");
    } else {
        println!(
            "{} {} batch {} @ {}px on {} ({} threads, {}): {:.3} images/s, median step {:.3} s over {} steps",
            args.mode.name(),
            args.model,
            args.batch,
            args.image_size,
            args.device,
            threads,
            args.dtype,
            ips,
            median,
            args.iters
        );
        if let serde_json::Value::Object(phases) = phases_json(&res) {
            for (name, secs) in phases {
                println!(
                    "  {name}: {:.3} s (median)",
                    secs.as_f64().unwrap_or(f64::NAN)
                );
            }
        }
    }
    Ok(())
}
