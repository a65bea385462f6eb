//! Resume exactness: a run interrupted after a checkpoint and resumed in a "new process" (fresh
//! VarMap with different values, fresh loop) reproduces the uninterrupted run bit for bit on
//! CPU: per-step loss, lr, grad norm, the final weights and the metrics log.
//!
//! The model is a 2-layer MLP with dropout on synthetic data; data and dropout masks are drawn
//! from the loop's generator, with gradient accumulation, clipping, warm-up and weight decay on.

use std::path::Path;

use std::collections::BTreeMap;

use beit_model::init::{init_beit, InitConfig};
use beit_train::{
    build_param_groups, fit, fit_source, named_vars, read_jsonl, AdamWConfig, BestMetric,
    Checkpoint, DataPosition, EpochSource, FitOptions, FitOutcome, GroupingConfig, Position,
    StepContext, StepOutput, TrainConfig, TrainLoop, TrainRng, TrainTask,
};
use candle::{DType, Device, Tensor, D};
use candle_nn::{Init, VarMap};

const IN: usize = 6;
const HID: usize = 16;
const OUT: usize = 3;
const BATCH: usize = 8;

fn make_model(seed: u64) -> VarMap {
    let vm = VarMap::new();
    let dev = Device::Cpu;
    for (n, s) in [
        ("fc1.weight", vec![HID, IN]),
        ("fc1.bias", vec![HID]),
        ("fc2.weight", vec![OUT, HID]),
        ("fc2.bias", vec![OUT]),
    ] {
        vm.get(s.as_slice(), n, Init::Const(0.0), DType::F32, &dev)
            .unwrap();
    }
    // std 0.02 would train too slowly to see anything; the init rules are the point here.
    let mut cfg = InitConfig::finetune(0, 0.1);
    cfg.std = 0.5;
    init_beit(&vm, &cfg, &mut TrainRng::seed_from_u64(seed)).unwrap();
    vm
}

fn config() -> TrainConfig {
    TrainConfig {
        epochs: 3,
        batches_per_epoch: 5, // 2 steps of 2 micro-batches per epoch; the 5th is not drawn
        accum_steps: 2,
        lr: 0.05,
        min_lr: 1e-4,
        warmup_epochs: 1,
        warmup_steps: None,
        weight_decay: 0.05,
        weight_decay_end: Some(0.1),
        clip_grad: Some(0.5),
        adamw: AdamWConfig::default(),
        seed: 42,
        log_every: 1,
        checkpoint_every: Some(3),
        checkpoint_each_epoch: false,
        keep_last: 2,
        show_progress: false,
        ..TrainConfig::default()
    }
}

struct Batch {
    x: Tensor,
    y: Tensor,
}

/// Micro-batch `index` of `epoch`: a function of its position only, as `fit` requires.
fn next_batch(epoch: u64, index: u64) -> anyhow::Result<Batch> {
    use rand::Rng;
    let rng = &mut TrainRng::derive(42, &[epoch, index]);
    let x = rng.normal_tensor((BATCH, IN), &Device::Cpu)?;
    let y: Vec<u32> = (0..BATCH)
        .map(|_| rng.random_range(0..OUT as u32))
        .collect();
    Ok(Batch {
        x,
        y: Tensor::from_vec(y, BATCH, &Device::Cpu)?,
    })
}

fn forward(vm: &VarMap, b: &Batch, rng: &mut TrainRng) -> anyhow::Result<StepOutput> {
    let get = |n: &str| vm.data().lock().unwrap()[n].as_tensor().clone();
    let h =
        b.x.matmul(&get("fc1.weight").t()?)?
            .broadcast_add(&get("fc1.bias"))?
            .relu()?;
    // Dropout 0.25 with a mask from the run's generator.
    let keep = rng
        .uniform_tensor((BATCH, HID), 0.0, 1.0, &Device::Cpu)?
        .ge(0.25)?
        .to_dtype(DType::F32)?;
    let h = ((h * keep)? / 0.75)?;
    let logits = h
        .matmul(&get("fc2.weight").t()?)?
        .broadcast_add(&get("fc2.bias"))?;
    let loss = candle_nn::loss::cross_entropy(&logits, &b.y)?;
    let acc = logits
        .argmax(D::Minus1)?
        .eq(&b.y)?
        .to_dtype(DType::F32)?
        .mean_all()?
        .to_scalar::<f32>()?;
    Ok(StepOutput {
        loss,
        batch_size: BATCH,
        metrics: vec![("acc1".into(), (acc as f64).into())],
    })
}

