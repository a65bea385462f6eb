//! Downloads through the real `hf-hub` client: against a closed local port (unreachable hub) and
//! against a small local HTTP server speaking the hub's protocol. Checks the resulting cache layout
//! and that failed or interrupted transfers leave nothing partial in the cache.
// The caches are built with Unix symlinks, as huggingface_hub builds them there.
#![cfg(unix)]

mod common;

use std::time::{Duration, Instant};

use beit_hub::{
    fetch, resolve_model, FetchOutcome, HubConfig, HubError, ResolveOptions, WeightFiles,
    STAGING_DIR,
};
use common::*;

const REPO: &str = "microsoft/beit-base-patch16-224";

fn hub(cache: &std::path::Path, endpoint: &str) -> HubConfig {
    HubConfig {
        cache_dir: cache.to_path_buf(),
        endpoint: endpoint.to_string(),
        token: None,
        offline: false,
        connect_timeout: std::time::Duration::from_secs(10),
    }
}

/// Blobs present for `repo` in `cache`, each checked to hash to its own name (no partial blob).
fn verified_blobs(cache: &std::path::Path, repo: &str) -> Vec<String> {
    let blobs = cache
        .join(format!("models--{}", repo.replace('/', "--")))
        .join("blobs");
    let mut names = Vec::new();
    for e in std::fs::read_dir(&blobs).into_iter().flatten().flatten() {
        let name = e.file_name().to_str().unwrap().to_string();
        let data = std::fs::read(e.path()).unwrap();
        assert!(
            sha256(&data) == name || git_sha1(&data) == name,
            "blob {name} does not hash to its name (partial or corrupt file in the cache)"
        );
        names.push(name);
    }
    names.sort();
    names
}

fn no_staging_left(cache: &std::path::Path) {
    let staging = cache.join(STAGING_DIR);
    assert!(
        !staging.exists(),
        "staging left behind: {:?}",
        files_below(&staging)
    );
}

#[test]
fn unreachable_endpoint_fails_fast_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let endpoint = format!("http://127.0.0.1:{}", closed_port());
    let start = Instant::now();
    let err = fetch(REPO, None, &hub(tmp.path(), &endpoint), false).unwrap_err();
    let elapsed = start.elapsed();
    let msg = err.to_string();
    assert!(matches!(err, HubError::Unreachable { .. }), "{msg}");
    assert!(msg.contains(&endpoint) && msg.contains(REPO), "{msg}");
    assert!(elapsed < Duration::from_secs(10), "took {elapsed:?}");
    assert!(
        files_below(tmp.path()).is_empty(),
        "{:?}",
        files_below(tmp.path())
    );
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);
}

