//! `beit-cli finetune`, `eval` and `linear-probe` end to end at tiny sizes: fine-tuning from a
//! `transformers`-made MIM checkpoint (shared relative bias) with the full recipe (RandAugment,
//! mixup/CutMix, random erasing, drop path, layer decay) resumes bit for bit from a mid-epoch
//! checkpoint; the exported best model loads back with identical logits and `eval` reproduces the
//! training-time accuracy; from scratch the loss falls; an ImageFolder with a corrupt file is
//! trained on with the file skipped and counted; config typos are named.

mod common;

use common::{cli, records, run_ok};
use std::path::{Path, PathBuf};

use beit_model::load::Checkpoint;
use beit_model::ForwardOptions;
use candle::{Device, Tensor};

fn fixture(rel: &str) -> PathBuf {
    common::fixtures("model").join(rel)
}

/// The full recipe, from the tiny MIM fixture (32 px, patch 8, 2 blocks, shared relative table).
const FROM_MIM: &str = r#"
device = "cpu"
[data]
source = "fashion-mnist"
max_train_samples = 64
max_val_samples = 48
num_workers = 2
[train]
epochs = 2
batch_size = 16
accum_steps = 2
lr = 4e-3
min_lr = 1e-6
warmup_steps = 2
warmup_epochs = 1
layer_decay = 0.65
drop_path_rate = 0.1
label_smoothing = 0.1
clip_grad = 5.0
checkpoint_every = 3
keep_last = 10
seed = 7
log_every = 1
[aug]
input_size = 32
auto_augment = "rand-m9-mstd0.5-inc1"
reprob = 0.25
mixup = 0.8
cutmix = 1.0
eval_resize = "squash"
eval_interpolation = "bilinear"
"#;

#[test]
fn finetune_from_mim_resumes_exactly_and_exports_a_loadable_model() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("ft.toml");
    std::fs::write(&config, FROM_MIM).unwrap();
    let full = tmp.path().join("full");
    let out = run_ok(
        cli()
            .args(["finetune", "--config"])
            .arg(&config)
            .arg("--model")
            .arg(fixture("mim_shared"))
            .arg("--output")
            .arg(&full),
    );
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        log.contains("copied the shared relative position table into every layer"),
        "{log}"
    );
    let steps = records(&full, "step");
    assert_eq!(
        steps.len(),
        8,
        "2 epochs x (64/8 micro-batches / 2 accumulated)"
    );
    assert_eq!(records(&full, "eval").len(), 2);

    // Interrupted after step 3 (mid-epoch 0), then resumed in the same directory.
    let resumed = tmp.path().join("resumed");
    let ft = |extra: &[&str]| {
        let mut c = cli();
        c.args(["finetune", "--config"])
            .arg(&config)
            .arg("--model")
            .arg(fixture("mim_shared"))
            .arg("--output")
            .arg(&resumed)
            .args(extra);
        c
    };
    let out = run_ok(&mut ft(&["--stop-after", "3"]));
    assert!(String::from_utf8_lossy(&out.stdout).contains("fine-tuning stopped"));
    assert_eq!(records(&resumed, "step").len(), 3);
    run_ok(&mut ft(&["--resume"]));
    let strip = |mut r: serde_json::Value| {
        r.as_object_mut().unwrap().remove("images_per_sec");
        r
    };
    let a: Vec<_> = steps.into_iter().map(strip).collect();
    let b: Vec<_> = records(&resumed, "step").into_iter().map(strip).collect();
    assert_eq!(
        a, b,
        "resumed step records differ from the uninterrupted run"
    );
    assert_eq!(records(&full, "eval"), records(&resumed, "eval"));
    assert_eq!(records(&full, "epoch"), records(&resumed, "epoch"));

    // The exported best model: HF layout with the dataset's labels and a processor config.
    let best = full.join("best_model");
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(best.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["architectures"][0], "BeitForImageClassification");
    assert_eq!(cfg["id2label"]["9"], "Ankle boot");
    assert_eq!(cfg["use_relative_position_bias"], true);
    assert_eq!(cfg["use_shared_relative_position_bias"], false);
    assert!(best.join("preprocessor_config.json").is_file());

    // Same logits as the training checkpoint of the best step.
    let best_rec: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(full.join("best.json")).unwrap()).unwrap();
    let step = best_rec["step"].as_u64().unwrap();
    let exported = Checkpoint::from_dir(&best).unwrap();
    let training = Checkpoint::from_files(
        exported.config.clone(),
        &full.join(format!("checkpoint-{step:08}/model.safetensors")),
    )
    .unwrap();
    let x = Tensor::randn(0f32, 1.0, (3, 3, 32, 32), &Device::Cpu).unwrap();
    let logits = |c: &Checkpoint| {
        c.classifier(&Device::Cpu)
            .unwrap()
            .forward(&x, ForwardOptions::default())
            .unwrap()
            .logits
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    assert_eq!(logits(&exported), logits(&training));

    // `eval` on the export reproduces the accuracy measured during training.
    let out = run_ok(
        cli()
            .args([
                "eval",
                "--json",
                "--data",
                "fashion-mnist",
                "--max-samples",
                "48",
                "--model",
            ])
            .arg(&best),
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["images"], 48);
    let acc1 = best_rec["acc1"].as_f64().unwrap();
    assert!(
        (report["acc1"].as_f64().unwrap() - acc1).abs() < 1e-9,
        "{report} vs {best_rec}"
    );
    assert_eq!(report["per_class"].as_array().unwrap().len(), 10);

    // Table output names top-1/top-5; `predict` loads the export too.
    let out = run_ok(
        cli()
            .args([
                "eval",
                "--data",
                "fashion-mnist",
                "--max-samples",
                "16",
                "--model",
            ])
            .arg(&best),
    );
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("top-1") && table.contains("top-5"),
        "{table}"
    );
    assert!(
        table.contains("most frequent confusions") || acc1 == 100.0,
        "{table}"
    );
    let png = tmp.path().join("item.png");
    let fm = beit_data::FashionMnist::embedded().unwrap();
    fm.test.rgb_image(0).save(&png).unwrap();
    let out = run_ok(
        cli()
            .args(["predict", "--json", "--top-k", "10", "--model"])
            .arg(&best)
            .arg(&png),
    );
    let preds: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let labels: Vec<&str> = preds[0]["predictions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["label"].as_str().unwrap())
        .collect();
    assert!(
        labels.contains(&"Sneaker") && labels.len() == 10,
        "{labels:?}"
    );
}

