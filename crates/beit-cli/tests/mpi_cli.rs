//! Data-parallel training under `mpirun` (feature `mpi`; needs OpenMPI's `mpirun` on the PATH):
//! `finetune`, `linear-probe` and `pretrain` on two processes log the same per-step losses (relative difference
//! <= 1e-5) and the same evaluation accuracy as one process with the same global batch, and a
//! run stopped on one world size resumes on another with the same losses. Only rank 0 writes.
//! `finetune-seg` runs on two processes with its ranks in sync and, its BatchNorms synchronised
//! (SyncBN), logs one process's losses too. On tar shards, each rank reading its own, a
//! two-process run stopped mid-epoch resumes from every rank's saved stream position with
//! bit-identical losses, hostile shards included.
//!
//! Drop path is on (drawn per image by its position in the global micro-batch); mixup/CutMix is
//! off: it mixes each rank's share of the batch (docs/distributed.md).
#![cfg(feature = "mpi")]

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::{records, tokenizer};

/// `beit-cli ARGS` on `n` processes (`mpirun -n n`), or as a plain process when `n == 0`.
fn run(n: usize, args: &[String]) -> Output {
    run_env(n, args, &[])
}

/// [`run`] with extra environment variables.
fn run_env(n: usize, args: &[String], env: &[(&str, &str)]) -> Output {
    let bin = env!("CARGO_BIN_EXE_beit-cli");
    let mut c = if n == 0 {
        Command::new(bin)
    } else {
        let mut c = Command::new("mpirun");
        c.args(["-n", &n.to_string(), "--oversubscribe", "--bind-to", "none"])
            .arg(bin);
        c
    };
    c.args(args)
        .env("HF_HUB_OFFLINE", "1")
        .env("BEIT_LOG", "info")
        .env("RAYON_NUM_THREADS", "1")
        .env("BEIT_DIST_TIMEOUT_S", "120")
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("OMPI_MCA_btl_vader_single_copy_mechanism", "none")
        .envs(env.iter().copied());
    let out = c
        .output()
        .expect("mpirun / beit-cli runs (is OpenMPI installed?)");
    assert!(
        out.status.success(),
        "{} processes: beit-cli {args:?} failed:\nstdout:\n{}\nstderr:\n{}",
        n.max(1),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn losses(dir: &Path) -> Vec<f64> {
    records(dir, "step")
        .iter()
        .map(|r| r["loss"].as_f64().unwrap())
        .collect()
}

fn assert_close(a: &[f64], b: &[f64], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: {a:?} vs {b:?}");
    let mut worst = 0f64;
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        let rel = (x - y).abs() / x.abs().max(1e-12);
        assert!(
            rel <= 1e-5,
            "{what}: step {} loss {x} vs {y} (rel {rel:e})",
            i + 1
        );
        worst = worst.max(rel);
    }
    eprintln!(
        "{what}: {} steps, largest relative difference {worst:e}",
        a.len()
    );
}

fn args(list: &[&str], cfg: &Path, out: &Path) -> Vec<String> {
    let mut v: Vec<String> = list.iter().map(|s| s.to_string()).collect();
    v.extend([
        "--config".into(),
        cfg.display().to_string(),
        "--output".into(),
        out.display().to_string(),
    ]);
    v
}

/// A 2-block width-32 classifier from scratch on 28 px Fashion-MNIST; RandAugment and random
/// erasing on (seeded per image), drop path 0.2 on, mixup off; 2 accumulated micro-batches of 8.
const FINETUNE: &str = r#"
[data]
source = "fashion-mnist"
max_train_samples = 48
max_val_samples = 30
num_workers = 1
[architecture]
hidden_size = 32
num_hidden_layers = 2
num_attention_heads = 2
intermediate_size = 64
patch_size = 7
[train]
epochs = 2
batch_size = 16
accum_steps = 2
lr = 3e-3
warmup_epochs = 1
drop_path_rate = 0.2
clip_grad = 1.0
keep_last = 5
seed = 3
log_every = 1
[aug]
input_size = 28
auto_augment = "rand-m9-mstd0.5-inc1"
reprob = 0.25
mixup = 0.0
cutmix = 0.0
eval_resize = "squash"
"#;

#[test]
fn finetune_on_two_processes_matches_one_and_resumes_on_another_count() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("ft.toml");
    std::fs::write(&cfg, FINETUNE).unwrap();
    let (one, two, mixed) = (
        tmp.path().join("one"),
        tmp.path().join("two"),
        tmp.path().join("mixed"),
    );
    run(0, &args(&["finetune"], &cfg, &one));
    run(2, &args(&["finetune"], &cfg, &two));
    let reference = losses(&one);
    assert_eq!(reference.len(), 6, "3 steps x 2 epochs");
    assert_close(&reference, &losses(&two), "finetune, 2 processes vs 1");
    let (e1, e2) = (records(&one, "eval"), records(&two, "eval"));
    assert_eq!(e1.len(), 2);
    assert_eq!(e1.len(), e2.len());
    for (a, b) in e1.iter().zip(&e2) {
        assert_eq!(a["acc1"], b["acc1"], "eval accuracy: {a:?} vs {b:?}");
        assert_eq!(a["acc5"], b["acc5"]);
        let (la, lb) = (a["loss"].as_f64().unwrap(), b["loss"].as_f64().unwrap());
        assert!((la - lb).abs() <= 1e-5 * la.abs(), "eval loss {la} vs {lb}");
    }
    assert!(two.join("best_model").is_dir() && two.join("curves.png").is_file());

    // Stopped after 2 steps on two processes, resumed on one.
    run(2, &args(&["finetune", "--stop-after", "2"], &cfg, &mixed));
    assert_eq!(losses(&mixed).len(), 2);
    run(0, &args(&["finetune", "--resume"], &cfg, &mixed));
    assert_close(&reference, &losses(&mixed), "finetune, resumed on 1 of 2");
    assert_eq!(records(&mixed, "eval")[1]["acc1"], e1[1]["acc1"]);

    // The linear probe of the exported model: features extracted sharded and gathered.
    let probe = |out: &Path| -> Vec<String> {
        [
            "linear-probe",
            "--layer",
            "1",
            "--epochs",
            "2",
            "--batch-size",
            "16",
            "--data",
            "fashion-mnist",
            "--set",
            "data.max_train_samples=48",
            "--set",
            "data.max_val_samples=30",
            "--model",
            one.join("best_model").to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
        ]
        .map(String::from)
        .to_vec()
    };
    let (p1, p2) = (tmp.path().join("probe1"), tmp.path().join("probe2"));
    run(0, &probe(&p1));
    run(2, &probe(&p2));
    assert_close(&losses(&p1), &losses(&p2), "linear probe, 2 processes vs 1");
    let (e1, e2) = (records(&p1, "eval"), records(&p2, "eval"));
    assert_eq!(e1.len(), 2);
    for (a, b) in e1.iter().zip(&e2) {
        assert_eq!(a["acc1"], b["acc1"], "probe accuracy: {a:?} vs {b:?}");
    }
    assert!(p2.join("linear_head.safetensors").is_file());
}

