//! What a training step reads back from the device: nothing but the logged values (at step 1,
//! every `log_every` steps, at an epoch's end and before a checkpoint) and, with clipping on,
//! the gradient norm of each optimizer step. Every read of the engine goes through
//! `beit_train::host`, which counts them; a read added inside the step breaks these counts.
//! The MIM step takes its masked positions from the host, as the pre-training recipe does: the
//! model and the loss read no mask back (`beit_model::mask_reads`, `beit_mim::mask_reads`).
//!
//! Also: the records do not depend on when they are read (the same `metrics.jsonl` whatever
//! `log_every`), a non-finite loss still stops the run before any checkpoint holds its
//! weights, and the step's source files read nothing except through the counting function.

use beit_mim::{masked_token_loss_at, MaskBatch};
use beit_model::init::{init_beit, InitConfig};
use beit_model::{
    BeitConfig, BeitForImageClassification, BeitForMaskedImageModeling, ForwardOptions, QueryRows,
};
use beit_train::{
    build_param_groups, fit, host, label_smoothing_cross_entropy, named_vars, read_jsonl,
    topk_accuracy_on_device, FitOptions, GroupingConfig, StepContext, StepOutput, StepValue,
    TrainConfig, TrainLoop, TrainRng, TrainTask,
};
use candle::{Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use rand::{Rng, RngCore};

const L: usize = 2;

fn tiny(mim: bool) -> BeitConfig {
    BeitConfig {
        hidden_size: 16,
        num_hidden_layers: L,
        num_attention_heads: 2,
        intermediate_size: 32,
        image_size: 16,
        patch_size: 4,
        vocab_size: 12,
        drop_path_rate: 0.1,
        use_mask_token: mim,
        use_shared_relative_position_bias: mim,
        use_relative_position_bias: !mim,
        id2label: (!mim).then(|| (0..5).map(|i| (i, format!("c{i}"))).collect()),
        ..BeitConfig::default()
    }
}

fn config(steps_per_epoch: u64, accum: u64, clip: Option<f64>, log_every: u64) -> TrainConfig {
    TrainConfig {
        epochs: 3,
        batches_per_epoch: steps_per_epoch * accum,
        accum_steps: accum,
        lr: 1e-3,
        min_lr: 1e-5,
        warmup_epochs: 1,
        clip_grad: clip,
        seed: 3,
        log_every,
        checkpoint_every: Some(5),
        keep_last: 1,
        ..TrainConfig::default()
    }
}

/// The reads `cfg` allows over its whole run: one per step whose values are read back, plus
/// the clipped gradient norms.
fn allowed_reads(cfg: &TrainConfig) -> u64 {
    let (n, e) = (cfg.total_steps(), cfg.steps_per_epoch());
    let every = cfg.checkpoint_every.unwrap_or(u64::MAX);
    let read_at = |s: u64| s == 1 || s % cfg.log_every == 0 || s % e == 0 || s % every == 0;
    let logged = (1..=n).filter(|&s| read_at(s) || s == n).count() as u64;
    logged + if cfg.clip_grad.is_some() { n } else { 0 }
}

/// A micro-batch of the masked-image-modelling task: 2 images of 4 x 4 patches, their masks
/// (on the host and as the device tensor) and the visual-token ids of every patch.
struct MimBatch {
    pixels: Tensor,
    masks: MaskBatch,
    mask: Tensor,
    token_ids: Tensor,
}

fn mim_batch(epoch: u64, index: u64) -> anyhow::Result<MimBatch> {
    let r = &mut TrainRng::derive(7, &[epoch, index]);
    let pixels = r.normal_tensor((2, 3, 16, 16), &Device::Cpu)?;
    let masks = MaskBatch {
        height: 4,
        width: 4,
        masks: (0..2)
            .map(|b| (0..16).map(|j| (b * 16 + j) % 3 == 0).collect())
            .collect(),
    };
    let ids: Vec<u32> = (0..32).map(|_| r.random_range(0..12)).collect();
    Ok(MimBatch {
        pixels,
        mask: masks.to_tensor(&Device::Cpu)?,
        masks,
        token_ids: Tensor::from_vec(ids, (2, 16), &Device::Cpu)?,
    })
}

struct Mim(BeitForMaskedImageModeling);

impl TrainTask for Mim {
    type Batch = MimBatch;
    type Error = anyhow::Error;

    fn train_step(&mut self, b: MimBatch, ctx: &mut StepContext<'_>) -> anyhow::Result<StepOutput> {
        ctx.reseed_stochastic(self.0.backbone().rng(), 2);
        let rows = QueryRows::new(&b.masks.masked_positions(1))?;
        let logits = (self.0)
            .forward_masked_rows(&b.pixels, &b.mask, &rows, ForwardOptions::train())?
            .logits;
        let masked = b.masks.masked_flat_indices();
        let out = masked_token_loss_at(&logits, (2, 16), &masked, Some(&b.token_ids))?;
        let acc = out.mlm_acc.expect("the visual-token loss measures mlm_acc");
        Ok(StepOutput {
            loss: out.loss,
            batch_size: 2,
            metrics: vec![("mlm_acc".into(), acc.into())],
        })
    }
}

/// A micro-batch of the classification task: 4 images, their labels.
fn cls_batch(epoch: u64, index: u64) -> anyhow::Result<(Tensor, Tensor)> {
    let r = &mut TrainRng::derive(8, &[epoch, index]);
    let x = r.normal_tensor((4, 3, 16, 16), &Device::Cpu)?;
    let y: Vec<u32> = (0..4).map(|_| r.random_range(0..5)).collect();
    Ok((x, Tensor::from_vec(y, 4, &Device::Cpu)?))
}

/// Fine-tuning; `nan_at` makes the loss of the first micro-batch of that step NaN.
struct Classify {
    model: BeitForImageClassification,
    nan_at: Option<u64>,
}

impl TrainTask for Classify {
    type Batch = (Tensor, Tensor);
    type Error = anyhow::Error;

    fn train_step(
        &mut self,
        (x, y): (Tensor, Tensor),
        ctx: &mut StepContext<'_>,
    ) -> anyhow::Result<StepOutput> {
        self.model.backbone().rng().reseed(ctx.rng.next_u64());
        let logits = self.model.forward(&x, ForwardOptions::train())?.logits;
        let mut loss = label_smoothing_cross_entropy(&logits, &y, 0.1)?;
        if self.nan_at == Some(ctx.position.step) {
            loss = (loss * f64::NAN)?;
        }
        let acc = topk_accuracy_on_device(&logits, &y, &[1])?.remove(0);
        Ok(StepOutput {
            loss,
            batch_size: 4,
            metrics: vec![
                ("acc1".into(), StepValue::scaled(acc, 100.0)),
                ("count".into(), StepValue::Host(4.0)),
            ],
        })
    }
}

fn classifier(seed: u64) -> anyhow::Result<(VarMap, BeitForImageClassification)> {
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, candle::DType::F32, &Device::Cpu);
    let model = BeitForImageClassification::new(&tiny(false), vb)?;
    init_beit(
        &vm,
        &InitConfig::finetune(L, 0.1),
        &mut TrainRng::seed_from_u64(seed),
    )?;
    Ok((vm, model))
}