/// A 2-block width-16 model from scratch on 28 px Fashion-MNIST, no augmentation.
const SCRATCH: &str = r#"
[data]
source = "fashion-mnist"
max_train_samples = 96
max_val_samples = 32
[architecture]
hidden_size = 32
num_hidden_layers = 2
num_attention_heads = 2
intermediate_size = 64
patch_size = 7
[train]
epochs = 6
batch_size = 16
lr = 3e-3
warmup_epochs = 1
layer_decay = 1.0
drop_path_rate = 0.0
label_smoothing = 0.0
weight_decay = 0.0
keep_last = 1
[aug]
input_size = 28
crop_scale_min = 1.0
hflip = 0.0
auto_augment = "none"
color_jitter = 0.0
reprob = 0.0
mixup = 0.0
cutmix = 0.0
eval_resize = "squash"
"#;

#[test]
fn finetune_from_scratch_lowers_the_loss_and_linear_probe_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("scratch.toml");
    std::fs::write(&config, SCRATCH).unwrap();
    let run = tmp.path().join("run");
    let out = run_ok(
        cli()
            .args(["finetune", "--config"])
            .arg(&config)
            .arg("--output")
            .arg(&run),
    );
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("best val acc1"), "{table}");
    let epochs: Vec<f64> = records(&run, "epoch")
        .iter()
        .map(|r| r["loss"].as_f64().unwrap())
        .collect();
    assert_eq!(epochs.len(), 6);
    assert!(
        epochs[5] < epochs[0] - 0.2,
        "epoch losses do not fall: {epochs:?}"
    );
    assert!(run.join("curves.png").is_file());
    let resolved = std::fs::read_to_string(run.join("config.toml")).unwrap();
    assert!(resolved.contains("hidden_size = 32"), "{resolved}");

    // A fresh run refuses a directory that holds checkpoints.
    let out = cli()
        .args(["finetune", "--config"])
        .arg(&config)
        .arg("--output")
        .arg(&run)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already holds checkpoints"));

    let probe_cmd = |out: &std::path::Path| {
        let mut c = cli();
        c.args([
            "linear-probe",
            "--layer",
            "1",
            "--epochs",
            "3",
            "--batch-size",
            "32",
        ])
        .args([
            "--data",
            "fashion-mnist",
            "--set",
            "data.max_train_samples=96",
        ])
        .args(["--set", "data.max_val_samples=32", "--model"])
        .arg(run.join("best_model"))
        .arg("--output")
        .arg(out);
        c
    };
    let probe = tmp.path().join("probe");
    let out = run_ok(&mut probe_cmd(&probe));
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("final val top-1") && table.contains("block 1 of 2"),
        "{table}"
    );
    assert_eq!(records(&probe, "eval").len(), 3);
    assert!(probe.join("linear_head.safetensors").is_file());
    // `pretrained = false` probes the same architecture at random init: other features, another
    // validation loss.
    let random = tmp.path().join("probe-random");
    let out = run_ok(probe_cmd(&random).args(["--set", "pretrained=false"]));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("from random init"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let val_loss = |dir: &std::path::Path| records(dir, "eval")[0]["loss"].as_f64().unwrap();
    assert_ne!(val_loss(&probe), val_loss(&random));
    let out = cli()
        .args([
            "linear-probe",
            "--layer",
            "5",
            "--data",
            "fashion-mnist",
            "--model",
        ])
        .arg(run.join("best_model"))
        .arg("--output")
        .arg(tmp.path().join("probe5"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("has 2 blocks"));
}

#[test]
fn image_folder_with_a_corrupt_file_is_trained_on() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    common::image_folder(&data, &[("train", 8), ("val", 3)]);
    std::fs::write(data.join("train/red/broken.png"), b"not a png at all").unwrap();
    let config = tmp.path().join("folder.toml");
    std::fs::write(
        &config,
        SCRATCH
            .replace("source = \"fashion-mnist\"", "")
            .replace("input_size = 28", "input_size = 14")
            .replace("epochs = 6", "epochs = 2")
            .replace("batch_size = 16", "batch_size = 4"),
    )
    .unwrap();
    let run = tmp.path().join("run");
    let out = run_ok(
        cli()
            .args(["finetune", "--config"])
            .arg(&config)
            .arg("--data")
            .arg(&data)
            .arg("--output")
            .arg(&run),
    );
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table
            .lines()
            .any(|l| l.trim_start().starts_with("skipped files") && l.trim_end().ends_with(" 1")),
        "{table}"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("broken.png"));
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("best_model/config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["id2label"]["0"], "blue");
    // `eval` on a single ImageFolder: a held-out quarter (4 of 17 files, corrupt one included).
    let out = run_ok(
        cli()
            .args(["eval", "--json", "--val-fraction", "0.25", "--model"])
            .arg(run.join("best_model"))
            .arg("--data")
            .arg(data.join("train")),
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        report["images"].as_u64().unwrap() + report["skipped_files"].as_u64().unwrap(),
        4,
        "{report}"
    );
    assert_eq!(
        records(&run, "step").len(),
        8,
        "4 full batches per epoch despite the skip"
    );
}

