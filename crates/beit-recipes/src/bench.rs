//! The `beit-cli bench` workloads: throughput of inference or of a full training step, randomly
//! initialised.
//!
//! The same workloads are timed for PyTorch + `transformers` by `scripts/bench/bench_peer.py`, and
//! `scripts/bench/bench_compare.py` runs both alternately and prints the ratios (docs/performance.md).

use std::collections::HashMap;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use beit_model::kernels::with_matmul_dtype;
use beit_model::{
    BeitConfig, BeitForImageClassification, BeitForMaskedImageModeling, ForwardOptions, QueryRows,
};
use candle::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use rand::{rngs::StdRng, seq::index::sample, Rng, SeedableRng};

/// What one timed step does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BenchMode {
    /// Classifier forward pass, no autograd graph.
    Infer,
    /// MIM pre-training step: masked forward, cross-entropy on the masked patches, backward, AdamW.
    TrainMim,
    /// Fine-tuning step: classifier forward, cross-entropy, backward, AdamW.
    TrainCls,
}

impl std::str::FromStr for BenchMode {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "infer" => Ok(Self::Infer),
            "train-mim" => Ok(Self::TrainMim),
            "train-cls" => Ok(Self::TrainCls),
            other => Err(format!("`{other}`: expected infer, train-mim or train-cls")),
        }
    }
}

impl BenchMode {
    /// The mode's command-line name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Infer => "infer",
            Self::TrainMim => "train-mim",
            Self::TrainCls => "train-cls",
        }
    }
}

/// One benchmark: what `beit-cli bench` times.
#[derive(Debug, Clone)]
pub struct BenchJob {
    /// Workload.
    pub mode: BenchMode,
    /// Images per step.
    pub batch: usize,
    /// Square input size in pixels.
    pub image_size: usize,
    /// Timed steps (after `warmup` untimed ones).
    pub iters: usize,
    /// Untimed warm-up steps.
    pub warmup: usize,
    /// Masked patches per image in `train-mim`.
    pub num_masked: usize,
    /// Compute dtype: `f32`, `bf16` or `f16`.
    pub dtype: String,
    /// Seed of the input, mask and label draws.
    pub seed: u64,
}

/// Resolve `--model` into a config for `mode` (MIM needs the mask token and vocabulary head).
pub fn resolve_config(model: &str, mode: BenchMode, image_size: usize) -> Result<BeitConfig> {
    let base = |large: bool| {
        let cfg = match mode {
            BenchMode::TrainMim => BeitConfig::base_patch16_224_pt22k(),
            _ => BeitConfig::base_patch16_224(),
        };
        if large {
            cfg.into_large()
        } else {
            cfg
        }
    };
    let mut cfg = match model {
        "base" => base(false),
        "large" => base(true),
        path => BeitConfig::from_file(path)
            .with_context(|| format!("`--model {path}` is neither base, large nor a config"))?,
    };
    cfg.image_size = image_size;
    if mode == BenchMode::TrainMim {
        cfg.use_mask_token = true;
    }
    cfg.validate()
        .with_context(|| format!("`--image-size {image_size}` with `--model {model}`"))?;
    Ok(cfg)
}

fn parse_dtype(s: &str) -> Result<DType> {
    Ok(match s {
        "f32" => DType::F32,
        "bf16" => DType::BF16,
        "f16" => DType::F16,
        other => bail!("unknown `--dtype {other}`: expected f32, bf16 or f16"),
    })
}

/// The measurement of one bench run.
#[derive(Debug, Clone)]
pub struct BenchResult {
    /// Seconds of each timed step.
    pub step_s: Vec<f64>,
    /// Per timed step, the seconds of each phase (training: forward, backward, optimizer).
    pub phase_s: Vec<Vec<f64>>,
}

impl BenchResult {
    /// Median step time in seconds.
    pub fn median_s(&self) -> f64 {
        let mut v = self.step_s.clone();
        v.sort_by(f64::total_cmp);
        let n = v.len();
        if n % 2 == 1 {
            v[n / 2]
        } else {
            0.5 * (v[n / 2 - 1] + v[n / 2])
        }
    }

    /// Median seconds of phase `i` over the timed steps.
    pub fn phase_median_s(&self, i: usize) -> Option<f64> {
        let v: Vec<f64> = self
            .phase_s
            .iter()
            .filter_map(|p| p.get(i).copied())
            .collect();
        (!v.is_empty()).then(|| {
            BenchResult {
                step_s: v,
                phase_s: vec![],
            }
            .median_s()
        })
    }
}

/// Phase names of the training modes, in the order their times are recorded.
const TRAIN_PHASES: [&str; 3] = ["forward", "backward", "optimizer"];

/// Records phase boundaries inside one step (synchronising the device at each).
struct Phases<'a> {
    dev: &'a Device,
    last: Instant,
    times: Vec<f64>,
}