/// The toy MLP as a task, evaluated on a fixed batch.
struct Mlp<'a> {
    vm: &'a VarMap,
    evals: Vec<u64>,
    best_calls: Vec<u64>,
}

impl TrainTask for Mlp<'_> {
    type Batch = Batch;
    type Error = anyhow::Error;

    fn train_step(&mut self, b: Batch, ctx: &mut StepContext<'_>) -> anyhow::Result<StepOutput> {
        forward(self.vm, &b, ctx.rng)
    }

    fn evaluate(&mut self) -> anyhow::Result<Vec<(String, f64)>> {
        let out = forward(
            self.vm,
            &next_batch(999, 0)?,
            &mut TrainRng::seed_from_u64(0),
        )?;
        self.evals
            .push(out.loss.to_scalar::<f32>()?.to_bits() as u64);
        Ok(vec![(
            "val_loss".into(),
            out.loss.to_scalar::<f32>()? as f64,
        )])
    }

    fn on_best(&mut self, _: &BTreeMap<String, f64>, at: Position) -> anyhow::Result<()> {
        self.best_calls.push(at.step);
        Ok(())
    }
}

/// Run `tl` to the end (or `opts.stop_after`) with [`fit`].
fn run_fit<'a>(
    tl: TrainLoop,
    vm: &'a VarMap,
    opts: &FitOptions,
) -> anyhow::Result<(FitOutcome, Mlp<'a>)> {
    let mut task = Mlp {
        vm,
        evals: vec![],
        best_calls: vec![],
    };
    let per_epoch = tl.config().batches_per_epoch;
    let out = fit(
        tl,
        &mut task,
        |epoch| Ok((0..per_epoch).map(move |i| next_batch(epoch, i))),
        opts,
    )?;
    Ok((out, task))
}

fn groups(vm: &VarMap) -> Vec<beit_train::ParamGroup> {
    build_param_groups(named_vars(vm), &GroupingConfig::finetune(0, 0.9)).unwrap()
}

/// (step, loss, lr, grad_norm, acc1) of the step records, as exact bits.
fn curve(dir: &Path) -> Vec<(u64, u64, u64, u64, u64)> {
    read_jsonl(&dir.join("metrics.jsonl"))
        .unwrap()
        .into_iter()
        .filter(|r| r["kind"] == "step")
        .map(|r| {
            let f = |k: &str| r[k].as_f64().unwrap().to_bits();
            (
                r["step"].as_u64().unwrap(),
                f("loss"),
                f("lr"),
                f("grad_norm"),
                f("acc1"),
            )
        })
        .collect()
}

fn epoch_records(dir: &Path) -> Vec<Vec<(String, u64)>> {
    read_jsonl(&dir.join("metrics.jsonl"))
        .unwrap()
        .into_iter()
        .filter(|r| r["kind"] == "epoch")
        .map(|r| {
            r.iter()
                .filter(|(k, _)| k.as_str() != "images_per_sec")
                .filter_map(|(k, v)| v.as_f64().map(|x| (k.clone(), x.to_bits())))
                .collect()
        })
        .collect()
}

fn weights(vm: &VarMap) -> Vec<(String, Vec<u32>)> {
    named_vars(vm)
        .into_iter()
        .map(|(n, v)| {
            let bits = v
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            (n, bits.into_iter().map(f32::to_bits).collect())
        })
        .collect()
}

