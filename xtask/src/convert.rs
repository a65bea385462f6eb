//! `cargo xtask convert`: published checkpoints in other layouts -> Hugging Face-layout safetensors.
//!
//! - BEiT: a unilm `.pth` (state dict under `model`), a timm `.pth`/`.bin`/`.safetensors`, or a HF
//!   `pytorch_model.bin` becomes `<out>/config.json` + `<out>/model.safetensors` with
//!   `transformers` key names. The name mapping is `beit_model::load::normalize_names`; the result is
//!   checked against the config key by key before anything is written.
//! - BEiT semantic segmentation: a unilm/mmseg UperNet checkpoint (`{"state_dict": ...}` with
//!   `backbone.*`, `decode_head.conv_seg`, ...) becomes a `BeitForSemanticSegmentation` directory
//!   (`beit_model::segmentation::normalize_segmentation_names`), config given or inferred.
//! - DALL-E: OpenAI's pickled `encoder.pkl` / `decoder.pkl` (whole `nn.Module`s) become one
//!   safetensors file with `dall_e`'s state-dict names, read by `beit_tokenizer::pkl::load_dalle_pkl`
//!   without executing the pickle.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use beit_model::load::{
    check_exact, expected_parameters, normalize_names, read_weights, Architecture,
};
use beit_model::save::save_hf;
use beit_model::segmentation::{
    expected_segmentation_parameters, normalize_segmentation_names, save_segmentation_hf,
    SegmentationConfig,
};
use beit_model::BeitConfig;
use beit_tokenizer::dalle::{DecoderConfig, EncoderConfig};
use beit_tokenizer::weights::{save_weights, WeightsFile};
use candle::Tensor;
use clap::{Args, ValueEnum};

/// Convert a checkpoint to Hugging Face-layout safetensors.
#[derive(Args, Debug)]
pub struct ConvertArgs {
    /// Input: a unilm/timm BEiT checkpoint (`.pth`, `.bin`, `.safetensors`), or DALL-E's
    /// `encoder.pkl` / `decoder.pkl`.
    pub input: PathBuf,
    /// Output: a model directory for BEiT (`config.json` + `model.safetensors`); a `.safetensors`
    /// file (or a directory to put `<input stem>.safetensors` in) for DALL-E.
    #[arg(short, long)]
    pub output: PathBuf,
    /// What the input is (default: `dalle` for `.pkl` files, `beit` otherwise).
    #[arg(long, value_enum)]
    pub kind: Option<Kind>,
    /// BEiT: the `config.json` to write (default: inferred from the tensor shapes, with unilm's
    /// LayerNorm eps 1e-6 and `LABEL_i` class names).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// BEiT classifiers: class names, one per line, in class-index order.
    #[arg(long, conflicts_with = "config")]
    pub labels: Option<PathBuf>,
}

/// Checkpoint families `convert` understands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Kind {
    /// A BEiT checkpoint (unilm, timm or HF key names).
    Beit,
    /// OpenAI's DALL-E dVAE encoder or decoder pickle.
    Dalle,
}

pub fn run(args: ConvertArgs) -> Result<()> {
    let kind = args.kind.unwrap_or_else(|| {
        if args
            .input
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("pkl"))
        {
            Kind::Dalle
        } else {
            Kind::Beit
        }
    });
    match kind {
        Kind::Beit => convert_beit(&args),
        Kind::Dalle => convert_dalle(&args.input, &args.output),
    }
}

