//! Recipe files: one TOML schema per command, read the same way everywhere, and the one `[train]`
//! table they share.
//!
//! [`load_config`] starts from the command's defaults (every struct is
//! `#[serde(deny_unknown_fields, default)]`, and each command's `Default` is its paper recipe),
//! merges the TOML file over them, then the `--set key=value` overrides in order, then the
//! first-class flags. A typo is an error naming the field and where it came from (the file with
//! line and column, the `--set` item, or the flag). [`write_resolved_config`] stores the result
//! in the run directory, so `--config RUN/config.toml` reruns it.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use beit_train::{AdamWConfig, GroupingConfig, ScheduleKind, TrainConfig};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::distributed::World;

/// The `[train]` table of every training recipe (unilm's `run_*.py` flag names in brackets).
///
/// The defaults below are the fine-tuning recipe of BEiT-base on ImageNet-1k; each command's
/// config starts from its own recipe (pre-training: 800 epochs, batch 2048, lr 1.5e-3, 10 warm-up
/// epochs, clip 3.0, no layer decay; linear probe: 50 epochs, lr 4e-3 to 0, weight decay 1e-4).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainSection {
    /// Epochs (`--epochs`, 100).
    pub epochs: u64,
    /// Images per optimizer step (1024 = 8 GPUs x 128), split into `accum_steps` micro-batches.
    pub batch_size: usize,
    /// Micro-batches per optimizer step (`--update_freq`, 1).
    pub accum_steps: u64,
    /// Peak learning rate, absolute (`--lr`, 4e-3).
    pub lr: f64,
    /// Final learning rate of the schedule (`--min_lr`, 1e-6).
    pub min_lr: f64,
    /// Learning-rate schedule: `cosine` (warm-up + half cosine, unilm's classification and
    /// pre-training) or `poly` (mmcv's linear warm-up from 1e-6 x lr + polynomial decay, unilm's
    /// semantic segmentation).
    pub schedule: ScheduleKind,
    /// Exponent of the `poly` schedule (mmseg `power`, 1.0).
    pub poly_power: f64,
    /// Linear warm-up epochs (`--warmup_epochs`, 20).
    pub warmup_epochs: u64,
    /// Warm-up steps, overriding the epochs when `warmup_epochs > 0` (`--warmup_steps`).
    pub warmup_steps: Option<u64>,
    /// AdamW weight decay (`--weight_decay`, 0.05).
    pub weight_decay: f64,
    /// Final weight decay of a cosine schedule (`--weight_decay_end`; none = constant).
    pub weight_decay_end: Option<f64>,
    /// Layer-wise lr decay (`--layer_decay`): block `i` of `L` learns at `d^(L + 1 - i)` times
    /// the lr. None or 1.0 = off, every parameter at the full lr: the default here and of
    /// pre-training, the linear probe and the tokenizer; fine-tuning sets 0.65 (unilm's
    /// ImageNet value) and segmentation 0.9. Read through [`TrainSection::grouping`].
    pub layer_decay: Option<f64>,
    /// Global gradient-norm clipping (`--clip_grad`; none).
    pub clip_grad: Option<f64>,
    /// Stochastic depth rate of the last block (`--drop_path`, 0.1).
    pub drop_path_rate: f64,
    /// Label smoothing of the classification loss (`--smoothing`, 0.1).
    pub label_smoothing: f64,
    /// AdamW beta1 (0.9).
    pub beta1: f64,
    /// AdamW beta2 (0.999).
    pub beta2: f64,
    /// AdamW epsilon (`--opt_eps`, 1e-8).
    pub eps: f64,
    /// Seed of initialisation, data order, augmentation, masks and drop path (`--seed`, 0).
    pub seed: u64,
    /// Evaluate every this many epochs, and after the last (1).
    pub eval_every: u64,
    /// Evaluation batch size (default 1.5 x the micro-batch, as unilm).
    pub eval_batch_size: Option<usize>,
    /// Log a line every this many optimizer steps (10).
    pub log_every: u64,
    /// Also checkpoint every this many optimizer steps (none).
    pub checkpoint_every: Option<u64>,
    /// Checkpoint at every epoch end (true).
    pub checkpoint_each_epoch: bool,
    /// Step checkpoints kept (2).
    pub keep_last: usize,
    /// Compute precision: `auto` (bf16 on CUDA, f32 elsewhere), `f32` or `bf16` (matrix products
    /// in bf16, parameters, norms, softmax and the loss in f32; see `beit_train::Precision`).
    pub precision: String,
}

