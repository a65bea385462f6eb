//! End-to-end tests of `beit-cli pretrain` on a tiny model and the embedded Fashion-MNIST images:
//! the loss falls, an interrupted run resumed from its checkpoint writes bit-identical metrics,
//! the exported model loads back (HF layout) with identical logits, the Table 4 ablation switches
//! run, and bad input gives clear errors.

mod common;

use common::tokenizer;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use beit_model::load::Checkpoint;
use beit_model::{BeitConfig, BeitForMaskedImageModeling, ForwardOptions};
use candle::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use serde_json::Value;

/// 16 px images, 4 px patches (4x4 grid), 2 blocks of width 16; 32 images = 2 steps per epoch
/// of 2 accumulated micro-batches of 8.
const TINY: &str = r#"
[architecture]
hidden_size = 16
num_hidden_layers = 2
num_attention_heads = 2
intermediate_size = 32
image_size = 16
patch_size = 4

[data]
max_train_samples = 32
num_workers = 1
prefetch = 2

[aug]
crop_scale = [0.5, 1.0]

[masking]
num_masking_patches = 6

[train]
drop_path_rate = 0.1
epochs = 2
batch_size = 16
accum_steps = 2
lr = 3e-3
min_lr = 1e-5
warmup_epochs = 0
log_every = 1
"#;

fn beit_cli(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_beit-cli"))
        .args(args)
        .env("BEIT_LOG", "info")
        .output()
        .expect("run beit-cli")
}

fn ok(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn config(dir: &Path) -> PathBuf {
    let p = dir.join("tiny.toml");
    std::fs::write(&p, TINY).unwrap();
    p
}

fn pretrain(cfg: &Path, tok: Option<&Path>, out: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "pretrain".to_string(),
        "--config".into(),
        cfg.display().to_string(),
        "--data".into(),
        "fashion-mnist".into(),
        "--output".into(),
        out.display().to_string(),
        "--quiet".into(),
    ];
    if let Some(t) = tok {
        args.push("--tokenizer".into());
        args.push(t.display().to_string());
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    beit_cli(&refs)
}

fn step_records(run: &Path) -> Vec<serde_json::Map<String, Value>> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|r| r["kind"] == "step")
        .map(|r| r.as_object().unwrap().clone())
        .collect()
}

fn losses(run: &Path) -> Vec<u64> {
    step_records(run)
        .iter()
        .map(|r| r["loss"].as_f64().unwrap().to_bits())
        .collect()
}

fn pixels(seed: u64) -> Tensor {
    use rand::{Rng, SeedableRng};
    let mut r = rand::rngs::StdRng::seed_from_u64(seed);
    let v: Vec<f32> = (0..2 * 3 * 16 * 16)
        .map(|_| r.random_range(-1.0..1.0))
        .collect();
    Tensor::from_vec(v, (2, 3, 16, 16), &Device::Cpu).unwrap()
}

