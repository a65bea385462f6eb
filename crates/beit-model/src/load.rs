//! Reading checkpoints: HF layout (safetensors, sharded safetensors, `pytorch_model.bin`), unilm/timm
//! key names, strict validation against the config, and the fine-tuning adaptations of unilm
//! (shared -> per-layer relative tables, resizing to a new resolution, dropping a mismatched head).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{VarBuilder, VarMap};

use crate::config::BeitConfig;
use crate::error::{BeitError, Result};
use crate::heads::{BeitForImageClassification, BeitForMaskedImageModeling};
use crate::interpolate::{bicubic_weights, kron_2d};
use crate::model::BeitModel;
use crate::relative_position::{num_relative_distance, resize_table_geometric};

/// Weight file names looked for in a model directory, in order of preference.
pub const WEIGHT_FILES: [&str; 3] = [
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
];

/// Which head a set of parameters belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// `BeitForImageClassification` (`classifier.*`).
    ImageClassification,
    /// `BeitForMaskedImageModeling` (`lm_head.*`).
    MaskedImageModeling,
    /// `BeitModel` alone (`beit.*` with a pooler).
    Backbone,
}

impl Architecture {
    /// The `transformers` class name, for `config.json`'s `architectures`.
    pub fn hf_class(self) -> &'static str {
        match self {
            Self::ImageClassification => "BeitForImageClassification",
            Self::MaskedImageModeling => "BeitForMaskedImageModeling",
            Self::Backbone => "BeitModel",
        }
    }

    /// Guess from parameter names (HF names).
    pub fn detect(names: impl IntoIterator<Item = impl AsRef<str>>) -> Self {
        let mut arch = Self::Backbone;
        for n in names {
            match n.as_ref() {
                "lm_head.weight" => return Self::MaskedImageModeling,
                "classifier.weight" => arch = Self::ImageClassification,
                _ => {}
            }
        }
        arch
    }
}

/// A config plus its tensors (HF names), ready to build a model.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    /// The model config.
    pub config: BeitConfig,
    /// Parameters by HF name (index buffers removed, unilm/timm names mapped).
    pub tensors: HashMap<String, Tensor>,
    /// Where the tensors came from (for messages).
    pub source: PathBuf,
}

impl Checkpoint {
    /// Load `config.json` and the weights of a HF-layout model directory.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        if !dir.is_dir() {
            return Err(BeitError::Checkpoint {
                path: dir.to_path_buf(),
                message: "not a directory".into(),
            });
        }
        let config = BeitConfig::from_file(dir.join("config.json"))?;
        let weights = WEIGHT_FILES
            .iter()
            .map(|f| dir.join(f))
            .find(|p| p.is_file())
            .ok_or_else(|| BeitError::Checkpoint {
                path: dir.to_path_buf(),
                message: format!("no weights found (looked for {})", WEIGHT_FILES.join(", ")),
            })?;
        Self::from_files(config, &weights)
    }

    /// Pair a config with a weights file (`.safetensors`, `.safetensors.index.json`, `.bin`/`.pth`).
    pub fn from_files(config: BeitConfig, weights: &Path) -> Result<Self> {
        let raw = read_weights(weights)?;
        let tensors = normalize_names(raw);
        Ok(Self {
            config,
            tensors,
            source: weights.to_path_buf(),
        })
    }

    /// The head the tensors belong to.
    pub fn architecture(&self) -> Architecture {
        Architecture::detect(self.tensors.keys())
    }

    /// A classifier; the checkpoint must match the config exactly (strict).
    pub fn classifier(&self, device: &Device) -> Result<BeitForImageClassification> {
        let vb = self.strict_builder(Architecture::ImageClassification, device)?;
        Ok(BeitForImageClassification::new(&self.config, vb)?)
    }

    /// A MIM model; the checkpoint must match the config exactly (strict).
    pub fn mim(&self, device: &Device) -> Result<BeitForMaskedImageModeling> {
        let vb = self.strict_builder(Architecture::MaskedImageModeling, device)?;
        Ok(BeitForMaskedImageModeling::new(&self.config, vb)?)
    }

    /// The backbone (under `beit.`) of any checkpoint; head parameters are ignored.
    pub fn backbone(&self, device: &Device) -> Result<BeitModel> {
        let expected = expected_parameters(&self.config, Architecture::Backbone)?;
        let tensors: HashMap<String, Tensor> = self
            .tensors
            .iter()
            .filter(|(k, _)| k.starts_with("beit."))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        // A backbone from a MIM checkpoint has no pooler: build without one then.
        let with_pooler = expected
            .keys()
            .all(|k| !k.starts_with("beit.pooler") || tensors.contains_key(k));
        let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
        Ok(BeitModel::new(&self.config, vb.pp("beit"), with_pooler)?)
    }

    fn strict_builder(&self, arch: Architecture, device: &Device) -> Result<VarBuilder<'static>> {
        let expected = expected_parameters(&self.config, arch)?;
        check_exact(&self.tensors, &expected, &self.source.display().to_string())?;
        Ok(VarBuilder::from_tensors(
            self.tensors.clone(),
            DType::F32,
            device,
        ))
    }
}

