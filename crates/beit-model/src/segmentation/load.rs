//! Loading and saving segmentation checkpoints: the Hugging Face layout, the unilm/mmseg layout,
//! a classification or MIM checkpoint as the backbone of a new segmentation model, and export in
//! Hugging Face layout.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};

use candle::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{VarBuilder, VarMap};

use super::config::SegmentationConfig;
use super::model::BeitForSemanticSegmentation;
use crate::config::BeitConfig;
use crate::error::{BeitError, Result};
use crate::load::{
    adapt_for_finetuning, check_exact, load_into_varmap, normalize_names, Architecture, Checkpoint,
    LoadReport,
};

/// The `transformers` class name written to `config.json`'s `architectures`.
pub const HF_CLASS: &str = "BeitForSemanticSegmentation";

/// Whether a set of (normalised) names belongs to a segmentation model.
pub fn is_segmentation(names: impl IntoIterator<Item = impl AsRef<str>>) -> bool {
    names.into_iter().any(|n| {
        let n = n.as_ref();
        n.starts_with("decode_head.") || n.starts_with("fpn1.")
    })
}

/// Map a segmentation checkpoint's names to the Hugging Face ones: unilm/mmseg's `backbone.`
/// prefix is dropped (`backbone.fpn1.*` -> `fpn1.*`, `backbone.blocks.*` -> `beit.encoder.layer.*`
/// with q/k/v split as for classification), `conv_seg` -> `classifier`; HF names are kept.
pub fn normalize_segmentation_names(tensors: HashMap<String, Tensor>) -> HashMap<String, Tensor> {
    let renamed: HashMap<String, Tensor> = tensors
        .into_iter()
        .map(|(name, t)| {
            let name = name.strip_prefix("module.").unwrap_or(&name);
            let name = name.strip_prefix("backbone.").unwrap_or(name);
            let name = name
                .replace("decode_head.conv_seg.", "decode_head.classifier.")
                .replace("auxiliary_head.conv_seg.", "auxiliary_head.classifier.");
            (map_v5_head_name(&name), t)
        })
        .collect();
    normalize_names(renamed)
}

/// The in-memory module names of `transformers` >= 5 (`fpn.fpn1.conv_transpose1`,
/// `psp_modules.blocks.0.conv.convolution`, `normalization`, `psp_bottleneck`) to the names of
/// the checkpoint files; other names unchanged.
fn map_v5_head_name(name: &str) -> String {
    const NECK: [(&str, &str); 4] = [
        ("fpn.fpn1.conv_transpose1.", "fpn1.0."),
        ("fpn.fpn1.normalization.", "fpn1.1."),
        ("fpn.fpn1.conv_transpose2.", "fpn1.3."),
        ("fpn.fpn2.", "fpn2.0."),
    ];
    for (from, to) in NECK {
        if let Some(rest) = name.strip_prefix(from) {
            return format!("{to}{rest}");
        }
    }
    if !(name.starts_with("decode_head.") || name.starts_with("auxiliary_head.")) {
        return name.to_string();
    }
    let mut n = name
        .replace(".convolution.", ".conv.")
        .replace(".normalization.", ".bn.")
        .replace("decode_head.psp_bottleneck.", "decode_head.bottleneck.");
    if let Some(rest) = n.strip_prefix("decode_head.psp_modules.blocks.") {
        if let Some((i, tail)) = rest.split_once(".conv.") {
            n = format!("decode_head.psp_modules.{i}.1.{tail}");
        }
    }
    n
}

/// The parameters and buffers (name -> shape) of a segmentation model built from `cfg`.
pub fn expected_segmentation_parameters(cfg: &BeitConfig) -> Result<BTreeMap<String, Shape>> {
    let recorder = Recorder::default();
    {
        let vb = VarBuilder::from_backend(Box::new(recorder.clone()), DType::F32, Device::Cpu);
        drop(BeitForSemanticSegmentation::new(cfg, vb)?);
    }
    let seen = recorder.0.lock().expect("recorder lock").clone();
    Ok(seen)
}

/// A VarBuilder backend that records what the model asks for and hands out zeros.
#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<BTreeMap<String, Shape>>>);

