//! End-to-end tests of `xtask convert` on the committed fixtures: a unilm-style `.pth` of a timm BEiT
//! (with its PyTorch logits), a HF-named MIM checkpoint, and a DALL-E-style pickled encoder.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::Result;
use beit_model::load::Checkpoint;
use beit_model::{BeitConfig, ForwardOptions};
use candle::{Device, Tensor};

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fixtures")
        .join(rel)
}

fn convert(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_xtask"))
        .arg("convert")
        .args(args)
        .output()
        .expect("run xtask")
}

fn ok(out: &Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "xtask failed:\n{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn max_err(a: &Tensor, b: &Tensor) -> Result<f32> {
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

/// The timm model's logits (computed by PyTorch, `scripts/fixtures/model_fixtures.py`) from the converted
/// directory.
fn logits_match(dir: &Path) -> Result<()> {
    let exp = candle::safetensors::load(
        fixture("model/timm_unilm/expected.safetensors"),
        &Device::Cpu,
    )?;
    let model = Checkpoint::from_dir(dir)?.classifier(&Device::Cpu)?;
    let logits = model
        .forward(&exp["pixel_values"], ForwardOptions::default())?
        .logits;
    let e = max_err(&logits, &exp["logits"])?;
    assert!(e <= 1e-4, "logits max abs err {e}");
    Ok(())
}

#[test]
fn unilm_pth_with_inferred_config_reproduces_pytorch_logits() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let out_dir = tmp.path().join("converted");
    let pth = fixture("model/timm_unilm/checkpoint.pth");
    let stdout = ok(&convert(&[
        pth.to_str().unwrap(),
        "-o",
        out_dir.to_str().unwrap(),
    ]));
    assert!(
        stdout.contains("BeitForImageClassification") && stdout.contains("inferred"),
        "{stdout}"
    );
    // The inferred config describes the timm model (same fields as the fixture's hand-written one).
    let inferred = BeitConfig::from_file(out_dir.join("config.json"))?;
    let truth = BeitConfig::from_file(fixture("model/timm_unilm/config.json"))?;
    assert_eq!(
        (
            inferred.hidden_size,
            inferred.num_hidden_layers,
            inferred.num_attention_heads
        ),
        (
            truth.hidden_size,
            truth.num_hidden_layers,
            truth.num_attention_heads
        )
    );
    assert_eq!(
        (
            inferred.intermediate_size,
            inferred.image_size,
            inferred.patch_size
        ),
        (truth.intermediate_size, truth.image_size, truth.patch_size)
    );
    assert_eq!(inferred.num_labels(), 5);
    assert_eq!(inferred.layer_norm_eps, 1e-6);
    assert!(inferred.use_relative_position_bias && !inferred.use_shared_relative_position_bias);
    assert!(inferred.use_mean_pooling && !inferred.use_mask_token);
    // Only HF names, no index buffers.
    let written = candle::safetensors::load(out_dir.join("model.safetensors"), &Device::Cpu)?;
    assert!(written
        .keys()
        .all(|k| k.starts_with("beit.") || k.starts_with("classifier.")));
    assert!(!written
        .keys()
        .any(|k| k.contains("relative_position_index")));
    logits_match(&out_dir)
}

#[test]
fn explicit_config_and_labels() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let pth = fixture("model/timm_unilm/checkpoint.pth");
    let out_dir = tmp.path().join("with-config");
    ok(&convert(&[
        pth.to_str().unwrap(),
        "-o",
        out_dir.to_str().unwrap(),
        "--config",
        fixture("model/timm_unilm/config.json").to_str().unwrap(),
    ]));
    assert_eq!(
        BeitConfig::from_file(out_dir.join("config.json"))?.label(4),
        "class_4"
    );
    logits_match(&out_dir)?;

    let labels = tmp.path().join("labels.txt");
    std::fs::write(&labels, "cat\ndog\nbird\nfish\nfrog\n")?;
    let out_dir = tmp.path().join("with-labels");
    ok(&convert(&[
        pth.to_str().unwrap(),
        "-o",
        out_dir.to_str().unwrap(),
        "--labels",
        labels.to_str().unwrap(),
    ]));
    assert_eq!(
        BeitConfig::from_file(out_dir.join("config.json"))?.label(2),
        "bird"
    );
    // A label file of the wrong length is refused, naming both counts.
    std::fs::write(&labels, "cat\ndog\n")?;
    let out = convert(&[
        pth.to_str().unwrap(),
        "-o",
        tmp.path().join("bad").to_str().unwrap(),
        "--labels",
        labels.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr.contains("2 names but the classifier has 5 classes"),
        "{stderr}"
    );
    assert!(!tmp.path().join("bad").exists());
    Ok(())
}

