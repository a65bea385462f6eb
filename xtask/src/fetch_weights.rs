//! `cargo xtask fetch-weights`.

use anyhow::{bail, Result};
use beit_hub::{fetch, known_checkpoints, CachedRepo, FetchOutcome, HubConfig, HubError};
use clap::Args;

/// Download checkpoints with `hf-hub` into the standard Hugging Face cache
/// (`HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`).
///
/// Honours `HF_ENDPOINT`, `HF_TOKEN` and `HF_HUB_OFFLINE=1`. A checkpoint already in the cache is
/// reported without touching the network.
#[derive(Args, Debug)]
pub struct FetchWeightsArgs {
    /// Hub repository ids, e.g. `microsoft/beit-base-patch16-224` (`@REV` selects a revision).
    #[arg(value_name = "REPO_ID")]
    pub repos: Vec<String>,
    /// Fetch every known checkpoint of the family (about 28 GB in all).
    #[arg(long, conflicts_with = "repos")]
    pub all: bool,
    /// List the known checkpoints (BEiT, timm BEiT v1/v2, data2vec-vision, DiT), their size and
    /// published result, and which are cached.
    #[arg(long, conflicts_with_all = ["repos", "all"])]
    pub list: bool,
    /// Branch, tag or commit to fetch (default `main`).
    #[arg(long, value_name = "REV")]
    pub revision: Option<String>,
    /// Do not draw progress bars.
    #[arg(long)]
    pub no_progress: bool,
}

pub fn run(args: FetchWeightsArgs) -> Result<()> {
    let hub = HubConfig::from_env();
    if args.list {
        print!("{}", list(&hub, args.revision.as_deref().unwrap_or("main")));
        return Ok(());
    }
    let targets: Vec<String> = if args.all {
        known_checkpoints()
            .iter()
            .map(|k| k.repo.to_string())
            .collect()
    } else {
        args.repos.clone()
    };
    if targets.is_empty() {
        bail!("name at least one repo id (e.g. microsoft/beit-base-patch16-224), or pass --all or --list");
    }
    let mut failures = Vec::new();
    for target in &targets {
        let (repo, revision) = match target.split_once('@') {
            Some((repo, rev)) => (repo, Some(rev.to_string())),
            None => (target.as_str(), args.revision.clone()),
        };
        match fetch(repo, revision.as_deref(), &hub, !args.no_progress) {
            Ok(report) => {
                let origin = report.files.hub.as_ref();
                let commit = origin
                    .map(|o| &o.commit[..o.commit.len().min(10)])
                    .unwrap_or("?");
                match &report.outcome {
                    FetchOutcome::Cached => println!(
                        "{repo}: already cached (commit {commit}) in {}",
                        report.files.dir.display()
                    ),
                    FetchOutcome::Downloaded { files } => {
                        let moved: u64 =
                            files.iter().filter(|f| f.transferred).map(|f| f.size).sum();
                        let names: Vec<_> = files.iter().map(|f| f.name.as_str()).collect();
                        println!(
                            "{repo}: fetched {} ({:.1} MB downloaded, commit {commit}) into {}",
                            names.join(", "),
                            moved as f64 / 1e6,
                            report.files.dir.display()
                        );
                    }
                }
            }
            Err(e) => {
                eprintln!("error: {e}");
                failures.push((repo.to_string(), e));
            }
        }
    }
    match failures.len() {
        0 => Ok(()),
        1 if targets.len() == 1 => {
            // Already printed; exit non-zero without repeating it.
            std::process::exit(1)
        }
        n => bail!(
            "{n} of {} checkpoints could not be fetched: {}",
            targets.len(),
            failures
                .iter()
                .map(|(r, _)| r.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// The `--list` table. Reads the cache only.
fn list(hub: &HubConfig, revision: &str) -> String {
    let mut out = format!(
        "Known checkpoints of the BEiT family (cache: {}{})\n",
        hub.cache_dir.display(),
        if revision == "main" {
            String::new()
        } else {
            format!(", revision {revision}")
        }
    );
    out.push_str(&format!(
        "{:<50} {:<15} {:<6} {:<12} {:>4} {:>9} {:>22}  {}\n",
        "repo", "family", "size", "head", "res", "≈download", "published", "cached"
    ));
    for k in known_checkpoints() {
        let published = match k.published {
            Some(v) => format!("{} {v:.1}", k.metric),
            None => "-".to_string(),
        };
        out.push_str(&format!(
            "{:<50} {:<15} {:<6} {:<12} {:>4} {:>6} MB {:>22}  {}\n",
            k.repo,
            k.family.label(),
            k.size,
            k.head.label(),
            k.resolution,
            k.approx_mb,
            published,
            cached_status(hub, k.repo, revision)
        ));
    }
    out
}

fn cached_status(hub: &HubConfig, repo: &str, revision: &str) -> String {
    match CachedRepo::new(&hub.cache_dir, repo).resolve(revision) {
        Ok(files) => {
            let commit = files.hub.map(|o| o.commit).unwrap_or_default();
            format!("yes ({})", &commit[..commit.len().min(10)])
        }
        Err(HubError::NotCached { .. }) => "no".to_string(),
        Err(e @ HubError::BrokenCacheEntry { .. }) => format!("broken: {e}"),
        Err(e) => format!("error: {e}"),
    }
}