impl Default for TrainSection {
    fn default() -> Self {
        Self {
            epochs: 100,
            batch_size: 1024,
            accum_steps: 1,
            lr: 4e-3,
            min_lr: 1e-6,
            schedule: ScheduleKind::Cosine,
            poly_power: 1.0,
            warmup_epochs: 20,
            warmup_steps: None,
            weight_decay: 0.05,
            weight_decay_end: None,
            // Every `Option` here defaults to None: a command's `Some` default is serialised
            // with the defaults and survives a recipe file's partial `[train]` table, while a
            // `None` is absent from that table and must come back as None (see `parse_config`).
            layer_decay: None,
            clip_grad: None,
            drop_path_rate: 0.1,
            label_smoothing: 0.1,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            seed: 0,
            eval_every: 1,
            eval_batch_size: None,
            log_every: 10,
            checkpoint_every: None,
            checkpoint_each_epoch: true,
            keep_last: 2,
            precision: "auto".into(),
        }
    }
}

impl TrainSection {
    /// The resolved `precision` on `device`.
    pub fn precision(&self, device: &candle::Device) -> Result<beit_train::Precision> {
        beit_train::Precision::parse_for(&self.precision, device)
            .with_context(|| "train.precision".to_string())
    }

    /// Images per micro-batch (`batch_size / accum_steps`).
    pub fn micro_batch(&self) -> Result<usize> {
        let a = self.accum_steps as usize;
        if a == 0 || self.batch_size == 0 || !self.batch_size.is_multiple_of(a) {
            bail!(
                "train.batch_size ({}) must be a positive multiple of train.accum_steps ({})",
                self.batch_size,
                self.accum_steps
            );
        }
        Ok(self.batch_size / a)
    }

    /// The optimizer's parameter grouping of a model of `num_layers` blocks: unilm's weight-decay
    /// rules and this table's `layer_decay` (none = no decay, every group at lr scale 1).
    pub fn grouping(&self, num_layers: usize) -> GroupingConfig {
        GroupingConfig {
            layer_decay: self.layer_decay,
            ..GroupingConfig::pretrain(num_layers)
        }
    }

    /// The engine's settings for a data source of `batches_per_epoch` micro-batches.
    pub fn engine(&self, batches_per_epoch: u64, show_progress: bool) -> Result<TrainConfig> {
        let cfg = TrainConfig {
            epochs: self.epochs,
            batches_per_epoch,
            accum_steps: self.accum_steps,
            lr: self.lr,
            min_lr: self.min_lr,
            lr_schedule: self.schedule,
            poly_power: self.poly_power,
            warmup_epochs: self.warmup_epochs,
            warmup_steps: self.warmup_steps,
            weight_decay: self.weight_decay,
            weight_decay_end: self.weight_decay_end,
            clip_grad: self.clip_grad,
            adamw: AdamWConfig {
                beta1: self.beta1,
                beta2: self.beta2,
                eps: self.eps,
            },
            seed: self.seed,
            log_every: self.log_every.max(1),
            checkpoint_every: self.checkpoint_every,
            checkpoint_each_epoch: self.checkpoint_each_epoch,
            keep_last: self.keep_last.max(1),
            show_progress,
        };
        cfg.validate().context("[train]")?;
        Ok(cfg)
    }
}

