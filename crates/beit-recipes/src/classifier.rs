//! A trainable image classifier: built in a `VarMap`, initialised as unilm fine-tunes, loaded
//! from a checkpoint after unilm's surgery, exported in Hugging Face layout.

use std::path::Path;

use anyhow::{Context, Result};
use beit_data::{EvalResize, EvalTransform, ImageProcessor, TargetSize};
use beit_model::init::{init_beit, InitConfig};
use beit_model::load::{adapt_for_finetuning, load_into_varmap, Architecture, Checkpoint};
use beit_model::{BeitConfig, BeitForImageClassification};
use beit_train::TrainRng;
use candle::{DType, Device};
use candle_nn::{VarBuilder, VarMap};

/// A classifier whose parameters live in a `VarMap` (trainable), with unilm's fine-tuning init
/// (transformers' init without a checkpoint), then the weights of `checkpoint` (if any) after
/// unilm's surgery (shared relative table copied into every layer, tables resized, mismatched
/// head dropped). Under a checkpoint, the fresh head is multiplied by `head_init_scale`
/// (unilm's `--init_scale`). The report lists what was loaded, left at its init (e.g. a new
/// head) or unused (e.g. `lm_head`).
pub fn trainable_classifier(
    cfg: &BeitConfig,
    checkpoint: Option<&Checkpoint>,
    head_init_scale: f64,
    device: &Device,
    init_seed: u64,
) -> Result<(
    VarMap,
    BeitForImageClassification,
    beit_model::load::LoadReport,
)> {
    let varmap = VarMap::new();
    let model =
        BeitForImageClassification::new(cfg, VarBuilder::from_varmap(&varmap, DType::F32, device))?;
    // unilm's order: initialise everything (head x head_init_scale), then load the checkpoint
    // over it. From scratch, transformers' initialisation (docs/training-parity.md: unilm's
    // stalls the first epochs of a from-scratch run).
    let mut init = InitConfig::classifier(
        cfg.num_hidden_layers,
        cfg.layer_scale_init_value,
        checkpoint.is_none(),
    );
    if checkpoint.is_some() {
        init.head_init_scale = Some(head_init_scale);
    }
    init_beit(
        &varmap,
        &init,
        &mut TrainRng::derive(init_seed, &[0x696e6974]),
    )?;
    let mut report = beit_model::load::LoadReport::default();
    if let Some(ck) = checkpoint {
        let (tensors, adapt) =
            adapt_for_finetuning(cfg, Architecture::ImageClassification, ck.tensors.clone())
                .with_context(|| format!("adapting {}", ck.source.display()))?;
        let loaded = load_into_varmap(&varmap, &tensors)?;
        report = beit_model::load::LoadReport {
            loaded: loaded.loaded,
            missing: loaded.missing,
            unused: adapt.unused,
            notes: adapt.notes,
        };
    }
    Ok((varmap, model, report))
}

/// The config of a classifier fine-tuned from `source` (a pre-trained MIM or a fine-tuned
/// checkpoint config): per-layer relative position tables (a shared table is copied into every
/// layer at load), no mask token, the dataset's labels, the recipe's drop path and resolution.
pub fn finetune_config(
    source: &BeitConfig,
    classes: &[String],
    drop_path_rate: f64,
    image_size: usize,
) -> BeitConfig {
    let mut cfg = source.clone();
    if cfg.use_shared_relative_position_bias {
        cfg.use_shared_relative_position_bias = false;
        cfg.use_relative_position_bias = true;
    }
    cfg.use_mask_token = false;
    cfg.drop_path_rate = drop_path_rate;
    cfg.image_size = image_size;
    cfg.set_labels(classes);
    cfg
}

/// Log a load report in a few lines.
pub fn log_load_report(report: &beit_model::load::LoadReport) {
    fn abbreviate(names: &[String]) -> String {
        let mut s = names.iter().take(4).cloned().collect::<Vec<_>>().join(", ");
        if names.len() > 4 {
            s.push_str(", ...");
        }
        s
    }
    for n in &report.notes {
        tracing::info!("checkpoint: {n}");
    }
    let listed = |names: &[String]| {
        if names.is_empty() {
            String::new()
        } else {
            format!(" ({})", abbreviate(names))
        }
    };
    tracing::info!(
        "checkpoint: {} tensors loaded, {} left at init{}, {} unused{}",
        report.loaded.len(),
        report.missing.len(),
        listed(&report.missing),
        report.unused.len(),
        listed(&report.unused),
    );
}