/// Read every tensor of a weights file, by extension.
pub fn read_weights(path: &Path) -> Result<HashMap<String, Tensor>> {
    let err = |message: String| BeitError::Checkpoint {
        path: path.to_path_buf(),
        message,
    };
    if !path.is_file() {
        return Err(err("file not found".into()));
    }
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    if name.ends_with(".index.json") {
        return read_sharded(path);
    }
    if name.ends_with(".safetensors") {
        return candle::safetensors::load(path, &Device::Cpu).map_err(|e| err(e.to_string()));
    }
    if name.ends_with(".bin") || name.ends_with(".pth") || name.ends_with(".pt") {
        guard_torch_file(path)?;
        // unilm keeps the state dict under "model"; some trainers use "state_dict" or "module".
        let mut last_error = String::new();
        for key in [None, Some("model"), Some("state_dict"), Some("module")] {
            match candle::pickle::read_all_with_key(path, key) {
                Ok(list) if !list.is_empty() => return Ok(list.into_iter().collect()),
                Ok(_) => last_error = "no tensors found".into(),
                Err(e) => last_error = e.to_string(),
            }
        }
        return Err(err(format!(
            "not a readable PyTorch state dict ({last_error})"
        )));
    }
    Err(err(
        "unknown weights format (expected .safetensors, .safetensors.index.json, .bin or .pth)"
            .into(),
    ))
}

/// Largest pickle (`data.pkl`, or the head of a non-zip file) scanned by [`guard_torch_file`]; a
/// state dict's pickle is a few hundred KB.
const MAX_PICKLE_BYTES: u64 = 256 << 20;

/// Refuse a PyTorch file whose pickle names anything but tensor-rebuilding and container types
/// (see [`beit_weights::pickle_guard`]): `os.system`, `builtins.eval`, ... are named in the error.
pub fn guard_torch_file(path: &Path) -> Result<()> {
    use std::io::Read;
    let err = |message: String| BeitError::Checkpoint {
        path: path.to_path_buf(),
        message,
    };
    let mut file = std::fs::File::open(path).map_err(|e| err(e.to_string()))?;
    let mut magic = [0u8; 4];
    let n = file.read(&mut magic).map_err(|e| err(e.to_string()))?;
    let allow = beit_weights::pickle_guard::Allow::default();
    if n == 4 && magic == *b"PK\x03\x04" {
        let file = std::fs::File::open(path).map_err(|e| err(e.to_string()))?;
        let mut zip = zip::ZipArchive::new(std::io::BufReader::new(file))
            .map_err(|e| err(format!("not a readable zip archive: {e}")))?;
        for i in 0..zip.len() {
            let mut entry = zip
                .by_index(i)
                .map_err(|e| err(format!("zip entry {i}: {e}")))?;
            let entry_name = entry
                .name()
                .map(|n| n.into_owned())
                .map_err(|e| err(format!("zip entry {i}: {e}")))?;
            if !entry_name.ends_with(".pkl") {
                continue;
            }
            let mut bytes = Vec::new();
            (&mut entry)
                .take(MAX_PICKLE_BYTES)
                .read_to_end(&mut bytes)
                .map_err(|e| err(format!("{entry_name}: {e}")))?;
            beit_weights::pickle_guard::check_pickle(&bytes, 1, &allow)
                .map_err(|m| err(format!("{entry_name}: {m}")))?;
        }
        Ok(())
    } else {
        // A bare pickle (or the legacy layout: a few pickles, then raw storages).
        let mut bytes = Vec::new();
        std::fs::File::open(path)
            .map_err(|e| err(e.to_string()))?
            .take(MAX_PICKLE_BYTES)
            .read_to_end(&mut bytes)
            .map_err(|e| err(e.to_string()))?;
        beit_weights::pickle_guard::check_pickle(&bytes, 5, &allow).map_err(err)
    }
}

