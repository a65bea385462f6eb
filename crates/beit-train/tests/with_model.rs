//! Contract test with the real model crate: the engine's name-based rules cover every parameter
//! of `beit-model`'s MIM and classification models, and a short MIM run through `TrainLoop`
//! updates every parameter, lowers the loss, and resumes exactly (model dropout/drop-path
//! reseeded from the loop's generator).

use beit_model::init::{init_beit, var_values, InitConfig, InitKind};
use beit_model::{
    BeitConfig, BeitForImageClassification, BeitForMaskedImageModeling, ForwardOptions,
};
use beit_train::{
    build_param_groups, fit, named_vars, read_jsonl, AdamWConfig, FitOptions, GroupingConfig,
    Position, StepContext, StepOutput, TrainConfig, TrainLoop, TrainRng, TrainTask,
};
use candle::{DType, Device, Tensor};
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
        hidden_dropout_prob: 0.1,
        use_mask_token: mim,
        use_shared_relative_position_bias: mim,
        use_relative_position_bias: !mim,
        id2label: if mim {
            None
        } else {
            Some((0..5).map(|i| (i, format!("c{i}"))).collect())
        },
        ..BeitConfig::default()
    }
}

fn mim_model(seed: u64) -> (VarMap, BeitForMaskedImageModeling) {
    let vm = VarMap::new();
    let m = BeitForMaskedImageModeling::new(
        &tiny(true),
        VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu),
    )
    .unwrap();
    init_beit(
        &vm,
        &InitConfig::pretrain(L, 0.1),
        &mut TrainRng::seed_from_u64(seed),
    )
    .unwrap();
    (vm, m)
}

#[test]
fn rules_cover_every_model_parameter() -> anyhow::Result<()> {
    let (vm, _m) = mim_model(0);
    let report = init_beit(
        &vm,
        &InitConfig::pretrain(L, 0.1),
        &mut TrainRng::seed_from_u64(0),
    )?;
    let kind = |n: &str| report.iter().find(|(k, _)| k == n).map(|(_, k)| *k);
    assert_eq!(
        kind("beit.embeddings.mask_token"),
        Some(InitKind::TruncNormal)
    );
    assert_eq!(
        kind("beit.encoder.relative_position_bias.relative_position_bias_table"),
        Some(InitKind::Zeros)
    );
    assert_eq!(
        kind("beit.encoder.layer.1.lambda_2"),
        Some(InitKind::LayerScale)
    );
    let groups = build_param_groups(named_vars(&vm), &GroupingConfig::pretrain(L))?;
    let count: usize = groups.iter().map(|g| g.params.len()).sum();
    assert_eq!(
        count,
        4 + 1 + 17 * L + 4,
        "MIM parameter count (classic transformers layout)"
    );

    let vm = VarMap::new();
    let _c = BeitForImageClassification::new(
        &tiny(false),
        VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu),
    )?;
    init_beit(
        &vm,
        &InitConfig::finetune(L, 0.1),
        &mut TrainRng::seed_from_u64(0),
    )?;
    let groups = build_param_groups(named_vars(&vm), &GroupingConfig::finetune(L, 0.65))?;
    let names: Vec<(String, f64)> = groups
        .iter()
        .map(|g| (g.name.clone(), g.lr_scale))
        .collect();
    assert_eq!(
        groups.iter().map(|g| g.params.len()).sum::<usize>(),
        3 + 18 * L + 4
    );
    let scale = |g: &str| names.iter().find(|(n, _)| n == g).map(|(_, s)| *s).unwrap();
    assert!(
        (scale("layer_0_decay") - 0.65f64.powi(3)).abs() < 1e-15,
        "{names:?}"
    );
    assert!(
        (scale("layer_2_no_decay") - 0.65).abs() < 1e-15,
        "{names:?}"
    );
    assert_eq!(scale("layer_3_decay"), 1.0);
    Ok(())
}

fn config(epochs: u64) -> TrainConfig {
    TrainConfig {
        epochs,
        batches_per_epoch: 4,
        accum_steps: 2,
        lr: 3e-3,
        min_lr: 1e-5,
        warmup_epochs: 1,
        warmup_steps: Some(1),
        weight_decay: 0.05,
        weight_decay_end: None,
        clip_grad: Some(3.0),
        adamw: AdamWConfig::default(),
        seed: 5,
        log_every: 100,
        checkpoint_every: Some(3),
        checkpoint_each_epoch: false,
        keep_last: 1,
        show_progress: false,
        ..TrainConfig::default()
    }
}

struct Batch {
    pixels: Tensor,
    mask: Tensor,
    labels: Tensor,
}

