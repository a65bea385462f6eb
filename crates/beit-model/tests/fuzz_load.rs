//! Fuzzing the checkpoint loaders with hostile files: safetensors (mutated files and generated
//! headers), `pytorch_model.bin` (mutated torch zip files), the pickle stream itself (mutated
//! `data.pkl` and random opcodes, through the guard and candle's pickle machine as the loader runs
//! them), `config.json` (generated and mutated, every family) and whole checkpoint directories.
//! None may panic, allocate beyond the declared limits, or fail without naming the file.
//!
//! CI runs a short pass; `cargo test -p beit-model --release --test fuzz_load -- --ignored` runs
//! 100,000 cases per target.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use beit_model::load::{expected_parameters, read_weights, Architecture, Checkpoint};
use beit_model::BeitConfig;
use beit_weights::{check_pickle, Allow};
use candle::{DType, Device, Tensor};
use common::fuzz;
use proptest::prelude::*;
use serde_json::{json, Value};

#[global_allocator]
static ALLOC: fuzz::Tracking = fuzz::Tracking;

/// No loader may allocate more than this for the small files fuzzed here.
const LIMIT: usize = 64 << 20;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn small_safetensors() -> Vec<u8> {
    let dev = Device::Cpu;
    let tensors: HashMap<String, Tensor> = [
        (
            "beit.embeddings.cls_token",
            Tensor::ones((1, 1, 4), DType::F32, &dev).unwrap(),
        ),
        (
            "classifier.weight",
            Tensor::ones((3, 4), DType::F16, &dev).unwrap(),
        ),
        (
            "classifier.bias",
            Tensor::zeros(3, DType::BF16, &dev).unwrap(),
        ),
        ("idx", Tensor::zeros(5, DType::I64, &dev).unwrap()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("s.safetensors");
    candle::safetensors::save(&tensors, &p).unwrap();
    std::fs::read(p).unwrap()
}

/// A safetensors file from a generated header: dtypes (some invalid), shapes (some huge) and
/// offsets (some inconsistent), and a declared header length that may lie.
fn generated_safetensors() -> impl Strategy<Value = Vec<u8>> {
    let dtype = prop_oneof![
        Just("F32"),
        Just("F16"),
        Just("BF16"),
        Just("I64"),
        Just("U8"),
        Just("F64"),
        Just("BOOL"),
        Just("F8_E4M3"),
        Just("Q4"),
        Just(""),
    ];
    let dim = prop_oneof![0usize..5, Just(usize::MAX), Just(1 << 31), Just(1 << 62)];
    let entry = (
        "[a-z.]{1,12}",
        dtype,
        prop::collection::vec(dim, 0..4),
        (0usize..64, 0usize..64),
    );
    (
        prop::collection::vec(entry, 0..4),
        prop::collection::vec(any::<u8>(), 0..64),
        prop_oneof![Just(None), any::<u64>().prop_map(Some)],
        any::<bool>(),
    )
        .prop_map(|(entries, data, declared, metadata)| {
            let mut header = serde_json::Map::new();
            for (name, dtype, shape, (a, b)) in entries {
                header.insert(
                    name,
                    json!({"dtype": dtype, "shape": shape, "data_offsets": [a, b]}),
                );
            }
            if metadata {
                header.insert("__metadata__".into(), json!({"format": "pt"}));
            }
            let text = Value::Object(header).to_string();
            let len = declared.unwrap_or(text.len() as u64);
            let mut out = len.to_le_bytes().to_vec();
            out.extend_from_slice(text.as_bytes());
            out.extend_from_slice(&data);
            out
        })
}

/// Write `bytes` to `name` in a fresh temporary directory, run `read_weights`.
fn read_file(
    name: &str,
    bytes: &[u8],
) -> (
    tempfile::TempDir,
    PathBuf,
    candle::Result<()>,
    Option<String>,
) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    std::fs::write(&path, bytes).unwrap();
    let res = read_weights(&path);
    let msg = res.as_ref().err().map(|e| e.to_string());
    if let Ok(tensors) = &res {
        let total: usize = tensors
            .values()
            .map(|t| t.elem_count() * t.dtype().size_in_bytes())
            .sum();
        assert!(
            total <= bytes.len(),
            "{total} tensor bytes from a {} byte file",
            bytes.len()
        );
    }
    (dir, path, Ok(()), msg)
}

fn check_named(msg: Option<String>, name: &str) -> Result<(), TestCaseError> {
    if let Some(m) = msg {
        prop_assert!(m.contains(name), "the error does not name the file: {m}");
    }
    Ok(())
}

fn safetensors_target(cases: u32) {
    let seed = small_safetensors();
    let strategy = prop_oneof![
        fuzz::edits().prop_map(move |e| fuzz::apply(&seed, &e)),
        generated_safetensors(),
    ];
    fuzz::run("safetensors", cases, strategy, |bytes| {
        let (_dir, _p, _, msg) = read_file("model.safetensors", &bytes);
        check_named(msg, "model.safetensors")?;
        fuzz::check_allocations(LIMIT, "safetensors")
    });
}

fn pytorch_bin_target(cases: u32) {
    let seed = std::fs::read(fixtures().join("family/fuzz_seeds/state_dict.bin")).unwrap();
    fuzz::run("pytorch_model.bin", cases, fuzz::edits(), |edits| {
        let bytes = fuzz::apply(&seed, &edits);
        let (_dir, _p, _, msg) = read_file("pytorch_model.bin", &bytes);
        check_named(msg, "pytorch_model.bin")?;
        fuzz::check_allocations(LIMIT, "pytorch_model.bin")
    });
}

/// What the loader does with a pickle stream: the guard, then (only if it passes) candle's
/// pickle machine and the tensor descriptions.
fn unpickle(bytes: &[u8]) {
    if check_pickle(bytes, 1, &Allow::default()).is_err() {
        return;
    }
    let mut stack = candle::pickle::Stack::empty();
    if stack.read_loop(&mut std::io::Cursor::new(bytes)).is_err() {
        return;
    }
    if let Ok(candle::pickle::Object::Dict(entries)) = stack.finalize() {
        for (k, v) in entries {
            let _ = v.into_tensor_info(k, Path::new("archive/data"));
        }
    }
}

fn opcode_soup() -> impl Strategy<Value = Vec<u8>> {
    // Random sequences of real opcodes with short arguments.
    let op = prop_oneof![
        prop::sample::select(
            b"()N.0t}]edsuaRbhqK\x85\x86\x87\x88\x89\x8f\x90\x91\x93\x94\x81".to_vec()
        )
        .prop_map(|o| vec![o]),
        "[a-z_.]{0,12}".prop_map(|s| {
            let mut v = vec![0x8c, s.len() as u8];
            v.extend(s.bytes());
            v
        }),
        any::<u32>().prop_map(|n| {
            let mut v = vec![b'J'];
            v.extend(n.to_le_bytes());
            v
        }),
        any::<u8>().prop_map(|n| vec![b'h', n]),
        any::<u8>().prop_map(|n| vec![b'q', n]),
        any::<u32>().prop_map(|n| {
            let mut v = vec![b'X'];
            v.extend(n.to_le_bytes());
            v
        }),
        Just(b"ctorch._utils\n_rebuild_tensor_v2\n".to_vec()),
        Just(b"ctorch\nFloatStorage\n".to_vec()),
        Just(b"ccollections\nOrderedDict\n".to_vec()),
    ];
    prop::collection::vec(op, 0..40).prop_map(|ops| {
        let mut out = vec![0x80, 2];
        for o in ops {
            out.extend(o);
        }
        out.push(b'.');
        out
    })
}

fn pickle_target(cases: u32) {
    let seeds: Vec<Vec<u8>> = ["data.pkl", "plain_protocol2.pkl"]
        .iter()
        .map(|n| std::fs::read(fixtures().join("family/fuzz_seeds").join(n)).unwrap())
        .collect();
    let strategy = prop_oneof![
        3 => (0..seeds.len(), fuzz::edits()).prop_map(move |(i, e)| fuzz::apply(&seeds[i], &e)),
        1 => opcode_soup(),
    ];
    fuzz::run("pickle stream", cases, strategy, |bytes| {
        unpickle(&bytes);
        fuzz::check_allocations(LIMIT, "pickle stream")
    });
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        prop_oneof![
            0u64..100,
            Just(0),
            Just(u64::MAX),
            Just(1 << 40),
            any::<u64>()
        ]
        .prop_map(|n| json!(n)),
        any::<i64>().prop_map(|n| json!(n)),
        prop_oneof![any::<f64>(), Just(1e-6), Just(0.9), Just(-1.0)].prop_map(|f| json!(f)),
        "[a-z_0-9]{0,10}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[a-z_0-9]{1,8}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

const KEYS: [&str; 24] = [
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "image_size",
    "patch_size",
    "num_channels",
    "vocab_size",
    "layer_norm_eps",
    "hidden_act",
    "use_mask_token",
    "use_absolute_position_embeddings",
    "use_relative_position_bias",
    "use_shared_relative_position_bias",
    "layer_scale_init_value",
    "use_mean_pooling",
    "id2label",
    "model_type",
    "architecture",
    "model_args",
    "num_classes",
    "global_pool",
    "label_names",
    "drop_path_rate",
];

fn config_json() -> impl Strategy<Value = String> {
    let real: Vec<String> = [
        "model/cls_per_layer/config.json",
        "family/timm_beitv2/config.json",
        "family/d2v_pt/config.json",
        "family/dit_mim/config.json",
    ]
    .iter()
    .map(|p| std::fs::read_to_string(fixtures().join(p)).unwrap())
    .collect();
    let generated =
        prop::collection::vec((prop::sample::select(KEYS.to_vec()), json_value()), 0..8).prop_map(
            |kv| {
                let mut m = serde_json::Map::new();
                for (k, v) in kv {
                    m.insert(k.to_string(), v);
                }
                Value::Object(m).to_string()
            },
        );
    // Real configs with one field replaced by a hostile value.
    let reals = real.clone();
    let replaced = (
        0..real.len(),
        prop::sample::select(KEYS.to_vec()),
        json_value(),
    )
        .prop_map(move |(i, k, v)| {
            let mut obj: Value = serde_json::from_str(&reals[i]).unwrap();
            obj[k] = v;
            obj.to_string()
        });
    let mutated = (0..real.len(), fuzz::edits()).prop_map(move |(i, e)| {
        String::from_utf8_lossy(&fuzz::apply(real[i].as_bytes(), &e)).into_owned()
    });
    prop_oneof![generated, replaced, mutated]
}

fn config_target(cases: u32) {
    fuzz::run("config.json", cases, config_json(), |text| {
        if let Ok(cfg) = BeitConfig::from_json_str(&text) {
            for arch in [
                Architecture::ImageClassification,
                Architecture::MaskedImageModeling,
                Architecture::Backbone,
            ] {
                let _ = expected_parameters(&cfg, arch);
            }
        }
        fuzz::check_allocations(LIMIT, "config.json")
    });
}

fn checkpoint_target(cases: u32) {
    let seed_dir = fixtures().join("family/dit_cls");
    let config = std::fs::read(seed_dir.join("config.json")).unwrap();
    let weights = std::fs::read(seed_dir.join("model.safetensors")).unwrap();
    let strategy = (any::<bool>(), fuzz::edits());
    fuzz::run(
        "checkpoint directory",
        cases,
        strategy,
        |(on_config, edits)| {
            let dir = tempfile::tempdir().unwrap();
            let (c, w) = if on_config {
                (fuzz::apply(&config, &edits), weights.clone())
            } else {
                (config.clone(), fuzz::apply(&weights, &edits))
            };
            std::fs::write(dir.path().join("config.json"), c).unwrap();
            std::fs::write(dir.path().join("model.safetensors"), w).unwrap();
            match Checkpoint::from_dir(dir.path()) {
                Ok(ck) => {
                    let _ = ck.classifier(&Device::Cpu);
                    let _ = ck.mim(&Device::Cpu);
                    let _ = ck.backbone(&Device::Cpu);
                }
                Err(e) => {
                    let m = e.to_string();
                    prop_assert!(
                        m.contains("config.json") || m.contains("model.safetensors"),
                        "the error names no file: {m}"
                    );
                }
            }
            fuzz::check_allocations(LIMIT, "checkpoint directory")
        },
    );
}

macro_rules! targets {
    ($($short:ident, $full:ident => $f:ident;)*) => {$(
        #[test]
        fn $short() {
            $f(fuzz::SHORT_CASES);
        }
        #[test]
        #[ignore = "100k cases: run with --release -- --ignored"]
        fn $full() {
            $f(fuzz::FULL_CASES);
        }
    )*};
}

targets! {
    fuzz_safetensors_short, fuzz_safetensors_100k => safetensors_target;
    fuzz_pytorch_bin_short, fuzz_pytorch_bin_100k => pytorch_bin_target;
    fuzz_pickle_short, fuzz_pickle_100k => pickle_target;
    fuzz_config_json_short, fuzz_config_json_100k => config_target;
    fuzz_checkpoint_dir_short, fuzz_checkpoint_dir_100k => checkpoint_target;
}

/// Regression: streams the 100k pickle run found (and their siblings) that made candle's pickle
/// machine index past the end of a tuple taken from the file (`Vec::remove` panicked). The
/// vendored candle-core checks the lengths (`vendor/candle-core-pickle-bounds.patch`): each is now
/// an error, and the guard plus the pickle machine, as the loader runs them, return without a panic.
#[test]
fn short_tuples_and_long_integers_in_a_pickle_are_errors() {
    let entry = |value: &[u8]| {
        // {"w": value} in protocol 2, with a dict built by MARK ... SETITEMS.
        let mut p = b"\x80\x02}(X\x01\x00\x00\x00w".to_vec();
        p.extend_from_slice(value);
        p.extend_from_slice(b"u.");
        p
    };
    let rebuild = b"ctorch._utils\n_rebuild_tensor_v2\n";
    let storage3 = b"(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000tQ";
    let mut cases: Vec<(&str, Vec<u8>)> = Vec::new();
    // _rebuild_tensor_v2 with 3 arguments instead of 6 (the crash the fuzzer found).
    let mut v = rebuild.to_vec();
    v.extend_from_slice(b"(K\x01K\x02K\x03tR");
    cases.push(("3 arguments", entry(&v)));
    // 4 arguments, but the storage reference has 3 fields instead of 5.
    let mut v = rebuild.to_vec();
    v.extend_from_slice(b"(");
    v.extend_from_slice(storage3);
    v.extend_from_slice(b"K\x00(K\x02t(K\x01ttR");
    cases.push(("short storage", entry(&v)));
    // _rebuild_from_type_v2 and _rebuild_parameter with too few arguments.
    let mut v = b"ctorch._tensor\n_rebuild_from_type_v2\n".to_vec();
    v.extend_from_slice(b"(K\x01K\x02tR");
    cases.push(("_rebuild_from_type_v2", entry(&v)));
    let mut v = b"ctorch._utils\n_rebuild_parameter\n".to_vec();
    v.extend_from_slice(b")R");
    cases.push(("_rebuild_parameter", entry(&v)));
    for (what, bytes) in &cases {
        unpickle(bytes);
        let mut stack = candle::pickle::Stack::empty();
        stack
            .read_loop(&mut std::io::Cursor::new(bytes))
            .unwrap_or_else(|e| panic!("{what}: the stream itself is valid: {e}"));
        let Ok(candle::pickle::Object::Dict(mut entries)) = stack.finalize() else {
            panic!("{what}: not a dict")
        };
        let (k, v) = entries.pop().unwrap();
        let e = v.into_tensor_info(k, Path::new("archive/data"));
        assert!(e.is_err(), "{what}: {e:?}");
    }
    // LONG1 with 9 and 40 bytes: more than an i64 holds (the shift overflowed, a panic in debug).
    for n in [9u8, 40] {
        let mut p = vec![0x80, 2, 0x8a, n];
        p.extend(std::iter::repeat_n(0xffu8, n as usize));
        p.push(b'.');
        unpickle(&p);
        let mut stack = candle::pickle::Stack::empty();
        assert!(stack.read_loop(&mut std::io::Cursor::new(&p)).is_err());
    }
}

#[test]
fn code_running_pickles_are_refused_naming_the_callable() {
    let dir = tempfile::tempdir().unwrap();
    // A bare pickle: GLOBAL os system, then REDUCE.
    let evil = dir.path().join("pytorch_model.bin");
    std::fs::write(&evil, b"cos\nsystem\n(S'touch /tmp/pwned'\ntR.").unwrap();
    let e = read_weights(&evil).unwrap_err().to_string();
    assert!(
        e.contains("`os.system`") && e.contains("pytorch_model.bin"),
        "{e}"
    );
    // The same inside a torch zip archive (what `torch.save` writes), with builtins.eval.
    let seed = std::fs::read(fixtures().join("family/fuzz_seeds/state_dict.bin")).unwrap();
    let mut zip_in = zip::ZipArchive::new(std::io::Cursor::new(seed)).unwrap();
    let mut out = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    for i in 0..zip_in.len() {
        let mut f = zip_in.by_index(i).unwrap();
        let name = f.name().unwrap().into_owned();
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut f, &mut data).unwrap();
        if name.ends_with("data.pkl") {
            data = b"\x80\x04\x8c\x08builtins\x94\x8c\x04eval\x94\x93\x8c\x061+1   \x85R.".to_vec();
        }
        out.start_file(name, zip::write::SimpleFileOptions::default())
            .unwrap();
        std::io::Write::write_all(&mut out, &data).unwrap();
    }
    let evil_zip = dir.path().join("evil.pth");
    std::fs::write(&evil_zip, out.finish().unwrap().into_inner()).unwrap();
    let e = read_weights(&evil_zip).unwrap_err().to_string();
    assert!(
        e.contains("`builtins.eval`") && e.contains("evil.pth"),
        "{e}"
    );
    // posix.system via STACK_GLOBAL in a bare pickle.
    let p = dir.path().join("model.bin");
    std::fs::write(
        &p,
        b"\x80\x04\x8c\x05posix\x94\x8c\x06system\x94\x93\x8c\x02id\x85R.",
    )
    .unwrap();
    let e = read_weights(&p).unwrap_err().to_string();
    assert!(e.contains("`posix.system`"), "{e}");
    // The genuine fixtures still load.
    assert!(
        !read_weights(&fixtures().join("family/fuzz_seeds/state_dict.bin"))
            .unwrap()
            .is_empty()
    );
}