fn read_sharded(index: &Path) -> Result<HashMap<String, Tensor>> {
    let err = |message: String| BeitError::Checkpoint {
        path: index.to_path_buf(),
        message,
    };
    let text = std::fs::read_to_string(index).map_err(|e| err(e.to_string()))?;
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| err(e.to_string()))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| err("no `weight_map` object".into()))?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let shards: BTreeSet<&str> = map.values().filter_map(|v| v.as_str()).collect();
    let mut all = HashMap::new();
    for shard in shards {
        let path = dir.join(shard);
        all.extend(candle::safetensors::load(&path, &Device::Cpu).map_err(|e| {
            BeitError::Checkpoint {
                path: path.clone(),
                message: e.to_string(),
            }
        })?);
    }
    for name in map.keys() {
        if !all.contains_key(name) {
            return Err(err(format!(
                "`{name}` is listed in the index but missing from its shard"
            )));
        }
    }
    Ok(all)
}

/// Map any supported naming to HF `transformers` checkpoint names and drop index buffers.
///
/// Recognised: HF names (kept); data2vec-vision names (`data2vec_vision.` -> `beit.`); a backbone
/// saved without prefix (`embeddings.*`, `encoder.*`, `layernorm.*` -> `beit.*`); unilm/timm names (`blocks.N.attn.qkv.weight` + `q_bias`/`v_bias`,
/// `gamma_1/2`, `norm`, `fc_norm`, `head`, `rel_pos_bias.*`); and the in-memory names of
/// `transformers` >= 5 (`beit.layers.N.attention.q_proj`, `mlp.fc1`, `shared_position_bias`).
pub fn normalize_names(tensors: HashMap<String, Tensor>) -> HashMap<String, Tensor> {
    let unilm = tensors
        .keys()
        .any(|k| k.starts_with("blocks.") || k == "patch_embed.proj.weight");
    let has_lm_head = tensors.contains_key("lm_head.weight");
    // A backbone saved alone (`BeitModel` / `Data2VecVisionModel.save_pretrained`, e.g. the
    // data2vec-vision pre-trained checkpoints) has no `beit.` prefix: add it.
    let headless = !tensors
        .keys()
        .any(|k| k.starts_with("beit.") || k.starts_with("data2vec_vision."))
        && tensors
            .keys()
            .any(|k| k.starts_with("embeddings.") || k.starts_with("encoder."));
    let mut out = HashMap::new();
    for (name, t) in tensors {
        let name = name.strip_prefix("module.").unwrap_or(&name).to_string();
        if name.ends_with("relative_position_index") || name.ends_with("attn.k_bias") {
            continue;
        }
        if unilm {
            if let Some(rest) = name.strip_suffix("attn.qkv.weight") {
                // Rows [0:C] = q, [C:2C] = k, [2C:3C] = v.
                let layer = hf_layer_prefix(rest);
                if let (Ok(rows), Some(layer)) = (t.dim(0), layer) {
                    let c = rows / 3;
                    for (i, part) in ["query", "key", "value"].iter().enumerate() {
                        if let Ok(w) = t.narrow(0, i * c, c) {
                            out.insert(format!("{layer}attention.attention.{part}.weight"), w);
                        }
                    }
                    continue;
                }
            }
            out.insert(map_unilm_name(&name, has_lm_head), t);
        } else {
            let name = if let Some(rest) = name.strip_prefix("data2vec_vision.") {
                format!("beit.{rest}")
            } else if headless
                && [
                    "embeddings.",
                    "encoder.",
                    "layernorm.",
                    "pooler.",
                    "layers.",
                ]
                .iter()
                .any(|p| name.starts_with(p))
            {
                format!("beit.{name}")
            } else {
                name
            };
            out.insert(map_v5_name(&name), t);
        }
    }
    out
}

