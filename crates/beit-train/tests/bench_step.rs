//! Timing of the engine's per-step overhead at ViT-B size (86.5M parameters, 223 tensors):
//! AdamW update, global-norm clipping, and a checkpoint save. Ignored by default (it allocates
//! ~2 GB and writes ~1 GB); run with
//! `cargo test -p beit-train --release --test bench_step -- --ignored --nocapture`.

use std::time::Instant;

use beit_train::{
    build_param_groups, clip_grad_norm, AdamW, AdamWConfig, CheckpointManager, GroupingConfig,
    TrainRng, TrainerState,
};
use candle::{backprop::GradStore, DType, Device, Tensor};
use candle_nn::{Init, VarMap};

fn vit_b_classifier(vm: &VarMap) {
    let dev = Device::Cpu;
    let add = |n: String, s: Vec<usize>| {
        vm.get(s.as_slice(), &n, Init::Const(0.01), DType::F32, &dev)
            .unwrap();
    };
    add("beit.embeddings.cls_token".into(), vec![1, 1, 768]);
    add(
        "beit.embeddings.patch_embeddings.projection.weight".into(),
        vec![768, 3, 16, 16],
    );
    add(
        "beit.embeddings.patch_embeddings.projection.bias".into(),
        vec![768],
    );
    for i in 0..12 {
        let p = format!("beit.encoder.layer.{i}.");
        for (n, s) in [
            ("attention.attention.query.weight", vec![768, 768]),
            ("attention.attention.query.bias", vec![768]),
            ("attention.attention.key.weight", vec![768, 768]),
            ("attention.attention.value.weight", vec![768, 768]),
            ("attention.attention.value.bias", vec![768]),
            (
                "attention.attention.relative_position_bias.relative_position_bias_table",
                vec![732, 12],
            ),
            ("attention.output.dense.weight", vec![768, 768]),
            ("attention.output.dense.bias", vec![768]),
            ("intermediate.dense.weight", vec![3072, 768]),
            ("intermediate.dense.bias", vec![3072]),
            ("output.dense.weight", vec![768, 3072]),
            ("output.dense.bias", vec![768]),
            ("layernorm_before.weight", vec![768]),
            ("layernorm_before.bias", vec![768]),
            ("layernorm_after.weight", vec![768]),
            ("layernorm_after.bias", vec![768]),
            ("lambda_1", vec![768]),
            ("lambda_2", vec![768]),
        ] {
            add(format!("{p}{n}"), s);
        }
    }
    add("beit.pooler.layernorm.weight".into(), vec![768]);
    add("beit.pooler.layernorm.bias".into(), vec![768]);
    add("classifier.weight".into(), vec![1000, 768]);
    add("classifier.bias".into(), vec![1000]);
}

#[test]
#[ignore = "timing at ViT-B size; allocates ~2 GB"]
fn vit_b_step_overhead() -> anyhow::Result<()> {
    let vm = VarMap::new();
    vit_b_classifier(&vm);
    let groups = build_param_groups(
        beit_train::named_vars(&vm),
        &GroupingConfig::finetune(12, 0.65),
    )?;
    let numel: usize = groups.iter().map(|g| g.numel()).sum();
    assert_eq!(numel, 86_530_984); // BEiT-base/16 MIM: 86.5 M parameters
    let mut opt = AdamW::new(groups, AdamWConfig::default())?;
    let vars = opt.vars();
    let mut grads = GradStore::default();
    for v in &vars {
        grads.insert(
            v.as_tensor(),
            Tensor::ones(v.shape(), DType::F32, &Device::Cpu)?,
        );
    }
    let best = |f: &mut dyn FnMut() -> anyhow::Result<()>| -> anyhow::Result<f64> {
        let mut t = f64::INFINITY;
        for _ in 0..3 {
            let s = Instant::now();
            f()?;
            t = t.min(s.elapsed().as_secs_f64());
        }
        Ok(t)
    };
    let t_step = best(&mut || Ok(opt.step(&grads, 1e-3, 0.05).map(|_| ())?))?;
    opt.set_fused_cpu(false);
    let t_step_ops = best(&mut || Ok(opt.step(&grads, 1e-3, 0.05).map(|_| ())?))?;
    opt.set_fused_cpu(true);
    let t_clip = best(&mut || Ok(clip_grad_norm(&mut grads, &vars, 1.0).map(|_| ())?))?;
    let dir = tempfile::tempdir()?;
    let mgr = CheckpointManager::new(dir.path(), 1)?;
    let state = TrainerState::new(
        0,
        TrainRng::seed_from_u64(0).state(),
        serde_json::json!({}),
        serde_json::json!({}),
    );
    let t_ckpt = best(&mut || Ok(mgr.save(&vm, &opt, &state).map(|_| ())?))?;
    eprintln!(
        "ViT-B ({numel} params, {} tensors), best of 3: AdamW step {:.0} ms fused CPU / {:.0} ms tensor ops, clip_grad_norm {:.0} ms, checkpoint save {:.0} ms",
        vars.len(),
        t_step * 1e3,
        t_step_ops * 1e3,
        t_clip * 1e3,
        t_ckpt * 1e3
    );
    Ok(())
}