/// A 2-block width-16 MIM model on 16 px images (4x4 patches), 6 blockwise-masked patches,
/// visual tokens from a random dVAE; 2 accumulated micro-batches of 8.
const PRETRAIN: &str = r#"
[architecture]
hidden_size = 16
num_hidden_layers = 2
num_attention_heads = 2
intermediate_size = 32
image_size = 16
patch_size = 4
[data]
source = "fashion-mnist"
max_train_samples = 32
num_workers = 1
prefetch = 2
[aug]
crop_scale = [0.5, 1.0]
[masking]
num_masking_patches = 6
[train]
drop_path_rate = 0.2
epochs = 2
batch_size = 16
accum_steps = 2
lr = 3e-3
min_lr = 1e-5
warmup_epochs = 0
keep_last = 5
log_every = 1
"#;

#[test]
fn pretrain_on_two_processes_matches_one_and_resumes_on_another_count() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("pt.toml");
    std::fs::write(&cfg, PRETRAIN).unwrap();
    let tok = tokenizer(tmp.path());
    let pt = |extra: &[&str]| {
        let mut v = vec!["pretrain", "--tokenizer", tok.to_str().unwrap()];
        v.extend(extra);
        v.into_iter().map(String::from).collect::<Vec<_>>()
    };
    let (one, two, mixed) = (
        tmp.path().join("one"),
        tmp.path().join("two"),
        tmp.path().join("mixed"),
    );
    let a = |extra: &[&str], out: &Path| {
        let mut v = pt(extra);
        v.extend(args(&[], &cfg, out));
        v
    };
    run(0, &a(&[], &one));
    run(2, &a(&[], &two));
    let reference = losses(&one);
    assert_eq!(reference.len(), 4, "2 steps x 2 epochs");
    assert_close(&reference, &losses(&two), "pretrain, 2 processes vs 1");
    assert!(two.join("model").join("model.safetensors").is_file());

    // Stopped after 1 step on one process, resumed on two.
    run(0, &a(&["--stop-after", "1"], &mixed));
    run(2, &a(&["--resume"], &mixed));
    assert_close(&reference, &losses(&mixed), "pretrain, resumed on 2 of 1");
}