/// A normalisation preset (`normalize` in `[aug]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NormalizePreset {
    /// mean = std = 0.5 (unilm's 127.5; the released checkpoints).
    Half,
    /// The ImageNet mean and std (`--imagenet_default_mean_and_std`).
    Imagenet,
    /// No normalisation.
    None,
}

impl NormalizePreset {
    /// The per-channel mean and std.
    pub fn normalize(self) -> beit_data::Normalize {
        match self {
            Self::Half => beit_data::Normalize::HALF,
            Self::Imagenet => beit_data::Normalize::IMAGENET,
            Self::None => beit_data::Normalize::IDENTITY,
        }
    }
}

/// How an evaluation image is brought to the model's size (`eval_resize` in `[aug]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EvalResizeMode {
    /// Shorter side to size / crop_pct, then a centre crop (unilm).
    Crop,
    /// Resize to size x size (the published Hugging Face processors).
    Squash,
}

/// A RandAugment policy (`auto_augment` in `[aug]`): timm's spec (`rand-m9-mstd0.5-inc1`), or
/// `none` (or empty) for none. Checked when the recipe is read; written back as given.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct AutoAugment {
    spec: String,
    policy: Option<beit_data::RandAugment>,
}

impl AutoAugment {
    /// The policy of `spec`; the error names the field and the spec.
    pub fn parse(spec: &str) -> Result<Self> {
        let policy = match spec.trim() {
            "" | "none" => None,
            s => Some(beit_data::RandAugment::parse(s).with_context(|| {
                format!("aug.auto_augment: `{s}` is not a RandAugment spec (e.g. rand-m9-mstd0.5-inc1) or none")
            })?),
        };
        Ok(Self {
            spec: spec.to_string(),
            policy,
        })
    }

    /// The policy, unless `none`.
    pub fn policy(&self) -> Option<&beit_data::RandAugment> {
        self.policy.as_ref()
    }
}

impl TryFrom<String> for AutoAugment {
    type Error = String;

    fn try_from(spec: String) -> Result<Self, String> {
        Self::parse(&spec).map_err(|e| format!("{e:#}"))
    }
}

impl From<AutoAugment> for String {
    fn from(a: AutoAugment) -> String {
        a.spec
    }
}

/// A model size preset (`preset` in `[architecture]` of pre-training).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Preset {
    /// BEiT-base: 12 blocks of width 768, 12 heads.
    Base,
    /// BEiT-large: 24 blocks of width 1024, 16 heads.
    Large,
}

/// Deserialise an optional name where an empty or blank string means unset (as recipes written
/// before `model` became optional spell it).
pub fn non_empty<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let v: Option<String> = Option::deserialize(d)?;
    Ok(v.filter(|s| !s.trim().is_empty()))
}

/// Parse one `--set key=value` into (key, TOML value). A value that is not valid TOML (e.g. a
/// bare path) is taken as a string.
pub fn parse_set(item: &str) -> Result<(String, toml::Value)> {
    let (key, raw) = item
        .split_once('=')
        .with_context(|| format!("--set `{item}`: expected KEY=VALUE"))?;
    let key = key.trim();
    if key.is_empty() || key.split('.').any(|p| p.trim().is_empty()) {
        bail!("--set `{item}`: invalid key `{key}`");
    }
    let raw = raw.trim();
    let value = match format!("v = {raw}").parse::<toml::Table>() {
        Ok(mut t) => t.remove("v").unwrap_or(toml::Value::String(raw.into())),
        Err(_) => toml::Value::String(raw.to_string()),
    };
    Ok((key.to_string(), value))
}

