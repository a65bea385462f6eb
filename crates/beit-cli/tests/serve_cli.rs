//! `beit-cli serve` as a process: answers equal to `beit-cli predict --json` on the same files,
//! and SIGTERM answers the queued requests before exiting 0.

mod common;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::Duration;

use common::{cli, run_ok};

fn model_dir() -> PathBuf {
    common::fixtures("model").join("predict")
}

const IMAGES: [&str; 4] = [
    "cat_gray.png",
    "cat_small.jpg",
    "rocket.jpg",
    "rocket_rgba.png",
];

/// Start `beit-cli serve` on a free port; its base URL once it listens.
fn spawn_server(extra: &[&str]) -> (Child, String) {
    let mut child = cli()
        .args(["serve", "--port", "0", "--model"])
        .arg(model_dir())
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let base = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_string();
    (child, base)
}

fn agent() -> ureq::Agent {
    let cfg = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(60)))
        .build();
    ureq::Agent::new_with_config(cfg)
}

fn classify(base: &str, name: &str) -> (u16, serde_json::Value) {
    let bytes = std::fs::read(model_dir().join(name)).unwrap();
    let mut r = agent()
        .post(format!("{base}/v1/classify?top_k=5"))
        .send(&bytes[..])
        .unwrap();
    let status = r.status().as_u16();
    let body = r.body_mut().read_to_string().unwrap();
    (
        status,
        serde_json::from_str(&body).unwrap_or(serde_json::Value::Null),
    )
}

fn wait_ready(base: &str) {
    for _ in 0..600 {
        if let Ok(r) = agent().get(format!("{base}/readyz")).call() {
            if r.status() == 200 {
                return;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("not ready in 30 s");
}

fn terminate(child: &Child) {
    let ok = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -TERM failed");
}

#[test]
fn serve_equals_predict_json_and_drains_on_sigterm() {
    let paths: Vec<PathBuf> = IMAGES.iter().map(|n| model_dir().join(n)).collect();
    let out = run_ok(
        cli()
            .args(["predict", "--json", "--top-k", "5", "--model"])
            .arg(model_dir())
            .args(&paths),
    );
    let predicted: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();

    // Batches wait up to 400 ms for company: the requests below are all queued when SIGTERM comes.
    let (mut child, base) = spawn_server(&["--max-batch", "32", "--max-wait-ms", "400"]);
    wait_ready(&base);
    let clients: Vec<_> = (0..8)
        .map(|i| {
            let base = base.clone();
            std::thread::spawn(move || (i % 4, classify(&base, IMAGES[i % 4])))
        })
        .collect();
    std::thread::sleep(Duration::from_millis(150));
    terminate(&child);
    for c in clients {
        let (i, (status, got)) = c.join().unwrap();
        assert_eq!(status, 200, "a queued request was dropped at shutdown");
        let want = &predicted[i]["predictions"];
        let got = &got[0]["predictions"];
        for (g, w) in got.as_array().unwrap().iter().zip(want.as_array().unwrap()) {
            assert_eq!(g["index"], w["index"], "{}: top-k order", IMAGES[i]);
            assert_eq!(g["label"], w["label"]);
            let diff =
                (g["probability"].as_f64().unwrap() - w["probability"].as_f64().unwrap()).abs();
            assert!(diff <= 1e-6, "{}: probability off by {diff}", IMAGES[i]);
        }
    }
    let status = child.wait().unwrap();
    assert!(status.success(), "exit status {status:?} after SIGTERM");
}
