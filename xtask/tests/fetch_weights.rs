//! End-to-end tests of the `xtask fetch-weights` binary. The environment is set on the child
//! process only; the cache is a temporary directory laid out like `huggingface_hub`'s.
// The caches are built with Unix symlinks, as huggingface_hub builds them there.
#![cfg(unix)]

#[path = "../../crates/beit-hub/tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::*;

const REPO: &str = "microsoft/beit-base-patch16-224";

/// Run `xtask fetch-weights ARGS` with a clean HF environment pointing at `cache`.
fn xtask(cache: &Path, env: &[(&str, &str)], args: &[&str]) -> Output {
    let mut all = vec![("HF_HUB_CACHE", cache.to_str().unwrap())];
    all.extend_from_slice(env);
    xtask_env(cache.parent().unwrap(), &all, args)
}

/// Run `xtask fetch-weights ARGS` with only `env` set among the HF variables, and `home` as HOME
/// (a home without a token file, so nothing of the real user leaks in).
fn xtask_env(home: &Path, env: &[(&str, &str)], args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_xtask"));
    cmd.arg("fetch-weights").args(args);
    for var in [
        "HF_HOME",
        "HF_HUB_CACHE",
        "HUGGINGFACE_HUB_CACHE",
        "HF_ENDPOINT",
        "HF_TOKEN",
        "HUGGING_FACE_HUB_TOKEN",
        "HF_TOKEN_PATH",
        "HF_HUB_OFFLINE",
        "HF_HUB_DISABLE_IMPLICIT_TOKEN",
        "XDG_CACHE_HOME",
    ] {
        cmd.env_remove(var);
    }
    cmd.env("HOME", home);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run xtask")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn closed_endpoint() -> String {
    format!("http://127.0.0.1:{}", closed_port())
}

#[test]
fn list_shows_known_checkpoints_and_cache_state() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("hub");
    write_cached(
        &cache,
        REPO,
        COMMIT,
        Some("main"),
        &[("config.json", &config_json()), ("model.safetensors", b"w")],
    );
    let out = xtask(&cache, &[("HF_ENDPOINT", &closed_endpoint())], &["--list"]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    for k in beit_hub_known() {
        assert!(stdout.contains(k), "{k} missing from\n{stdout}");
    }
    let line = |repo: &str| {
        stdout
            .lines()
            .find(|l| l.starts_with(&format!("{repo} ")))
            .unwrap_or_else(|| panic!("no line for {repo}:\n{stdout}"))
            .to_string()
    };
    let cached = line(REPO);
    assert!(cached.contains("IN-1k top-1 85.2"), "{cached}");
    assert!(
        cached
            .trim_end()
            .ends_with(&format!("yes ({})", &COMMIT[..10])),
        "{cached}"
    );
    let large = line("microsoft/beit-large-patch16-512");
    assert!(large.contains("88.6") && large.contains(" 512 "), "{large}");
    assert!(large.trim_end().ends_with(" no"), "{large}");
    assert!(line("microsoft/beit-base-finetuned-ade-640-640").contains("ADE20K mIoU 53.6"));
    let dit = line("microsoft/dit-large-finetuned-rvlcdip");
    assert!(dit.contains("DiT") && dit.contains("RVL-CDIP"), "{dit}");
    let v2 = line("timm/beitv2_base_patch16_224.in1k_ft_in1k");
    assert!(v2.contains("BEiT v2 (timm)") && v2.contains("85.5"), "{v2}");
    assert!(stdout.contains(&cache.display().to_string()), "{stdout}");
}

/// The repos the listing must show (the list: base/large pt22k, pt22k-ft22k,
/// 224/384/512 ImageNet-1k, ADE20K 640).
fn beit_hub_known() -> [&'static str; 19] {
    [
        "microsoft/beit-base-patch16-224-pt22k",
        "microsoft/beit-large-patch16-224-pt22k",
        "microsoft/beit-base-patch16-224-pt22k-ft22k",
        "microsoft/beit-large-patch16-224-pt22k-ft22k",
        "microsoft/beit-base-patch16-224",
        "microsoft/beit-base-patch16-384",
        "microsoft/beit-large-patch16-224",
        "microsoft/beit-large-patch16-384",
        "microsoft/beit-large-patch16-512",
        "microsoft/beit-base-finetuned-ade-640-640",
        "microsoft/beit-large-finetuned-ade-640-640",
        // The other families of the architecture.
        "timm/beitv2_base_patch16_224.in1k_ft_in22k_in1k",
        "timm/beitv2_large_patch16_224.in1k_ft_in22k_in1k",
        "timm/beit_base_patch16_224.in22k_ft_in22k_in1k",
        "facebook/data2vec-vision-base",
        "facebook/data2vec-vision-base-ft1k",
        "microsoft/dit-base",
        "microsoft/dit-large",
        "microsoft/dit-base-finetuned-rvlcdip",
    ]
}