#[test]
fn download_lays_out_the_cache_like_huggingface_hub() -> anyhow::Result<()> {
    let server = FakeHub::start();
    let weights: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    server.add_repo(
        REPO,
        COMMIT,
        &[
            (".gitattributes", b"*.bin filter=lfs".to_vec()),
            ("README.md", b"# BEiT".to_vec()),
            ("config.json", config_json()),
            ("preprocessor_config.json", b"{\"size\":224}".to_vec()),
            ("model.safetensors", weights.clone()),
            ("pytorch_model.bin", b"also here, not needed".to_vec()),
        ],
    );
    let tmp = tempfile::tempdir()?;
    let mut h = hub(tmp.path(), &server.endpoint);
    h.token = Some("hf_test_token".into());
    let report = fetch(REPO, None, &h, false)?;
    let FetchOutcome::Downloaded { files } = &report.outcome else {
        panic!("expected a download, got {:?}", report.outcome)
    };
    let names: Vec<_> = files.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "config.json",
            "preprocessor_config.json",
            "model.safetensors"
        ]
    );
    assert!(files.iter().all(|f| f.transferred));
    assert_eq!(files[2].size, weights.len() as u64);

    // Layout: blobs named by etag, relative symlinks in snapshots/<commit>, refs/main = commit.
    let repo_dir = tmp.path().join("models--microsoft--beit-base-patch16-224");
    assert_eq!(std::fs::read_to_string(repo_dir.join("refs/main"))?, COMMIT);
    let snap = repo_dir.join("snapshots").join(COMMIT);
    let link = std::fs::read_link(snap.join("model.safetensors"))?;
    assert_eq!(
        link,
        std::path::PathBuf::from(format!("../../blobs/{}", sha256(&weights)))
    );
    let link = std::fs::read_link(snap.join("config.json"))?;
    assert_eq!(
        link,
        std::path::PathBuf::from(format!("../../blobs/{}", git_sha1(&config_json())))
    );
    let mut want = vec![
        sha256(&weights),
        git_sha1(&config_json()),
        git_sha1(b"{\"size\":224}"),
    ];
    want.sort();
    assert_eq!(verified_blobs(tmp.path(), REPO), want);
    assert_eq!(
        report.files.weights,
        WeightFiles::Safetensors(snap.join("model.safetensors"))
    );
    assert_eq!(std::fs::read(snap.join("model.safetensors"))?, weights);
    no_staging_left(tmp.path());
    // No hf-hub leftovers (.part, .lock) anywhere in the cache.
    let all = files_below(tmp.path());
    assert!(
        all.iter()
            .all(|f| !f.ends_with(".part") && !f.ends_with(".lock")),
        "{all:?}"
    );
    // The token travels as a bearer token.
    assert!(server
        .requests()
        .iter()
        .all(|(_, auth)| auth.as_deref() == Some("Bearer hf_test_token")));

    // Second time: reported as cached, with the endpoint unreachable.
    let closed = format!("http://127.0.0.1:{}", closed_port());
    let again = fetch(REPO, None, &hub(tmp.path(), &closed), false)?;
    assert_eq!(again.outcome, FetchOutcome::Cached);
    assert_eq!(again.files, report.files);
    Ok(())
}

#[test]
fn sharded_download_and_no_exist_marker() -> anyhow::Result<()> {
    let server = FakeHub::start();
    let index = br#"{"metadata":{"total_size":8},"weight_map":{
        "a":"model-00001-of-00002.safetensors","b":"model-00002-of-00002.safetensors"}}"#;
    server.add_repo(
        "someone/beit-sharded",
        COMMIT2,
        &[
            ("config.json", config_json()),
            ("model.safetensors.index.json", index.to_vec()),
            ("model-00001-of-00002.safetensors", b"shard-one".to_vec()),
            ("model-00002-of-00002.safetensors", b"shard-two".to_vec()),
        ],
    );
    let tmp = tempfile::tempdir()?;
    let report = fetch(
        "someone/beit-sharded",
        Some("v1.0"),
        &hub(tmp.path(), &server.endpoint),
        false,
    )?;
    let WeightFiles::ShardedSafetensors { shards, .. } = &report.files.weights else {
        panic!("{:?}", report.files.weights)
    };
    assert_eq!(std::fs::read(&shards[1])?, b"shard-two");
    let repo_dir = tmp.path().join("models--someone--beit-sharded");
    // The ref is named after the requested revision; absent optional files are recorded.
    assert_eq!(
        std::fs::read_to_string(repo_dir.join("refs/v1.0"))?,
        COMMIT2
    );
    assert!(repo_dir
        .join(".no_exist")
        .join(COMMIT2)
        .join("preprocessor_config.json")
        .is_file());
    // Every file was requested at the pinned commit.
    let resolves: Vec<_> = server
        .requests()
        .into_iter()
        .filter(|(r, _)| r.contains("/resolve/"))
        .collect();
    assert!(
        resolves.iter().all(|(r, _)| r.contains(COMMIT2)),
        "{resolves:?}"
    );
    Ok(())
}

