//! Training on tar shards (`beit-cli data pack` of a small ImageFolder) and on its Hugging Face
//! Parquet copy, stopped mid-epoch and `--resume`d: the checkpoint records the loader's stream
//! position, the resumed run reads on from it, and its step records are bit-identical to the
//! uninterrupted run's, for `finetune` and `pretrain`, on clean shards and on shards with a
//! corrupt sample and a truncated shard (skipped, counted and named). `mpi_cli.rs` runs the same
//! on two processes.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{cli, records, run_ok, SHARDED_FINETUNE};

/// The step records of a run, without the timing.
fn steps(run: &Path) -> Vec<serde_json::Value> {
    records(run, "step")
        .into_iter()
        .map(|mut r| {
            r.as_object_mut().unwrap().remove("images_per_sec");
            r
        })
        .collect()
}

/// The data positions saved in `run`'s checkpoint of `step`.
fn saved_positions(run: &Path, step: u64) -> serde_json::Value {
    let state = run.join(format!("checkpoint-{step:08}/trainer_state.json"));
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(state).unwrap()).unwrap();
    state["data_positions"].clone()
}

/// `beit-cli <command> --config CFG --data DATA --output OUT EXTRA...`.
fn train(command: &str, cfg: &Path, data: &Path, out: &Path, extra: &[&str]) -> Command {
    let mut c = cli();
    c.args([command, "--config"])
        .arg(cfg)
        .arg("--data")
        .arg(data)
        .arg("--output")
        .arg(out)
        .args(extra);
    c
}

/// Run `command` uninterrupted in `tmp/full`, then stopped after 2 steps and resumed in
/// `tmp/resumed`; returns both run directories and the resumed run's output.
fn full_and_resumed(
    command: &str,
    cfg: &Path,
    data: &Path,
    extra: &[&str],
) -> (PathBuf, PathBuf, Output) {
    let tmp = cfg.parent().unwrap();
    let (full, resumed) = (tmp.join("full"), tmp.join("resumed"));
    let full_out = run_ok(&mut train(command, cfg, data, &full, extra));
    let stop: Vec<&str> = extra.iter().copied().chain(["--stop-after", "2"]).collect();
    run_ok(&mut train(command, cfg, data, &resumed, &stop));
    assert_eq!(records(&resumed, "step").len(), 2);
    let more: Vec<&str> = extra.iter().copied().chain(["--resume"]).collect();
    let out = run_ok(&mut train(command, cfg, data, &resumed, &more));
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        log.contains("reading on from the saved data position"),
        "{log}"
    );
    assert_eq!(
        steps(&full),
        steps(&resumed),
        "{command}: resumed steps differ"
    );
    (full, resumed, full_out)
}

#[test]
fn finetune_on_shards_resumes_from_the_saved_stream_position() {
    let (tmp, data) = common::packed_folder();
    let cfg = tmp.path().join("ft.toml");
    std::fs::write(&cfg, SHARDED_FINETUNE).unwrap();
    let every = ["--set", "train.checkpoint_every=2"];
    let (full, resumed, _) = full_and_resumed("finetune", &cfg, &data, &every);
    assert_eq!(records(&full, "step").len(), 6, "2 epochs x 3 steps");
    // 2 steps = 4 micro-batches of 4 images: 16 stream items, none skipped.
    let at = serde_json::json!([{"epoch": 0, "items": 16, "batches": 4}]);
    assert_eq!(saved_positions(&resumed, 2), at);
    assert_eq!(records(&full, "eval"), records(&resumed, "eval"));
    assert_eq!(records(&full, "epoch"), records(&resumed, "epoch"));
    // What a kill -9 after step 5 leaves: the run resumed from its step-2 checkpoint (the later
    // records and checkpoints are dropped) logs the same steps again.
    let before = steps(&full);
    let ck = full.join("checkpoint-00000002");
    let resume = ["--resume", ck.to_str().unwrap()];
    run_ok(&mut train(
        "finetune",
        &cfg,
        &data,
        &full,
        &[&every[..], &resume].concat(),
    ));
    assert_eq!(
        steps(&full),
        before,
        "resumed from step 2 of a finished run"
    );
}

#[test]
fn pretrain_on_shards_resumes_from_the_saved_stream_position() {
    let (tmp, data) = common::packed_folder();
    let cfg = tmp.path().join("pt.toml");
    std::fs::write(&cfg, SHARDED_PRETRAIN).unwrap();
    let tok = common::tokenizer(tmp.path());
    let extra = ["--tokenizer", tok.to_str().unwrap()];
    let (full, resumed, _) = full_and_resumed("pretrain", &cfg, &data, &extra);
    assert_eq!(records(&full, "step").len(), 6, "2 epochs x 3 steps");
    assert_eq!(saved_positions(&resumed, 2)[0]["batches"], 4);
}

/// A 2-block width-16 MIM model on 16 px crops (4x4 patches), 6 blockwise-masked patches, drop
/// path on; micro-batches of 4, two accumulated per step.
pub const SHARDED_PRETRAIN: &str = r#"
[architecture]
hidden_size = 16
num_hidden_layers = 2
num_attention_heads = 2
intermediate_size = 32
image_size = 16
patch_size = 4
[data]
num_workers = 1
prefetch = 2
[aug]
crop_scale = [0.5, 1.0]
[masking]
num_masking_patches = 6
[train]
drop_path_rate = 0.2
epochs = 2
batch_size = 8
accum_steps = 2
lr = 3e-3
warmup_epochs = 0
keep_last = 5
log_every = 1
"#;

#[test]
fn hostile_shards_are_skipped_named_and_resumed_exactly() {
    let (tmp, data) = common::packed_folder();
    let (corrupt, cut) = common::spoil_shards(&data.join("train"));
    let cfg = tmp.path().join("ft.toml");
    std::fs::write(&cfg, SHARDED_FINETUNE).unwrap();
    let (full, resumed, out) = full_and_resumed("finetune", &cfg, &data, &[]);
    assert_eq!(
        records(&full, "step").len(),
        6,
        "full epochs despite the skips"
    );
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains(&corrupt) && log.contains(&cut), "{log}");
    let table = String::from_utf8_lossy(&out.stdout);
    let skipped = table
        .lines()
        .find(|l| l.trim_start().starts_with("skipped files"))
        .and_then(|l| l.split_whitespace().last()?.parse::<usize>().ok())
        .unwrap_or_else(|| panic!("no skipped-files row: {table}"));
    assert!(skipped >= 2, "{table}");
    assert!(saved_positions(&resumed, 2)[0]["items"].as_u64().unwrap() >= 16);
}

#[test]
fn finetune_on_parquet_resumes_from_the_saved_stream_position() {
    let tmp = tempfile::tempdir().unwrap();
    let (folder, hub) = (tmp.path().join("folder"), tmp.path().join("hub"));
    common::image_folder(&folder, &[("train", 12), ("val", 2)]);
    common::hub_parquet(&folder, &hub, 4);
    let cfg = tmp.path().join("ft.toml");
    std::fs::write(&cfg, SHARDED_FINETUNE).unwrap();
    let (full, resumed, _) = full_and_resumed("finetune", &cfg, &hub, &[]);
    assert_eq!(records(&full, "step").len(), 6, "2 epochs x 3 steps");
    let at = serde_json::json!([{"epoch": 0, "items": 16, "batches": 4}]);
    assert_eq!(saved_positions(&resumed, 2), at);
}