#[test]
fn resumed_run_reproduces_uninterrupted_run_bit_for_bit() -> anyhow::Result<()> {
    // Uninterrupted run.
    let dir_a = tempfile::tempdir()?;
    let vm_a = make_model(7);
    let tl = TrainLoop::new(
        config(),
        vm_a.clone(),
        groups(&vm_a),
        dir_a.path(),
        serde_json::json!({}),
    )?;
    let (done, _) = run_fit(tl, &vm_a, &FitOptions::default())?;
    let summary = done.summary;
    assert!(done.finished);
    assert_eq!(summary.steps, 6);
    let curve_a = curve(dir_a.path());
    assert_eq!(curve_a.len(), 6);
    // It learns something and the lr follows the warm-up.
    assert!(curve_a[0].2 == 0f64.to_bits(), "first warm-up lr is 0");

    // Interrupted run: stops after step 4 (checkpoint at 3; step 4 and one more micro-batch of
    // work are lost), then a new process resumes from the run directory.
    let dir_b = tempfile::tempdir()?;
    {
        let vm_b = make_model(7);
        let mut tl = TrainLoop::new(
            config(),
            vm_b.clone(),
            groups(&vm_b),
            dir_b.path(),
            serde_json::json!({}),
        )?;
        // Driven by hand through the step API, then killed mid-accumulation.
        while tl.state().step < 4 || tl.position().batch_in_epoch % 2 == 0 {
            let pos = tl.position();
            let b = next_batch(pos.epoch, pos.batch_in_epoch)?;
            let out = forward(&vm_b, &b, tl.rng())?;
            tl.micro_step(out)?;
        }
        // Dropped without finish(): like a killed process.
    }
    assert_eq!(curve(dir_b.path()).len(), 4);
    let vm_c = make_model(12345); // different values: must be overwritten by the checkpoint
    let tl = TrainLoop::resume(
        config(),
        vm_c.clone(),
        groups(&vm_c),
        dir_b.path(),
        dir_b.path(),
        serde_json::json!({}),
    )?;
    assert_eq!(tl.state().step, 3);
    assert_eq!(tl.position().epoch, 1);
    assert_eq!(tl.position().batch_in_epoch, 2);
    run_fit(tl, &vm_c, &FitOptions::default())?;
    // A fresh run into a directory with checkpoints is refused.
    let vm_d = make_model(1);
    let e = TrainLoop::new(
        config(),
        vm_d.clone(),
        groups(&vm_d),
        dir_b.path(),
        serde_json::json!({}),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("already holds checkpoints"), "{e}");

    let curve_b = curve(dir_b.path());
    assert_eq!(curve_a, curve_b, "loss curves differ");
    assert_eq!(weights(&vm_a), weights(&vm_c), "final weights differ");
    // Epoch records too (the resumed epoch's averages include its pre-checkpoint step), one per
    // epoch, no duplicates from the lost step.
    let epochs_a = epoch_records(dir_a.path());
    assert_eq!(epochs_a.len(), 3);
    assert_eq!(epochs_a, epoch_records(dir_b.path()));
    // Resuming run A from its older checkpoint (step 3, explicit path) replays the same
    // continuation: the stale step-6 checkpoint and the later records are replaced.
    let vm_e = make_model(777);
    let tl = TrainLoop::resume(
        config(),
        vm_e.clone(),
        groups(&vm_e),
        dir_a.path(),
        &dir_a.path().join("checkpoint-00000003"),
        serde_json::json!({}),
    )?;
    run_fit(tl, &vm_e, &FitOptions::default())?;
    assert_eq!(curve_a, curve(dir_a.path()));
    assert_eq!(weights(&vm_a), weights(&vm_e));

    // Rotation kept the last two step checkpoints (3 and 6).
    let ck: Vec<String> = std::fs::read_dir(dir_b.path())?
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("checkpoint-"))
        .collect();
    assert_eq!(ck.len(), 2, "{ck:?}");
    Ok(())
}