/// `blocks.3.` -> `beit.encoder.layer.3.`.
fn hf_layer_prefix(unilm_prefix: &str) -> Option<String> {
    let idx = unilm_prefix.strip_prefix("blocks.")?.strip_suffix('.')?;
    idx.parse::<usize>()
        .ok()
        .map(|i| format!("beit.encoder.layer.{i}."))
}

fn map_unilm_name(name: &str, has_lm_head: bool) -> String {
    const TOP: [(&str, &str); 9] = [
        ("cls_token", "beit.embeddings.cls_token"),
        ("mask_token", "beit.embeddings.mask_token"),
        ("pos_embed", "beit.embeddings.position_embeddings"),
        (
            "patch_embed.proj.",
            "beit.embeddings.patch_embeddings.projection.",
        ),
        ("rel_pos_bias.", "beit.encoder.relative_position_bias."),
        ("fc_norm.", "beit.pooler.layernorm."),
        ("head.", "classifier."),
        ("lm_head.", "lm_head."),
        ("norm.", "@norm."),
    ];
    if let Some(rest) = name.strip_prefix("blocks.") {
        if let Some((idx, tail)) = rest.split_once('.') {
            const BLOCK: [(&str, &str); 11] = [
                ("norm1.", "layernorm_before."),
                ("norm2.", "layernorm_after."),
                ("attn.q_bias", "attention.attention.query.bias"),
                ("attn.v_bias", "attention.attention.value.bias"),
                (
                    "attn.relative_position_bias_table",
                    "attention.attention.relative_position_bias.relative_position_bias_table",
                ),
                ("attn.proj.", "attention.output.dense."),
                ("mlp.fc1.", "intermediate.dense."),
                ("mlp.fc2.", "output.dense."),
                ("gamma_1", "lambda_1"),
                ("gamma_2", "lambda_2"),
                ("ls1.gamma", "lambda_1"),
            ];
            for (from, to) in BLOCK {
                if let Some(t) = tail.strip_prefix(from) {
                    return format!("beit.encoder.layer.{idx}.{to}{t}");
                }
            }
            if let Some(t) = tail.strip_prefix("ls2.gamma") {
                return format!("beit.encoder.layer.{idx}.lambda_2{t}");
            }
        }
        return name.to_string();
    }
    for (from, to) in TOP {
        if let Some(t) = name.strip_prefix(from) {
            if to == "@norm." {
                // The final norm is the MIM head's LayerNorm in pre-training checkpoints, the
                // backbone's last LayerNorm (CLS pooling) otherwise.
                let target = if has_lm_head {
                    "layernorm."
                } else {
                    "beit.layernorm."
                };
                return format!("{target}{t}");
            }
            return format!("{to}{t}");
        }
    }
    name.to_string()
}

fn map_v5_name(name: &str) -> String {
    let Some(rest) = name.strip_prefix("beit.layers.") else {
        return name.replace(
            "beit.shared_position_bias.",
            "beit.encoder.relative_position_bias.",
        );
    };
    let Some((idx, tail)) = rest.split_once('.') else {
        return name.to_string();
    };
    const V5: [(&str, &str); 7] = [
        ("attention.q_proj.", "attention.attention.query."),
        ("attention.k_proj.", "attention.attention.key."),
        ("attention.v_proj.", "attention.attention.value."),
        ("attention.o_proj.", "attention.output.dense."),
        ("mlp.fc1.", "intermediate.dense."),
        ("mlp.fc2.", "output.dense."),
        (
            "relative_position_bias.",
            "attention.attention.relative_position_bias.",
        ),
    ];
    for (from, to) in V5 {
        if let Some(t) = tail.strip_prefix(from) {
            return format!("beit.encoder.layer.{idx}.{to}{t}");
        }
    }
    format!("beit.encoder.layer.{idx}.{tail}")
}

