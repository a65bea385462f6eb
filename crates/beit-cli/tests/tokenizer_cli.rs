//! `beit-cli tokenizer encode | reconstruct | train`, end to end on the committed fixtures.

use std::path::{Path, PathBuf};
use std::process::Command;

use candle::{DType, Device};

fn fixture(name: &str) -> PathBuf {
    Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../fixtures/tokenizer"
    ))
    .join(name)
}

fn cli(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_beit-cli"))
        .args(args)
        .env("BEIT_LOG", "warn")
        .output()
        .expect("run beit-cli")
}

fn ok(args: &[&str]) -> String {
    let out = cli(args);
    assert!(
        out.status.success(),
        "beit-cli {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn encode_prints_the_dall_e_ids_as_json_from_safetensors_and_pkl() {
    let expected =
        candle::safetensors::load(fixture("expected.safetensors"), &Device::Cpu).unwrap();
    let images = [
        fixture("images/chelsea_112.png"),
        fixture("images/astronaut_112.png"),
    ];
    for weights in ["dalle_small_encoder.safetensors", "dalle_small_encoder.pkl"] {
        let w = fixture(weights);
        let stdout = ok(&[
            "tokenizer",
            "encode",
            "--weights",
            w.to_str().unwrap(),
            "--json",
            images[0].to_str().unwrap(),
            images[1].to_str().unwrap(),
        ]);
        let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
        let arr = v.as_array().unwrap();
        assert_eq!(arr.len(), 2);
        for (item, name) in arr.iter().zip(["chelsea_112", "astronaut_112"]) {
            assert!(item["image"]
                .as_str()
                .unwrap()
                .ends_with(&format!("{name}.png")));
            let tokens: Vec<Vec<u32>> = serde_json::from_value(item["tokens"].clone()).unwrap();
            let want: Vec<Vec<u32>> = expected[&format!("{name}.ids")]
                .to_dtype(DType::U32)
                .unwrap()
                .to_vec2()
                .unwrap();
            assert_eq!(tokens, want, "{weights}: {name}");
        }
    }
    // Plain output: a header line and 14 rows of 14 ids per image.
    let w = fixture("dalle_small_encoder.safetensors");
    let text = ok(&[
        "tokenizer",
        "encode",
        "--weights",
        w.to_str().unwrap(),
        images[0].to_str().unwrap(),
    ]);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 15);
    assert!(lines[0].contains("14x14 tokens"));
    assert_eq!(lines[1].split_whitespace().count(), 14);
}

#[test]
fn reconstruct_writes_a_side_by_side_png() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("recon.png");
    ok(&[
        "tokenizer",
        "reconstruct",
        "--weights",
        fixture("dalle_small_encoder.safetensors").to_str().unwrap(),
        "--decoder",
        fixture("dalle_small_decoder.safetensors").to_str().unwrap(),
        // A 64 px image: resized to the tokenizer's 112 px with Lanczos first.
        fixture("images/coffee_64.png").to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    let img = image::open(&out).unwrap();
    assert_eq!((img.width(), img.height()), (2 * 112 + 2, 112));
}

#[test]
fn bad_inputs_fail_with_a_clear_message() {
    let out = cli(&[
        "tokenizer",
        "encode",
        "--weights",
        "/nonexistent/w.safetensors",
        "x.png",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/w.safetensors"), "{err}");
    let dec = fixture("dalle_small_decoder.safetensors");
    let out = cli(&[
        "tokenizer",
        "encode",
        "--weights",
        dec.to_str().unwrap(),
        "x.png",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("dalle_small_decoder.safetensors"), "{err}");
}

#[test]
fn train_then_encode_with_the_trained_tokenizer_and_resume() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("tiny.toml");
    std::fs::write(
        &config,
        "[architecture]\nimage_size = 28\nchannels = 3\nvocab_size = 32\ndownsample = 4\n\
         n_hid = 8\nn_init = 8\nn_blk_per_group = 1\n\n[data]\nmax_train_samples = 80\n\n\
         [train]\nepochs = 1\nbatch_size = 8\nwarmup_steps = 2\nlog_every = 1\ncheckpoint_every = 2\n",
    )
    .unwrap();
    let out = dir.path().join("run");
    let args = [
        "tokenizer",
        "train",
        "--config",
        config.to_str().unwrap(),
        "--data",
        "fashion-mnist",
        "--output",
        out.to_str().unwrap(),
        "--quiet",
        "--steps",
    ];
    let mut first = args.to_vec();
    first.push("3");
    let stdout = ok(&first);
    assert!(stdout.contains("held-out MSE"), "{stdout}");
    for f in [
        "encoder.safetensors",
        "decoder.safetensors",
        "checkpoint-00000003",
        "eval.json",
        "metrics.jsonl",
        "reconstructions.png",
        "config.toml",
    ] {
        assert!(out.join(f).exists(), "{f} missing");
    }
    let eval: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("eval.json")).unwrap()).unwrap();
    assert_eq!(eval["steps"], 3);
    assert!(eval["heldout_mse"].as_f64().unwrap().is_finite());
    assert_eq!(
        std::fs::read_to_string(out.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .count(),
        3
    );

    // The exported encoder is a tokenizer like DALL-E's: 28 px in, 7x7 ids out.
    let png = dir.path().join("item.png");
    image::RgbImage::from_fn(28, 28, |x, y| image::Rgb([(x * 9) as u8, (y * 9) as u8, 0]))
        .save(&png)
        .unwrap();
    let enc = out.join("encoder.safetensors");
    let v: serde_json::Value = serde_json::from_str(
        ok(&[
            "tokenizer",
            "encode",
            "--weights",
            enc.to_str().unwrap(),
            "--json",
            png.to_str().unwrap(),
        ])
        .trim(),
    )
    .unwrap();
    let tokens: Vec<Vec<u32>> = serde_json::from_value(v[0]["tokens"].clone()).unwrap();
    assert_eq!((tokens.len(), tokens[0].len()), (7, 7));
    assert!(tokens.iter().flatten().all(|&t| t < 32));

    // Resume to 5 steps: continues from the checkpoint at step 3.
    let mut more = args.to_vec();
    more.extend(["5", "--resume"]);
    ok(&more);
    let eval: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("eval.json")).unwrap()).unwrap();
    assert_eq!(eval["steps"], 5);
    assert_eq!(
        std::fs::read_to_string(out.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .count(),
        5
    );
}