fn convert_beit(args: &ConvertArgs) -> Result<()> {
    let input = &args.input;
    let raw = read_weights(input)?;
    if raw
        .keys()
        .any(|k| k.starts_with("decode_head.") || k.starts_with("backbone."))
    {
        return convert_segmentation(args, raw);
    }
    let tensors = normalize_names(raw);
    let arch = Architecture::detect(tensors.keys());
    let (cfg, origin) = match &args.config {
        Some(path) => (BeitConfig::from_file(path)?, path.display().to_string()),
        None => {
            let labels = match &args.labels {
                Some(path) => Some(read_labels(path)?),
                None => None,
            };
            (
                infer_config(&tensors, arch, labels.as_deref())
                    .with_context(|| format!("inferring a config for {}", input.display()))?,
                "inferred from the tensor shapes".to_string(),
            )
        }
    };
    let expected = expected_parameters(&cfg, arch)?;
    check_exact(&tensors, &expected, &input.display().to_string())?;
    save_hf(&args.output, &cfg, arch, &tensors)?;
    let params: usize = expected.values().map(|s| s.elem_count()).sum();
    println!(
        "{} -> {} ({}: {} tensors, {params} parameters; config {origin})",
        input.display(),
        args.output.display(),
        arch.hf_class(),
        expected.len(),
    );
    Ok(())
}

/// A unilm/mmseg UperNet checkpoint (`backbone.*`, `fpnN`, `decode_head.conv_seg`, ...; or
/// already HF-named) -> `BeitForSemanticSegmentation` in HF layout. Without `--config` the
/// config is inferred: the backbone from its shapes, the heads from theirs, and `out_indices`
/// from unilm's recipes ([3, 5, 7, 11] for 12 blocks, [7, 11, 15, 23] for 24, in unilm's
/// indexing), written in transformers' indexing (one more: the same blocks).
fn convert_segmentation(args: &ConvertArgs, raw: HashMap<String, Tensor>) -> Result<()> {
    let input = &args.input;
    let mut tensors = normalize_segmentation_names(raw);
    let (cfg, seg, origin) = match &args.config {
        Some(path) => {
            let cfg = BeitConfig::from_file(path)?;
            let seg = SegmentationConfig::from_config(&cfg)
                .with_context(|| format!("the segmentation fields of {}", path.display()))?;
            (cfg, seg, path.display().to_string())
        }
        None => {
            let labels = match &args.labels {
                Some(path) => Some(read_labels(path)?),
                None => None,
            };
            let (cfg, seg) =
                infer_segmentation_config(&tensors, labels.as_deref()).with_context(|| {
                    format!("inferring a segmentation config for {}", input.display())
                })?;
            (cfg, seg, "inferred from the tensor shapes".to_string())
        }
    };
    let mut cfg = cfg;
    seg.store(&mut cfg);
    let expected = expected_segmentation_parameters(&cfg)?;
    // mmseg drops nothing, but older checkpoints may lack the BatchNorm batch counters.
    for (name, shape) in &expected {
        if name.ends_with(".num_batches_tracked") && !tensors.contains_key(name) {
            tensors.insert(
                name.clone(),
                Tensor::zeros(shape, candle::DType::F32, &candle::Device::Cpu)?,
            );
        }
    }
    check_exact(&tensors, &expected, &input.display().to_string())?;
    save_segmentation_hf(&args.output, &cfg, &seg, &tensors)?;
    let params: usize = expected
        .iter()
        .filter(|(k, _)| !k.ends_with(".num_batches_tracked"))
        .map(|(_, s)| s.elem_count())
        .sum();
    println!(
        "{} -> {} (BeitForSemanticSegmentation: {} tensors, {params} values; out_indices {:?}; \
         config {origin})",
        input.display(),
        args.output.display(),
        expected.len(),
        seg.out_indices,
    );
    Ok(())
}