/// `record_eval` keeps the best checkpoint and a loss that becomes NaN stops the run.
#[test]
fn best_checkpoint_and_non_finite_loss() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let vm = make_model(1);
    let mut cfg = config();
    cfg.checkpoint_every = None;
    let mut tl = TrainLoop::new(
        cfg,
        vm.clone(),
        groups(&vm),
        dir.path(),
        serde_json::json!({"model": "mlp"}),
    )?;
    for i in 0..4 {
        let out = forward(&vm, &next_batch(0, i)?, tl.rng())?;
        tl.micro_step(out)?;
    }
    let best = beit_train::BestMetric {
        name: "acc1".into(),
        higher_is_better: true,
    };
    assert!(tl.record_eval(&[("acc1", 0.4), ("loss", 1.0)], Some(&best))?);
    assert!(!tl.record_eval(&[("acc1", 0.3)], Some(&best))?);
    let ck = beit_train::Checkpoint::open(&dir.path().join("best"))?;
    assert_eq!(ck.state.best_metric, Some(0.4));
    assert_eq!(ck.state.step, 2);
    assert_eq!(ck.state.run_config["model"], "mlp");
    // A non-finite loss is found when its step's values are read back: here at the end of
    // its optimizer step (the clipped gradient norm is not finite).
    let nan = Tensor::new(f32::NAN, &Device::Cpu)?;
    let pending = tl.micro_step(StepOutput {
        loss: nan,
        batch_size: 1,
        metrics: vec![],
    })?;
    assert!(pending.is_none());
    let out = forward(&vm, &next_batch(0, 4)?, tl.rng())?;
    let e = tl.micro_step(out).unwrap_err().to_string();
    assert!(e.contains("non-finite loss at step 2"), "{e}");
    Ok(())
}

/// `fit`: evaluation every epoch and at the end, the best-model hook, `stop_after`, and a resumed
/// run that evaluates the epoch whose evaluation was lost and recovers the best value from the log.
#[test]
fn fit_evaluates_tracks_the_best_and_stops_after() -> anyhow::Result<()> {
    let opts = FitOptions {
        eval_every: Some(1),
        best: Some(BestMetric {
            name: "val_loss".into(),
            higher_is_better: false,
        }),
        stop_after: None,
    };
    let mut cfg = config();
    cfg.checkpoint_each_epoch = true;
    // Uninterrupted: 3 epochs of 2 steps, an evaluation after each.
    let dir_a = tempfile::tempdir()?;
    let vm_a = make_model(3);
    let tl = TrainLoop::new(
        cfg.clone(),
        vm_a.clone(),
        groups(&vm_a),
        dir_a.path(),
        serde_json::json!({}),
    )?;
    let (done_a, task_a) = run_fit(tl, &vm_a, &opts)?;
    assert_eq!(task_a.evals.len(), 3);
    assert_eq!(done_a.last_eval.as_ref().unwrap().epochs_done, 3);
    assert!(!task_a.best_calls.is_empty() && task_a.best_calls[0] == 2);
    let best_a = done_a.best_eval.clone().unwrap();

    // Stopped after 3 steps (mid-epoch 1), then resumed to the end with the same results.
    let dir_b = tempfile::tempdir()?;
    let vm_b = make_model(3);
    let tl = TrainLoop::new(
        cfg.clone(),
        vm_b.clone(),
        groups(&vm_b),
        dir_b.path(),
        serde_json::json!({}),
    )?;
    let (done, task) = run_fit(
        tl,
        &vm_b,
        &FitOptions {
            stop_after: Some(3),
            ..opts.clone()
        },
    )?;
    assert!(!done.finished);
    assert_eq!(done.summary.steps, 3);
    assert_eq!(task.evals.len(), 1);
    let tl = TrainLoop::resume(
        cfg.clone(),
        vm_b.clone(),
        groups(&vm_b),
        dir_b.path(),
        dir_b.path(),
        serde_json::json!({}),
    )?;
    let (done_b, task_b) = run_fit(tl, &vm_b, &opts)?;
    assert!(done_b.finished);
    assert_eq!(task_b.evals, task_a.evals[1..].to_vec());
    // The resumed run recovers the best evaluation from metrics.jsonl (JSON keeps ~17 digits).
    let best_b = done_b.best_eval.unwrap();
    assert_eq!(
        (best_b.step, best_b.epochs_done),
        (best_a.step, best_a.epochs_done)
    );
    let (vb, va) = (best_b.metrics["val_loss"], best_a.metrics["val_loss"]);
    assert!((vb - va).abs() <= 1e-12 * va.abs(), "{vb} vs {va}");
    assert_eq!(curve(dir_a.path()), curve(dir_b.path()));
    assert_eq!(weights(&vm_a), weights(&vm_b));

    // Killed during the evaluation that follows epoch 0 (its checkpoint is written, its eval
    // record is not): the resumed run evaluates first.
    let dir_c = tempfile::tempdir()?;
    let vm_c = make_model(3);
    {
        let mut tl = TrainLoop::new(
            cfg.clone(),
            vm_c.clone(),
            groups(&vm_c),
            dir_c.path(),
            serde_json::json!({}),
        )?;
        while tl.position().epoch == 0 {
            let pos = tl.position();
            let out = forward(&vm_c, &next_batch(pos.epoch, pos.batch_in_epoch)?, tl.rng())?;
            tl.micro_step(out)?;
        }
    }
    let tl = TrainLoop::resume(
        cfg,
        vm_c.clone(),
        groups(&vm_c),
        dir_c.path(),
        dir_c.path(),
        serde_json::json!({}),
    )?;
    let (_, task_c) = run_fit(tl, &vm_c, &opts)?;
    assert_eq!(task_c.evals, task_a.evals);
    Ok(())
}

