//! Fuzzing the TOML recipes of every command (mutations of the shipped configs): no panic, no
//! allocation beyond the limit, and a rejected file is named in the error.
//!
//! CI runs a short pass; `cargo test -p beit-recipes --release --test fuzz_recipes -- --ignored`
//! runs 100,000 cases.

#[path = "../../beit-model/tests/common/fuzz.rs"]
mod fuzz;

use std::path::Path;

use beit_recipes::{
    load_config, FinetuneConfig, LinearProbeConfig, PretrainConfig, TokenizerConfig,
};
use proptest::prelude::*;

#[global_allocator]
static ALLOC: fuzz::Tracking = fuzz::Tracking;

const LIMIT: usize = 64 << 20;

/// `load_config` of the recipe type that `file` is for.
fn parse(file: &str, path: &Path) -> anyhow::Result<()> {
    match file {
        f if f.starts_with("pretrain") => {
            load_config::<PretrainConfig>(Some(path), &[], &[]).map(drop)
        }
        f if f.starts_with("finetune") => {
            load_config::<FinetuneConfig>(Some(path), &[], &[]).map(drop)
        }
        f if f.starts_with("linear_probe") => {
            load_config::<LinearProbeConfig>(Some(path), &[], &[]).map(drop)
        }
        _ => load_config::<TokenizerConfig>(Some(path), &[], &[]).map(drop),
    }
}

fn recipes_target(cases: u32) {
    let files = [
        "pretrain_fashion_mnist.toml",
        "finetune_fashion_mnist.toml",
        "linear_probe_base.toml",
        "tokenizer_fashion_mnist.toml",
    ];
    let configs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs");
    let seeds: Vec<Vec<u8>> = files
        .iter()
        .map(|f| std::fs::read(configs.join(f)).unwrap())
        .collect();
    // The shipped recipes themselves parse.
    for f in files {
        parse(f, &configs.join(f)).unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("recipe.toml");
    let n = files.len();
    fuzz::run(
        "TOML recipes",
        cases,
        (0..n, fuzz::edits()),
        |(i, edits)| {
            std::fs::write(&path, fuzz::apply(&seeds[i], &edits)).unwrap();
            if let Err(e) = parse(files[i], &path) {
                let m = format!("{e:#}");
                prop_assert!(
                    m.contains("recipe.toml"),
                    "the error does not name the file: {m}"
                );
            }
            fuzz::check_allocations(LIMIT, "TOML recipes")
        },
    );
}

#[test]
fn fuzz_recipes_short() {
    recipes_target(fuzz::SHORT_CASES);
}

#[test]
#[ignore = "100k cases: run with --release -- --ignored"]
fn fuzz_recipes_100k() {
    recipes_target(fuzz::FULL_CASES);
}
