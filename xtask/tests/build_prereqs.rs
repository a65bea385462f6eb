//! The default build needs a Rust toolchain and a C compiler, nothing else (README, "Prerequisites"):
//! no `cmake` and no `nasm`. This test resolves the workspace's dependency graph with default features
//! (`cargo metadata`, whose `resolve.nodes` holds only the dependencies actually activated) and fails,
//! naming the dependency path, if any workspace member reaches a crate that runs cmake or nasm at
//! build time. Opt-in features (beit-data's `jpeg-simd`, the CUDA and MPI features) may need more;
//! they are not activated here, so they are not checked.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::Path;
use std::process::Command;

use serde_json::Value;

/// Crates whose build script runs cmake or nasm, by crate name, with the reason. A `-sys` crate that
/// builds its C library through the `cmake` or `nasm-rs` crate is caught by those two entries already
/// (`turbojpeg-sys` with its `cmake` feature; `mozjpeg-sys` with `nasm_simd`, beit-data's
/// `jpeg-simd`); the others listed run the tools themselves or cannot build without them.
const NEEDS_CMAKE_OR_NASM: &[(&str, &str)] = &[
    (
        "cmake",
        "the cmake-rs crate: runs the `cmake` program from a build script",
    ),
    ("nasm-rs", "assembles .asm sources with the `nasm` program"),
    (
        "turbojpeg-sys",
        "builds libjpeg-turbo with cmake (and nasm for its SIMD code), or needs it installed",
    ),
    ("libz-ng-sys", "builds zlib-ng with cmake"),
    ("aws-lc-fips-sys", "builds AWS-LC (FIPS) with cmake"),
    ("shaderc-sys", "builds shaderc with cmake"),
    ("sdl2-sys", "builds SDL2 with cmake (feature `bundled`)"),
];

#[test]
fn default_build_needs_neither_cmake_nor_nasm() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    // xtask sits one level below the workspace root; cargo finds the root from here.
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new(&cargo)
        .args(["metadata", "--format-version", "1", "--locked", "--offline"])
        .current_dir(manifest_dir)
        .output()
        .expect("run `cargo metadata`");
    assert!(
        out.status.success(),
        "`cargo metadata --locked --offline` failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: Value = serde_json::from_slice(&out.stdout).expect("cargo metadata JSON");

    let name_of: HashMap<&str, &str> = meta["packages"]
        .as_array()
        .expect("packages")
        .iter()
        .map(|p| (p["id"].as_str().unwrap(), p["name"].as_str().unwrap()))
        .collect();
    // Package id -> its activated dependencies (normal, build and dev, every target platform).
    let deps: HashMap<&str, Vec<&str>> = meta["resolve"]["nodes"]
        .as_array()
        .expect("resolve.nodes")
        .iter()
        .map(|n| {
            let ds = n["deps"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d["pkg"].as_str().unwrap())
                .collect();
            (n["id"].as_str().unwrap(), ds)
        })
        .collect();
    let members: Vec<&str> = meta["workspace_members"]
        .as_array()
        .expect("workspace_members")
        .iter()
        .map(|m| m.as_str().unwrap())
        .collect();

    // Breadth-first from every workspace member, keeping each package's parent for the path.
    let mut parent: HashMap<&str, Option<&str>> = HashMap::new();
    let mut queue: VecDeque<&str> = VecDeque::new();
    for &m in &members {
        parent.insert(m, None);
        queue.push_back(m);
    }
    let mut offenders = Vec::new();
    let mut reported = HashSet::new();
    while let Some(id) = queue.pop_front() {
        let name = name_of[id];
        if let Some((_, why)) = NEEDS_CMAKE_OR_NASM.iter().find(|(n, _)| *n == name) {
            if reported.insert(name) {
                let mut path = vec![name];
                let mut at = id;
                while let Some(Some(up)) = parent.get(at) {
                    path.push(name_of[up]);
                    at = up;
                }
                path.reverse();
                offenders.push(format!("  {} ({why})", path.join(" -> ")));
            }
        }
        for &d in deps.get(id).map(Vec::as_slice).unwrap_or_default() {
            if !parent.contains_key(d) {
                parent.insert(d, Some(id));
                queue.push_back(d);
            }
        }
    }
    assert!(
        offenders.is_empty(),
        "the default build now needs cmake or nasm, which the README promises it does not; \
         make the dependency opt-in (a feature) or find another:\n{}",
        offenders.join("\n")
    );
    // The walk saw the graph: beit-data's JPEG decoder is in it.
    assert!(
        parent.keys().any(|id| name_of[id] == "mozjpeg-sys"),
        "mozjpeg-sys not found in the resolved graph"
    );
}