#[test]
fn config_typos_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("typo.toml");
    std::fs::write(&bad, "[train]\nlayer_decy = 0.7\n").unwrap();
    let out = cli()
        .args(["finetune", "--data", "fashion-mnist", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("layer_decy") && err.contains("typo.toml"),
        "{err}"
    );

    let out = cli()
        .args(["finetune", "--set", "aug.mixpu=0", "--print-config"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("mixpu") && err.contains("--set"),
        "{err}"
    );

    // Every shipped recipe parses, and the defaults are the paper's base recipe.
    let configs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs");
    for entry in std::fs::read_dir(&configs).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        let cmd = if name.starts_with("finetune_seg_") {
            "finetune-seg"
        } else if name.starts_with("finetune_") {
            "finetune"
        } else if name.starts_with("linear_probe_") {
            "linear-probe"
        } else {
            continue; // other commands' recipes
        };
        let out = cli()
            .args([cmd, "--print-config", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = run_ok(cli().args(["finetune", "--print-config", "--set", "train.epochs=3"]));
    let text = String::from_utf8_lossy(&out.stdout);
    for line in [
        "epochs = 3",
        "layer_decay = 0.65",
        "lr = 0.004",
        "mixup = 0.8",
        "reprob = 0.25",
    ] {
        assert!(text.contains(line), "missing `{line}` in\n{text}");
    }
}