/// `finetune-seg` under `mpirun -n 2`: the ranks read their shares, stay identical (the weight
/// checksum, BatchNorm running statistics included, is compared at every checkpoint and would
/// stop the run), the sharded validation counts are summed, and rank 0 alone writes. (The
/// losses' equality with one process's: the synchronised BatchNorm case at the end.)
#[test]
fn finetune_seg_runs_on_two_processes_with_ranks_in_sync() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("seg.toml");
    std::fs::write(&cfg, common::TINY_SEGMENTATION).unwrap();
    // 3 steps an epoch, step checkpoints, 5 validation mosaics (an uneven split over 2 ranks).
    let list = [
        "finetune-seg",
        "--set",
        "data.iters_per_epoch=3",
        "--set",
        "data.fashion_val_images=5",
        "--set",
        "train.checkpoint_every=2",
        "--set",
        "train.keep_last=5",
    ];
    let (one, two) = (tmp.path().join("one"), tmp.path().join("two"));
    run(0, &args(&list, &cfg, &one));
    let out = run(2, &args(&list, &cfg, &two));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        stdout.matches("segmentation fine-tuning done").count(),
        1,
        "rank 0 alone reports: {stdout}"
    );
    let (l1, l2) = (losses(&one), losses(&two));
    assert_eq!((l1.len(), l2.len()), (6, 6), "3 steps x 2 epochs");
    for (a, b) in l1.iter().zip(&l2) {
        assert!(b.is_finite() && (a - b).abs() < 0.25 * a, "loss {a} vs {b}");
    }
    let evals = records(&two, "eval");
    assert_eq!(evals.len(), 2);
    for e in &evals {
        let miou = e["mIoU"].as_f64().unwrap();
        assert!((0.0..=100.0).contains(&miou), "{e:?}");
    }
    assert!(two.join("checkpoint-00000006").is_dir());
    let tensors = candle::safetensors::load(
        two.join("final_model/model.safetensors"),
        &candle::Device::Cpu,
    )
    .unwrap();
    let tracked = tensors["decode_head.bottleneck.bn.num_batches_tracked"]
        .to_scalar::<i64>()
        .unwrap();
    assert_eq!(tracked, 6, "one BatchNorm update per micro-batch, rank 0's");
}

#[test]
fn an_indivisible_micro_batch_is_refused_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("ft.toml");
    std::fs::write(&cfg, FINETUNE).unwrap();
    let out = Command::new("mpirun")
        .args(["-n", "3", "--oversubscribe", "--bind-to", "none"])
        .arg(env!("CARGO_BIN_EXE_beit-cli"))
        .args(args(&["finetune"], &cfg, &tmp.path().join("run")))
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("RAYON_NUM_THREADS", "1")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot be split evenly over 3 processes"),
        "{err}"
    );
}

/// A world of 1 with the all-reduce forced (`BEIT_DIST_FORCE_REDUCE=1`, what
/// `scripts/gpu/gpu_nccl_check.sh` does to exercise NCCL on one GPU) logs the losses of a plain
/// process; an unknown `BEIT_DIST_BACKEND` is refused naming the variable.
#[test]
fn a_forced_all_reduce_in_a_world_of_one_changes_nothing_and_the_backend_is_checked() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("ft.toml");
    std::fs::write(&cfg, FINETUNE).unwrap();
    let (one, forced) = (tmp.path().join("one"), tmp.path().join("forced"));
    let quick = ["finetune", "--stop-after", "3"];
    run(0, &args(&quick, &cfg, &one));
    run_env(
        1,
        &args(&quick, &cfg, &forced),
        &[
            ("BEIT_DIST_FORCE_REDUCE", "1"),
            ("BEIT_DIST_BACKEND", "mpi"),
        ],
    );
    let reference = losses(&one);
    assert_eq!(reference.len(), 3);
    assert_close(&reference, &losses(&forced), "forced all-reduce, 1 process");

    let out = Command::new("mpirun")
        .args(["-n", "1", "--bind-to", "none"])
        .arg(env!("CARGO_BIN_EXE_beit-cli"))
        .args(args(&quick, &cfg, &tmp.path().join("bad")))
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("BEIT_DIST_BACKEND", "gloo")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("BEIT_DIST_BACKEND=\"gloo\": expected `nccl` or `mpi`"),
        "{err}"
    );
}