/// A streamed toy source: micro-batch `i` of an epoch is stream items `3i..3i+3` (one of them
/// "skipped"), so the position after it is `{items: 3(i+1), batches: i+1}`.
struct Stream {
    per_epoch: u64,
    reopened: Vec<DataPosition>,
}

struct StreamIter {
    epoch: u64,
    next: u64,
    end: u64,
}

impl Iterator for StreamIter {
    type Item = anyhow::Result<Batch>;
    fn next(&mut self) -> Option<Self::Item> {
        (self.next < self.end).then(|| {
            self.next += 1;
            next_batch(self.epoch, self.next - 1)
        })
    }
}

impl EpochSource for Stream {
    type Batch = Batch;
    type Error = anyhow::Error;
    type Iter = StreamIter;

    fn epoch(&mut self, epoch: u64) -> anyhow::Result<StreamIter> {
        Ok(StreamIter {
            epoch,
            next: 0,
            end: self.per_epoch,
        })
    }

    fn epoch_from(&mut self, pos: DataPosition) -> Option<anyhow::Result<StreamIter>> {
        assert_eq!(
            pos.items,
            3 * pos.batches,
            "the position saved after that batch"
        );
        self.reopened.push(pos);
        Some(Ok(StreamIter {
            epoch: pos.epoch,
            next: pos.batches,
            end: self.per_epoch,
        }))
    }

    fn position(&self, it: &StreamIter) -> Option<DataPosition> {
        (it.next > 0).then_some(DataPosition {
            epoch: it.epoch,
            items: 3 * it.next,
            batches: it.next,
        })
    }
}

/// `fit_source`: the checkpoint records the streamed source's position, and the resumed run
/// reopens the epoch there (no replay) with the losses of the uninterrupted run.
#[test]
fn a_streamed_source_resumes_from_its_saved_position() -> anyhow::Result<()> {
    use serde_json::json;
    let cfg = config();
    let run = |dir: &Path, vm: &VarMap, resume: bool, stop_after| -> anyhow::Result<Stream> {
        let ck = resume.then_some(dir);
        let tl = TrainLoop::open(cfg.clone(), vm.clone(), groups(vm), dir, ck, json!({}))?;
        let mut task = Mlp {
            vm,
            evals: vec![],
            best_calls: vec![],
        };
        let mut source = Stream {
            per_epoch: cfg.batches_per_epoch,
            reopened: vec![],
        };
        let opts = FitOptions {
            stop_after,
            ..FitOptions::default()
        };
        fit_source(tl, &mut task, &mut source, &opts)?;
        Ok(source)
    };
    let (a, b) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let (vm_a, vm_b) = (make_model(5), make_model(5));
    assert!(run(a.path(), &vm_a, false, None)?.reopened.is_empty());
    // Stopped after 3 steps: 2 micro-batches into epoch 1.
    run(b.path(), &vm_b, false, Some(3))?;
    let saved = Checkpoint::open(b.path())?.state.data_positions;
    let at = DataPosition {
        epoch: 1,
        items: 6,
        batches: 2,
    };
    assert_eq!(saved, vec![at]);
    let resumed = run(b.path(), &vm_b, true, None)?;
    assert_eq!(resumed.reopened, vec![at]);
    assert_eq!(curve(a.path()), curve(b.path()));
    assert_eq!(weights(&vm_a), weights(&vm_b));
    Ok(())
}