/// A fixed pool of 4 batches (so the loss can fall), masks and ids from a fixed generator.
fn batch(pos: Position) -> anyhow::Result<Batch> {
    let mut r = TrainRng::derive(99, &[pos.batch_in_epoch]);
    let pixels = r.normal_tensor((2, 3, 16, 16), &Device::Cpu)?;
    let mask: Vec<u8> = (0..32)
        .map(|i| u8::from(i % 3 == 0 || r.random_bool(0.3)))
        .collect();
    let m = mask.iter().filter(|&&x| x == 1).count();
    let labels: Vec<u32> = (0..m).map(|_| r.random_range(0..12)).collect();
    Ok(Batch {
        pixels,
        mask: Tensor::from_vec(mask, (2, 16), &Device::Cpu)?,
        labels: Tensor::from_vec(labels, m, &Device::Cpu)?,
    })
}

fn forward(
    model: &BeitForMaskedImageModeling,
    b: &Batch,
    rng: &mut TrainRng,
) -> anyhow::Result<StepOutput> {
    // The model's dropout/drop-path generator is reseeded from the loop's (checkpointed) one.
    model.backbone().rng().reseed(rng.next_u64());
    let logits = model
        .forward_masked(&b.pixels, &b.mask, ForwardOptions::train())?
        .logits;
    let loss = candle_nn::loss::cross_entropy(&logits, &b.labels)?;
    let acc = beit_train::topk_accuracy_on_device(&logits, &b.labels, &[1])?.remove(0);
    Ok(StepOutput {
        loss,
        batch_size: 2,
        metrics: vec![("mlm_acc".into(), acc.into())],
    })
}

/// The MIM model as a task for [`fit`].
struct Mim<'a>(&'a BeitForMaskedImageModeling);

impl TrainTask for Mim<'_> {
    type Batch = Batch;
    type Error = anyhow::Error;

    fn train_step(&mut self, b: Batch, ctx: &mut StepContext<'_>) -> anyhow::Result<StepOutput> {
        forward(self.0, &b, ctx.rng)
    }
}

/// Run `tl` with [`fit`] to the end.
fn run(tl: TrainLoop, model: &BeitForMaskedImageModeling) -> anyhow::Result<()> {
    let per_epoch = tl.config().batches_per_epoch;
    fit(
        tl,
        &mut Mim(model),
        |epoch| {
            Ok((0..per_epoch).map(move |i| {
                batch(Position {
                    step: 0,
                    epoch,
                    batch_in_epoch: i,
                })
            }))
        },
        &FitOptions::default(),
    )?;
    Ok(())
}

fn losses(dir: &std::path::Path) -> Vec<u64> {
    read_jsonl(&dir.join("metrics.jsonl"))
        .unwrap()
        .into_iter()
        .filter(|r| r["kind"] == "step")
        .map(|r| r["loss"].as_f64().unwrap().to_bits())
        .collect()
}

#[test]
fn mim_training_updates_everything_and_resumes_exactly() -> anyhow::Result<()> {
    let epochs = 4; // 2 steps per epoch, 8 steps
    let dir_a = tempfile::tempdir()?;
    let (vm, model) = mim_model(1);
    let before: Vec<(String, Vec<f32>)> = named_vars(&vm)
        .into_iter()
        .map(|(n, v)| (n, v.as_tensor().flatten_all().unwrap().to_vec1().unwrap()))
        .collect();
    let groups = build_param_groups(named_vars(&vm), &GroupingConfig::pretrain(L))?;
    let tl = TrainLoop::new(
        config(epochs),
        vm.clone(),
        groups,
        dir_a.path(),
        serde_json::json!({}),
    )?;
    run(tl, &model)?;
    for (name, old) in &before {
        let new: Vec<f32> = var_values(&vm, name)?;
        assert_ne!(&new, old, "`{name}` was not updated");
    }
    let la = losses(dir_a.path());
    assert_eq!(la.len(), 8);
    let first = f64::from_bits(la[0]);
    let last = f64::from_bits(la[7]);
    assert!(last < first, "loss did not fall: {first} -> {last}");

    // Interrupted after 4 steps (checkpoint at 3; the finished step 4 is lost), resumed into a
    // fresh model.
    let dir_b = tempfile::tempdir()?;
    {
        let (vm, model) = mim_model(1);
        let groups = build_param_groups(named_vars(&vm), &GroupingConfig::pretrain(L))?;
        let mut tl = TrainLoop::new(
            config(epochs),
            vm.clone(),
            groups,
            dir_b.path(),
            serde_json::json!({}),
        )?;
        while tl.state().step < 4 {
            let b = batch(tl.position())?;
            let out = forward(&model, &b, tl.rng())?;
            tl.micro_step(out)?;
        }
    }
    let (vm_c, model_c) = mim_model(2);
    let groups = build_param_groups(named_vars(&vm_c), &GroupingConfig::pretrain(L))?;
    let tl = TrainLoop::resume(
        config(epochs),
        vm_c.clone(),
        groups,
        dir_b.path(),
        dir_b.path(),
        serde_json::json!({}),
    )?;
    run(tl, &model_c)?;
    assert_eq!(la, losses(dir_b.path()));
    for (name, _) in &before {
        assert_eq!(var_values(&vm, name)?, var_values(&vm_c, name)?, "{name}");
    }
    Ok(())
}