#[test]
fn mim_checkpoint_keeps_shared_table_mask_token_and_vocab() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let out_dir = tmp.path().join("mim");
    let src = fixture("model/mim_shared/model.safetensors");
    let stdout = ok(&convert(&[
        src.to_str().unwrap(),
        "-o",
        out_dir.to_str().unwrap(),
    ]));
    assert!(stdout.contains("BeitForMaskedImageModeling"), "{stdout}");
    let cfg = BeitConfig::from_file(out_dir.join("config.json"))?;
    let truth = BeitConfig::from_file(fixture("model/mim_shared/config.json"))?;
    assert!(cfg.use_shared_relative_position_bias && !cfg.use_relative_position_bias);
    assert!(cfg.use_mask_token && cfg.use_mean_pooling);
    assert_eq!(cfg.vocab_size, truth.vocab_size);
    assert_eq!(cfg.num_attention_heads, truth.num_attention_heads);
    // Loads strictly as a MIM model, with the very same tensors.
    Checkpoint::from_dir(&out_dir)?.mim(&Device::Cpu)?;
    let a = candle::safetensors::load(&src, &Device::Cpu)?;
    let b = candle::safetensors::load(out_dir.join("model.safetensors"), &Device::Cpu)?;
    for (k, t) in &b {
        assert_eq!(max_err(t, &a[k])?, 0.0, "{k}");
    }
    Ok(())
}

#[test]
fn dalle_pickle_to_safetensors() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let pkl = fixture("tokenizer/dalle_small_encoder.pkl");
    let stdout = ok(&convert(&[
        pkl.to_str().unwrap(),
        "-o",
        tmp.path().to_str().unwrap(),
    ]));
    assert!(
        stdout.contains("DALL-E encoder, vocabulary 512"),
        "{stdout}"
    );
    let out = tmp.path().join("dalle_small_encoder.safetensors");
    let got = candle::safetensors::load(&out, &Device::Cpu)?;
    // The reference: the same state dict saved from PyTorch (scripts/fixtures/tokenizer_fixtures.py).
    let want: HashMap<String, Tensor> = candle::safetensors::load(
        fixture("tokenizer/dalle_small_encoder.safetensors"),
        &Device::Cpu,
    )?;
    assert_eq!(
        {
            let mut k: Vec<_> = got.keys().collect();
            k.sort();
            k
        },
        {
            let mut k: Vec<_> = want.keys().collect();
            k.sort();
            k
        }
    );
    for (k, t) in &want {
        assert_eq!(max_err(&got[k], t)?, 0.0, "{k}");
    }
    Ok(())
}

/// The unilm/mmseg copy of the tiny UperNet fixture (`scripts/fixtures/seg_fixtures.py`: `backbone.`
/// prefix, fused qkv, `conv_seg`, `{"state_dict": ...}`) converts to exactly the tensors
/// `transformers` saved for the same model.
#[test]
fn mmseg_segmentation_checkpoint_converts_to_the_hub_layout() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let out_dir = tmp.path().join("seg");
    let config = fixture("seg/aux_mmseg/config.json");
    let stdout = ok(&convert(&[
        fixture("seg/aux_mmseg/model.pth").to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
        "-o",
        out_dir.to_str().unwrap(),
    ]));
    assert!(stdout.contains("BeitForSemanticSegmentation"), "{stdout}");
    let got = candle::safetensors::load(out_dir.join("model.safetensors"), &Device::Cpu)?;
    let want = candle::safetensors::load(fixture("seg/aux/model.safetensors"), &Device::Cpu)?;
    let mut names: Vec<_> = want.keys().collect();
    names.sort();
    assert_eq!(got.len(), want.len());
    for k in names {
        let g = got.get(k).unwrap_or_else(|| panic!("`{k}` missing"));
        let (g, w) = (
            g.to_dtype(candle::DType::F32)?,
            want[k].to_dtype(candle::DType::F32)?,
        );
        assert_eq!(g.dims(), w.dims(), "{k}");
        assert_eq!(max_err(&g, &w)?, 0.0, "{k}");
    }
    let cfg = BeitConfig::from_file(out_dir.join("config.json"))?;
    assert_eq!(cfg.extra["out_indices"].to_string(), "[1,2,3,4]");
    // The converted directory loads as a segmentation model.
    beit_model::segmentation::segmentation_model(&Checkpoint::from_dir(&out_dir)?, &Device::Cpu)?;

    // Without a config, 4 blocks leave `out_indices` unknown: the error says what to pass.
    let out = convert(&[
        fixture("seg/aux_mmseg/model.pth").to_str().unwrap(),
        "-o",
        tmp.path().join("inferred").to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr.contains("out_indices") && stderr.contains("--config"),
        "{stderr}"
    );
    Ok(())
}

#[test]
fn unsupported_inputs_fail_clearly() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    // A segmentation checkpoint (mmseg names).
    let seg = tmp.path().join("seg.safetensors");
    let t = Tensor::zeros((1, 1, 4), candle::DType::F32, &Device::Cpu)?;
    candle::safetensors::save(
        &HashMap::from([("backbone.cls_token".to_string(), t)]),
        &seg,
    )?;
    let out = convert(&[
        seg.to_str().unwrap(),
        "-o",
        tmp.path().join("o").to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr.contains("segmentation checkpoint") && stderr.contains("decode_head.classifier"),
        "{stderr}"
    );
    // A missing file is named.
    let missing = tmp.path().join("nope.pth");
    let out = convert(&[
        missing.to_str().unwrap(),
        "-o",
        tmp.path().join("o").to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr.contains("nope.pth"), "{stderr}");
    assert!(!tmp.path().join("o").exists());
    Ok(())
}