/// The parameters (name -> shape) a model of `arch` built from `cfg` expects.
pub fn expected_parameters(
    cfg: &BeitConfig,
    arch: Architecture,
) -> Result<BTreeMap<String, Shape>> {
    let recorder = Recorder::default();
    {
        let vb = VarBuilder::from_backend(Box::new(recorder.clone()), DType::F32, Device::Cpu);
        match arch {
            Architecture::ImageClassification => drop(BeitForImageClassification::new(cfg, vb)?),
            Architecture::MaskedImageModeling => drop(BeitForMaskedImageModeling::new(cfg, vb)?),
            Architecture::Backbone => drop(BeitModel::new(cfg, vb.pp("beit"), true)?),
        }
    }
    let seen = recorder.0.lock().expect("recorder lock").clone();
    Ok(seen)
}

/// A VarBuilder backend that records what the model asks for and hands out zeros (one broadcast
/// scalar: nothing of the parameter's size is allocated).
#[derive(Clone, Default)]
struct Recorder(std::sync::Arc<Mutex<BTreeMap<String, Shape>>>);

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
        Tensor::zeros((), dtype, dev)?.broadcast_as(s)
    }
    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle::Result<Tensor> {
        candle::bail!("recorder cannot provide `{name}` without a shape")
    }
    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

/// Fail with one message listing every missing key, unexpected key and shape mismatch.
pub fn check_exact(
    tensors: &HashMap<String, Tensor>,
    expected: &BTreeMap<String, Shape>,
    source: &str,
) -> Result<()> {
    let mut lines = Vec::new();
    for (name, shape) in expected {
        match tensors.get(name) {
            None => lines.push(format!(
                "  missing key `{name}` (expected shape {:?})",
                shape.dims()
            )),
            Some(t) if t.shape() != shape => lines.push(format!(
                "  shape mismatch for `{name}`: checkpoint {:?}, config expects {:?}",
                t.dims(),
                shape.dims()
            )),
            Some(_) => {}
        }
    }
    let mut unexpected: Vec<&String> = tensors
        .keys()
        .filter(|k| !expected.contains_key(*k))
        .collect();
    unexpected.sort();
    for name in unexpected {
        lines.push(format!("  unexpected key `{name}`"));
    }
    if lines.is_empty() {
        return Ok(());
    }
    if tensors.contains_key("beit.encoder.relative_position_bias.relative_position_bias_table")
        && expected
            .keys()
            .any(|k| k.ends_with("attention.relative_position_bias.relative_position_bias_table"))
    {
        lines.push(
            "  hint: the checkpoint has a shared relative position table (pre-training); load it for \
             fine-tuning, which copies it into every layer"
                .into(),
        );
    }
    Err(BeitError::Mismatch {
        source_name: source.to_string(),
        report: lines.join("\n"),
    })
}

/// What [`adapt_for_finetuning`] and [`load_into_varmap`] did, for the log.
#[derive(Debug, Default, Clone)]
pub struct LoadReport {
    /// Parameters taken from the checkpoint.
    pub loaded: Vec<String>,
    /// Parameters the model has but the checkpoint lacks (left at their initial values).
    pub missing: Vec<String>,
    /// Checkpoint tensors the model does not use.
    pub unused: Vec<String>,
    /// Adaptations made (copies, resizes, dropped heads), one sentence each.
    pub notes: Vec<String>,
}