impl Phases<'_> {
    fn mark(&mut self) -> Result<()> {
        self.dev.synchronize()?;
        let now = Instant::now();
        self.times.push((now - self.last).as_secs_f64());
        self.last = now;
        Ok(())
    }
}

/// Times `warmup + iters` calls of `step`, synchronising the device after each; `step` may mark
/// phase boundaries.
fn time_steps(
    dev: &Device,
    warmup: usize,
    iters: usize,
    mut step: impl FnMut(&mut Phases) -> Result<()>,
) -> Result<BenchResult> {
    let phases = || Phases {
        dev,
        last: Instant::now(),
        times: vec![],
    };
    for _ in 0..warmup {
        step(&mut phases())?;
        dev.synchronize()?;
    }
    let mut step_s = Vec::with_capacity(iters);
    let mut phase_s = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t = Instant::now();
        let mut p = phases();
        step(&mut p)?;
        dev.synchronize()?;
        step_s.push(t.elapsed().as_secs_f64());
        phase_s.push(p.times);
    }
    Ok(BenchResult { step_s, phase_s })
}

/// Detached copies of every variable, for an inference model without autograd tracking.
fn frozen(varmap: &VarMap, dtype: DType) -> Result<HashMap<String, Tensor>> {
    let data = varmap.data().lock().expect("varmap lock");
    data.iter()
        .map(|(k, v)| Ok((k.clone(), v.as_detached_tensor().to_dtype(dtype)?)))
        .collect()
}

/// Run the benchmark described by `args` (without printing).
pub fn measure(args: &BenchJob, cfg: &BeitConfig, dev: &Device) -> Result<BenchResult> {
    let dtype = parse_dtype(&args.dtype)?;
    if args.batch == 0 || args.iters == 0 {
        bail!("`--batch` and `--iters` must be positive");
    }
    let mut rng = StdRng::seed_from_u64(args.seed);
    let (b, s) = (args.batch, args.image_size);
    let pixels: Vec<f32> = (0..b * 3 * s * s)
        .map(|_| rng.random::<f32>() * 2.0 - 1.0)
        .collect();
    let pixels = Tensor::from_vec(pixels, (b, 3, s, s), dev)?;
    // Inference casts the weights and inputs; training keeps them f32 and computes the matrix
    // products in `dtype` (mixed precision, as `train.precision`).
    let pixels = match args.mode {
        BenchMode::Infer => pixels.to_dtype(dtype)?,
        _ => pixels,
    };
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, dev);
    match args.mode {
        BenchMode::Infer => {
            // Build once to initialise the variables, then again from frozen tensors.
            BeitForImageClassification::new(cfg, vb)?;
            let vb = VarBuilder::from_tensors(frozen(&varmap, dtype)?, dtype, dev);
            let model = BeitForImageClassification::new(cfg, vb)?;
            time_steps(dev, args.warmup, args.iters, |_| {
                let logits = model.forward(&pixels, ForwardOptions::default())?.logits;
                drop(logits);
                Ok(())
            })
        }
        BenchMode::TrainMim => {
            let model = BeitForMaskedImageModeling::new(cfg, vb)?;
            let n = cfg.num_patches();
            if args.num_masked == 0 || args.num_masked > n {
                bail!("`--num-masked {}` must be in 1..={n}", args.num_masked);
            }
            let mut mask = vec![0u8; b * n];
            // The masked token rows of each image (patch + 1, increasing), known on the host as
            // in pre-training, so the step reads nothing back.
            let mut rows = Vec::with_capacity(b);
            for row in mask.chunks_mut(n) {
                let mut picked = sample(&mut rng, n, args.num_masked).into_vec();
                picked.sort_unstable();
                picked.iter().for_each(|&i| row[i] = 1);
                rows.push(picked.iter().map(|&i| i as u32 + 1).collect());
            }
            let rows = QueryRows::new(&rows)?;
            let m = b * args.num_masked;
            let mask = Tensor::from_vec(mask, (b, n), dev)?;
            let labels: Vec<u32> = (0..m)
                .map(|_| rng.random_range(0..cfg.vocab_size as u32))
                .collect();
            let labels = Tensor::from_vec(labels, m, dev)?;
            let mut opt = BenchOptimizer::new(&varmap, cfg.num_hidden_layers)?;
            with_matmul_dtype(dtype, || {
                time_steps(dev, args.warmup, args.iters, |p| {
                    let logits = model
                        .forward_masked_rows(&pixels, &mask, &rows, ForwardOptions::train())?
                        .logits;
                    let loss =
                        candle_nn::loss::cross_entropy(&logits.to_dtype(DType::F32)?, &labels)?;
                    p.mark()?;
                    let grads = loss.backward()?;
                    p.mark()?;
                    opt.step(&grads)?;
                    p.mark()
                })
            })
        }
        BenchMode::TrainCls => {
            let model = BeitForImageClassification::new(cfg, vb)?;
            let classes = cfg.num_labels() as u32;
            let labels: Vec<u32> = (0..b).map(|_| rng.random_range(0..classes)).collect();
            let labels = Tensor::from_vec(labels, b, dev)?;
            let mut opt = BenchOptimizer::new(&varmap, cfg.num_hidden_layers)?;
            with_matmul_dtype(dtype, || {
                time_steps(dev, args.warmup, args.iters, |p| {
                    let logits = model.forward(&pixels, ForwardOptions::train())?.logits;
                    let loss =
                        candle_nn::loss::cross_entropy(&logits.to_dtype(DType::F32)?, &labels)?;
                    p.mark()?;
                    let grads = loss.backward()?;
                    p.mark()?;
                    opt.step(&grads)?;
                    p.mark()
                })
            })
        }
    }
}

