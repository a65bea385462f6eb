//! `beit-cli predict` and `attention` end to end against transformers' own pipeline
//! (`BeitImageProcessorPil` + `BeitForImageClassification`) on real photos: JPEG, PNG, grey, RGBA.

mod common;

use common::cli;
use std::path::PathBuf;

fn fixture(rel: &str) -> PathBuf {
    common::fixtures("model").join(rel)
}

#[test]
fn predict_matches_transformers_pipeline_on_real_photos() {
    let dir = fixture("predict");
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let images: Vec<PathBuf> = expected
        .as_array()
        .unwrap()
        .iter()
        .map(|e| dir.join(e["image"].as_str().unwrap()))
        .collect();
    let out = cli()
        .args(["predict", "--model"])
        .arg(&dir)
        .args(["--json", "--top-k", "5"])
        .args(&images)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("stdout is exactly one JSON value");
    let got = got.as_array().unwrap();
    assert_eq!(got.len(), images.len());
    // PNG decoding is lossless, and JPEG is decoded by libjpeg-turbo's decoder (MozJPEG 4)
    // with Pillow's settings (the same pixels): probabilities agree to float precision on both.
    let (mut worst_png, mut worst_jpeg) = (0f64, 0f64);
    for (g, e) in got.iter().zip(expected.as_array().unwrap()) {
        let is_png = e["image"].as_str().unwrap().ends_with(".png");
        let worst = if is_png {
            &mut worst_png
        } else {
            &mut worst_jpeg
        };
        assert!(g["image"]
            .as_str()
            .unwrap()
            .ends_with(e["image"].as_str().unwrap()));
        let preds = g["predictions"].as_array().unwrap();
        assert_eq!(preds.len(), 5);
        let probs = e["probabilities"].as_array().unwrap();
        assert_eq!(
            preds[0]["index"], e["top"][0],
            "{}: top-1 class",
            e["image"]
        );
        assert_eq!(preds[0]["label"], e["labels"][0]);
        for p in preds {
            let i = p["index"].as_u64().unwrap() as usize;
            let diff = (p["probability"].as_f64().unwrap() - probs[i].as_f64().unwrap()).abs();
            *worst = worst.max(diff);
        }
    }
    println!(
        "predict: max |probability - transformers|: PNG {worst_png:.2e}, JPEG {worst_jpeg:.2e}"
    );
    assert!(
        worst_png < 1e-6,
        "PNG: max probability difference {worst_png}"
    );
    assert!(
        worst_jpeg < 1e-6,
        "JPEG: max probability difference {worst_jpeg}"
    );
}

#[test]
fn predict_errors_are_one_clear_line() {
    let dir = fixture("predict");
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("broken.jpg");
    std::fs::write(&bad, b"\xff\xd8\xff\xe0 not really a jpeg").unwrap();
    let out = cli()
        .args(["predict", "--model"])
        .arg(&dir)
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("broken.jpg") && err.trim().lines().count() == 1,
        "{err}"
    );

    let out = cli()
        .env("HF_HUB_CACHE", tmp.path())
        .args(["predict", "--model", "microsoft/beit-base-patch16-224"])
        .arg(dir.join("rocket.jpg"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("microsoft/beit-base-patch16-224") && err.contains("fetch-weights"),
        "{err}"
    );

    // A pre-training (MIM) checkpoint is not a classifier: said so, naming the model.
    let out = cli()
        .args(["predict", "--model"])
        .arg(fixture("mim_shared"))
        .arg(dir.join("rocket.jpg"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not an image classifier"), "{err}");
}

#[test]
fn attention_writes_a_heat_map_sheet() {
    let tmp = tempfile::tempdir().unwrap();
    let png = tmp.path().join("attn.png");
    let out = cli()
        .args(["attention", "--model"])
        .arg(fixture("mim_shared"))
        .arg("--image")
        .arg(fixture("predict/rocket.jpg"))
        .arg("--out")
        .arg(&png)
        .args(["--query", "1,2", "--layer", "0"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let img = image::open(&png).unwrap().to_rgb8();
    // 1 input + mean + 4 heads = 6 panels of 32 px in one row, 4 px gaps.
    assert_eq!(img.dimensions(), (6 * 36 + 4, 36 + 4));
}