#[test]
fn offline_and_missing_is_one_clear_message_and_nonzero_exit() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("hub");
    let out = xtask(&cache, &[("HF_HUB_OFFLINE", "1")], &[REPO]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(out.stdout.is_empty(), "{}", text(&out.stdout));
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with(&format!(
            "error: {REPO} (revision main) is not in the Hugging Face cache"
        )),
        "{stderr}"
    );
    assert!(
        stderr.contains("HF_HUB_OFFLINE")
            && stderr.contains(&format!("cargo xtask fetch-weights {REPO}")),
        "{stderr}"
    );
    assert!(!cache.exists(), "offline fetch created {}", cache.display());
}

#[test]
fn cached_checkpoint_is_reported_without_network() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("hub");
    write_cached(
        &cache,
        REPO,
        COMMIT,
        Some("main"),
        &[("config.json", &config_json()), ("pytorch_model.bin", b"w")],
    );
    let out = xtask(&cache, &[("HF_ENDPOINT", &closed_endpoint())], &[REPO]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    assert!(
        stdout.starts_with(&format!(
            "{REPO}: already cached (commit {})",
            &COMMIT[..10]
        )),
        "{stdout}"
    );
}

#[test]
fn unreachable_endpoint_fails_and_leaves_cache_empty() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("hub");
    let endpoint = closed_endpoint();
    let out = xtask(
        &cache,
        &[("HF_ENDPOINT", &endpoint)],
        &[REPO, "--no-progress"],
    );
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("cannot reach the Hugging Face hub at {endpoint}")),
        "{stderr}"
    );
    assert!(files_below(&cache).is_empty(), "{:?}", files_below(&cache));
}

#[test]
fn downloads_through_hf_endpoint_with_token_and_revision() {
    let server = FakeHub::start();
    server.add_repo(
        REPO,
        COMMIT2,
        &[
            ("config.json", config_json()),
            ("preprocessor_config.json", b"{\"size\":224}".to_vec()),
            ("model.safetensors", vec![7u8; 10_000]),
        ],
    );
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("hub");
    let out = xtask(
        &cache,
        &[("HF_ENDPOINT", &server.endpoint), ("HF_TOKEN", "hf_xtask")],
        &[REPO, "--revision", "v1", "--no-progress"],
    );
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    assert!(
        stdout.starts_with(&format!(
            "{REPO}: fetched config.json, preprocessor_config.json, model.safetensors (0.0 MB downloaded, commit {})",
            &COMMIT2[..10]
        )),
        "{stdout}"
    );
    let repo_dir = cache.join("models--microsoft--beit-base-patch16-224");
    assert_eq!(
        std::fs::read_to_string(repo_dir.join("refs/v1")).unwrap(),
        COMMIT2
    );
    assert!(server
        .requests()
        .iter()
        .all(|(_, a)| a.as_deref() == Some("Bearer hf_xtask")));
    // The info request asked for the revision given on the command line.
    assert!(
        server.requests()[0].0.ends_with("/revision/v1"),
        "{:?}",
        server.requests()
    );

    // Several repos: one fails, the other succeeds; the exit status is non-zero and both are named.
    let out = xtask(
        &cache,
        &[("HF_ENDPOINT", &server.endpoint)],
        &[&format!("{REPO}@v1"), "org/missing", "--no-progress"],
    );
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    assert!(stdout.contains("already cached"), "{stdout}");
    assert!(
        stderr.contains("org/missing") && stderr.contains("HTTP 404"),
        "{stderr}"
    );
    assert!(
        stderr.contains("1 of 2 checkpoints could not be fetched: org/missing"),
        "{stderr}"
    );
}

#[test]
fn no_target_is_a_usage_error() {
    let tmp = tempfile::tempdir().unwrap();
    let out = xtask(&tmp.path().join("hub"), &[], &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("--all or --list"));
}

#[test]
fn cache_root_from_hf_home_and_xdg() {
    let tmp = tempfile::tempdir().unwrap();
    let hf_home = tmp.path().join("hf");
    write_cached(
        &hf_home.join("hub"),
        REPO,
        COMMIT,
        Some("main"),
        &[("config.json", &config_json()), ("model.safetensors", b"w")],
    );
    let endpoint = closed_endpoint();
    let out = xtask_env(
        tmp.path(),
        &[
            ("HF_HOME", hf_home.to_str().unwrap()),
            ("HF_ENDPOINT", &endpoint),
        ],
        &[REPO],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains(&format!("{}", hf_home.join("hub").display())));
    // XDG_CACHE_HOME/huggingface/hub when HF_HOME is unset; ~/.cache/huggingface/hub otherwise.
    let xdg = tmp.path().join("xdg");
    write_cached(
        &xdg.join("huggingface/hub"),
        REPO,
        COMMIT,
        Some("main"),
        &[("config.json", &config_json()), ("model.safetensors", b"w")],
    );
    let out = xtask_env(
        tmp.path(),
        &[
            ("XDG_CACHE_HOME", xdg.to_str().unwrap()),
            ("HF_ENDPOINT", &endpoint),
        ],
        &[REPO],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = xtask_env(tmp.path(), &[("HF_HUB_OFFLINE", "1")], &["--list"]);
    let stdout = text(&out.stdout);
    let default = tmp.path().join(".cache/huggingface/hub");
    assert!(
        stdout.contains(&format!("(cache: {})", default.display())),
        "{stdout}"
    );
}
