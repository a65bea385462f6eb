//! Parity with the other published families of the architecture, on fixtures each library made
//! itself (`scripts/fixtures/family_fixtures.py`): timm BEiT v2 and v1 (timm's hub layout and names),
//! data2vec-vision (classifier; pre-trained backbone saved without prefix) and DiT (absolute
//! position embeddings; MIM and classifier). Max abs error must stay <= 1e-4 in f32.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::Result;
use beit_model::config::Family;
use beit_model::load::{Architecture, Checkpoint};
use beit_model::{BeitConfig, ForwardOptions};
use candle::{Device, Tensor};

const TOL: f32 = 1e-4;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/family")
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

fn hidden_opts() -> ForwardOptions {
    ForwardOptions {
        output_hidden_states: true,
        ..ForwardOptions::default()
    }
}

fn check_hidden(exp: &HashMap<String, Tensor>, got: &[Tensor], what: &str) -> Result<()> {
    let n = exp
        .keys()
        .filter(|k| k.starts_with("hidden_states."))
        .count();
    assert_eq!(got.len(), n, "{what}: number of hidden states");
    for (i, h) in got.iter().enumerate() {
        let e = max_err(h, &exp[&format!("hidden_states.{i}")])?;
        assert!(e <= TOL, "{what}: hidden_states.{i} max err {e}");
    }
    Ok(())
}

fn classifier_logits(name: &str) -> Result<(Checkpoint, f32)> {
    let dir = fixture(name);
    let exp = expected(&dir)?;
    let ckpt = Checkpoint::from_dir(&dir)?;
    assert_eq!(ckpt.architecture(), Architecture::ImageClassification);
    let model = ckpt.classifier(&Device::Cpu)?;
    let out = model.forward(&exp["pixel_values"], hidden_opts())?;
    let e = max_err(&out.logits, &exp["logits"])?;
    println!("{name}: logits max abs err {e:.2e}");
    assert!(e <= TOL, "{name}: logits max err {e}");
    if exp.contains_key("hidden_states.0") {
        check_hidden(&exp, &out.backbone.hidden_states, name)?;
    }
    Ok((ckpt, e))
}

#[test]
fn timm_beit_v2_hub_layout() -> Result<()> {
    let (ckpt, _) = classifier_logits("timm_beitv2")?;
    let cfg = &ckpt.config;
    assert_eq!(cfg.family, Family::Timm);
    assert_eq!(cfg.layer_norm_eps, 1e-6);
    assert_eq!(
        (cfg.hidden_size, cfg.num_hidden_layers, cfg.image_size),
        (32, 2, 32)
    );
    assert!(cfg.use_relative_position_bias && cfg.use_mean_pooling);
    let pc = cfg
        .timm_pretrained_cfg
        .as_ref()
        .expect("pretrained_cfg kept");
    assert_eq!(
        pc["mean"][0].as_f64(),
        Some(0.485),
        "BEiT v2 uses ImageNet mean"
    );
    Ok(())
}

#[test]
fn timm_beit_v1_hub_layout() -> Result<()> {
    let (ckpt, _) = classifier_logits("timm_beit")?;
    assert_eq!(ckpt.config.family, Family::Timm);
    let pc = ckpt.config.timm_pretrained_cfg.as_ref().unwrap();
    assert_eq!(pc["mean"][0].as_f64(), Some(0.5), "BEiT v1 uses 0.5 mean");
    Ok(())
}

#[test]
fn data2vec_vision_classifier() -> Result<()> {
    let (ckpt, _) = classifier_logits("d2v_cls")?;
    assert_eq!(ckpt.config.family, Family::Data2VecVision);
    assert_eq!(ckpt.config.label(1), "rocket");
    Ok(())
}