#[test]
fn loss_falls_resume_is_exact_and_the_export_loads_back() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path());
    let tok = tokenizer(tmp.path());

    // Uninterrupted: 2 epochs x 2 steps (4 micro-batches of 8, accumulated by 2).
    let a = tmp.path().join("a");
    let out = pretrain(&cfg, Some(&tok), &a, &["--set", "train.epochs=4"]);
    ok(&out, "pretrain");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("): 8 steps"), "{stdout}");
    let recs = step_records(&a);
    assert_eq!(recs.len(), 8);
    for r in &recs {
        for k in ["loss", "lr", "grad_norm", "mlm_acc", "images_per_sec"] {
            assert!(r[k].as_f64().unwrap().is_finite(), "{k} in {r:?}");
        }
    }
    let l: Vec<f64> = recs.iter().map(|r| r["loss"].as_f64().unwrap()).collect();
    let (head, tail) = ((l[0] + l[1]) / 2.0, (l[6] + l[7]) / 2.0);
    assert!(tail < head, "MIM loss did not fall: {l:?}");
    assert!(a.join("curves.png").is_file());
    assert!(a.join("config.toml").is_file());

    // Interrupted after 3 steps (mid-epoch), then resumed: the same losses, bit for bit.
    let b = tmp.path().join("b");
    let out = pretrain(
        &cfg,
        Some(&tok),
        &b,
        &["--set", "train.epochs=4", "--stop-after", "3"],
    );
    ok(&out, "pretrain --stop-after 3");
    assert!(!b.join("model").exists(), "no export before the end");
    assert_eq!(losses(&b).len(), 3);
    let out = pretrain(
        &cfg,
        Some(&tok),
        &b,
        &["--set", "train.epochs=4", "--resume"],
    );
    ok(&out, "pretrain --resume");
    assert_eq!(losses(&b), losses(&a), "resumed run differs");

    // A fresh run into a directory with checkpoints is refused.
    let out = pretrain(&cfg, Some(&tok), &a, &["--set", "train.epochs=4"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already holds checkpoints"));

    // The export (HF layout) loads strictly, holds exactly the last checkpoint's parameters, and
    // computes the same logits as a model built from that checkpoint.
    let exported = Checkpoint::from_dir(a.join("model")).unwrap();
    assert!(exported.config.use_shared_relative_position_bias);
    assert_eq!(exported.config.vocab_size, 16);
    let m1 = exported.mim(&Device::Cpu).unwrap();
    let saved = candle::safetensors::load(
        a.join("checkpoint-00000008/model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(saved.len(), exported.tensors.len());
    for (name, t) in &saved {
        let e = &exported.tensors[name];
        let (x, y): (Vec<f32>, Vec<f32>) = (
            t.flatten_all().unwrap().to_vec1().unwrap(),
            e.flatten_all().unwrap().to_vec1().unwrap(),
        );
        assert_eq!(x, y, "`{name}` differs between checkpoint and export");
    }
    let bcfg = BeitConfig::from_file(a.join("model/config.json")).unwrap();
    let m2 = BeitForMaskedImageModeling::new(
        &bcfg,
        VarBuilder::from_tensors(saved, DType::F32, &Device::Cpu),
    )
    .unwrap();
    // The trainable (VarMap) form of the same weights, as during training: it runs the
    // differentiable LayerNorm/softmax instead of the fused kernels, so it agrees to rounding.
    let vm = VarMap::new();
    let m3 = BeitForMaskedImageModeling::new(
        &bcfg,
        VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu),
    )
    .unwrap();
    beit_train::load_model(&vm, &a.join("checkpoint-00000008/model.safetensors"), true).unwrap();
    let x = pixels(1);
    let mask = Tensor::from_vec(
        (0..32).map(|i| u8::from(i % 3 == 0)).collect::<Vec<u8>>(),
        (2, 16),
        &Device::Cpu,
    )
    .unwrap();
    let logits = |m: &BeitForMaskedImageModeling| -> Vec<f32> {
        let l = m
            .forward(&x, Some(&mask), ForwardOptions::default())
            .unwrap()
            .logits;
        assert_eq!(l.dims(), &[2, 16, 16]);
        l.flatten_all().unwrap().to_vec1().unwrap()
    };
    let (v1, v2, v3) = (logits(&m1), logits(&m2), logits(&m3));
    assert_eq!(v1, v2, "exported logits differ from the checkpoint's");
    let max = v1
        .iter()
        .zip(&v3)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(max < 1e-5, "trainable and exported models differ by {max}");
}

#[test]
fn ablation_switches_run() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path());
    let tok = tokenizer(tmp.path());
    let short = ["--set", "train.epochs=1"];

    // Random masking (Table 4 "- blockwise masking").
    let run = tmp.path().join("random");
    let mut args = short.to_vec();
    args.extend(["--set", "masking.strategy=random"]);
    ok(&pretrain(&cfg, Some(&tok), &run, &args), "random masking");
    let recs = step_records(&run);
    assert_eq!(recs.len(), 2);
    // Random masking hits the target exactly: 6 masked patches per image.
    assert!(
        recs.iter().all(|r| r["masked"].as_f64() == Some(6.0)),
        "{recs:?}"
    );

    // Recover all tokens (Table 4 "+ recover 100% visual tokens").
    let run = tmp.path().join("all");
    let mut args = short.to_vec();
    args.extend(["--set", "objective.target=all-tokens"]);
    ok(&pretrain(&cfg, Some(&tok), &run, &args), "all tokens");
    assert!(step_records(&run)
        .iter()
        .all(|r| r["loss"].as_f64().unwrap().is_finite() && r.contains_key("mlm_acc")));

    // Pixel regression (Table 4 "- visual tokens"): no tokenizer needed, a pixel head is saved.
    let run = tmp.path().join("pixels");
    let mut args = short.to_vec();
    args.extend(["--set", "objective.target=pixel-regression"]);
    ok(&pretrain(&cfg, None, &run, &args), "pixel regression");
    let recs = step_records(&run);
    assert!(recs
        .iter()
        .all(|r| r["loss"].as_f64().unwrap().is_finite() && !r.contains_key("mlm_acc")));
    assert!(run.join("model/pixel_head.safetensors").is_file());
    Checkpoint::from_dir(run.join("model"))
        .unwrap()
        .mim(&Device::Cpu)
        .unwrap();
}

#[test]
fn bad_input_gives_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path());
    let tok = tokenizer(tmp.path());
    let err = |out: Output| {
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let out_dir = tmp.path().join("x");
    let e = err(pretrain(
        &cfg,
        Some(&tok),
        &out_dir,
        &["--set", "train.lrr=1"],
    ));
    assert!(e.contains("lrr"), "{e}");
    let e = err(pretrain(&cfg, None, &out_dir, &[]));
    assert!(e.contains("--tokenizer"), "{e}");
    let e = err(pretrain(
        &cfg,
        Some(&tok),
        &out_dir,
        &["--set", "architecture.vocab_size=32"],
    ));
    assert!(
        e.contains("vocab_size = 32") && e.contains("16 codes"),
        "{e}"
    );
    let e = err(pretrain(
        &cfg,
        Some(&tok),
        &out_dir,
        &[
            "--set",
            "architecture.image_size=32",
            "--set",
            "aug.second_size=16",
        ],
    ));
    assert!(e.contains("second_size = 16"), "{e}");
    let e = err(pretrain(
        &cfg,
        Some(&tmp.path().join("missing")),
        &out_dir,
        &[],
    ));
    assert!(e.contains("no encoder found"), "{e}");
    let e = err(pretrain(
        &cfg,
        Some(&tok),
        &out_dir,
        &["--set", "train.accum_steps=3"],
    ));
    assert!(e.contains("multiple of train.accum_steps"), "{e}");
}