#[test]
fn pytorch_bin_only_repo_is_fetched() -> anyhow::Result<()> {
    let server = FakeHub::start();
    server.add_repo(
        "microsoft/beit-base-finetuned-ade-640-640",
        COMMIT,
        &[
            ("config.json", config_json()),
            ("pytorch_model.bin", b"zip pickle".to_vec()),
        ],
    );
    let tmp = tempfile::tempdir()?;
    let opts = ResolveOptions {
        hub: hub(tmp.path(), &server.endpoint),
        revision: None,
        allow_download: true,
        progress: false,
    };
    // resolve_model downloads only because allow_download is set.
    let files = resolve_model("microsoft/beit-base-finetuned-ade-640-640", &opts)?;
    assert!(matches!(files.weights, WeightFiles::PytorchBin(_)));
    Ok(())
}

#[test]
fn resolve_does_not_download_unless_asked() {
    let server = FakeHub::start();
    server.add_repo(
        REPO,
        COMMIT,
        &[
            ("config.json", config_json()),
            ("model.safetensors", b"w".to_vec()),
        ],
    );
    let tmp = tempfile::tempdir().unwrap();
    let opts = ResolveOptions::default().with_hub(hub(tmp.path(), &server.endpoint));
    let err = resolve_model(REPO, &opts).unwrap_err();
    assert!(matches!(err, HubError::NotCached { .. }));
    assert!(server.requests().is_empty(), "{:?}", server.requests());
}

#[test]
fn interrupted_download_leaves_no_partial_file() -> anyhow::Result<()> {
    let server = FakeHub::start();
    let weights = vec![42u8; 200_000];
    server.add_repo(
        REPO,
        COMMIT,
        &[
            ("config.json", config_json()),
            ("model.safetensors", weights.clone()),
        ],
    );
    server.edit_file(REPO, "model.safetensors", |f| f.cut_after = Some(50_000));
    let tmp = tempfile::tempdir()?;
    let err = fetch(REPO, None, &hub(tmp.path(), &server.endpoint), false).unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, HubError::Download { .. } | HubError::Corrupt { .. }),
        "{msg}"
    );
    assert!(
        msg.contains("model.safetensors") && msg.contains(REPO),
        "{msg}"
    );
    // Only the complete, verified config blob is in the cache; no weights blob, no .part, no ref.
    assert_eq!(
        verified_blobs(tmp.path(), REPO),
        vec![git_sha1(&config_json())]
    );
    let all = files_below(tmp.path());
    assert!(all.iter().all(|f| !f.contains("safetensors")), "{all:?}");
    assert!(
        all.iter()
            .all(|f| !f.ends_with(".part") && !f.ends_with(".incomplete")),
        "{all:?}"
    );
    assert!(!all.iter().any(|f| f.contains("refs/")), "{all:?}");
    no_staging_left(tmp.path());
    // Still "not cached": resolution says how to fetch.
    let err = resolve_model(
        REPO,
        &ResolveOptions::default().with_hub(hub(tmp.path(), &server.endpoint)),
    )
    .unwrap_err();
    assert!(matches!(err, HubError::NotCached { .. }));

    // Once the server behaves, a new fetch completes (re-using the config blob).
    server.edit_file(REPO, "model.safetensors", |f| f.cut_after = None);
    let report = fetch(REPO, None, &hub(tmp.path(), &server.endpoint), false)?;
    let FetchOutcome::Downloaded { files } = report.outcome else {
        panic!()
    };
    assert_eq!(
        files
            .iter()
            .map(|f| (f.name.as_str(), f.transferred))
            .collect::<Vec<_>>(),
        [("config.json", false), ("model.safetensors", true)]
    );
    assert_eq!(std::fs::read(report.files.weights.paths()[0])?, weights);
    Ok(())
}

