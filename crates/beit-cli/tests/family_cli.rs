//! `beit-cli predict` and `attention` on every family of the architecture (timm BEiT v2/v1,
//! data2vec-vision, DiT), against each library's own image pipeline and model on real photos
//! (`scripts/fixtures/family_fixtures.py`): the PNG, the big camera JPEG, and JPEG variants of a photo at
//! 4:2:0, 4:2:2, 4:4:4, progressive, grey and CMYK. JPEGs are decoded by libjpeg-turbo's decoder
//! (MozJPEG 4) as Pillow does, so the probabilities agree to float precision on JPEG as on PNG.

mod common;

use common::cli;
use std::path::PathBuf;

fn root() -> PathBuf {
    common::fixtures("")
}

/// Run predict on the fixture's photos; return the worst probability difference.
fn predict_matches_library(name: &str) -> f64 {
    let dir = root().join("family").join(name);
    let text = std::fs::read_to_string(dir.join("expected_predict.json")).unwrap();
    let expected: serde_json::Value = serde_json::from_str(&text).unwrap();
    let expected = expected.as_array().unwrap();
    let images: Vec<PathBuf> = expected
        .iter()
        .map(|e| root().join("data").join(e["image"].as_str().unwrap()))
        .collect();
    let classes = expected[0]["probabilities"].as_array().unwrap().len();
    let out = cli()
        .args([
            "predict",
            "--json",
            "--top-k",
            &classes.to_string(),
            "--model",
        ])
        .arg(&dir)
        .args(&images)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut worst = 0f64;
    for (g, e) in got.as_array().unwrap().iter().zip(expected) {
        let image = e["image"].as_str().unwrap();
        let preds = g["predictions"].as_array().unwrap();
        let top5: Vec<u64> = preds
            .iter()
            .take(5)
            .map(|p| p["index"].as_u64().unwrap())
            .collect();
        let want: Vec<u64> = e["top5"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        assert_eq!(top5, want, "{name} {image}: top-5");
        let probs = e["probabilities"].as_array().unwrap();
        let mut img_worst = 0f64;
        for p in preds {
            let i = p["index"].as_u64().unwrap() as usize;
            let d = (p["probability"].as_f64().unwrap() - probs[i].as_f64().unwrap()).abs();
            img_worst = img_worst.max(d);
        }
        println!("{name} {image}: max |p - library| {img_worst:.1e}");
        worst = worst.max(img_worst);
    }
    assert!(worst <= 1e-5, "{name}: max probability difference {worst}");
    worst
}

#[test]
fn predict_timm_beit_v2_matches_timm() {
    predict_matches_library("timm_beitv2");
}

#[test]
fn predict_timm_beit_v1_matches_timm() {
    predict_matches_library("timm_beit");
}

#[test]
fn predict_data2vec_vision_matches_transformers() {
    predict_matches_library("d2v_cls");
}

#[test]
fn predict_dit_matches_transformers() {
    predict_matches_library("dit_cls");
}

#[test]
fn attention_runs_on_a_pretrained_backbone_and_a_timm_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    for name in ["d2v_pt", "timm_beitv2", "dit_mim"] {
        let png = tmp.path().join(format!("{name}.png"));
        let out = cli()
            .args(["attention", "--model"])
            .arg(root().join("family").join(name))
            .arg("--image")
            .arg(root().join("data/jpeg/chelsea_420.jpg"))
            .arg("--out")
            .arg(&png)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let img = image::open(&png).unwrap();
        assert!(img.width() > 32 && img.height() >= 32, "{name}");
    }
    // A backbone is not a classifier: predict says so.
    let out = cli()
        .args(["predict", "--model"])
        .arg(root().join("family/d2v_pt"))
        .arg(root().join("data/chelsea.png"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not an image classifier"), "{err}");
}

/// A short fine-tuning recipe at the fixtures' 32 px: two optimizer steps and one evaluation.
const FINETUNE_TINY: &str = r#"
device = "cpu"
[data]
source = "fashion-mnist"
max_train_samples = 32
max_val_samples = 16
num_workers = 1
[train]
epochs = 1
batch_size = 16
lr = 1e-3
warmup_steps = 1
layer_decay = 0.75
seed = 3
log_every = 1
[aug]
input_size = 32
"#;

/// `finetune --model` starts from every family's checkpoint (a classifier with another head, a
/// pre-trained backbone, DiT's absolute position embeddings, timm's key names and config), trains,
/// and exports a model that `eval` loads back with the accuracy measured during training.
#[test]
fn finetune_starts_from_every_family() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("ft.toml");
    std::fs::write(&config, FINETUNE_TINY).unwrap();
    for name in [
        "timm_beitv2",
        "timm_beit",
        "d2v_cls",
        "d2v_pt",
        "dit_cls",
        "dit_mim",
    ] {
        let out_dir = tmp.path().join(name);
        let out = cli()
            .args(["finetune", "--config"])
            .arg(&config)
            .arg("--model")
            .arg(root().join("family").join(name))
            .arg("--output")
            .arg(&out_dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let records: Vec<serde_json::Value> =
            std::fs::read_to_string(out_dir.join("metrics.jsonl"))
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect();
        let losses: Vec<f64> = records
            .iter()
            .filter(|r| r["kind"] == "step")
            .map(|r| r["loss"].as_f64().unwrap())
            .collect();
        assert_eq!(losses.len(), 2, "{name}: 32 images / batch 16");
        assert!(losses.iter().all(|l| l.is_finite()), "{name}: {losses:?}");
        let acc1 = records
            .iter()
            .rfind(|r| r["kind"] == "eval")
            .unwrap_or_else(|| panic!("{name}: no eval record"))["acc1"]
            .as_f64()
            .unwrap();

        let best = out_dir.join("best_model");
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(best.join("config.json")).unwrap())
                .unwrap();
        assert_eq!(cfg["id2label"]["9"], "Ankle boot", "{name}");
        let out = cli()
            .args([
                "eval",
                "--json",
                "--data",
                "fashion-mnist",
                "--max-samples",
                "16",
                "--model",
            ])
            .arg(&best)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert!(
            (report["acc1"].as_f64().unwrap() - acc1).abs() < 1e-9,
            "{name}: {report} vs training-time acc1 {acc1}"
        );
    }
}
