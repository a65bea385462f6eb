//! Shared by the fuzz tests of beit-model, beit-data and beit-tokenizer (included with `#[path]`):
//! a proptest runner with a fixed seed, byte-level mutations of valid seed files, and a global
//! allocator that records the largest single allocation, so that a length field read from a hostile
//! file cannot make a loader allocate beyond its declared limit unnoticed.
//!
//! Each target runs `SHORT_CASES` cases in CI and `FULL_CASES` in an ignored test:
//! `cargo test -p <crate> --release --test <fuzz file> -- --ignored`. `BEIT_FUZZ_SEED` (a number)
//! changes the seed.

#![allow(dead_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};

/// Cases per target in the CI run.
pub const SHORT_CASES: u32 = 300;
/// Cases per target in the ignored run.
pub const FULL_CASES: u32 = 100_000;

/// The system allocator, recording the largest request.
pub struct Tracking;

static LARGEST: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every method forwards to `System` with the caller's arguments unchanged (so `System`'s
// guarantees hold); the only addition is an atomic maximum, which neither allocates nor panics.
unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        // SAFETY: forwarded as is; the caller upholds `GlobalAlloc::alloc`'s contract.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by `System` through this allocator with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.fetch_max(new_size, Ordering::Relaxed);
        // SAFETY: `ptr`/`layout` come from this allocator (i.e. `System`); forwarded as is.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// The largest single allocation made so far by this test binary.
pub fn largest_allocation() -> usize {
    LARGEST.load(Ordering::Relaxed)
}

/// Fail the case if any allocation so far exceeded `limit` bytes.
pub fn check_allocations(limit: usize, what: &str) -> Result<(), TestCaseError> {
    let largest = largest_allocation();
    if largest > limit {
        return Err(TestCaseError::fail(format!(
            "{what}: an allocation of {largest} bytes exceeded the {limit} byte limit"
        )));
    }
    Ok(())
}

/// Run `test` on `cases` values of `strategy` with a fixed seed; panics (caught by proptest) and
/// failures are shrunk and reported with the failing input.
pub fn run<S>(
    name: &str,
    cases: u32,
    strategy: S,
    test: impl Fn(S::Value) -> Result<(), TestCaseError>,
) where
    S: Strategy,
    S::Value: std::fmt::Debug,
{
    let seed: u64 = std::env::var("BEIT_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x6265_6974);
    let mut seed_bytes = [0u8; 32];
    seed_bytes[..8].copy_from_slice(&seed.to_le_bytes());
    let config = Config {
        cases,
        failure_persistence: None,
        max_shrink_iters: 4096,
        ..Config::default()
    };
    let rng = TestRng::from_seed(RngAlgorithm::ChaCha, &seed_bytes);
    let mut runner = TestRunner::new_with_rng(config, rng);
    let start = std::time::Instant::now();
    if let Err(e) = runner.run(&strategy, test) {
        panic!("fuzz target `{name}` failed: {e}");
    }
    println!(
        "fuzz target `{name}`: {cases} cases, no panic, no failure ({:.1}s, largest allocation {} bytes)",
        start.elapsed().as_secs_f64(),
        largest_allocation()
    );
}

/// One byte-level change to a seed file.
#[derive(Debug, Clone)]
pub enum Edit {
    /// XOR the byte at (position mod len) with a non-zero mask.
    Flip(usize, u8),
    /// Overwrite 4 bytes with a 32-bit value, little- or big-endian (length fields).
    Word(usize, u32, bool),
    /// Insert bytes.
    Insert(usize, Vec<u8>),
    /// Delete a run of bytes.
    Delete(usize, usize),
    /// Cut the file.
    Truncate(usize),
    /// Copy a run of bytes elsewhere (duplicated markers, chunks).
    Splice(usize, usize, usize),
}

fn word() -> impl Strategy<Value = u32> {
    prop_oneof![
        Just(0u32),
        Just(1),
        Just(0x7fff_ffff),
        Just(0x8000_0000),
        Just(u32::MAX),
        Just(0xffff),
        Just(0x1_0000),
        any::<u32>(),
    ]
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        4 => (any::<usize>(), 1u8..=255).prop_map(|(p, m)| Edit::Flip(p, m)),
        2 => (any::<usize>(), word(), any::<bool>()).prop_map(|(p, w, be)| Edit::Word(p, w, be)),
        1 => (any::<usize>(), prop::collection::vec(any::<u8>(), 1..16)).prop_map(|(p, b)| Edit::Insert(p, b)),
        1 => (any::<usize>(), 1usize..64).prop_map(|(p, n)| Edit::Delete(p, n)),
        1 => any::<usize>().prop_map(Edit::Truncate),
        1 => (any::<usize>(), any::<usize>(), 1usize..32).prop_map(|(a, b, n)| Edit::Splice(a, b, n)),
    ]
}

/// A few edits.
pub fn edits() -> impl Strategy<Value = Vec<Edit>> {
    prop::collection::vec(edit(), 1..6)
}

/// Apply `edits` to a copy of `seed`; positions wrap around the current length.
pub fn apply(seed: &[u8], edits: &[Edit]) -> Vec<u8> {
    let mut b = seed.to_vec();
    for e in edits {
        if b.is_empty() {
            break;
        }
        let n = b.len();
        match e {
            Edit::Flip(p, m) => b[p % n] ^= m,
            Edit::Word(p, w, be) => {
                let bytes = if *be {
                    w.to_be_bytes()
                } else {
                    w.to_le_bytes()
                };
                let p = p % n;
                for (i, x) in bytes.iter().enumerate() {
                    if p + i < n {
                        b[p + i] = *x;
                    }
                }
            }
            Edit::Insert(p, v) => {
                let p = p % (n + 1);
                b.splice(p..p, v.iter().copied());
            }
            Edit::Delete(p, k) => {
                let p = p % n;
                let end = (p + k).min(n);
                b.drain(p..end);
            }
            Edit::Truncate(p) => b.truncate(p % n),
            Edit::Splice(from, to, k) => {
                let from = from % n;
                let end = (from + k).min(n);
                let chunk: Vec<u8> = b[from..end].to_vec();
                let to = to % (n + 1);
                b.splice(to..to, chunk);
            }
        }
    }
    b
}