impl SimpleBackend for Recorder {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle::Result<Tensor> {
        self.0
            .lock()
            .expect("recorder lock")
            .insert(name.to_string(), s.clone());
        Tensor::zeros(s, dtype, dev)
    }
    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle::Result<Tensor> {
        candle::bail!("recorder cannot provide `{name}` without a shape")
    }
    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

/// Load a segmentation model from a checkpoint whose tensors match its config exactly (HF or
/// unilm/mmseg names; a missing `num_batches_tracked` counter is the only tolerated gap).
pub fn segmentation_model(
    ckpt: &Checkpoint,
    device: &Device,
) -> Result<BeitForSemanticSegmentation> {
    let mut tensors = normalize_segmentation_names(ckpt.tensors.clone());
    if !is_segmentation(tensors.keys()) {
        return Err(BeitError::Mismatch {
            source_name: ckpt.source.display().to_string(),
            report: format!(
                "  no segmentation head (`decode_head.*`) in a {} checkpoint; to start a \
                 segmentation model from it, load it as a backbone (initialised heads)",
                match Architecture::detect(tensors.keys()) {
                    Architecture::ImageClassification => "classification",
                    Architecture::MaskedImageModeling => "masked-image-modeling",
                    Architecture::Backbone => "backbone",
                }
            ),
        });
    }
    let expected = expected_segmentation_parameters(&ckpt.config)?;
    for (name, shape) in &expected {
        if name.ends_with(".num_batches_tracked") && !tensors.contains_key(name) {
            tensors.insert(
                name.clone(),
                Tensor::zeros(shape, DType::F32, &Device::Cpu)?,
            );
        }
    }
    check_exact(&tensors, &expected, &ckpt.source.display().to_string())?;
    let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
    Ok(BeitForSemanticSegmentation::new(&ckpt.config, vb)?)
}

/// Build a trainable segmentation model of `cfg` in `varmap`: every tensor the model has is
/// taken from `tensors` when present (a full segmentation checkpoint, or the backbone of a
/// classification / MIM checkpoint), the rest keeps `transformers`' initialisation (convolutions
/// normal with std `initializer_range`, biases 0, BatchNorm 1/0, running statistics 0/1).
///
/// The backbone goes through unilm's fine-tuning surgery first: a shared relative position table
/// is copied into every layer, tables of another resolution are resized (geometric cubic) to
/// `cfg`'s grid, absolute position embeddings bicubically.
pub fn segmentation_model_in_varmap(
    cfg: &BeitConfig,
    tensors: HashMap<String, Tensor>,
    varmap: &VarMap,
    device: &Device,
) -> Result<(BeitForSemanticSegmentation, LoadReport)> {
    let tensors = normalize_segmentation_names(tensors);
    let (head_tensors, backbone_tensors): (HashMap<_, _>, HashMap<_, _>) =
        tensors.into_iter().partition(|(k, _)| {
            k.starts_with("fpn")
                || k.starts_with("decode_head.")
                || k.starts_with("auxiliary_head.")
        });
    let (mut adapted, mut report) =
        adapt_for_finetuning(cfg, Architecture::Backbone, backbone_tensors)?;
    // The backbone of a segmentation model has no pooler.
    report.missing.retain(|k| !k.starts_with("beit.pooler."));
    adapted.extend(head_tensors);
    let vb = VarBuilder::from_varmap(varmap, DType::F32, device);
    let model = BeitForSemanticSegmentation::new(cfg, vb)?;
    let loaded = load_into_varmap(varmap, &adapted)?;
    report.loaded = loaded.loaded;
    report.missing = loaded.missing;
    report.unused.extend(loaded.unused);
    report.unused.sort();
    report.unused.dedup();
    Ok((model, report))
}

/// Save a segmentation model's tensors (HF names, e.g. from [`crate::save::varmap_tensors`]) and
/// `cfg` (with `seg` stored in it) under `dir` in Hugging Face layout, readable by
/// `transformers`' `BeitForSemanticSegmentation.from_pretrained`. BatchNorm counters are
/// written as int64 scalars, as PyTorch keeps them. Files are written atomically.
pub fn save_segmentation_hf(
    dir: &Path,
    cfg: &BeitConfig,
    seg: &SegmentationConfig,
    tensors: &HashMap<String, Tensor>,
) -> Result<()> {
    let io = |path: &Path, source| BeitError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut cfg = cfg.clone();
    seg.store(&mut cfg);
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let expected = expected_segmentation_parameters(&cfg)?;
    let mut out = HashMap::new();
    let mut missing = Vec::new();
    for (name, shape) in &expected {
        let Some(t) = tensors.get(name) else {
            missing.push(format!("  missing key `{name}`"));
            continue;
        };
        if t.shape() != shape {
            missing.push(format!(
                "  shape mismatch for `{name}`: {:?}, the config expects {:?}",
                t.dims(),
                shape.dims()
            ));
            continue;
        }
        let t = t.to_device(&Device::Cpu)?;
        let t = if name.ends_with(".num_batches_tracked") {
            t.to_dtype(DType::F64)?.round()?.to_dtype(DType::I64)?
        } else {
            t.to_dtype(DType::F32)?
        };
        out.insert(name.clone(), t.contiguous()?);
    }
    if !missing.is_empty() {
        return Err(BeitError::Mismatch {
            source_name: "model being saved".into(),
            report: missing.join("\n"),
        });
    }
    let weights = dir.join("model.safetensors");
    let tmp = dir.join(".model.safetensors.tmp");
    candle::safetensors::save(&out, &tmp)?;
    std::fs::rename(&tmp, &weights).map_err(|e| io(&weights, e))?;
    let config = dir.join("config.json");
    let tmp = dir.join(".config.json.tmp");
    std::fs::write(&tmp, cfg.to_hf_json(HF_CLASS)?).map_err(|e| io(&tmp, e))?;
    std::fs::rename(&tmp, &config).map_err(|e| io(&config, e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> BeitConfig {
        BeitConfig::from_json_str(
            r#"{"hidden_size": 8, "num_hidden_layers": 4, "num_attention_heads": 2,
                "intermediate_size": 16, "image_size": 16, "patch_size": 4,
                "use_relative_position_bias": true, "out_indices": [1, 2, 3, 4],
                "auxiliary_channels": 6, "id2label": {"0": "a", "1": "b", "2": "c"}}"#,
        )
        .unwrap()
    }

    #[test]
    fn expected_names_follow_the_hub_files() -> Result<()> {
        let p = expected_segmentation_parameters(&tiny())?;
        for k in [
            "fpn1.0.weight",
            "fpn1.1.running_var",
            "fpn1.1.num_batches_tracked",
            "fpn1.3.bias",
            "fpn2.0.weight",
            "decode_head.psp_modules.3.1.conv.weight",
            "decode_head.psp_modules.0.1.bn.running_mean",
            "decode_head.bottleneck.conv.weight",
            "decode_head.lateral_convs.2.bn.bias",
            "decode_head.fpn_convs.0.conv.weight",
            "decode_head.fpn_bottleneck.conv.weight",
            "decode_head.classifier.bias",
            "auxiliary_head.convs.0.conv.weight",
            "auxiliary_head.classifier.weight",
            "beit.encoder.layer.3.attention.attention.relative_position_bias.relative_position_bias_table",
        ] {
            assert!(p.contains_key(k), "missing {k}");
        }
        assert!(!p.keys().any(|k| k.starts_with("beit.pooler")));
        assert_eq!(p["fpn1.0.weight"].dims(), &[8, 8, 2, 2]);
        assert_eq!(
            p["decode_head.bottleneck.conv.weight"].dims(),
            &[8, 40, 3, 3]
        );
        assert_eq!(
            p["decode_head.fpn_bottleneck.conv.weight"].dims(),
            &[8, 32, 3, 3]
        );
        assert_eq!(p["auxiliary_head.classifier.weight"].dims(), &[3, 6, 1, 1]);
        assert_eq!(p["fpn1.1.num_batches_tracked"].dims(), &[] as &[usize]);
        Ok(())
    }

    #[test]
    fn mmseg_names_map_to_hf() {
        let t = Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap();
        let raw: HashMap<String, Tensor> = [
            "backbone.cls_token",
            "backbone.blocks.0.norm1.weight",
            "backbone.fpn1.1.running_mean",
            "decode_head.conv_seg.weight",
            "auxiliary_head.conv_seg.bias",
            "decode_head.psp_modules.0.1.bn.weight",
        ]
        .iter()
        .map(|k| (k.to_string(), t.clone()))
        .collect();
        let out = normalize_segmentation_names(raw);
        let v5: HashMap<String, Tensor> = [
            "fpn.fpn1.conv_transpose2.weight",
            "fpn.fpn1.normalization.running_var",
            "fpn.fpn2.bias",
            "decode_head.psp_modules.blocks.2.conv.normalization.weight",
            "decode_head.psp_bottleneck.convolution.weight",
            "auxiliary_head.convs.0.normalization.bias",
        ]
        .iter()
        .map(|k| (k.to_string(), t.clone()))
        .collect();
        let v5 = normalize_segmentation_names(v5);
        for k in [
            "fpn1.3.weight",
            "fpn1.1.running_var",
            "fpn2.0.bias",
            "decode_head.psp_modules.2.1.bn.weight",
            "decode_head.bottleneck.conv.weight",
            "auxiliary_head.convs.0.bn.bias",
        ] {
            assert!(v5.contains_key(k), "missing {k}: {:?}", v5.keys());
        }
        for k in [
            "beit.embeddings.cls_token",
            "beit.encoder.layer.0.layernorm_before.weight",
            "fpn1.1.running_mean",
            "decode_head.classifier.weight",
            "auxiliary_head.classifier.bias",
            "decode_head.psp_modules.0.1.bn.weight",
        ] {
            assert!(out.contains_key(k), "missing {k}: {:?}", out.keys());
        }
    }
}