/// The `preprocessor_config.json` equivalent of an evaluation transform, for exports.
/// `ShorterSideCrop` becomes a square resize to `floor(size / crop_pct)` then a centre crop (what
/// `BeitImageProcessor` can express; identical for square images).
pub fn processor_for_eval(t: &EvalTransform) -> ImageProcessor {
    let (size, crop) = match t.resize {
        EvalResize::Squash => (t.size, false),
        EvalResize::ShorterSideCrop { crop_pct } => {
            ((t.size as f64 / crop_pct).floor() as u32, true)
        }
    };
    ImageProcessor {
        do_resize: true,
        size: TargetSize::Exact(size, size),
        resample: t.interpolation,
        do_center_crop: crop,
        crop_size: (t.size, t.size),
        do_rescale: true,
        rescale_factor: 1.0 / 255.0,
        do_normalize: true,
        image_mean: t.normalize.mean,
        image_std: t.normalize.std,
    }
}

/// Write a classifier in Hugging Face layout (`config.json` with `id2label`,
/// `model.safetensors`, `preprocessor_config.json`) that `beit-cli predict`, `eval` and
/// `transformers` load.
pub fn export_classifier(
    dir: &Path,
    cfg: &BeitConfig,
    varmap: &VarMap,
    processor: &ImageProcessor,
) -> Result<()> {
    beit_model::save::save_hf(
        dir,
        cfg,
        Architecture::ImageClassification,
        &beit_model::save::varmap_tensors(varmap),
    )
    .with_context(|| format!("exporting the model to {}", dir.display()))?;
    let path = dir.join("preprocessor_config.json");
    let tmp = dir.join(".preprocessor_config.json.tmp");
    std::fs::write(&tmp, serde_json::to_string_pretty(&processor.to_json())?)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use beit_model::save::varmap_tensors;
    use beit_model::BeitForMaskedImageModeling;

    fn max_abs(t: &candle::Tensor) -> f32 {
        t.abs().unwrap().max_all().unwrap().to_scalar().unwrap()
    }

    #[test]
    fn a_checkpoint_keeps_its_weights_and_the_fresh_head_takes_the_scale() -> Result<()> {
        let dev = Device::Cpu;
        let mut mim = BeitConfig::base_patch16_224_pt22k();
        (
            mim.hidden_size,
            mim.num_hidden_layers,
            mim.num_attention_heads,
        ) = (32, 2, 2);
        (mim.intermediate_size, mim.image_size, mim.vocab_size) = (64, 32, 16);
        let vm = VarMap::new();
        BeitForMaskedImageModeling::new(&mim, VarBuilder::from_varmap(&vm, DType::F32, &dev))?;
        init_beit(
            &vm,
            &InitConfig::transformers(2, 0.1),
            &mut TrainRng::derive(1, &[]),
        )?;
        let ck = Checkpoint {
            config: mim.clone(),
            tensors: varmap_tensors(&vm),
            source: "in-memory MIM model".into(),
        };
        let classes: Vec<String> = ["a", "b", "c"].map(String::from).to_vec();
        let cfg = finetune_config(&mim, &classes, 0.0, 32);
        let (full, _, report) = trainable_classifier(&cfg, Some(&ck), 1.0, &dev, 0)?;
        let (small, _, _) = trainable_classifier(&cfg, Some(&ck), 0.001, &dev, 0)?;
        assert!(report.missing.iter().any(|k| k == "classifier.weight"));
        let (full, small) = (varmap_tensors(&full), varmap_tensors(&small));
        // The same draw, scaled: weight and bias of the fresh head.
        for k in ["classifier.weight", "classifier.bias"] {
            let diff = (&full[k] - (&small[k] * 1000.0)?)?;
            assert!(max_abs(&diff) <= 1e-4 * max_abs(&full[k]).max(1e-6), "{k}");
        }
        assert!(max_abs(&full["classifier.weight"]) > 0.01);
        // The backbone is the checkpoint's, whatever the head's scale.
        let k = "beit.embeddings.patch_embeddings.projection.weight";
        assert_eq!(max_abs(&(&full[k] - &ck.tensors[k])?), 0.0);
        assert_eq!(max_abs(&(&small[k] - &ck.tensors[k])?), 0.0);
        Ok(())
    }
}
