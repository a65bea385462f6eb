//! Parity with Hugging Face `transformers` (and timm) on the fixtures of `scripts/fixtures/model_fixtures.py`:
//! small random models with every parameter perturbed, saved in the real HF layout, with the
//! outputs `transformers` computed. Max abs error must stay <= 1e-4 in f32.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::Result;
use beit_model::load::{read_weights, Checkpoint};
use beit_model::relative_position::resize_table_geometric;
use beit_model::{BeitConfig, ForwardOptions};
use candle::{Device, Tensor};

const TOL: f32 = 1e-4;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/model")
        .join(name)
}

fn expected(dir: &Path) -> Result<HashMap<String, Tensor>> {
    Ok(candle::safetensors::load(
        dir.join("expected.safetensors"),
        &Device::Cpu,
    )?)
}

fn max_err(a: &Tensor, b: &Tensor) -> Result<f32> {
    assert_eq!(a.dims(), b.dims(), "shape");
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

fn all_outputs() -> ForwardOptions {
    ForwardOptions {
        output_hidden_states: true,
        output_attentions: true,
        ..ForwardOptions::default()
    }
}

fn check_backbone_outputs(
    exp: &HashMap<String, Tensor>,
    out: &beit_model::BeitOutput,
    what: &str,
) -> Result<()> {
    let n_hidden = exp
        .keys()
        .filter(|k| k.starts_with("hidden_states."))
        .count();
    assert_eq!(
        out.hidden_states.len(),
        n_hidden,
        "{what}: number of hidden states"
    );
    for (i, h) in out.hidden_states.iter().enumerate() {
        let e = max_err(h, &exp[&format!("hidden_states.{i}")])?;
        assert!(e <= TOL, "{what}: hidden_states.{i} max err {e}");
    }
    for (i, a) in out.attentions.iter().enumerate() {
        let e = max_err(a, &exp[&format!("attentions.{i}")])?;
        assert!(e <= TOL, "{what}: attentions.{i} max err {e}");
    }
    Ok(())
}

fn check_classifier_dir(name: &str) -> Result<f32> {
    let dir = fixture(name);
    let exp = expected(&dir)?;
    let model = Checkpoint::from_dir(&dir)?.classifier(&Device::Cpu)?;
    let out = model.forward(&exp["pixel_values"], all_outputs())?;
    let e = max_err(&out.logits, &exp["logits"])?;
    println!("{name}: logits max abs err {e:.2e}");
    assert!(e <= TOL, "{name}: logits max err {e}");
    check_backbone_outputs(&exp, &out.backbone, name)?;
    // The same checkpoint at a larger resolution (48 px vs 32: tables/pos-embeds resampled).
    let hr = model.forward(&exp["hr.pixel_values"], ForwardOptions::default())?;
    let e_hr = max_err(&hr.logits, &exp["hr.logits"])?;
    println!("{name}: logits at 48px max abs err {e_hr:.2e}");
    assert!(e_hr <= TOL, "{name}: high-resolution logits max err {e_hr}");
    Ok(e)
}

#[test]
fn mim_shared_bias_with_mask_token() -> Result<()> {
    let dir = fixture("mim_shared");
    let exp = expected(&dir)?;
    let model = Checkpoint::from_dir(&dir)?.mim(&Device::Cpu)?;
    let mask = &exp["bool_masked_pos"];
    let out = model.forward(&exp["pixel_values"], Some(mask), all_outputs())?;
    let e = max_err(&out.logits, &exp["logits"])?;
    println!("mim_shared: logits max abs err {e:.2e}");
    assert!(e <= TOL, "logits max err {e}");
    check_backbone_outputs(&exp, &out.backbone, "mim_shared")?;

    // Masked-only logits are the rows of the full logits at the masked positions.
    let masked = model.forward_masked(&exp["pixel_values"], mask, ForwardOptions::default())?;
    let rows = beit_model::heads::masked_rows(&exp["logits"], mask)?;
    assert!(max_err(&masked.logits, &rows)? <= TOL);

    let zeros = Tensor::zeros((2, 36), candle::DType::U8, &Device::Cpu)?;
    let hr = model.forward(
        &exp["hr.pixel_values"],
        Some(&zeros),
        ForwardOptions::default(),
    )?;
    let e_hr = max_err(&hr.logits, &exp["hr.logits"])?;
    println!("mim_shared: logits at 48px max abs err {e_hr:.2e}");
    assert!(e_hr <= TOL, "high-resolution logits max err {e_hr}");
    Ok(())
}

#[test]
fn classifier_per_layer_bias_mean_pooling() -> Result<()> {
    check_classifier_dir("cls_per_layer").map(|_| ())
}

#[test]
fn classifier_from_pytorch_model_bin() -> Result<()> {
    check_classifier_dir("cls_per_layer_bin").map(|_| ())
}

#[test]
fn classifier_from_sharded_safetensors() -> Result<()> {
    check_classifier_dir("cls_per_layer_sharded").map(|_| ())
}

#[test]
fn absolute_position_embedding_and_cls_pooling_without_layer_scale() -> Result<()> {
    check_classifier_dir("abs_pos_cls_pool").map(|_| ())
}

#[test]
fn timm_and_unilm_key_names() -> Result<()> {
    let dir = fixture("timm_unilm");
    let exp = expected(&dir)?;
    let config = BeitConfig::from_file(dir.join("config.json"))?;
    for weights in ["model.safetensors", "checkpoint.pth"] {
        let ckpt = Checkpoint::from_files(config.clone(), &dir.join(weights))?;
        let model = ckpt.classifier(&Device::Cpu)?;
        let logits = model
            .forward(&exp["pixel_values"], ForwardOptions::default())?
            .logits;
        let e = max_err(&logits, &exp["logits"])?;
        println!("timm/unilm {weights}: logits max abs err {e:.2e}");
        assert!(e <= TOL, "{weights}: logits max err {e}");
    }
    Ok(())
}

#[test]
fn geometric_table_resize_matches_unilm_scipy() -> Result<()> {
    let t = candle::safetensors::load(fixture("geometric_resize.safetensors"), &Device::Cpu)?;
    let resized = resize_table_geometric(&t["table"], 6)?;
    let e = max_err(&resized, &t["resized"])?;
    println!("geometric resize: max abs err {e:.2e}");
    assert!(e <= 1e-4, "max err {e}");
    Ok(())
}

#[test]
fn a_config_mismatch_is_reported_by_key() -> Result<()> {
    let dir = fixture("cls_per_layer");
    let mut ckpt = Checkpoint::from_dir(&dir)?;
    ckpt.config.num_hidden_layers = 3;
    let err = ckpt.classifier(&Device::Cpu).unwrap_err().to_string();
    assert!(err.contains("missing key `beit.encoder.layer.2."), "{err}");
    let mut ckpt = Checkpoint::from_dir(&dir)?;
    ckpt.config.intermediate_size = 48;
    let err = ckpt.classifier(&Device::Cpu).unwrap_err().to_string();
    assert!(
        err.contains("shape mismatch for `beit.encoder.layer.0.intermediate.dense.weight`"),
        "{err}"
    );
    // A MIM checkpoint asked for as a classifier: unexpected lm_head, missing classifier.
    let err = Checkpoint::from_dir(fixture("mim_shared"))?
        .classifier(&Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("unexpected key `lm_head.weight`")
            && err.contains("missing key `classifier.weight`"),
        "{err}"
    );
    Ok(())
}

#[test]
fn missing_and_corrupt_files_are_clear_errors() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let err = Checkpoint::from_dir(tmp.path()).unwrap_err().to_string();
    assert!(err.contains("config.json"), "{err}");
    std::fs::copy(
        fixture("cls_per_layer/config.json"),
        tmp.path().join("config.json"),
    )?;
    let err = Checkpoint::from_dir(tmp.path()).unwrap_err().to_string();
    assert!(
        err.contains("no weights found") && err.contains("model.safetensors"),
        "{err}"
    );
    std::fs::write(
        tmp.path().join("model.safetensors"),
        b"not a safetensors file",
    )?;
    let err = Checkpoint::from_dir(tmp.path()).unwrap_err().to_string();
    assert!(err.contains("model.safetensors"), "{err}");
    let err = read_weights(&tmp.path().join("nope.bin"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("nope.bin") && err.contains("not found"),
        "{err}"
    );
    Ok(())
}
