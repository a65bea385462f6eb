//! `beit-cli segment` and `eval-seg` end to end against transformers' own pipeline
//! (`BeitImageProcessor` + `BeitForSemanticSegmentation` + `post_process_semantic_segmentation`)
//! on real photos (PNG, JPEG, grey, RGBA), with a random tiny model saved by transformers
//! (`scripts/fixtures/seg_fixtures.py`).

mod common;

use common::cli;
use std::path::{Path, PathBuf};

fn fixture(rel: &str) -> PathBuf {
    common::fixtures("seg").join(rel)
}

#[test]
fn segment_matches_transformers_pipeline_on_real_photos() {
    let dir = fixture("segment");
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let expected = expected.as_array().unwrap();
    let images: Vec<PathBuf> = expected
        .iter()
        .map(|e| dir.join(e["image"].as_str().unwrap()))
        .collect();
    let out_dir = tempfile::tempdir().unwrap();
    let out = cli()
        .args(["segment", "--model"])
        .arg(&dir)
        .arg("--json")
        .arg("--out")
        .arg(out_dir.path())
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
    for (g, e) in got.iter().zip(expected) {
        let name = e["image"].as_str().unwrap();
        assert!(g["image"].as_str().unwrap().ends_with(name));
        assert_eq!(g["height"], e["height"], "{name}");
        assert_eq!(g["width"], e["width"], "{name}");
        let (gl, el) = (
            g["labels"].as_array().unwrap(),
            e["labels"].as_array().unwrap(),
        );
        assert_eq!(gl.len(), el.len(), "{name}: rows");
        let (mut same, mut total) = (0usize, 0usize);
        for (gr, er) in gl.iter().zip(el) {
            let (gr, er) = (gr.as_array().unwrap(), er.as_array().unwrap());
            assert_eq!(gr.len(), er.len(), "{name}: columns");
            same += gr.iter().zip(er).filter(|(a, b)| a == b).count();
            total += gr.len();
        }
        let agree = same as f64 / total as f64;
        println!(
            "segment {name}: {:.3}% of pixels equal transformers'",
            100.0 * agree
        );
        // JPEGs (4:4:4 and 4:2:0) are decoded by libjpeg-turbo's decoder (MozJPEG 4) as Pillow
        // decodes them, so every image gets the same pixels as in Python: >= 99.5% of the labels
        // agree; the rest are near-ties of this random model's logits.
        assert!(
            agree >= 0.995,
            "{name}: only {:.3}% of pixels agree",
            100.0 * agree
        );
        // The classes present are listed with their pixel counts.
        let areas: u64 = g["classes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["pixels"].as_u64().unwrap())
            .sum();
        assert_eq!(areas as usize, total);
        // Files: a palette PNG of class indices with the same content, and an overlay.
        let stem = Path::new(name).file_stem().unwrap().to_str().unwrap();
        let map = beit_data::segmentation::read_label_png(
            &out_dir.path().join(format!("{stem}.labels.png")),
        )
        .unwrap();
        let flat: Vec<u64> = gl
            .iter()
            .flat_map(|r| r.as_array().unwrap().iter().map(|v| v.as_u64().unwrap()))
            .collect();
        assert_eq!(
            map.labels.iter().map(|&v| v as u64).collect::<Vec<_>>(),
            flat
        );
        let overlay = image::open(out_dir.path().join(format!("{stem}.overlay.png"))).unwrap();
        assert!(overlay.height() as u64 >= e["height"].as_u64().unwrap());
        assert!(
            overlay.width() as u64 > e["width"].as_u64().unwrap(),
            "legend column"
        );
    }
}

#[test]
fn sliding_window_runs_and_reports_bad_specs() {
    let dir = fixture("segment");
    let out = cli()
        .args(["segment", "--model"])
        .arg(&dir)
        .args(["--json", "--sliding-window", "64,32"])
        .arg(dir.join("chelsea.png"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(got[0]["labels"].as_array().unwrap().len(), 100);
    let out = cli()
        .args(["segment", "--model"])
        .arg(&dir)
        .args(["--sliding-window", "60,32"])
        .arg(dir.join("chelsea.png"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("patch size"), "{err}");
}

#[test]
fn segment_refuses_a_classifier_with_a_clear_error() {
    let cls = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/model/cls_per_layer");
    let out = cli()
        .args(["segment", "--model"])
        .arg(&cls)
        .arg(fixture("segment/chelsea.png"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("not a semantic segmentation checkpoint"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn eval_seg_matches_mmseg_metric_of_transformers_predictions() {
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("eval/expected.json")).unwrap())
            .unwrap();
    let out = cli()
        .args(["eval-seg", "--json", "--model"])
        .arg(fixture("segment"))
        .arg("--data")
        .arg(fixture("eval"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(got["images"], 3);
    assert_eq!(got["reduce_zero_label"], true, "from do_reduce_labels");
    // Predictions agree with transformers' on >= 99.5% of pixels, so the scores agree closely.
    for k in ["aAcc", "mIoU", "mAcc"] {
        let (g, e) = (got[k].as_f64().unwrap(), expected[k].as_f64().unwrap());
        println!("eval-seg {k}: {g:.4} vs transformers + mmseg metric {e:.4}");
        assert!((g - e).abs() < 0.5, "{k}: {g} vs {e}");
    }
    for (c, e) in got["per_class"]
        .as_array()
        .unwrap()
        .iter()
        .zip(expected["iou"].as_array().unwrap())
    {
        match (c["iou"].as_f64(), e.as_f64()) {
            (Some(a), Some(b)) => assert!((a - b).abs() < 1.0, "class {}: {a} vs {b}", c["index"]),
            (None, None) => {}
            other => panic!("class {}: {other:?}", c["index"]),
        }
    }
}