#[test]
fn corrupted_transfer_is_rejected_by_hash() {
    let server = FakeHub::start();
    let weights = vec![1u8; 4096];
    server.add_repo(
        REPO,
        COMMIT,
        &[
            ("config.json", config_json()),
            ("model.safetensors", weights),
        ],
    );
    // Same length, different bytes: only the sha256 check can notice.
    server.edit_file(REPO, "model.safetensors", |f| {
        f.body_override = Some(vec![2u8; 4096])
    });
    let tmp = tempfile::tempdir().unwrap();
    let err = fetch(REPO, None, &hub(tmp.path(), &server.endpoint), false).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, HubError::Corrupt { .. }), "{msg}");
    assert!(msg.contains("does not match the hub's etag"), "{msg}");
    assert_eq!(
        verified_blobs(tmp.path(), REPO),
        vec![git_sha1(&config_json())]
    );
    no_staging_left(tmp.path());
}

#[test]
fn http_errors_carry_hints() {
    let server = FakeHub::start();
    let tmp = tempfile::tempdir().unwrap();
    let h = hub(tmp.path(), &server.endpoint);
    let msg = fetch("microsoft/beit-nonexistent", None, &h, false)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("HTTP 404") && msg.contains("check the repo id"),
        "{msg}"
    );
    server
        .state
        .lock()
        .unwrap()
        .status
        .insert("org/gated".into(), 401);
    let msg = fetch("org/gated", None, &h, false).unwrap_err().to_string();
    assert!(
        msg.contains("HTTP 401") && msg.contains("HF_TOKEN"),
        "{msg}"
    );
    // A repo without weights.
    server.add_repo(
        "org/no-weights",
        COMMIT,
        &[("config.json", config_json()), ("README.md", b"x".to_vec())],
    );
    let msg = fetch("org/no-weights", None, &h, false)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("has no weights") && msg.contains("README.md"),
        "{msg}"
    );
    assert!(files_below(tmp.path())
        .iter()
        .all(|f| !f.contains("blobs/") || f.contains("no-weights")));
}

#[test]
fn concurrent_fetches_of_one_checkpoint_agree() -> anyhow::Result<()> {
    let server = FakeHub::start();
    let weights: Vec<u8> = (0..100_000u32).map(|i| (i % 253) as u8).collect();
    server.add_repo(
        REPO,
        COMMIT,
        &[
            ("config.json", config_json()),
            ("model.safetensors", weights.clone()),
        ],
    );
    let tmp = tempfile::tempdir()?;
    let h = hub(tmp.path(), &server.endpoint);
    let reports: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..3)
            .map(|_| s.spawn(|| fetch(REPO, None, &h, false)))
            .collect();
        handles.into_iter().map(|t| t.join().unwrap()).collect()
    });
    for r in &reports {
        let r = r.as_ref().map_err(|e| anyhow::anyhow!("{e}"))?;
        assert_eq!(std::fs::read(r.files.weights.paths()[0])?, weights);
    }
    assert_eq!(verified_blobs(tmp.path(), REPO).len(), 2);
    let all = files_below(tmp.path());
    assert!(all.iter().all(|f| !f.contains(".tmp-")), "{all:?}");
    no_staging_left(tmp.path());
    Ok(())
}

#[test]
fn staging_left_by_a_killed_fetch_is_removed() -> anyhow::Result<()> {
    let server = FakeHub::start();
    server.add_repo(
        REPO,
        COMMIT,
        &[
            ("config.json", config_json()),
            ("model.safetensors", b"w".to_vec()),
        ],
    );
    let tmp = tempfile::tempdir()?;
    // A process that has exited: its staging folder is stale.
    let mut child = std::process::Command::new("true").spawn()?;
    let dead = child.id();
    child.wait()?;
    let stale = tmp.path().join(STAGING_DIR).join(format!("{dead}-0"));
    std::fs::create_dir_all(stale.join("models--x--y/blobs"))?;
    std::fs::write(stale.join("models--x--y/blobs/abc.part"), b"partial")?;
    fetch(REPO, None, &hub(tmp.path(), &server.endpoint), false)?;
    assert!(!stale.exists());
    no_staging_left(tmp.path());
    Ok(())
}
