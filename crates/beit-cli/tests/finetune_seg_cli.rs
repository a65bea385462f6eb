//! `beit-cli finetune-seg` end to end at tiny sizes on the Fashion-MNIST segmentation set: from
//! scratch the loss falls and `metrics.jsonl` carries mIoU evaluations; from a `transformers`-made
//! MIM checkpoint (shared relative bias) a run interrupted mid-epoch resumes bit for bit; the
//! export carries trained BatchNorm statistics; config typos are named.

mod common;

use common::{cli, records, run_ok};
use std::path::{Path, PathBuf};

fn fixture(rel: &str) -> PathBuf {
    common::fixtures("model").join(rel)
}

/// From the tiny MIM fixture (32 px, patch 8, 2 blocks, shared relative table), with gradient
/// accumulation and step checkpoints.
const FROM_MIM: &str = r#"
device = "cpu"
[data]
source = "fashion-mnist"
iters_per_epoch = 3
fashion_train_images = 12
fashion_val_images = 3
[segmentation]
out_indices = [1, 2, 2, 2]
auxiliary_channels = 8
[train]
epochs = 2
batch_size = 4
accum_steps = 2
lr = 2e-3
schedule = "poly"
warmup_epochs = 1
warmup_steps = 2
layer_decay = 0.9
checkpoint_every = 2
keep_last = 10
seed = 7
log_every = 1
[aug]
crop_size = 32
scale = [128, 32]
eval_stride = 24
"#;

#[test]
fn from_scratch_the_loss_falls_and_miou_is_logged() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("seg.toml");
    std::fs::write(&config, common::TINY_SEGMENTATION).unwrap();
    let out_dir = tmp.path().join("run");
    let out = run_ok(
        cli()
            .args(["finetune-seg", "--quiet", "--config"])
            .arg(&config)
            .arg("--output")
            .arg(&out_dir),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("segmentation fine-tuning done"), "{stdout}");
    let steps = records(&out_dir, "step");
    assert_eq!(steps.len(), 20);
    let loss = |r: &serde_json::Value| r["loss"].as_f64().unwrap();
    let first = loss(&steps[0]);
    let last: f64 = steps[15..].iter().map(loss).sum::<f64>() / 5.0;
    assert!(
        last < 0.8 * first,
        "loss {first} -> {last} (mean of the last 5 steps)"
    );
    // The poly schedule with warm-up: the lr rises, then falls linearly to 0.
    let lr: Vec<f64> = steps.iter().map(|r| r["lr"].as_f64().unwrap()).collect();
    assert!(lr[0] < 1e-7 && lr[2] > lr[10] && lr[10] > lr[19]);
    let evals = records(&out_dir, "eval");
    assert_eq!(evals.len(), 2, "one evaluation per epoch");
    for e in &evals {
        let miou = e["mIoU"].as_f64().unwrap();
        assert!((0.0..=100.0).contains(&miou), "{e}");
        assert!(e["aAcc"].as_f64().unwrap() > 0.0);
    }
    // The exports: HF layout, trained BatchNorm statistics, the processor.
    for dir in ["best_model", "final_model"] {
        let dir = out_dir.join(dir);
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap())
                .unwrap();
        assert_eq!(config["architectures"][0], "BeitForSemanticSegmentation");
        assert_eq!(config["out_indices"], serde_json::json!([1, 2, 2, 2]));
        assert_eq!(config["id2label"]["0"], "background");
        assert!(dir.join("preprocessor_config.json").is_file());
    }
    let tensors = candle::safetensors::load(
        out_dir.join("final_model/model.safetensors"),
        &candle::Device::Cpu,
    )
    .unwrap();
    let tracked = tensors["decode_head.bottleneck.bn.num_batches_tracked"]
        .to_scalar::<i64>()
        .unwrap();
    assert_eq!(tracked, 20, "one BatchNorm update per training micro-batch");
    let mean = tensors["decode_head.bottleneck.bn.running_mean"]
        .abs()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(mean > 0.0, "running mean still at its init");
}

#[test]
fn from_mim_resumes_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("seg.toml");
    std::fs::write(&config, FROM_MIM).unwrap();
    let run = |dir: &Path, extra: &[&str]| {
        let mut c = cli();
        c.args(["finetune-seg", "--config"])
            .arg(&config)
            .arg("--model")
            .arg(fixture("mim_shared"))
            .arg("--output")
            .arg(dir)
            .args(extra);
        run_ok(&mut c)
    };
    let full = tmp.path().join("full");
    let out = run(&full, &[]);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        log.contains("copied the shared relative position table into every layer"),
        "{log}"
    );
    assert_eq!(records(&full, "step").len(), 6);

    // Interrupted after step 4 (mid-epoch 1), then resumed in the same directory.
    let resumed = tmp.path().join("resumed");
    let out = run(&resumed, &["--stop-after", "4"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("stopped"));
    assert_eq!(records(&resumed, "step").len(), 4);
    run(&resumed, &["--resume"]);
    let strip = |mut r: serde_json::Value| {
        r.as_object_mut().unwrap().remove("images_per_sec");
        r
    };
    let a: Vec<_> = records(&full, "step").into_iter().map(strip).collect();
    let b: Vec<_> = records(&resumed, "step").into_iter().map(strip).collect();
    assert_eq!(
        a, b,
        "resumed step records differ from the uninterrupted run"
    );
    assert_eq!(records(&full, "eval"), records(&resumed, "eval"));
    let weights = |dir: &Path| std::fs::read(dir.join("final_model/model.safetensors")).unwrap();
    assert!(
        weights(&full) == weights(&resumed),
        "the final models differ (weights or BatchNorm statistics)"
    );
}

#[test]
fn config_typos_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("typo.toml");
    std::fs::write(&bad, "[aug]\ncrop_sise = 64\n").unwrap();
    let out = cli()
        .args(["finetune-seg", "--data", "fashion-mnist", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("crop_sise") && err.contains("typo.toml"),
        "{err}"
    );
    let out = cli()
        .args([
            "finetune-seg",
            "--print-config",
            "--set",
            "train.schedule=cosin",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("cosin") && err.contains("--set"),
        "{err}"
    );
    // The defaults are unilm's ADE20K recipe.
    let out = run_ok(cli().args(["finetune-seg", "--print-config"]));
    let text = String::from_utf8_lossy(&out.stdout);
    for line in [
        "lr = 0.00003",
        "schedule = \"poly\"",
        "warmup_steps = 1500",
        "layer_decay = 0.9",
        "batch_size = 16",
        "crop_size = 640",
        "iters_per_epoch = 16000",
        "cat_max_ratio = 0.75",
    ] {
        assert!(text.contains(line), "missing `{line}` in\n{text}");
    }
}