/// unilm's checkpoint surgery before fine-tuning a model of `cfg` / `arch`:
/// a shared relative table is copied into every layer when the model uses per-layer tables;
/// relative tables of another resolution are resized with the geometric-grid cubic interpolation;
/// absolute position embeddings bicubically; a head whose shape differs is dropped.
pub fn adapt_for_finetuning(
    cfg: &BeitConfig,
    arch: Architecture,
    mut tensors: HashMap<String, Tensor>,
) -> Result<(HashMap<String, Tensor>, LoadReport)> {
    let mut report = LoadReport::default();
    let expected = expected_parameters(cfg, arch)?;
    unshare_relative_tables(cfg, &mut tensors, &mut report);
    resize_relative_tables(cfg, &mut tensors, &mut report)?;
    resize_position_embeddings(cfg, &mut tensors, &mut report)?;
    drop_mismatched_head(&expected, &mut tensors, &mut report);
    keep_expected(&expected, &mut tensors, &mut report)?;
    Ok((tensors, report))
}

type Tensors = HashMap<String, Tensor>;

/// A shared relative table copied into every layer, when the model has per-layer tables and the
/// checkpoint only the shared one (kept too when the model also uses a shared table).
fn unshare_relative_tables(cfg: &BeitConfig, tensors: &mut Tensors, report: &mut LoadReport) {
    let shared_key = "beit.encoder.relative_position_bias.relative_position_bias_table";
    let layer_key = |i: usize| {
        format!("beit.encoder.layer.{i}.attention.attention.relative_position_bias.relative_position_bias_table")
    };
    if cfg.use_relative_position_bias && !tensors.contains_key(&layer_key(0)) {
        if let Some(shared) = tensors.get(shared_key).cloned() {
            for i in 0..cfg.num_hidden_layers {
                tensors.insert(layer_key(i), shared.clone());
            }
            if !cfg.use_shared_relative_position_bias {
                tensors.remove(shared_key);
            }
            report
                .notes
                .push("copied the shared relative position table into every layer".into());
        }
    }
}

/// Relative tables of another resolution resized to the model's grid (geometric cubic).
fn resize_relative_tables(
    cfg: &BeitConfig,
    tensors: &mut Tensors,
    report: &mut LoadReport,
) -> Result<()> {
    let grid = cfg.grid_size();
    let want_rows = num_relative_distance((grid, grid));
    let table_names: Vec<String> = tensors
        .keys()
        .filter(|k| k.ends_with("relative_position_bias_table"))
        .cloned()
        .collect();
    for name in table_names {
        let t = &tensors[&name];
        if t.dim(0)? != want_rows {
            let from = t.dim(0)?;
            let resized = resize_table_geometric(t, grid)?;
            tensors.insert(name.clone(), resized);
            report.notes.push(format!(
                "resized `{name}` from {from} to {want_rows} rows (geometric cubic)"
            ));
        }
    }
    Ok(())
}

/// Absolute position embeddings of another square grid resized bicubically (the CLS row kept).
fn resize_position_embeddings(
    cfg: &BeitConfig,
    tensors: &mut Tensors,
    report: &mut LoadReport,
) -> Result<()> {
    let grid = cfg.grid_size();
    let pos_key = "beit.embeddings.position_embeddings";
    let Some(pos) = tensors.get(pos_key).cloned() else {
        return Ok(());
    };
    let n = pos.dim(1)? - 1;
    let g0 = (n as f64).sqrt().round() as usize;
    if n != cfg.num_patches() && g0 * g0 == n {
        let m = kron_2d(
            &bicubic_weights(g0, grid),
            g0,
            grid,
            &bicubic_weights(g0, grid),
            g0,
            grid,
        );
        let m = Tensor::from_vec(m, (grid * grid, g0 * g0), pos.device())?;
        let patches = m.matmul(&pos.narrow(1, 1, n)?.squeeze(0)?.to_dtype(DType::F32)?)?;
        let resized = Tensor::cat(
            &[
                &pos.narrow(1, 0, 1)?.to_dtype(DType::F32)?,
                &patches.unsqueeze(0)?,
            ],
            1,
        )?;
        tensors.insert(pos_key.to_string(), resized);
        report.notes.push(format!(
            "resized `{pos_key}` from {g0}x{g0} to {grid}x{grid} (bicubic)"
        ));
    }
    Ok(())
}

