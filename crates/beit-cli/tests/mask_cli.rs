//! End-to-end tests of `beit-cli mask`.

use std::process::{Command, Output};

use beit_mim::MaskingConfig;
use serde_json::Value;

fn beit_cli(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_beit-cli"))
        .arg("mask")
        .args(args)
        .env("BEIT_LOG", "info")
        .output()
        .expect("run beit-cli")
}

fn json_masks(args: &[&str]) -> (Value, Vec<Vec<u8>>) {
    let out = beit_cli(args);
    assert!(
        out.status.success(),
        "beit-cli mask {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The whole of stdout must be one JSON object.
    let doc: Value = serde_json::from_slice(&out.stdout).expect("stdout is exactly one JSON value");
    assert!(doc.is_object());
    let masks = doc["masks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            m.as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u8)
                .collect()
        })
        .collect();
    (doc, masks)
}

#[test]
fn json_blockwise_masks_match_the_library() {
    let args = [
        "--input-size",
        "14",
        "--num-masking-patches",
        "75",
        "--min-num-patches",
        "16",
        "--samples",
        "5",
        "--seed",
        "17",
        "--json",
    ];
    let (doc, masks) = json_masks(&args);
    assert_eq!(doc["input_size"], serde_json::json!([14, 14]));
    assert_eq!(masks.len(), 5);
    let expected = MaskingConfig::default()
        .build()
        .unwrap()
        .sample_batch(17, 0, 5);
    for (got, want) in masks.iter().zip(&expected.masks) {
        assert_eq!(got.len(), 196);
        assert!(got.iter().all(|&v| v <= 1));
        let count = got.iter().filter(|&&v| v == 1).count();
        assert!((16..=75).contains(&count), "{count}");
        let want: Vec<u8> = want.iter().map(|&b| u8::from(b)).collect();
        assert_eq!(got, &want);
    }
    // Same seed, same masks; another seed, other masks.
    assert_eq!(json_masks(&args).1, masks);
    let mut other = args;
    other[9] = "18";
    assert_ne!(json_masks(&other).1, masks);
}

#[test]
fn json_random_masks_have_the_exact_count_on_any_grid() {
    let (doc, masks) = json_masks(&[
        "--input-size",
        "7x5",
        "--num-masking-patches",
        "14",
        "--random",
        "--samples",
        "4",
        "--json",
    ]);
    assert_eq!(doc["input_size"], serde_json::json!([7, 5]));
    for m in masks {
        assert_eq!(m.len(), 35);
        assert_eq!(m.iter().filter(|&&v| v == 1).count(), 14);
    }
}

#[test]
fn png_grid_has_the_expected_layout() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("masks.png");
    let out = beit_cli(&[
        "--input-size",
        "7",
        "--num-masking-patches",
        "20",
        "--min-num-patches",
        "4",
        "--samples",
        "4",
        "--cell-px",
        "10",
        "--png",
        path.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let img = image::open(&path).unwrap().to_rgb8();
    // 2x2 tiles of 7*10+1 px with 5 px gaps: 2*71 + 3*5 = 157.
    assert_eq!(img.dimensions(), (157, 157));
    // Grey pixels exist (masked patches) and white ones too (visible patches).
    let grey = img.pixels().filter(|p| p.0 == [128, 128, 128]).count();
    let visible = img.pixels().filter(|p| p.0 == [250, 250, 250]).count();
    assert!(grey > 0 && visible > 0, "grey {grey}, visible {visible}");
    // Each masked patch has 9x9 grey pixels inside its grid lines.
    let expected = MaskingConfig {
        min_num_patches: 4,
        ..MaskingConfig::new([7, 7], 20)
    }
    .build()
    .unwrap()
    .sample_batch(0, 0, 4);
    let masked: usize = expected.counts().iter().sum();
    assert_eq!(grey, masked * 81);
}

#[test]
fn bad_settings_fail_with_a_clear_message() {
    let out = beit_cli(&["--num-masking-patches", "300", "--json"]);
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("num_masking_patches"), "{err}");

    let out = beit_cli(&["--input-size", "big"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("HxW"));
}