/// Fine-tune the classifier under `cfg` in `dir`; returns the reads the run made.
fn finetune(cfg: TrainConfig, dir: &std::path::Path, nan_at: Option<u64>) -> anyhow::Result<u64> {
    let (vm, model) = classifier(4)?;
    let groups = build_param_groups(named_vars(&vm), &GroupingConfig::finetune(L, 0.65))?;
    let per_epoch = cfg.batches_per_epoch;
    let tl = TrainLoop::new(cfg, vm, groups, dir, serde_json::json!({}))?;
    let before = host::reads();
    let batches = |e| Ok((0..per_epoch).map(move |i| cls_batch(e, i)));
    fit(
        tl,
        &mut Classify { model, nan_at },
        batches,
        &FitOptions::default(),
    )?;
    Ok(host::reads() - before)
}

#[test]
fn mim_pretraining_reads_the_logged_values_and_the_clipped_norm_only() -> anyhow::Result<()> {
    let cfg = config(4, 1, Some(3.0), 3);
    let expected = allowed_reads(&cfg);
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, candle::DType::F32, &Device::Cpu);
    let model = BeitForMaskedImageModeling::new(&tiny(true), vb)?;
    init_beit(
        &vm,
        &InitConfig::pretrain(L, 0.1),
        &mut TrainRng::seed_from_u64(1),
    )?;
    let groups = build_param_groups(named_vars(&vm), &GroupingConfig::pretrain(L))?;
    let dir = tempfile::tempdir()?;
    let per_epoch = cfg.batches_per_epoch;
    let tl = TrainLoop::new(cfg, vm, groups, dir.path(), serde_json::json!({}))?;
    let before = host::reads();
    let mask_reads = (beit_model::mask_reads(), beit_mim::mask_reads());
    let batches = |e| Ok((0..per_epoch).map(move |i| mim_batch(e, i)));
    fit(tl, &mut Mim(model), batches, &FitOptions::default())?;
    assert_eq!(
        (beit_model::mask_reads(), beit_mim::mask_reads()),
        mask_reads,
        "the model and the loss read no mask back"
    );
    // 12 steps, log_every 3, 4 steps per epoch, a checkpoint every 5: steps 1, 3, 4, 5, 6, 8,
    // 9, 10, 12 are read (9), and 12 clipped norms.
    assert_eq!(expected, 21);
    assert_eq!(host::reads() - before, expected);
    Ok(())
}