/// `finetune` on two processes over tar shards and over their Parquet copy: stopped after 2
/// steps and resumed on two, every rank continues from its own saved stream position, with the
/// losses of the uninterrupted run; then the same on shards with a corrupt sample and a truncated
/// shard (skipped and named).
#[test]
fn sharded_finetune_on_two_processes_resumes_from_each_ranks_position() {
    let (tmp, shards) = common::packed_folder();
    let hub = tmp.path().join("hub");
    common::hub_parquet(&tmp.path().join("folder"), &hub, 4);
    let cfg = tmp.path().join("ft.toml");
    std::fs::write(&cfg, common::SHARDED_FINETUNE).unwrap();
    let ft = |data: &Path, out: &Path, extra: &[&str]| {
        let mut v = vec!["finetune", "--data", data.to_str().unwrap()];
        v.extend(extra);
        args(&v, &cfg, out)
    };
    for (tag, data) in [("tar", &shards), ("parquet", &hub), ("spoiled", &shards)] {
        let names = (tag == "spoiled").then(|| common::spoil_shards(&shards.join("train")));
        let (full, resumed) = (
            tmp.path().join(tag),
            tmp.path().join(format!("{tag}-resumed")),
        );
        let out = run(2, &ft(data, &full, &[]));
        run(2, &ft(data, &resumed, &["--stop-after", "2"]));
        let state = resumed.join("checkpoint-00000002/trainer_state.json");
        let state: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(state).unwrap()).unwrap();
        let positions = state["data_positions"].as_array().unwrap();
        assert_eq!(positions.len(), 2, "one position per rank: {state}");
        assert!(positions.iter().all(|p| p["batches"] == 4), "{state}");
        let again = run(2, &ft(data, &resumed, &["--resume"]));
        let log = String::from_utf8_lossy(&again.stderr);
        assert!(
            log.contains("reading on from the saved data position"),
            "{log}"
        );
        let (a, b) = (losses(&full), losses(&resumed));
        assert_eq!(a.len(), 6, "2 epochs x 3 steps");
        assert_eq!(a, b, "{tag}: resumed losses differ");
        if let Some((corrupt, cut)) = names {
            let log = String::from_utf8_lossy(&out.stderr);
            assert!(log.contains(&corrupt) && log.contains(&cut), "{log}");
        }
    }
}

/// `finetune-seg` under `mpirun -n 2` with its BatchNorms synchronised (SyncBN, the default): the
/// statistics of the global batch normalise every rank's share, so the per-step losses are one
/// process's within float rounding (relative difference <= 1e-5, as the classification cases)
/// (measured: 1.3e-7) and so is the validation mIoU. With `segmentation.sync_batch_norm=false`
/// each rank normalises with its own 2 crops and the losses leave that tolerance (measured: 2e-3).
#[test]
fn finetune_seg_with_sync_batch_norm_on_two_processes_matches_one() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("seg.toml");
    std::fs::write(&cfg, common::TINY_SEGMENTATION).unwrap();
    let list = ["finetune-seg", "--set", "data.iters_per_epoch=3"];
    let unsynced: Vec<&str> = list
        .into_iter()
        .chain(["--set", "segmentation.sync_batch_norm=false"])
        .collect();
    let (one, two, per_rank) = (
        tmp.path().join("one"),
        tmp.path().join("two"),
        tmp.path().join("per_rank"),
    );
    run(0, &args(&list, &cfg, &one));
    run(2, &args(&list, &cfg, &two));
    run(2, &args(&unsynced, &cfg, &per_rank));
    let reference = losses(&one);
    assert_eq!(reference.len(), 6, "3 steps x 2 epochs");
    assert_close(
        &reference,
        &losses(&two),
        "finetune-seg (SyncBN), 2 processes vs 1",
    );
    let (e1, e2) = (records(&one, "eval"), records(&two, "eval"));
    assert_eq!((e1.len(), e2.len()), (2, 2));
    for (a, b) in e1.iter().zip(&e2) {
        let (ma, mb) = (a["mIoU"].as_f64().unwrap(), b["mIoU"].as_f64().unwrap());
        assert!((ma - mb).abs() <= 1e-3, "validation mIoU {ma} vs {mb}");
    }
    let unsynced = losses(&per_rank);
    let worst = reference
        .iter()
        .zip(&unsynced)
        .map(|(a, b)| (a - b).abs() / a.abs())
        .fold(0f64, f64::max);
    eprintln!("finetune-seg, per-rank BatchNorm: largest relative difference {worst:e}");
    assert!(
        worst > 1e-4,
        "per-rank BatchNorm statistics should change the losses: {reference:?} vs {unsynced:?}"
    );
}
