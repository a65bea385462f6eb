//! Every workspace member takes the workspace's lints (`[lints] workspace = true`), so the
//! `[workspace.lints]` of the root `Cargo.toml` (unsafe_op_in_unsafe_fn, the SAFETY comment on
//! every unsafe block, ...) hold for a crate added later too.

// Shared with the other layout tests; this one reads manifests only.
#[allow(dead_code)]
mod workspace;

#[test]
fn every_member_takes_the_workspace_lints() {
    let root = workspace::root();
    let root_manifest = workspace::read_toml(&root.join("Cargo.toml"));
    assert!(
        root_manifest["workspace"].get("lints").is_some(),
        "the root Cargo.toml has no [workspace.lints]"
    );
    let missing: Vec<String> = workspace::members()
        .into_iter()
        .filter(|member| {
            let manifest = workspace::read_toml(&member.join("Cargo.toml"));
            let lints = manifest.get("lints").and_then(|l| l.get("workspace"));
            lints.and_then(|w| w.as_bool()) != Some(true)
        })
        .map(|member| {
            member
                .strip_prefix(&root)
                .unwrap_or(&member)
                .display()
                .to_string()
        })
        .collect();
    assert!(
        missing.is_empty(),
        "members without `[lints] workspace = true` in their Cargo.toml: {}",
        missing.join(", ")
    );
}