#[test]
fn finetuning_without_clipping_reads_the_logged_values_only() -> anyhow::Result<()> {
    let cfg = config(4, 2, None, 4);
    let expected = allowed_reads(&cfg);
    let dir = tempfile::tempdir()?;
    // 12 steps of 2 micro-batches: steps 1, 4, 5, 8, 10, 12 are read.
    assert_eq!(expected, 6);
    assert_eq!(finetune(cfg, dir.path(), None)?, expected);
    Ok(())
}

/// The step records without their timing.
fn step_records(dir: &std::path::Path) -> Vec<serde_json::Map<String, serde_json::Value>> {
    let mut recs = read_jsonl(&dir.join("metrics.jsonl")).unwrap();
    recs.iter_mut().for_each(|r| {
        r.remove("images_per_sec");
    });
    recs
}

#[test]
fn the_log_is_the_same_whenever_it_is_read() -> anyhow::Result<()> {
    let (a, b) = (tempfile::tempdir()?, tempfile::tempdir()?);
    finetune(config(4, 2, None, 1), a.path(), None)?;
    finetune(config(4, 2, None, 7), b.path(), None)?;
    let (ra, rb) = (step_records(a.path()), step_records(b.path()));
    assert_eq!(ra.len(), 12 + 3, "12 step records and 3 epoch records");
    assert_eq!(ra, rb);
    Ok(())
}

#[test]
fn a_non_finite_loss_stops_the_run_before_the_next_checkpoint() -> anyhow::Result<()> {
    // No clipping, a read every 4 steps, a checkpoint every 5: the NaN loss of the step after
    // 3 is found at step 4's read, before the checkpoint of step 5 is written.
    let dir = tempfile::tempdir()?;
    let err = finetune(config(4, 2, None, 4), dir.path(), Some(3)).unwrap_err();
    assert!(
        err.to_string().contains("non-finite loss at step 3"),
        "{err}"
    );
    let steps: Vec<u64> = step_records(dir.path())
        .iter()
        .filter_map(|r| r["step"].as_u64())
        .collect();
    assert_eq!(steps, vec![1, 2, 3], "the steps before it are logged");
    let checkpoints: Vec<_> = std::fs::read_dir(dir.path())?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("trainer_state.json").exists())
        .collect();
    assert!(
        checkpoints.is_empty(),
        "no checkpoint after a non-finite step"
    );
    Ok(())
}

/// The files of the training step: every read goes through `host::read_values`.
#[test]
fn the_step_reads_only_through_the_counting_function() {
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let step_files = [
        "accumulate.rs",
        "adamw_cpu.rs",
        "clip.rs",
        "fit.rs",
        "losses.rs",
        "pending.rs",
        "records.rs",
        "train_loop.rs",
        "update.rs",
    ];
    for f in step_files {
        let text = std::fs::read_to_string(src.join(f)).unwrap();
        // Unit tests (at the end of the file) may read what they like.
        let code = text.split("#[cfg(test)]").next().unwrap_or("");
        for (i, line) in code.lines().enumerate() {
            let read = [".to_vec0", ".to_vec1", ".to_vec2", ".to_vec3", ".to_scalar"]
                .iter()
                .any(|p| line.contains(p));
            assert!(
                !read || line.trim_start().starts_with("//"),
                "src/{f}:{}: reads back outside beit_train::host: {}",
                i + 1,
                line.trim()
            );
        }
    }
}
