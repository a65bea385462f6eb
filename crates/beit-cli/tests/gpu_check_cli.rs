//! `scripts/gpu/gpu_check.sh --device cpu --tiny` end to end, so that the GPU machine's one-command
//! check cannot rot: the parity fixtures through `beit-cli verify` (f32 and bf16), the device/CPU
//! training parity (here candle's plain ops against the fused kernels), and the bench part, each
//! leaving JSON lines in `results.jsonl`.

mod common;

use std::process::Command;

use serde_json::Value;

#[test]
fn the_tiny_cpu_mode_of_gpu_check_passes_and_writes_every_part() {
    let tmp = tempfile::tempdir().unwrap();
    let out_dir = tmp.path().join("check");
    let script = common::fixtures("").join("../scripts/gpu/gpu_check.sh");
    let out = Command::new("bash")
        .arg(&script)
        .args(["--device", "cpu", "--tiny", "--bin"])
        .arg(env!("CARGO_BIN_EXE_beit-cli"))
        .arg("--out")
        .arg(&out_dir)
        .output()
        .expect("bash runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "gpu_check.sh failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<Value> = std::fs::read_to_string(out_dir.join("results.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let of = |kind: &str| -> Vec<&Value> { lines.iter().filter(|r| r["kind"] == kind).collect() };
    assert!(lines.iter().all(|r| r["pass"] == true), "{stdout}");

    // 1. Every fixture of fixtures/model and fixtures/family, in f32 and in bf16.
    let verify = of("verify");
    for dtype in ["f32", "bf16"] {
        let v: Vec<_> = verify.iter().filter(|r| r["dtype"] == dtype).collect();
        assert_eq!(v.len(), 12, "{dtype}: {v:?}");
        assert!(v.iter().any(|r| r["name"] == "model/mim_shared"));
        assert!(v.iter().any(|r| r["name"] == "family/d2v_pt"));
    }
    for r in verify.iter().filter(|r| r["dtype"] == "f32") {
        assert!(r["max_abs_err"].as_f64().unwrap() <= 1e-4, "{r}");
    }

    // 2. Step losses of fine-tuning and MIM pre-training on both sides.
    let summaries = of("train_parity_summary");
    for recipe in ["finetune", "pretrain"] {
        let s = summaries
            .iter()
            .find(|r| r["recipe"] == recipe)
            .unwrap_or_else(|| panic!("no {recipe} summary"));
        assert_eq!(s["steps"], 4, "{s}");
        assert!(s["max_rel_diff"].as_f64().unwrap() <= 1e-4);
    }
    assert_eq!(of("train_parity").len(), 8);

    // 3. Three workloads in two dtypes, with images/s.
    let bench = of("bench");
    assert_eq!(bench.len(), 6, "{bench:?}");
    assert!(bench
        .iter()
        .all(|r| r["images_per_s"].as_f64().unwrap() > 0.0));
    assert_eq!(of("bench_ratio").len(), 6);

    // 5. The verdict.
    let verdict = of("gpu_check");
    assert_eq!(verdict.len(), 1);
    assert_eq!(verdict[0]["failures"], 0);
}
