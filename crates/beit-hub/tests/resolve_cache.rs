//! Resolution from a cache laid out as `huggingface_hub` lays it out (blobs, relative snapshot
//! symlinks, refs), and from local directories. No network.
// The caches are built with Unix symlinks, as huggingface_hub builds them there.
#![cfg(unix)]

mod common;

use beit_hub::{fetch, resolve_model, HubConfig, HubError, ResolveOptions, WeightFiles};
use common::*;

const REPO: &str = "microsoft/beit-base-patch16-224";

fn hub(cache: &std::path::Path) -> HubConfig {
    // Explicit settings: nothing read from (or written to) this process's environment.
    HubConfig {
        cache_dir: cache.to_path_buf(),
        endpoint: format!("http://127.0.0.1:{}", closed_port()),
        token: None,
        offline: false,
        connect_timeout: std::time::Duration::from_secs(10),
    }
}

fn opts(cache: &std::path::Path) -> ResolveOptions {
    ResolveOptions::default().with_hub(hub(cache))
}

#[test]
fn resolves_safetensors_checkpoint_through_refs_and_symlinks() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let weights = b"not really safetensors, but bytes".to_vec();
    let repo_dir = write_cached(
        tmp.path(),
        REPO,
        COMMIT,
        Some("main"),
        &[
            ("config.json", &config_json()),
            ("preprocessor_config.json", b"{\"size\":224}"),
            ("model.safetensors", &weights),
            // Both formats present: safetensors must win.
            ("pytorch_model.bin", b"pickle"),
        ],
    );
    let files = resolve_model(REPO, &opts(tmp.path()))?;
    let snap = repo_dir.join("snapshots").join(COMMIT);
    assert_eq!(files.dir, snap);
    assert_eq!(files.config, snap.join("config.json"));
    assert_eq!(
        files.preprocessor_config,
        Some(snap.join("preprocessor_config.json"))
    );
    assert_eq!(
        files.weights,
        WeightFiles::Safetensors(snap.join("model.safetensors"))
    );
    // The snapshot entry is a symlink into blobs/ holding the real bytes.
    assert_eq!(std::fs::read(files.weights.paths()[0])?, weights);
    assert_eq!(
        std::fs::canonicalize(&files.config)?,
        std::fs::canonicalize(repo_dir.join("blobs").join(git_sha1(&config_json())))?
    );
    let origin = files.hub.unwrap();
    assert_eq!(
        (origin.repo.as_str(), origin.commit.as_str()),
        (REPO, COMMIT)
    );
    Ok(())
}

#[test]
fn revisions_by_spec_option_commit_and_tag() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    write_cached(
        tmp.path(),
        REPO,
        COMMIT,
        Some("main"),
        &[
            ("config.json", &config_json()),
            ("model.safetensors", b"v1"),
        ],
    );
    // A second commit, reachable through a tag-like ref `v2` and a PR ref with slashes.
    write_cached(
        tmp.path(),
        REPO,
        COMMIT2,
        Some("v2"),
        &[
            ("config.json", &config_json()),
            ("pytorch_model.bin", b"v2"),
        ],
    );
    write_cached(tmp.path(), REPO, COMMIT2, Some("refs/pr/7"), &[]);

    let o = opts(tmp.path());
    let main = resolve_model(REPO, &o)?;
    assert_eq!(main.hub.unwrap().commit, COMMIT);
    let v2 = resolve_model(&format!("{REPO}@v2"), &o)?;
    assert!(matches!(v2.weights, WeightFiles::PytorchBin(_)));
    assert_eq!(v2.hub.unwrap().commit, COMMIT2);
    let pr = resolve_model(&format!("{REPO}@refs/pr/7"), &o)?;
    assert_eq!(pr.hub.unwrap().commit, COMMIT2);
    // A full commit hash needs no ref.
    let by_commit = resolve_model(&format!("{REPO}@{COMMIT2}"), &o)?;
    assert_eq!(by_commit.dir, v2.dir);
    // The option supplies the revision when the spec has none; the spec's `@` wins over it.
    let via_opt = resolve_model(REPO, &o.clone().with_revision("v2"))?;
    assert_eq!(via_opt.dir, v2.dir);
    let spec_wins = resolve_model(&format!("{REPO}@main"), &o.clone().with_revision("v2"))?;
    assert_eq!(spec_wins.dir, main.dir);

    let err = resolve_model(&format!("{REPO}@v9"), &o).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, HubError::NotCached { .. }), "{msg}");
    assert!(msg.contains("revision v9"), "{msg}");
    assert!(
        msg.contains(&format!("cargo xtask fetch-weights {REPO} --revision v9")),
        "{msg}"
    );
    Ok(())
}

#[test]
fn sharded_safetensors_and_missing_shard() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let index = br#"{"metadata":{"total_size":4},"weight_map":{
        "beit.embeddings.cls_token":"model-00001-of-00002.safetensors",
        "classifier.weight":"model-00002-of-00002.safetensors",
        "classifier.bias":"model-00002-of-00002.safetensors"}}"#;
    let repo_dir = write_cached(
        tmp.path(),
        REPO,
        COMMIT,
        Some("main"),
        &[
            ("config.json", &config_json()),
            ("model.safetensors.index.json", index),
            ("model-00001-of-00002.safetensors", b"s1"),
            ("model-00002-of-00002.safetensors", b"s2"),
            ("pytorch_model.bin", b"pickle"),
        ],
    );
    let files = resolve_model(REPO, &opts(tmp.path()))?;
    let snap = repo_dir.join("snapshots").join(COMMIT);
    assert_eq!(
        files.weights,
        WeightFiles::ShardedSafetensors {
            index: snap.join("model.safetensors.index.json"),
            shards: vec![
                snap.join("model-00001-of-00002.safetensors"),
                snap.join("model-00002-of-00002.safetensors"),
            ],
        }
    );
    assert_eq!(files.preprocessor_config, None);

    std::fs::remove_file(snap.join("model-00002-of-00002.safetensors"))?;
    let msg = resolve_model(REPO, &opts(tmp.path()))
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("has no model-00002-of-00002.safetensors"),
        "{msg}"
    );
    Ok(())
}

