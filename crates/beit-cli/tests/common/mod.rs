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

/// An ImageFolder of PNGs under `root`: for each `(split, n)`, `n` images of each of the classes
/// `red` and `blue` (sizes 20x18 and up, all different).
pub fn image_folder(root: &Path, splits: &[(&str, u32)]) {
    for &(split, n) in splits {
        for (c, colour) in [("red", [200u8, 30, 30]), ("blue", [30, 30, 200])] {
            let dir = root.join(split).join(c);
            std::fs::create_dir_all(&dir).unwrap();
            for i in 0..n {
                let img = image::RgbImage::from_fn(20 + i % 8, 18, |x, y| {
                    let v = ((x * 7 + y * 3 + i * 11) % 40) as u8;
                    image::Rgb([colour[0] + v, colour[1] + v, colour[2] + v])
                });
                img.save(dir.join(format!("{i}.png"))).unwrap();
            }
        }
    }
}

/// `beit-cli data pack` of the ImageFolder `data` into `out` (`out/train/`, `out/val/`), shards of
/// about `shard_size` bytes.
pub fn pack(data: &Path, out: &Path, shard_size: &str) {
    run_ok(
        cli()
            .args([
                "data",
                "pack",
                "--seed",
                "3",
                "--shard-size",
                shard_size,
                "--data",
            ])
            .arg(data)
            .arg("--out")
            .arg(out),
    );
}

/// Spoil a packed split: the first image of shard 1 no longer decodes (its bytes after the PNG
/// signature zeroed, the tar intact) and shard 3 is cut in the middle. Returns the two shards'
/// file names.
pub fn spoil_shards(split: &Path) -> (String, String) {
    let name = |i: usize| format!("shard-{i:06}.tar");
    let corrupt = split.join(name(1));
    let mut bytes = std::fs::read(&corrupt).unwrap();
    let sig = b"\x89PNG\r\n\x1a\n";
    let at = bytes
        .windows(sig.len())
        .position(|w| w == sig)
        .expect("a PNG in the shard")
        + sig.len();
    bytes[at..at + 64].fill(0);
    std::fs::write(&corrupt, bytes).unwrap();
    let cut = split.join(name(3));
    let whole = std::fs::read(&cut).unwrap();
    std::fs::write(&cut, &whole[..whole.len() / 2]).unwrap();
    (name(1), name(3))
}

/// A 2-block width-16 classifier from scratch on 14 px crops, RandAugment, random erasing and
/// drop path on; micro-batches of 4, two accumulated per step.
pub const SHARDED_FINETUNE: &str = r#"
device = "cpu"
[data]
num_workers = 1
[architecture]
hidden_size = 16
num_hidden_layers = 2
num_attention_heads = 2
intermediate_size = 32
patch_size = 7
[train]
epochs = 2
batch_size = 8
accum_steps = 2
lr = 3e-3
warmup_epochs = 1
drop_path_rate = 0.1
keep_last = 5
seed = 4
log_every = 1
[aug]
input_size = 14
auto_augment = "rand-m9-mstd0.5-inc1"
reprob = 0.25
mixup = 0.0
cutmix = 0.0
eval_resize = "squash"
"#;

/// A packed ImageFolder of 24 training and 4 validation images in shards of about 3 images:
/// (temp dir, packed root).
pub fn packed_folder() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let (folder, packed) = (tmp.path().join("folder"), tmp.path().join("shards"));
    image_folder(&folder, &[("train", 12), ("val", 2)]);
    pack(&folder, &packed, "2KB");
    (tmp, packed)
}

/// Parquet files in the Hugging Face layout, the writer of beit-data's tests.
#[path = "../../../beit-data/tests/common/parquet_writer.rs"]
pub mod parquet_writer;

/// The ImageFolder `folder` (`train/`, `val/` of [`image_folder`]) as a Hugging Face dataset
/// in `hub/data/`: `files` training files and one validation file, snappy pages, classes named.
pub fn hub_parquet(folder: &Path, hub: &Path, files: usize) {
    use parquet_writer::{write_parquet, Layout, Row, HUB};
    let layout = Layout {
        names: Some(&["blue", "red"]),
        codec: parquet::basic::Compression::SNAPPY,
        ..HUB
    };
    let rows = |split: &str| -> Vec<Row> {
        let mut rows = Vec::new();
        for (label, class) in ["blue", "red"].into_iter().enumerate() {
            let mut paths: Vec<PathBuf> = std::fs::read_dir(folder.join(split).join(class))
                .unwrap()
                .map(|e| e.unwrap().path())
                .collect();
            paths.sort();
            rows.extend(
                paths
                    .iter()
                    .map(|p| (Some(std::fs::read(p).unwrap()), Some(label as i64))),
            );
        }
        rows
    };
    let data = hub.join("data");
    std::fs::create_dir_all(&data).unwrap();
    let train = rows("train");
    for (i, chunk) in train.chunks(train.len().div_ceil(files)).enumerate() {
        let name = format!("train-{i:05}-of-{files:05}.parquet");
        write_parquet(&data.join(name), chunk, layout);
    }
    let val = data.join("validation-00000-of-00001.parquet");
    write_parquet(&val, &rows("val"), layout);
}