/// A classifier head whose shape differs from the model's is dropped (the model keeps its init).
fn drop_mismatched_head(
    expected: &BTreeMap<String, Shape>,
    tensors: &mut Tensors,
    report: &mut LoadReport,
) {
    for head in ["classifier.weight", "classifier.bias"] {
        if let (Some(t), Some(shape)) = (tensors.get(head), expected.get(head)) {
            if t.shape() != shape {
                report.notes.push(format!(
                    "dropped `{head}` of shape {:?} (the model needs {:?}); it starts from its init",
                    t.dims(),
                    shape.dims()
                ));
                tensors.remove(head);
            }
        }
    }
}

/// Sort the tensors into loaded / missing / unused against the model's parameters, keep only
/// the expected ones, and refuse any other shape mismatch by name.
fn keep_expected(
    expected: &BTreeMap<String, Shape>,
    tensors: &mut Tensors,
    report: &mut LoadReport,
) -> Result<()> {
    for (name, shape) in expected {
        match tensors.get(name) {
            Some(t) if t.shape() == shape => report.loaded.push(name.clone()),
            Some(t) => {
                return Err(BeitError::Mismatch {
                    source_name: "checkpoint".into(),
                    report: format!(
                        "  shape mismatch for `{name}`: checkpoint {:?}, config expects {:?}",
                        t.dims(),
                        shape.dims()
                    ),
                })
            }
            None => report.missing.push(name.clone()),
        }
    }
    report.unused = tensors
        .keys()
        .filter(|k| !expected.contains_key(*k))
        .cloned()
        .collect();
    report.unused.sort();
    tensors.retain(|k, _| expected.contains_key(k));
    Ok(())
}

