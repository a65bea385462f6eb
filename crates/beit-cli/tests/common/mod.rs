//! Helpers shared by beit-cli's end-to-end tests (each test binary uses its own subset).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The `beit-cli` binary, offline (hub ids never reach the network in tests: an empty cache) and
/// logging at `info` whatever the caller's environment says.
pub fn cli() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_beit-cli"));
    c.env("HF_HUB_OFFLINE", "1").env("BEIT_LOG", "info");
    c
}

/// `fixtures/<rel>` of the repository.
pub fn fixtures(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures")
        .join(rel)
}

/// Run `cmd`; fail the test with its stdout and stderr unless it succeeds.
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("beit-cli runs");
    assert!(
        out.status.success(),
        "beit-cli failed:\nstdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The records of `kind` (`step`, `eval`, ...) in `dir/metrics.jsonl`.
pub fn records(dir: &Path, kind: &str) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r["kind"] == kind)
        .collect()
}

/// A tiny from-scratch `finetune-seg` recipe: 2 blocks of width 16, patch 8, 32-px crops of
/// Fashion-MNIST mosaics, 2 epochs of 10 steps.
pub const TINY_SEGMENTATION: &str = r#"
device = "cpu"
[data]
source = "fashion-mnist"
iters_per_epoch = 10
fashion_train_images = 24
fashion_val_images = 4
[architecture]
hidden_size = 16
num_hidden_layers = 2
num_attention_heads = 2
intermediate_size = 32
patch_size = 8
[segmentation]
out_indices = [1, 2, 2, 2]
auxiliary_channels = 8
[train]
epochs = 2
batch_size = 4
lr = 1e-2
schedule = "poly"
warmup_epochs = 1
warmup_steps = 2
layer_decay = 0.9
seed = 1
log_every = 1
[aug]
crop_size = 32
scale = [128, 32]
eval_stride = 24
"#;

/// A frozen random dVAE (16 codes, 4x downsampling) in `beit-cli tokenizer train`'s layout.
pub fn tokenizer(dir: &Path) -> PathBuf {
    use beit_tokenizer::{Dvae, DvaeConfig};
    use candle::Device;
    let cfg = DvaeConfig {
        image_size: 16,
        channels: 3,
        vocab_size: 16,
        downsample: 4,
        n_hid: 8,
        n_init: 8,
        n_blk_per_group: 1,
    };
    let out = dir.join("tok");
    Dvae::new(&cfg, 3, &Device::Cpu)
        .unwrap()
        .export(&out)
        .unwrap();
    out
}