/// Set `value` at the dotted `key` of `table`, creating intermediate tables.
pub fn set_dotted(table: &mut toml::Table, key: &str, value: toml::Value) -> Result<()> {
    let parts: Vec<&str> = key.split('.').map(str::trim).collect();
    let mut cur = table;
    for (i, part) in parts[..parts.len() - 1].iter().enumerate() {
        let entry = cur
            .entry(part.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        cur = match entry {
            toml::Value::Table(t) => t,
            other => bail!(
                "`{key}`: `{}` is a {}, not a table",
                parts[..=i].join("."),
                other.type_str()
            ),
        };
    }
    cur.insert(parts[parts.len() - 1].to_string(), value);
    Ok(())
}

/// Merge `over` into `base`: tables recursively, any other value replaced.
fn merge(base: &mut toml::Table, over: toml::Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

/// Read a command config: `T::default()`, the TOML file over it (if any), the `--set`
/// overrides in order, then `flags` (dotted key, value). Each stage is checked on its own so an
/// error names its origin: the file (with line and column), the `--set` item, or the flag's key.
pub fn load_config<T: DeserializeOwned + Serialize + Default>(
    path: Option<&Path>,
    sets: &[String],
    flags: &[(String, toml::Value)],
) -> Result<T> {
    let text = match path {
        Some(p) => Some(
            std::fs::read_to_string(p)
                .with_context(|| format!("cannot read config {}", p.display()))?,
        ),
        None => None,
    };
    let origin = path.map(|p| p.display().to_string()).unwrap_or_default();
    parse_config(text.as_deref().map(|t| (t, origin.as_str())), sets, flags)
}

/// [`load_config`] of a recipe `text` named `origin` in errors (e.g. one compiled into the
/// binary), or of the defaults alone.
pub fn parse_config<T: DeserializeOwned + Serialize + Default>(
    source: Option<(&str, &str)>,
    sets: &[String],
    flags: &[(String, toml::Value)],
) -> Result<T> {
    let mut table = toml::Table::try_from(T::default()).context("serialising the defaults")?;
    if let Some((text, origin)) = source {
        // Deserialise the text alone first: its errors carry line/column and the field name.
        if let Err(e) = toml::from_str::<T>(text) {
            bail!("config {origin}: {}", e.to_string().trim_end());
        }
        let file = text
            .parse::<toml::Table>()
            .with_context(|| format!("config {origin}"))?;
        merge(&mut table, file);
    }
    let check = |table: &toml::Table, origin: &str| -> Result<()> {
        T::deserialize(toml::Value::Table(table.clone()))
            .map(|_| ())
            .map_err(|e| anyhow::anyhow!("{origin}: {}", e.to_string().trim_end()))
    };
    for item in sets {
        let (key, value) = parse_set(item)?;
        set_dotted(&mut table, &key, value).with_context(|| format!("--set `{item}`"))?;
        check(&table, &format!("--set `{item}`"))?;
    }
    for (key, value) in flags {
        set_dotted(&mut table, key, value.clone())?;
        check(&table, &format!("flag for `{key}` = {value}"))?;
    }
    Ok(T::deserialize(toml::Value::Table(table))?)
}

/// Write the resolved config as `config.toml` in `dir` (for the record, and to rerun with
/// `--config DIR/config.toml`); in a data-parallel `world`, rank 0 writes it.
pub fn write_resolved_config<T: Serialize>(dir: &Path, cfg: &T, world: &World) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let path = dir.join("config.toml");
    if !world.is_primary() {
        return Ok(path); // rank 0 writes the run's files
    }
    let text = toml::to_string_pretty(cfg).context("serialising the resolved config")?;
    std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(path)
}

/// Create the run directory. A fresh run refuses a directory with checkpoints (the engine also
/// checks); resuming requires one.
pub fn prepare_output_dir(out: &Path, resuming: bool) -> Result<()> {
    if resuming {
        if !out.is_dir() {
            bail!(
                "--resume: the output directory {} does not exist",
                out.display()
            );
        }
        return Ok(());
    }
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize, Serialize, PartialEq)]
    #[serde(deny_unknown_fields, default)]
    struct Inner {
        lr: f64,
        epochs: u64,
        name: String,
    }
    impl Default for Inner {
        fn default() -> Self {
            Self {
                lr: 4e-3,
                epochs: 100,
                name: "x".into(),
            }
        }
    }
    #[derive(Debug, Deserialize, Serialize, PartialEq)]
    #[serde(deny_unknown_fields, default)]
    struct Outer {
        model: Option<String>,
        train: Inner,
    }
    impl Default for Outer {
        // A command default that differs from the section's own default.
        fn default() -> Self {
            Self {
                model: None,
                train: Inner {
                    lr: 1.5e-3,
                    ..Inner::default()
                },
            }
        }
    }

    #[test]
    fn file_sets_and_flags_apply_in_order_over_the_command_defaults() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let p = dir.path().join("c.toml");
        std::fs::write(&p, "[train]\nepochs = 5\n")?;
        let c: Outer = load_config(
            Some(&p),
            &["train.epochs=7".into(), "train.name=some/path".into()],
            &[("model".into(), toml::Value::String("m".into()))],
        )?;
        assert_eq!(
            c.train.lr, 1.5e-3,
            "a partial table keeps the command's default"
        );
        assert_eq!(c.train.epochs, 7);
        assert_eq!(c.train.name, "some/path");
        assert_eq!(c.model.as_deref(), Some("m"));
        let d: Outer = load_config(None, &[], &[])?;
        assert_eq!(d, Outer::default());
        Ok(())
    }

    #[test]
    fn typos_name_the_field_and_origin() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bad.toml");
        std::fs::write(&p, "[train]\nlrr = 1e-3\n").unwrap();
        let e = format!(
            "{:#}",
            load_config::<Outer>(Some(&p), &[], &[]).unwrap_err()
        );
        assert!(e.contains("lrr") && e.contains("bad.toml"), "{e}");
        let e = format!(
            "{:#}",
            load_config::<Outer>(None, &["train.epoch=3".into()], &[]).unwrap_err()
        );
        assert!(e.contains("epoch") && e.contains("--set"), "{e}");
        let e = format!(
            "{:#}",
            load_config::<Outer>(None, &["train.lr=fast".into()], &[]).unwrap_err()
        );
        assert!(e.contains("train.lr=fast"), "{e}");
        assert!(parse_set("novalue").is_err());
    }

    #[test]
    fn train_section_maps_to_the_engine() {
        let t = TrainSection {
            batch_size: 12,
            accum_steps: 5,
            ..TrainSection::default()
        };
        assert!(t.micro_batch().is_err());
        let t = TrainSection {
            batch_size: 12,
            accum_steps: 3,
            ..TrainSection::default()
        };
        assert_eq!(t.micro_batch().unwrap(), 4);
        let e = t.engine(30, false).unwrap();
        assert_eq!((e.steps_per_epoch(), e.total_steps()), (10, 1000));
        let e = format!(
            "{:#}",
            parse_config::<TrainSection>(None, &["schedule=\"polynomial\"".into()], &[])
                .unwrap_err()
        );
        assert!(e.contains("polynomial") && e.contains("poly"), "{e}");
        let p: TrainSection = parse_config(None, &["schedule=\"poly\"".into()], &[]).unwrap();
        assert_eq!(p.engine(30, false).unwrap().lr_schedule, ScheduleKind::Poly);
        assert!(TrainSection {
            epochs: 0,
            ..TrainSection::default()
        }
        .engine(30, false)
        .is_err());
    }

    #[test]
    fn layer_decay_is_the_grouping_and_none_is_off() {
        let t = TrainSection {
            layer_decay: Some(0.65),
            ..TrainSection::default()
        };
        let g = t.grouping(12);
        assert_eq!(g.layer_decay, Some(0.65));
        assert_eq!(g.lr_scale(13), 1.0);
        assert!((g.lr_scale(12) - 0.65).abs() < 1e-12);
        let off = TrainSection {
            layer_decay: None,
            ..t
        }
        .grouping(12);
        assert_eq!(off, GroupingConfig::pretrain(12));
        assert_eq!(off.lr_scale(0), 1.0);
    }
}