/// Backbone and head settings of a segmentation checkpoint (HF names) from its shapes.
fn infer_segmentation_config(
    tensors: &HashMap<String, Tensor>,
    labels: Option<&[String]>,
) -> Result<(BeitConfig, SegmentationConfig)> {
    const CLASSIFIER: &str = "decode_head.classifier.weight";
    let classes = tensors
        .get(CLASSIFIER)
        .map(|t| t.dims()[0])
        .with_context(|| {
            format!(
                "a segmentation checkpoint (backbone./decode_head. keys) without `{CLASSIFIER}`"
            )
        })?;
    let backbone: HashMap<String, Tensor> = tensors
        .iter()
        .filter(|(k, _)| k.starts_with("beit."))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let mut cfg = infer_config(&backbone, Architecture::Backbone, None)?;
    // The segmentation backbone has no pooler; transformers' ADE20K configs use mean pooling
    // (no final LayerNorm), as unilm's backbone has none.
    cfg.use_mean_pooling = true;
    let names: Vec<String> = match labels {
        Some(l) if l.len() == classes => l.to_vec(),
        Some(l) => bail!(
            "the label file has {} names but the decode head has {classes} classes",
            l.len()
        ),
        None => (0..classes).map(|i| format!("LABEL_{i}")).collect(),
    };
    cfg.set_labels(&names);
    let count = |prefix: &str, suffix: &str| {
        (0..)
            .take_while(|i| tensors.contains_key(&format!("{prefix}{i}{suffix}")))
            .count()
    };
    let unilm: Vec<usize> = match cfg.num_hidden_layers {
        12 => vec![3, 5, 7, 11],
        24 => vec![7, 11, 15, 23],
        l => bail!(
            "`out_indices` cannot be inferred for {l} blocks (unilm's recipes cover 12 and 24); \
             pass --config with them"
        ),
    };
    let defaults = SegmentationConfig::default();
    let aux = tensors.contains_key("auxiliary_head.classifier.weight");
    let seg = SegmentationConfig {
        out_indices: unilm.iter().map(|k| k + 1).collect(),
        pool_scales: match count("decode_head.psp_modules.", ".1.conv.weight") {
            4 => defaults.pool_scales.clone(),
            n => bail!("{n} pyramid pooling branches; pass --config with their `pool_scales`"),
        },
        use_auxiliary_head: aux,
        auxiliary_channels: tensors
            .get("auxiliary_head.convs.0.conv.weight")
            .map_or(defaults.auxiliary_channels, |t| t.dims()[0]),
        auxiliary_num_convs: count("auxiliary_head.convs.", ".conv.weight"),
        auxiliary_concat_input: tensors.contains_key("auxiliary_head.conv_cat.conv.weight"),
        ..defaults
    };
    seg.validate(&cfg)?;
    Ok((cfg, seg))
}

fn read_labels(path: &Path) -> Result<Vec<String>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect())
}

