//! The GPU's code path on the CPU: on CUDA the fused CPU kernels of beit-kernels are off and
//! candle's plain ops run, which `BEIT_FUSED_OPS=0` selects on the CPU too. Each recipe
//! (`pretrain`, `finetune`, `finetune-seg`, `tokenizer train`) runs a few steps of a tiny model
//! both ways, and the step losses of `metrics.jsonl` agree to a relative 1e-4 (the two paths sum
//! in different orders; nothing else differs).

mod common;

use common::{cli, records, run_ok, tokenizer};
use std::path::Path;
use std::process::Command;

/// The largest relative difference the two paths may show in a step loss.
const TOLERANCE: f64 = 1e-4;

/// 16 px images, 4 px patches, 2 blocks of width 16, 3 steps with drop path.
const PRETRAIN: &str = r#"
device = "cpu"
[architecture]
hidden_size = 16
num_hidden_layers = 2
num_attention_heads = 2
intermediate_size = 32
image_size = 16
patch_size = 4
[data]
source = "fashion-mnist"
max_train_samples = 24
num_workers = 1
[masking]
num_masking_patches = 6
[train]
drop_path_rate = 0.1
epochs = 1
batch_size = 8
lr = 3e-3
warmup_epochs = 0
log_every = 1
"#;

/// The full fine-tuning recipe (RandAugment, mixup/CutMix, random erasing, drop path, layer
/// decay, clipping) on a 2-block width-16 model from scratch, 3 steps.
const FINETUNE: &str = r#"
device = "cpu"
[data]
source = "fashion-mnist"
max_train_samples = 24
max_val_samples = 8
num_workers = 1
[architecture]
hidden_size = 16
num_hidden_layers = 2
num_attention_heads = 2
intermediate_size = 32
patch_size = 8
[train]
epochs = 1
batch_size = 8
lr = 4e-3
warmup_steps = 1
warmup_epochs = 0
layer_decay = 0.65
drop_path_rate = 0.1
label_smoothing = 0.1
clip_grad = 5.0
seed = 7
log_every = 1
[aug]
input_size = 32
auto_augment = "rand-m9-mstd0.5-inc1"
reprob = 0.25
mixup = 0.8
cutmix = 1.0
eval_resize = "squash"
"#;

/// 28 px Fashion-MNIST images, a 7x7 grid of 8 codes, 3 steps.
const TOKENIZER: &str = "[architecture]\nimage_size = 28\nchannels = 3\nvocab_size = 8\n\
downsample = 4\nn_hid = 8\nn_init = 8\nn_blk_per_group = 1\n\n[data]\nmax_train_samples = 32\n\n\
[train]\nepochs = 1\nbatch_size = 4\nwarmup_steps = 1\nlog_every = 1\n";

/// Run `args` (with `--output DIR` appended) once with the fused kernels and once with
/// `BEIT_FUSED_OPS=0`; return the step losses of each run.
fn both_paths(tmp: &Path, name: &str, args: &[&str]) -> (Vec<f64>, Vec<f64>) {
    let losses = |fused: bool| {
        let out = tmp.join(format!("{name}-{}", if fused { "fused" } else { "plain" }));
        let mut c: Command = cli();
        c.args(args).arg("--output").arg(&out);
        c.env("BEIT_FUSED_OPS", if fused { "1" } else { "0" });
        run_ok(&mut c);
        records(&out, "step")
            .iter()
            .map(|r| r["loss"].as_f64().expect("a numeric loss"))
            .collect::<Vec<f64>>()
    };
    (losses(true), losses(false))
}

fn assert_close(what: &str, fused: &[f64], plain: &[f64], steps: usize) {
    assert_eq!(fused.len(), steps, "{what}: fused steps {fused:?}");
    assert_eq!(plain.len(), steps, "{what}: plain steps {plain:?}");
    for (i, (a, b)) in fused.iter().zip(plain).enumerate() {
        let rel = (a - b).abs() / a.abs().max(1e-12);
        assert!(
            a.is_finite() && rel <= TOLERANCE,
            "{what} step {}: fused {a} vs plain {b} (relative {rel:e})",
            i + 1
        );
    }
}

fn write(tmp: &Path, name: &str, text: &str) -> String {
    let p = tmp.join(name);
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

#[test]
fn pretrain_plain_ops_match_the_fused_kernels() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write(tmp.path(), "pt.toml", PRETRAIN);
    let tok = tokenizer(tmp.path()).display().to_string();
    let args = ["pretrain", "--quiet", "--config", &cfg, "--tokenizer", &tok];
    let (fused, plain) = both_paths(tmp.path(), "pt", &args);
    assert_close("pretrain", &fused, &plain, 3);
}

#[test]
fn finetune_plain_ops_match_the_fused_kernels() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write(tmp.path(), "ft.toml", FINETUNE);
    let args = ["finetune", "--quiet", "--config", &cfg];
    let (fused, plain) = both_paths(tmp.path(), "ft", &args);
    assert_close("finetune", &fused, &plain, 3);
}

#[test]
fn finetune_seg_plain_ops_match_the_fused_kernels() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write(tmp.path(), "seg.toml", common::TINY_SEGMENTATION);
    let args = [
        "finetune-seg",
        "--quiet",
        "--config",
        &cfg,
        "--set",
        "train.epochs=1",
        "--set",
        "data.iters_per_epoch=3",
    ];
    let (fused, plain) = both_paths(tmp.path(), "seg", &args);
    assert_close("finetune-seg", &fused, &plain, 3);
}

#[test]
fn tokenizer_training_plain_ops_match_the_fused_kernels() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write(tmp.path(), "tok.toml", TOKENIZER);
    let args = [
        "tokenizer",
        "train",
        "--quiet",
        "--config",
        &cfg,
        "--data",
        "fashion-mnist",
        "--steps",
        "3",
    ];
    let (fused, plain) = both_paths(tmp.path(), "tok", &args);
    assert_close("tokenizer train", &fused, &plain, 3);
}
