//! Flags shared by the training commands, and the one place the CLI prints tables.
//!
//! A command's settings come from its TOML recipe (`--config`, fields it omits keep the command's
//! documented defaults), then `--set key=value` overrides, then the first-class flags below,
//! which win over both (see `beit_recipes::config`).

use std::path::{Path, PathBuf};

use anyhow::Result;
use beit_recipes::World;
use clap::Args;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Flags shared by the training commands; `#[command(flatten)]` them into a command's `Args`.
#[derive(Args, Debug, Clone, Default)]
pub struct CommonArgs {
    /// TOML recipe (see `configs/`). Fields it omits take their documented defaults (the paper's
    /// recipe); an unknown field is an error naming it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Override any config field: `--set train.layer_decay=0.75 --set aug.mixup=0.0`. Dotted keys
    /// address nested tables; the value is parsed as TOML (a bare word is taken as a string).
    /// Applied after the file, before the flags below. Repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Dataset: a directory (`train/` and `val/` ImageFolders, or one ImageFolder split by
    /// `data.val_fraction`), `fashion-mnist` (embedded subset) or `fashion-mnist:DIR` (full set).
    #[arg(long)]
    pub data: Option<String>,
    /// Model: a directory with config.json + weights, or a hub id in the local HF cache.
    #[arg(long)]
    pub model: Option<String>,
    /// Run directory (checkpoints, metrics.jsonl, curves.png, exported model).
    #[arg(long, short = 'o')]
    pub output: Option<PathBuf>,
    /// Number of epochs.
    #[arg(long)]
    pub epochs: Option<u64>,
    /// Images per optimizer step (split into micro-batches by `train.accum_steps`).
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Peak learning rate.
    #[arg(long)]
    pub lr: Option<f64>,
    /// Device: cpu, cuda[:N] or metal[:N].
    #[arg(long)]
    pub device: Option<String>,
    /// Seed of initialisation, data order, augmentation, drop path.
    #[arg(long)]
    pub seed: Option<u64>,
    /// No progress bar (logs only).
    #[arg(long)]
    pub quiet: bool,
}

impl CommonArgs {
    /// The flags that were given, as (dotted key, value) overrides: the same keys in every
    /// recipe (`data.source`, `model`, `output`, `device`, `train.{epochs,batch_size,lr,seed}`).
    pub fn flag_overrides(&self) -> Vec<(String, toml::Value)> {
        use toml::Value as V;
        let mut out = Vec::new();
        let mut push = |k: &str, v: Option<V>| {
            if let Some(v) = v {
                out.push((k.to_string(), v));
            }
        };
        push("data.source", self.data.clone().map(V::String));
        push("model", self.model.clone().map(V::String));
        push(
            "output",
            self.output
                .as_ref()
                .map(|p| V::String(p.display().to_string())),
        );
        push("train.epochs", self.epochs.map(|v| V::Integer(v as i64)));
        push(
            "train.batch_size",
            self.batch_size.map(|v| V::Integer(v as i64)),
        );
        push("train.lr", self.lr.map(V::Float));
        push("device", self.device.clone().map(V::String));
        push("train.seed", self.seed.map(|v| V::Integer(v as i64)));
        out
    }

    /// The command's config: its defaults, the file, the `--set`s, the flags, then `extra`
    /// (command-specific flags as dotted keys).
    pub fn resolve<T: DeserializeOwned + Serialize + Default>(
        &self,
        extra: Vec<(String, toml::Value)>,
    ) -> Result<T> {
        let mut flags = self.flag_overrides();
        flags.extend(extra);
        beit_recipes::load_config(self.config.as_deref(), &self.set, &flags)
    }
}

/// `--resume [CHECKPOINT]`: continue the run in the output directory from its newest checkpoint,
/// or from the given checkpoint directory.
#[derive(Args, Debug, Clone, Default)]
pub struct ResumeArg {
    /// Continue an interrupted run exactly (weights, optimizer, schedule, data position, random
    /// generators). Without a value: the newest `checkpoint-*` in the output directory.
    #[arg(long, value_name = "CHECKPOINT", num_args = 0..=1)]
    #[allow(clippy::option_option)] // absent / `--resume` / `--resume DIR`
    pub resume: Option<Option<PathBuf>>,
}

impl ResumeArg {
    /// The checkpoint (or run directory) to resume from, if resuming.
    pub fn checkpoint(&self, out_dir: &Path) -> Option<PathBuf> {
        self.resume
            .as_ref()
            .map(|p| p.clone().unwrap_or_else(|| out_dir.to_path_buf()))
    }
}

/// The flags of the fine-tuning commands (`finetune`, `finetune-seg`) beyond [`CommonArgs`].
#[derive(Args, Debug, Clone, Default)]
pub struct FinetuneRunArgs {
    #[command(flatten)]
    pub resume: ResumeArg,
    /// Allow downloading a hub checkpoint missing from the local cache.
    #[arg(long)]
    pub download: bool,
    /// Print the resolved configuration as TOML and exit.
    #[arg(long)]
    pub print_config: bool,
    /// Stop (with a checkpoint) once this many optimizer steps are done, e.g. to fit a time
    /// limit; continue later with `--resume`.
    #[arg(long, value_name = "STEPS")]
    pub stop_after: Option<u64>,
}

impl FinetuneRunArgs {
    /// The job the flags describe over the recipe `C` (whose run directory `output` names), run
    /// in `world`, or `None` when `--print-config` printed the resolved recipe instead.
    pub fn job<C: DeserializeOwned + Serialize + Default>(
        &self,
        common: &CommonArgs,
        output: impl Fn(&C) -> &Path,
        world: &World,
    ) -> Result<Option<beit_recipes::FinetuneJob<C>>> {
        let config: C = common.resolve(vec![])?;
        if self.print_config {
            print!("{}", toml::to_string_pretty(&config)?);
            return Ok(None);
        }
        Ok(Some(beit_recipes::FinetuneJob {
            resume: self.resume.checkpoint(output(&config)),
            config,
            download: self.download,
            stop_after: self.stop_after,
            progress: !common.quiet,
            world: world.clone(),
        }))
    }
}

/// Print `rows` as two aligned columns under `title`.
pub fn print_table(title: &str, rows: &[(String, String)]) {
    let w = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    println!("{title}");
    for (k, v) in rows {
        println!("  {k:<w$}  {v}");
    }
}

/// `toml::Value::String` of a path.
pub fn path_value(p: &Path) -> toml::Value {
    toml::Value::String(p.display().to_string())
}