#[test]
fn data2vec_vision_pretrained_backbone_without_prefix() -> Result<()> {
    let dir = fixture("d2v_pt");
    let exp = expected(&dir)?;
    let ckpt = Checkpoint::from_dir(&dir)?;
    assert_eq!(ckpt.architecture(), Architecture::Backbone);
    assert!(ckpt
        .tensors
        .contains_key("beit.encoder.relative_position_bias.relative_position_bias_table"));
    let model = ckpt.backbone(&Device::Cpu)?;
    let out = model.forward(&exp["pixel_values"], None, hidden_opts())?;
    let e = max_err(&out.last_hidden_state, &exp["last_hidden_state"])?;
    println!("d2v_pt: last hidden state max abs err {e:.2e}");
    assert!(e <= TOL, "last_hidden_state max err {e}");
    check_hidden(&exp, &out.hidden_states, "d2v_pt")?;
    // CLS pooling: the pooled output is the CLS row of the final LayerNorm's output.
    let pooled = out.pooler_output.expect("CLS pooling");
    let cls = exp["last_hidden_state"].narrow(1, 0, 1)?.squeeze(1)?;
    assert!(max_err(&pooled, &cls)? <= TOL);
    // Not a classifier: the error says what is missing.
    let err = ckpt.classifier(&Device::Cpu).unwrap_err().to_string();
    assert!(err.contains("missing key `classifier.weight`"), "{err}");
    Ok(())
}

#[test]
fn dit_mim_absolute_positions() -> Result<()> {
    let dir = fixture("dit_mim");
    let exp = expected(&dir)?;
    let ckpt = Checkpoint::from_dir(&dir)?;
    assert!(ckpt.config.use_absolute_position_embeddings);
    assert_eq!(ckpt.architecture(), Architecture::MaskedImageModeling);
    let model = ckpt.mim(&Device::Cpu)?;
    let out = model.forward(
        &exp["pixel_values"],
        Some(&exp["bool_masked_pos"]),
        hidden_opts(),
    )?;
    let e = max_err(&out.logits, &exp["logits"])?;
    println!("dit_mim: logits max abs err {e:.2e}");
    assert!(e <= TOL, "logits max err {e}");
    check_hidden(&exp, &out.backbone.hidden_states, "dit_mim")?;
    Ok(())
}

#[test]
fn dit_document_classifier() -> Result<()> {
    let (ckpt, _) = classifier_logits("dit_cls")?;
    assert_eq!(ckpt.config.num_labels(), 16);
    assert_eq!(ckpt.config.label(0), "letter");
    Ok(())
}

#[test]
fn timm_config_errors_name_the_field() {
    let e = BeitConfig::from_json_str(r#"{"architecture": "vit_base_patch16_224"}"#)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("vit_base_patch16_224") && e.contains("beitv2_base_patch16_224"),
        "{e}"
    );
    let e = BeitConfig::from_json_str(
        r#"{"architecture": "beitv2_base_patch16_224", "model_args": {"swiglu_mlp": true}}"#,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("model_args.swiglu_mlp"), "{e}");
    let e = BeitConfig::from_json_str(
        r#"{"architecture": "beit_base_patch16_224", "num_classes": 3, "label_names": ["a"]}"#,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("label_names"), "{e}");
    let e = BeitConfig::from_json_str(r#"{"model_type": "vit"}"#)
        .unwrap_err()
        .to_string();
    assert!(e.contains("model_type") && e.contains("vit"), "{e}");
    // The published large v2 config: 24 layers of 1024, 1000 classes, mean pooling.
    let c = BeitConfig::from_json_str(
        r#"{"architecture": "beitv2_large_patch16_224", "num_classes": 1000, "num_features": 1024,
            "global_pool": "avg", "pretrained_cfg": {"tag": "in1k_ft_in22k_in1k",
            "input_size": [3, 224, 224], "interpolation": "bicubic", "crop_pct": 0.95,
            "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "num_classes": 1000}}"#,
    )
    .unwrap();
    assert_eq!(
        (
            c.hidden_size,
            c.num_hidden_layers,
            c.num_attention_heads,
            c.intermediate_size
        ),
        (1024, 24, 16, 4096)
    );
    assert_eq!(c.num_labels(), 1000);
    assert!(c.layer_scale_init_value > 0.0 && c.use_relative_position_bias);
}
