//! End-to-end test of `beit-cli demo --quick`: every stage runs (tokenizer, MIM pre-training,
//! two fine-tunings, evaluation), each stage's training loss falls, both classifiers beat chance
//! (10 classes) on the held-out images, and the summary is printed and saved. The quick run is
//! too short for the comparison between the two to mean anything; the full demo's figures are in
//! docs/demo.md.

use std::process::Command;

use serde_json::Value;

#[test]
fn quick_demo_runs_every_stage_and_prints_the_summary() {
    let tmp = tempfile::tempdir().unwrap();
    let out_dir = tmp.path().join("demo");
    let run = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_beit-cli"))
            .args(["demo", "--quick", "--quiet", "--output"])
            .arg(&out_dir)
            .args(extra)
            .env("BEIT_LOG", "warn")
            .output()
            .expect("run beit-cli")
    };
    let out = run(&[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for needle in [
        "BEiT demo summary",
        "1. dVAE tokenizer",
        "2. MIM pre-training",
        "3. fine-tune, from MIM pre-training",
        "4. fine-tune, from random init",
        "5. linear probes",
        "test accuracy:",
        "linear probe (frozen features, block 4)",
    ] {
        assert!(
            stdout.contains(needle),
            "`{needle}` missing from:\n{stdout}"
        );
    }
    let summary: Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("summary.json")).unwrap())
            .unwrap();
    for k in [
        "accuracy_pretrained",
        "accuracy_scratch",
        "probe_accuracy_pretrained",
        "probe_accuracy_random_init",
    ] {
        let a = summary[k].as_f64().unwrap();
        assert!(a > 10.0 && a <= 100.0, "{k} = {a}%: not above chance");
    }
    for stage in [
        "tokenizer",
        "pretrain",
        "finetune_pretrained",
        "finetune_scratch",
    ] {
        let pair = &summary["loss_first_last"][stage];
        let (first, last) = (pair[0].as_f64().unwrap(), pair[1].as_f64().unwrap());
        assert!(
            last.is_finite() && last < first,
            "{stage}: training loss did not fall ({first} -> {last})"
        );
    }
    assert_eq!(summary["stages"].as_array().unwrap().len(), 5);
    for stage in [
        "pretrain",
        "finetune-pretrained",
        "finetune-scratch",
        "probe-pretrained",
        "probe-random-init",
    ] {
        assert!(out_dir.join(stage).join("curves.png").is_file(), "{stage}");
        assert!(
            out_dir.join(stage).join("metrics.jsonl").is_file(),
            "{stage}"
        );
    }
    assert!(out_dir.join("pretrain/model/model.safetensors").is_file());
    assert!(out_dir.join("tokenizer/encoder.safetensors").is_file());

    // A second run does not silently replace the first.
    let again = run(&[]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--overwrite"));
}