#[test]
fn pytorch_bin_fallback() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let repo_dir = write_cached(
        tmp.path(),
        "microsoft/beit-base-finetuned-ade-640-640",
        COMMIT,
        Some("main"),
        &[
            ("config.json", &config_json()),
            ("pytorch_model.bin", b"pickle"),
        ],
    );
    let files = resolve_model(
        "microsoft/beit-base-finetuned-ade-640-640",
        &opts(tmp.path()),
    )?;
    assert_eq!(
        files.weights,
        WeightFiles::PytorchBin(
            repo_dir
                .join("snapshots")
                .join(COMMIT)
                .join("pytorch_model.bin")
        )
    );
    Ok(())
}

#[test]
fn missing_checkpoint_names_repo_cache_and_fix() {
    let tmp = tempfile::tempdir().unwrap();
    let err = resolve_model(REPO, &opts(tmp.path())).unwrap_err();
    assert!(matches!(err, HubError::NotCached { .. }));
    assert_eq!(
        err.to_string(),
        format!(
            "{REPO} (revision main) is not in the Hugging Face cache ({}); fetch it with \
             `cargo xtask fetch-weights {REPO}` or pass a local directory",
            tmp.path().display()
        )
    );
    // A snapshot without weights names what is missing.
    write_cached(
        tmp.path(),
        REPO,
        COMMIT,
        Some("main"),
        &[("config.json", &config_json())],
    );
    let before = files_below(tmp.path());
    let msg = resolve_model(REPO, &opts(tmp.path()))
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains(&format!("snapshot {COMMIT} has no model.safetensors (nor sharded safetensors, nor pytorch_model.bin)")),
        "{msg}"
    );
    // Resolution alone never creates anything in the cache.
    assert_eq!(files_below(tmp.path()), before);
}

#[test]
fn offline_mode_with_missing_checkpoint_is_one_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let mut o = opts(tmp.path()).with_download(true);
    o.hub.offline = true;
    let err = resolve_model(REPO, &o).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, HubError::Offline { .. }), "{msg}");
    assert!(
        msg.contains(REPO) && msg.contains("HF_HUB_OFFLINE"),
        "{msg}"
    );
    assert!(
        msg.contains(&format!("cargo xtask fetch-weights {REPO}")),
        "{msg}"
    );
    // fetch() agrees, and writes nothing.
    let err = fetch(REPO, None, &o.hub, false).unwrap_err();
    assert!(matches!(err, HubError::Offline { .. }));
    assert!(files_below(tmp.path()).is_empty());
}

#[test]
fn cached_checkpoint_is_reported_without_network() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    write_cached(
        tmp.path(),
        REPO,
        COMMIT,
        Some("main"),
        &[("config.json", &config_json()), ("model.safetensors", b"w")],
    );
    // The endpoint is a closed port: any request would fail.
    for offline in [false, true] {
        let h = hub(tmp.path()).with_offline(offline);
        let report = fetch(REPO, None, &h, false)?;
        assert_eq!(report.outcome, beit_hub::FetchOutcome::Cached);
        assert_eq!(report.files.hub.unwrap().commit, COMMIT);
    }
    Ok(())
}

#[test]
fn dangling_symlink_is_reported_as_broken_entry() {
    let tmp = tempfile::tempdir().unwrap();
    let repo_dir = write_cached(
        tmp.path(),
        REPO,
        COMMIT,
        Some("main"),
        &[("config.json", &config_json()), ("model.safetensors", b"w")],
    );
    std::fs::remove_file(repo_dir.join("blobs").join(sha256(b"w"))).unwrap();
    let err = resolve_model(REPO, &opts(tmp.path())).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, HubError::BrokenCacheEntry { .. }), "{msg}");
    assert!(
        msg.contains("model.safetensors") && msg.contains("fetch-weights"),
        "{msg}"
    );
}

#[test]
fn local_directories() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("my-beit");
    std::fs::create_dir(&dir)?;
    let o = opts(tmp.path());
    let spec = dir.to_str().unwrap();

    let err = resolve_model(spec, &o).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "{} has no config.json; a model directory needs config.json next to the weights",
            dir.display()
        )
    );
    std::fs::write(dir.join("config.json"), config_json())?;
    let err = resolve_model(spec, &o).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "{} has no weights: looked for model.safetensors, model.safetensors.index.json (sharded) \
             and pytorch_model.bin",
            dir.display()
        )
    );
    std::fs::write(dir.join("pytorch_model.bin"), b"x")?;
    let files = resolve_model(spec, &o)?;
    assert_eq!(
        files.weights,
        WeightFiles::PytorchBin(dir.join("pytorch_model.bin"))
    );
    assert_eq!(files.hub, None);
    std::fs::write(dir.join("model.safetensors"), b"x")?;
    let files = resolve_model(spec, &o)?;
    assert_eq!(
        files.weights,
        WeightFiles::Safetensors(dir.join("model.safetensors"))
    );

    let err = resolve_model("no/such/dir", &o).unwrap_err();
    assert!(matches!(err, HubError::InvalidSpec { .. }));
    assert!(err.to_string().contains("`no/such/dir`"));
    Ok(())
}