/// The optimizer `pretrain`/`finetune` use: beit-train's AdamW with unilm's parameter groups
/// (fused in-place update for f32 on the CPU), at lr 1e-4 and weight decay 0.05.
struct BenchOptimizer(beit_train::AdamW);

impl BenchOptimizer {
    fn new(varmap: &VarMap, num_layers: usize) -> Result<Self> {
        let groups = beit_train::build_param_groups(
            beit_train::named_vars(varmap),
            &beit_train::GroupingConfig::pretrain(num_layers),
        )?;
        Ok(Self(beit_train::AdamW::new(
            groups,
            beit_train::AdamWConfig::default(),
        )?))
    }

    fn step(&mut self, grads: &candle::backprop::GradStore) -> Result<()> {
        self.0.step(grads, 1e-4, 0.05)?;
        Ok(())
    }
}

/// `{"forward": s, "backward": s, "optimizer": s}` medians for training modes, else `null`.
pub fn phases_json(res: &BenchResult) -> serde_json::Value {
    let map: serde_json::Map<String, serde_json::Value> = TRAIN_PHASES
        .iter()
        .enumerate()
        .filter_map(|(i, name)| Some((name.to_string(), res.phase_median_s(i)?.into())))
        .collect();
    if map.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::Value::Object(map)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny_args(mode: BenchMode) -> BenchJob {
        BenchJob {
            mode,
            batch: 2,
            image_size: 32,
            iters: 2,
            warmup: 1,
            num_masked: 2,
            dtype: "f32".into(),
            seed: 0,
        }
    }

    fn tiny_config(mode: BenchMode) -> BeitConfig {
        let mut cfg = resolve_config("base", mode, 32).unwrap();
        cfg.hidden_size = 32;
        cfg.num_hidden_layers = 2;
        cfg.num_attention_heads = 2;
        cfg.intermediate_size = 64;
        cfg.vocab_size = 50;
        cfg
    }

    #[test]
    fn every_mode_runs_and_times_each_step() {
        for mode in [BenchMode::Infer, BenchMode::TrainMim, BenchMode::TrainCls] {
            let res = measure(&tiny_args(mode), &tiny_config(mode), &Device::Cpu).unwrap();
            assert_eq!(res.step_s.len(), 2);
            assert!(res.median_s() > 0.0);
            let phases = if mode == BenchMode::Infer { 0 } else { 3 };
            assert!(res.phase_s.iter().all(|p| p.len() == phases));
        }
    }

    #[test]
    fn mim_config_has_mask_token_and_bad_sizes_are_errors() {
        let cfg = resolve_config("base", BenchMode::TrainMim, 224).unwrap();
        assert!(cfg.use_mask_token && cfg.use_shared_relative_position_bias);
        assert_eq!(cfg.num_patches(), 196);
        assert!(resolve_config("base", BenchMode::Infer, 100).is_err());
        assert!(resolve_config("/nonexistent/config.json", BenchMode::Infer, 224).is_err());
        let mut args = tiny_args(BenchMode::TrainMim);
        args.num_masked = 1000;
        let cfg = tiny_config(BenchMode::TrainMim);
        assert!(measure(&args, &cfg, &Device::Cpu).is_err());
    }

    #[test]
    fn median_of_even_and_odd_counts() {
        let r = BenchResult {
            step_s: vec![3.0, 1.0, 2.0],
            phase_s: vec![vec![1.0, 0.5], vec![3.0, 0.5], vec![2.0, 0.5]],
        };
        assert_eq!(r.phase_median_s(0), Some(2.0));
        assert_eq!(r.phase_median_s(2), None);
        assert_eq!(r.median_s(), 2.0);
        let r = BenchResult {
            step_s: vec![4.0, 1.0, 2.0, 3.0],
            phase_s: vec![],
        };
        assert_eq!(r.median_s(), 2.5);
    }
}
