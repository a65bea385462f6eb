//! Parity of `BeitForSemanticSegmentation` with `transformers` on the fixtures of
//! `scripts/fixtures/seg_fixtures.py`: tiny random models (every parameter perturbed, BatchNorm running
//! statistics non-trivial) saved by transformers itself, with its eval logits (decode and
//! auxiliary heads), its loss, and one training step's gradients and running statistics.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::Result;
use beit_model::load::{read_weights, Checkpoint};
use beit_model::save::varmap_tensors;
use beit_model::segmentation::{
    is_buffer, normalize_segmentation_names, save_segmentation_hf, segmentation_model,
    segmentation_model_in_varmap, BeitForSemanticSegmentation,
};
use beit_model::{BeitConfig, ForwardOptions};
use candle::{Device, Tensor};
use candle_nn::VarMap;

const TOL: f32 = 1e-4;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/seg")
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

fn max_abs(a: &Tensor) -> Result<f32> {
    Ok(a.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

fn scalar(t: &Tensor) -> Result<f32> {
    Ok(t.flatten_all()?.to_vec1::<f32>()?[0])
}

/// Eval logits of both heads and the loss; returns the logits error.
fn check_eval(
    name: &str,
    model: &BeitForSemanticSegmentation,
    exp: &HashMap<String, Tensor>,
) -> Result<f32> {
    let out = model.forward(&exp["pixel_values"], ForwardOptions::default())?;
    let e = max_err(&out.logits, &exp["logits"])?;
    println!("{name}: decode-head logits max abs err {e:.2e}");
    assert!(e <= TOL, "{name}: logits max err {e}");
    match (&out.auxiliary_logits, exp.get("auxiliary_logits")) {
        (Some(a), Some(b)) => {
            let ea = max_err(a, b)?;
            println!("{name}: auxiliary logits max abs err {ea:.2e}");
            assert!(ea <= TOL, "{name}: auxiliary logits max err {ea}");
        }
        (None, None) => {}
        _ => panic!("{name}: auxiliary head presence differs from transformers"),
    }
    let loss = scalar(&model.loss(&out, &exp["labels"])?)?;
    let want = scalar(&exp["loss"])?;
    println!(
        "{name}: loss {loss} vs {want} (err {:.2e})",
        (loss - want).abs()
    );
    assert!((loss - want).abs() <= 1e-5, "{name}: loss {loss} vs {want}");
    Ok(e)
}

#[test]
fn eval_logits_and_loss_match_transformers() -> Result<()> {
    for name in ["aux", "noaux"] {
        let dir = fixture(name);
        let exp = expected(&dir)?;
        let model = segmentation_model(&Checkpoint::from_dir(&dir)?, &Device::Cpu)?;
        check_eval(name, &model, &exp)?;
    }
    Ok(())
}

#[test]
fn mmseg_layout_loads_to_the_same_model() -> Result<()> {
    let dir = fixture("aux_mmseg");
    let cfg = BeitConfig::from_file(dir.join("config.json"))?;
    let ckpt = Checkpoint::from_files(cfg, &dir.join("model.pth"))?;
    let model = segmentation_model(&ckpt, &Device::Cpu)?;
    check_eval("aux_mmseg", &model, &expected(&fixture("aux"))?)?;
    Ok(())
}

/// One training step: BatchNorm with batch statistics, the loss, the gradient of every parameter
/// (within 1e-4 of the largest entry of that gradient) and the updated running statistics.
#[test]
fn training_step_matches_transformers() -> Result<()> {
    for name in ["aux", "noaux"] {
        let dir = fixture(name);
        let exp = expected(&dir)?;
        let ckpt = Checkpoint::from_dir(&dir)?;
        let varmap = VarMap::new();
        let (model, report) = segmentation_model_in_varmap(
            &ckpt.config,
            ckpt.tensors.clone(),
            &varmap,
            &Device::Cpu,
        )?;
        assert!(report.missing.is_empty(), "{name}: {:?}", report.missing);
        let out = model.forward(&exp["pixel_values"], ForwardOptions::train())?;
        let e = max_err(&out.logits, &exp["train.logits"])?;
        assert!(e <= TOL, "{name}: train-mode logits max err {e}");
        let loss = model.loss(&out, &exp["labels"])?;
        let (l, want) = (scalar(&loss)?, scalar(&exp["train.loss"])?);
        assert!((l - want).abs() <= 1e-5, "{name}: train loss {l} vs {want}");
        let grads = loss.backward()?;
        // The fixture names gradients and statistics as transformers >= 5 names its modules in
        // memory (`beit.layers.0.attention.q_proj`, `fpn.fpn1.normalization`): map them to the
        // file names, as the loader does.
        let by_file_name = |prefix: &str| {
            normalize_segmentation_names(
                exp.iter()
                    .filter_map(|(k, v)| Some((k.strip_prefix(prefix)?.to_string(), v.clone())))
                    .collect(),
            )
        };
        let want_grads = by_file_name("grad.");
        let want_stats = by_file_name("after.");
        let vars = varmap.data().lock().unwrap();
        let mut global = 0f32;
        for g in want_grads.values() {
            global = global.max(max_abs(g)?);
        }
        let (mut worst, mut checked) = (0f32, 0);
        let mut bad = Vec::new();
        for (var_name, var) in vars.iter() {
            if is_buffer(var_name) {
                continue;
            }
            let ours = grads.get(var.as_tensor());
            match (ours, want_grads.get(var_name)) {
                (Some(g), Some(want)) => {
                    // Relative to the tensor's largest entry. A bias whose output only reaches a
                    // training-mode BatchNorm (directly or through a 1x1 convolution) has an exact
                    // gradient of zero (the batch mean absorbs it): there the exact values are
                    // rounding residue and ours must be noise too (below 1e-6 of the largest
                    // gradient of the model).
                    let exact_max = max_abs(want)?;
                    let scale = if exact_max <= 1e-7 * global {
                        1e-2 * global
                    } else {
                        exact_max
                    };
                    let rel = max_err(g, want)? / scale;
                    if rel > TOL {
                        bad.push(format!(
                            "{var_name}: relative err {rel:.2e} (max |grad| {scale:.2e})"
                        ));
                    }
                    worst = worst.max(rel);
                    checked += 1;
                }
                (None, None) => {}
                (Some(g), None) => {
                    // transformers has no gradient here (unused layer): ours must be zero.
                    assert_eq!(max_abs(g)?, 0.0, "{name}: {var_name} has a gradient");
                }
                (None, Some(_)) => panic!("{name}: no gradient reached {var_name}"),
            }
        }
        bad.sort();
        assert!(
            bad.is_empty(),
            "{name}: gradients differ:\n{}",
            bad.join("\n")
        );
        assert_eq!(
            checked,
            want_grads.len(),
            "{name}: every parameter gradient compared"
        );
        println!("{name}: {checked} gradients, worst relative err {worst:.2e}");
        // Running statistics after the step (momentum 0.1, unbiased variance).
        let mut stats = 0;
        for (k, want) in &want_stats {
            let got = vars[k].as_tensor();
            let e = max_err(got, want)?;
            assert!(e <= 1e-5, "{name}: {k} max err {e}");
            stats += 1;
        }
        assert!(stats > 0);
    }
    Ok(())
}

/// Export in HF layout and load it back: identical logits; the counters stay int64.
#[test]
fn export_round_trips() -> Result<()> {
    let dir = fixture("aux");
    let exp = expected(&dir)?;
    let ckpt = Checkpoint::from_dir(&dir)?;
    let varmap = VarMap::new();
    let (model, _) =
        segmentation_model_in_varmap(&ckpt.config, ckpt.tensors.clone(), &varmap, &Device::Cpu)?;
    let tmp = tempfile::tempdir()?;
    save_segmentation_hf(
        tmp.path(),
        &ckpt.config,
        model.segmentation_config(),
        &varmap_tensors(&varmap),
    )?;
    let raw = read_weights(&tmp.path().join("model.safetensors"))?;
    assert_eq!(
        raw["fpn1.1.num_batches_tracked"].dtype(),
        candle::DType::I64
    );
    assert_eq!(raw.len(), ckpt.tensors.len(), "every parameter and buffer");
    let back = segmentation_model(&Checkpoint::from_dir(tmp.path())?, &Device::Cpu)?;
    let original = segmentation_model(&ckpt, &Device::Cpu)?;
    let a = back.forward(&exp["pixel_values"], ForwardOptions::default())?;
    let b = original.forward(&exp["pixel_values"], ForwardOptions::default())?;
    assert_eq!(
        max_err(&a.logits, &b.logits)?,
        0.0,
        "the export holds the same values"
    );
    check_eval("aux export", &back, &exp)?;
    Ok(())
}

/// A classification checkpoint's backbone under a new segmentation model: heads initialised,
/// tables resized to the new resolution; a clear error when loaded as a full model instead.
#[test]
fn classifier_backbone_starts_a_segmentation_model() -> Result<()> {
    let cls_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/model/cls_per_layer");
    let cls = Checkpoint::from_dir(&cls_dir)?;
    let err = segmentation_model(&cls, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("no segmentation head"), "{err}");
    let mut cfg = cls.config.clone();
    cfg.image_size = 64; // 8x8 grid instead of 4x4: tables resized
    cfg.extra
        .insert("out_indices".into(), serde_json::json!([1, 1, 2, 2]));
    cfg.extra
        .insert("auxiliary_channels".into(), serde_json::json!(8));
    let varmap = VarMap::new();
    let (model, report) =
        segmentation_model_in_varmap(&cfg, cls.tensors.clone(), &varmap, &Device::Cpu)?;
    assert!(
        report.missing.iter().all(|k| !k.starts_with("beit.")),
        "{:?}",
        report.missing
    );
    assert!(report.missing.iter().any(|k| k.starts_with("decode_head.")));
    assert!(report.unused.iter().any(|k| k.starts_with("classifier.")));
    assert!(
        report.notes.iter().any(|n| n.contains("resized")),
        "{:?}",
        report.notes
    );
    let x = Tensor::randn(0f32, 1., (1, 3, 64, 64), &Device::Cpu)?;
    let out = model.forward(&x, ForwardOptions::default())?;
    assert_eq!(out.logits.dims(), &[1, cfg.num_labels(), 32, 32]);
    assert_eq!(
        out.auxiliary_logits.unwrap().dims(),
        &[1, cfg.num_labels(), 8, 8]
    );
    Ok(())
}

/// Writes our export of the `aux` fixture for `scripts/fixtures/seg_fixtures.py --check-export DIR/aux`
/// (transformers must load it and reproduce the logits): `BEIT_EXPORT_DIR=DIR cargo test -p
/// beit-model --test segmentation -- --ignored export_for_transformers`.
#[test]
#[ignore = "writes an export for the Python round-trip check"]
fn export_for_transformers() -> Result<()> {
    let root = PathBuf::from(std::env::var("BEIT_EXPORT_DIR").expect("set BEIT_EXPORT_DIR"));
    for name in ["aux", "noaux"] {
        let ckpt = Checkpoint::from_dir(fixture(name))?;
        let varmap = VarMap::new();
        let (model, _) = segmentation_model_in_varmap(
            &ckpt.config,
            ckpt.tensors.clone(),
            &varmap,
            &Device::Cpu,
        )?;
        let out = root.join(name);
        save_segmentation_hf(
            &out,
            &ckpt.config,
            model.segmentation_config(),
            &varmap_tensors(&varmap),
        )?;
        std::fs::copy(
            fixture(name).join("expected.safetensors"),
            out.join("expected.safetensors"),
        )?;
    }
    Ok(())
}
