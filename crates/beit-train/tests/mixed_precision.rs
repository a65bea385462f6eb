//! The bf16 pattern of `Precision`: f32 master Vars, bf16 matmuls, f32 loss. Gradients arrive at
//! the Vars in f32 through `to_dtype`'s backward, AdamW updates them in f32, and the loss falls.
//! (CPU bf16 is slow but numerically the same kind of computation as on CUDA.)

use beit_train::{
    build_param_groups, named_vars, AdamWConfig, GroupingConfig, Precision, StepOutput,
    TrainConfig, TrainLoop, TrainRng,
};
use candle::{DType, Device, Tensor};
use candle_nn::{Init, VarMap};
use rand::Rng;

#[test]
fn bf16_compute_with_f32_master_weights_trains() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    let p = Precision::Bf16;
    let vm = VarMap::new();
    let mut init = TrainRng::seed_from_u64(0);
    for (n, s) in [("fc1.weight", (32, 8)), ("fc2.weight", (4, 32))] {
        vm.get(s, n, Init::Const(0.0), DType::F32, &dev)?;
        vm.data().lock().unwrap()[n].set(&(init.normal_tensor(s, &dev)? * 0.3)?)?;
    }
    vm.get(4, "fc2.bias", Init::Const(0.0), DType::F32, &dev)?;
    let groups = build_param_groups(named_vars(&vm), &GroupingConfig::pretrain(0))?;
    let cfg = TrainConfig {
        epochs: 1,
        batches_per_epoch: 30,
        accum_steps: 1,
        lr: 1e-2,
        min_lr: 1e-3,
        warmup_epochs: 0,
        warmup_steps: None,
        weight_decay: 0.0,
        weight_decay_end: None,
        clip_grad: None,
        adamw: AdamWConfig::default(),
        seed: 0,
        log_every: 1,
        checkpoint_every: None,
        checkpoint_each_epoch: false,
        keep_last: 1,
        show_progress: false,
        ..TrainConfig::default()
    };
    let dir = tempfile::tempdir()?;
    let mut tl = TrainLoop::new(cfg, vm.clone(), groups, dir.path(), serde_json::json!({}))?;
    // A fixed linearly separable-ish task: class = argmax of a fixed projection.
    let teacher = TrainRng::seed_from_u64(9).normal_tensor((4, 8), &dev)?;
    let get = |n: &str| vm.data().lock().unwrap()[n].as_tensor().clone();
    let mut losses = Vec::new();
    while !tl.is_done() {
        let x = tl.rng().normal_tensor((16, 8), &dev)?;
        let y = x.matmul(&teacher.t()?)?.argmax(1)?;
        let _ = tl.rng().random::<u8>();
        // bf16 matmuls on cast weights; loss in f32.
        let h = p
            .cast(&x)?
            .matmul(&p.cast(&get("fc1.weight"))?.t()?)?
            .relu()?;
        let logits = h.matmul(&p.cast(&get("fc2.weight"))?.t()?)?;
        assert_eq!(logits.dtype(), DType::BF16);
        let logits = Precision::to_f32(&logits)?.broadcast_add(&get("fc2.bias"))?;
        let loss = candle_nn::loss::cross_entropy(&logits, &y)?;
        let r = tl
            .micro_step(StepOutput {
                loss,
                batch_size: 16,
                metrics: vec![],
            })?
            .unwrap();
        let r = r.record.expect("read back at every step (log_every = 1)");
        assert!(!r.skipped && r.grad_norm > 0.0);
        losses.push(r.loss);
    }
    for (n, v) in named_vars(&vm) {
        assert_eq!(v.dtype(), DType::F32, "{n} stays f32");
    }
    let head: f64 = losses[..5].iter().sum::<f64>() / 5.0;
    let tail: f64 = losses[losses.len() - 5..].iter().sum::<f64>() / 5.0;
    assert!(tail < 0.7 * head, "loss {head} -> {tail}");
    let _ = Tensor::zeros(1, DType::F32, &dev)?;
    Ok(())
}
