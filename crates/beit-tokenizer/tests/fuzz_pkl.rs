//! Fuzzing the DALL-E `.pkl` reader (legacy and zip layouts, mutated): no panic, no allocation
//! beyond the limit, errors that name the file. (The TOML recipes are fuzzed in beit-recipes.)
//!
//! CI runs a short pass; `cargo test -p beit-tokenizer --release --test fuzz_pkl -- --ignored`
//! runs 100,000 cases per target.

#[path = "../../beit-model/tests/common/fuzz.rs"]
mod fuzz;

use std::path::{Path, PathBuf};

use beit_tokenizer::pkl::{load_dalle_pkl, parse_dalle_pkl};
use proptest::prelude::*;

#[global_allocator]
static ALLOC: fuzz::Tracking = fuzz::Tracking;

const LIMIT: usize = 64 << 20;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn pkl_target(cases: u32) {
    let seeds: Vec<Vec<u8>> = [
        "tokenizer/legacy_block.pkl",
        "family/fuzz_seeds/state_dict.bin",
        "family/fuzz_seeds/plain_protocol2.pkl",
    ]
    .iter()
    .map(|p| std::fs::read(fixtures().join(p)).unwrap())
    .collect();
    let n = seeds.len();
    fuzz::run("DALL-E .pkl", cases, (0..n, fuzz::edits()), |(i, edits)| {
        let bytes = fuzz::apply(&seeds[i], &edits);
        let path = Path::new("fuzz/encoder.pkl");
        if let Err(e) = parse_dalle_pkl(&bytes, path) {
            let m = e.to_string();
            prop_assert!(
                m.contains("encoder.pkl"),
                "the error does not name the file: {m}"
            );
        }
        fuzz::check_allocations(LIMIT, "DALL-E .pkl")
    });
}

#[test]
fn fuzz_dalle_pkl_short() {
    pkl_target(fuzz::SHORT_CASES);
}

#[test]
#[ignore = "100k cases: run with --release -- --ignored"]
fn fuzz_dalle_pkl_100k() {
    pkl_target(fuzz::FULL_CASES);
}

#[test]
fn a_pkl_that_runs_code_is_refused_naming_the_callable() {
    let dir = tempfile::tempdir().unwrap();
    for (name, bytes, callable) in [
        (
            "os.pkl",
            &b"cos\nsystem\n(S'echo pwned'\ntR."[..],
            "os.system",
        ),
        (
            "posix.pkl",
            &b"cposix\nsystem\n(S'id'\ntR."[..],
            "posix.system",
        ),
        (
            "eval.pkl",
            &b"\x80\x04\x8c\x08builtins\x94\x8c\x04eval\x94\x93\x8c\x031+1\x85R."[..],
            "builtins.eval",
        ),
    ] {
        // As the legacy layout: the torch magic pickle first, then the payload.
        let mut file = vec![
            0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19,
            b'.',
        ];
        file.extend_from_slice(bytes);
        let path = dir.path().join(name);
        std::fs::write(&path, &file).unwrap();
        let e = load_dalle_pkl(&path).unwrap_err().to_string();
        assert!(
            e.contains(&format!("`{callable}`")) && e.contains(name),
            "{e}"
        );
    }
    // OpenAI's real layout is still read.
    assert!(
        !load_dalle_pkl(&fixtures().join("tokenizer/dalle_small_encoder.pkl"))
            .unwrap()
            .is_empty()
    );
}