/// A `BeitConfig` that describes `tensors` (HF names): sizes from the shapes, position scheme and
/// head from which keys exist. unilm and timm train with LayerNorm eps 1e-6, so that is used.
fn infer_config(
    tensors: &HashMap<String, Tensor>,
    arch: Architecture,
    labels: Option<&[String]>,
) -> Result<BeitConfig> {
    let dims = |name: &str| -> Result<Vec<usize>> {
        tensors
            .get(name)
            .map(|t| t.dims().to_vec())
            .with_context(|| format!("the checkpoint has no `{name}`"))
    };
    let proj = dims("beit.embeddings.patch_embeddings.projection.weight")?;
    let [hidden, channels, patch, _] = proj[..] else {
        bail!("patch projection weight has shape {proj:?}, expected 4 dimensions");
    };
    let layers = (0..)
        .take_while(|i| {
            tensors.contains_key(&format!("beit.encoder.layer.{i}.layernorm_before.weight"))
        })
        .count();
    if layers == 0 {
        bail!("no `beit.encoder.layer.0.*` tensors: not a BEiT checkpoint");
    }
    let intermediate = dims("beit.encoder.layer.0.intermediate.dense.weight")?[0];
    const SHARED: &str = "beit.encoder.relative_position_bias.relative_position_bias_table";
    const PER_LAYER: &str =
        "beit.encoder.layer.0.attention.attention.relative_position_bias.relative_position_bias_table";
    const ABS: &str = "beit.embeddings.position_embeddings";
    let table = tensors.get(SHARED).or_else(|| tensors.get(PER_LAYER));
    let (grid, heads) = if let Some(t) = table {
        // (2W-1)^2 relative offsets plus 3 entries for cls->token, token->cls, cls->cls.
        let (rows, heads) = t.dims2()?;
        let side = ((rows.saturating_sub(3)) as f64).sqrt().round() as usize;
        let grid = side.div_ceil(2);
        if side * side + 3 != rows || 2 * grid != side + 1 {
            bail!("relative position table has {rows} rows, not (2W-1)^2 + 3 for any grid side W");
        }
        (grid, heads)
    } else if let Some(t) = tensors.get(ABS) {
        let n = t.dims3()?.1 - 1;
        let side = (n as f64).sqrt().round() as usize;
        if side * side != n {
            bail!("`{ABS}` holds {n} patch positions, not a square grid");
        }
        // Without a relative table the head count is not stored anywhere; ViT-B/L use 64-wide heads.
        (side, hidden / 64)
    } else {
        bail!("the checkpoint has neither relative position tables nor `{ABS}`");
    };
    let mut cfg = BeitConfig {
        hidden_size: hidden,
        num_hidden_layers: layers,
        num_attention_heads: heads.max(1),
        intermediate_size: intermediate,
        image_size: grid * patch,
        patch_size: patch,
        num_channels: channels,
        layer_norm_eps: 1e-6,
        use_mask_token: tensors.contains_key("beit.embeddings.mask_token"),
        use_absolute_position_embeddings: tensors.contains_key(ABS),
        use_relative_position_bias: tensors.contains_key(PER_LAYER),
        use_shared_relative_position_bias: tensors.contains_key(SHARED),
        layer_scale_init_value: if tensors.contains_key("beit.encoder.layer.0.lambda_1") {
            0.1
        } else {
            0.0
        },
        use_mean_pooling: arch == Architecture::MaskedImageModeling
            || tensors.contains_key("beit.pooler.layernorm.weight"),
        ..BeitConfig::default()
    };
    if let Some(t) = tensors.get("lm_head.weight") {
        cfg.vocab_size = t.dims()[0];
    }
    if let Some(t) = tensors.get("classifier.weight") {
        let classes = t.dims()[0];
        let names: Vec<String> = match labels {
            Some(l) if l.len() == classes => l.to_vec(),
            Some(l) => bail!(
                "the label file has {} names but the classifier has {classes} classes",
                l.len()
            ),
            None => (0..classes).map(|i| format!("LABEL_{i}")).collect(),
        };
        cfg.set_labels(&names);
    }
    cfg.validate()?;
    Ok(cfg)
}

fn convert_dalle(input: &Path, output: &Path) -> Result<()> {
    let tensors = beit_tokenizer::pkl::load_dalle_pkl(input)?;
    let weights = WeightsFile::from_tensors(input, tensors);
    // Check the tensors form a DALL-E encoder or decoder before writing anything.
    let what = match EncoderConfig::infer(&weights) {
        Ok(cfg) => format!(
            "encoder, vocabulary {}, {} groups",
            cfg.vocab_size, cfg.group_count
        ),
        Err(enc_err) => match DecoderConfig::infer(&weights) {
            Ok(cfg) => format!(
                "decoder, vocabulary {}, {} groups",
                cfg.vocab_size, cfg.group_count
            ),
            Err(dec_err) => bail!(
                "{} is neither a DALL-E encoder ({enc_err}) nor a decoder ({dec_err})",
                input.display()
            ),
        },
    };
    let path = if output.is_dir() {
        let stem = input
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("dalle");
        output.join(format!("{stem}.safetensors"))
    } else {
        output.to_path_buf()
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    save_weights(&weights.tensors, HashMap::new(), &path)?;
    println!(
        "{} -> {} (DALL-E {what}, {} tensors)",
        input.display(),
        path.display(),
        weights.tensors.len()
    );
    Ok(())
}