/// Overwrite the variables of `varmap` with the tensors of the same name (shapes must match).
/// Variables without a tensor keep their values; the report lists both.
pub fn load_into_varmap(varmap: &VarMap, tensors: &HashMap<String, Tensor>) -> Result<LoadReport> {
    let mut report = LoadReport::default();
    let vars = varmap.data().lock().expect("varmap lock");
    let mut names: Vec<&String> = vars.keys().collect();
    names.sort();
    for name in names {
        let var = &vars[name];
        match tensors.get(name) {
            Some(t) => {
                if t.shape() != var.shape() {
                    return Err(BeitError::Mismatch {
                        source_name: "checkpoint".into(),
                        report: format!(
                            "  shape mismatch for `{name}`: checkpoint {:?}, model {:?}",
                            t.dims(),
                            var.dims()
                        ),
                    });
                }
                var.set(&t.to_dtype(var.dtype())?.to_device(var.device())?)?;
                report.loaded.push(name.clone());
            }
            None => report.missing.push(name.clone()),
        }
    }
    report.unused = tensors
        .keys()
        .filter(|k| !vars.contains_key(*k))
        .cloned()
        .collect();
    report.unused.sort();
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> BeitConfig {
        BeitConfig {
            hidden_size: 8,
            num_hidden_layers: 2,
            num_attention_heads: 2,
            intermediate_size: 16,
            image_size: 8,
            patch_size: 4,
            vocab_size: 10,
            ..BeitConfig::default()
        }
    }

    #[test]
    fn expected_parameters_follow_hf_names_and_counts() -> Result<()> {
        let mim = expected_parameters(
            &BeitConfig::base_patch16_224_pt22k(),
            Architecture::MaskedImageModeling,
        )?;
        assert_eq!(mim.len(), 213, "reference §3.2 counts 213 tensors");
        let n: usize = mim.values().map(|s| s.elem_count()).sum();
        assert_eq!(n, 91_965_776, "reference §1: base MIM parameter count");
        let cls = expected_parameters(
            &BeitConfig::base_patch16_224(),
            Architecture::ImageClassification,
        )?;
        assert_eq!(cls.len(), 223);
        let n: usize = cls.values().map(|s| s.elem_count()).sum();
        assert_eq!(n, 86_530_984);
        assert_eq!(
            cls["beit.encoder.layer.0.attention.attention.relative_position_bias.relative_position_bias_table"].dims(),
            &[732, 12]
        );
        Ok(())
    }

    #[test]
    fn unilm_names_map_to_hf() {
        let dev = Device::Cpu;
        let t = |n: usize| Tensor::zeros(n, DType::F32, &dev).unwrap();
        let raw: HashMap<String, Tensor> = [
            (
                "blocks.1.attn.qkv.weight",
                Tensor::zeros((24, 8), DType::F32, &dev).unwrap(),
            ),
            ("blocks.1.attn.q_bias", t(8)),
            ("blocks.1.gamma_2", t(8)),
            ("blocks.1.attn.relative_position_index", t(4)),
            ("fc_norm.weight", t(8)),
            ("head.bias", t(3)),
            ("norm.weight", t(8)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let out = normalize_names(raw);
        for k in [
            "beit.encoder.layer.1.attention.attention.query.weight",
            "beit.encoder.layer.1.attention.attention.key.weight",
            "beit.encoder.layer.1.attention.attention.value.weight",
            "beit.encoder.layer.1.attention.attention.query.bias",
            "beit.encoder.layer.1.lambda_2",
            "beit.pooler.layernorm.weight",
            "classifier.bias",
            "beit.layernorm.weight",
        ] {
            assert!(out.contains_key(k), "missing {k}: {:?}", out.keys());
        }
        assert_eq!(out.len(), 8, "the index buffer is dropped");
    }

    #[test]
    fn mismatch_report_lists_everything() -> Result<()> {
        let cfg = tiny();
        let expected = expected_parameters(&cfg, Architecture::ImageClassification)?;
        let mut tensors: HashMap<String, Tensor> = expected
            .iter()
            .map(|(k, s)| {
                (
                    k.clone(),
                    Tensor::zeros(s, DType::F32, &Device::Cpu).unwrap(),
                )
            })
            .collect();
        tensors.remove("beit.encoder.layer.1.lambda_1");
        tensors.insert(
            "classifier.weight".into(),
            Tensor::zeros((5, 8), DType::F32, &Device::Cpu)?,
        );
        tensors.insert(
            "extra.thing".into(),
            Tensor::zeros(1, DType::F32, &Device::Cpu)?,
        );
        let err = check_exact(&tensors, &expected, "x.safetensors")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("missing key `beit.encoder.layer.1.lambda_1`"),
            "{err}"
        );
        assert!(
            err.contains("shape mismatch for `classifier.weight`"),
            "{err}"
        );
        assert!(err.contains("unexpected key `extra.thing`"), "{err}");
        assert!(err.contains("x.safetensors"), "{err}");
        Ok(())
    }

    #[test]
    fn shared_table_is_copied_into_layers_for_finetuning() -> Result<()> {
        let mut pre = tiny();
        pre.use_shared_relative_position_bias = true;
        pre.use_mask_token = true;
        pre.image_size = 12; // 3x3 grid
        let mim = expected_parameters(&pre, Architecture::MaskedImageModeling)?;
        let tensors: HashMap<String, Tensor> = mim
            .iter()
            .map(|(k, s)| (k.clone(), Tensor::rand(0f32, 1., s, &Device::Cpu).unwrap()))
            .collect();
        let shared =
            tensors["beit.encoder.relative_position_bias.relative_position_bias_table"].clone();
        let mut ft = tiny();
        ft.use_relative_position_bias = true;
        ft.image_size = 20; // 5x5 grid: tables resized from 3x3
        let (out, report) = adapt_for_finetuning(&ft, Architecture::ImageClassification, tensors)?;
        let layer1 = &out["beit.encoder.layer.1.attention.attention.relative_position_bias.relative_position_bias_table"];
        assert_eq!(layer1.dims(), &[num_relative_distance((5, 5)), 2]);
        // The 3 CLS rows are carried over unchanged.
        let tail = layer1
            .narrow(0, 81, 3)?
            .sub(&shared.narrow(0, 25, 3)?)?
            .abs()?
            .sum_all()?;
        assert_eq!(tail.to_scalar::<f32>()?, 0.0);
        assert!(report.missing.iter().any(|k| k.starts_with("classifier")));
        assert!(report.unused.iter().any(|k| k.starts_with("lm_head")));
        assert!(!report.notes.is_empty());
        Ok(())
    }
}
