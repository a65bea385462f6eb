//! Parameter groups for the full name lists of base BEiT models.

use std::collections::BTreeMap;

use beit_train::{build_param_groups, GroupingConfig, ParamGroup};
use candle::{DType, Device, Var};
use serde_json::Value;

/// The per-block tensors of the classic `transformers` layout, with shapes.
fn block_params(i: usize, per_layer_table: bool) -> Vec<(String, Vec<usize>)> {
    let p = format!("beit.encoder.layer.{i}.");
    let mut v: Vec<(String, Vec<usize>)> = vec![
        ("attention.attention.query.weight", vec![768, 768]),
        ("attention.attention.query.bias", vec![768]),
        ("attention.attention.key.weight", vec![768, 768]),
        ("attention.attention.value.weight", vec![768, 768]),
        ("attention.attention.value.bias", vec![768]),
        ("attention.output.dense.weight", vec![768, 768]),
        ("attention.output.dense.bias", vec![768]),
        ("intermediate.dense.weight", vec![3072, 768]),
        ("intermediate.dense.bias", vec![3072]),
        ("output.dense.weight", vec![768, 3072]),
        ("output.dense.bias", vec![768]),
        ("layernorm_before.weight", vec![768]),
        ("layernorm_before.bias", vec![768]),
        ("layernorm_after.weight", vec![768]),
        ("layernorm_after.bias", vec![768]),
        ("lambda_1", vec![768]),
        ("lambda_2", vec![768]),
    ]
    .into_iter()
    .map(|(n, s)| (format!("{p}{n}"), s))
    .collect();
    if per_layer_table {
        v.push((
            format!("{p}attention.attention.relative_position_bias.relative_position_bias_table"),
            vec![732, 12],
        ));
    }
    v
}

fn mim_names() -> Vec<(String, Vec<usize>)> {
    let mut v: Vec<(String, Vec<usize>)> = vec![
        ("beit.embeddings.cls_token".into(), vec![1, 1, 768]),
        ("beit.embeddings.mask_token".into(), vec![1, 1, 768]),
        (
            "beit.embeddings.patch_embeddings.projection.weight".into(),
            vec![768, 3, 16, 16],
        ),
        (
            "beit.embeddings.patch_embeddings.projection.bias".into(),
            vec![768],
        ),
        (
            "beit.encoder.relative_position_bias.relative_position_bias_table".into(),
            vec![732, 12],
        ),
    ];
    for i in 0..12 {
        v.extend(block_params(i, false));
    }
    v.extend([
        ("layernorm.weight".into(), vec![768]),
        ("layernorm.bias".into(), vec![768]),
        ("lm_head.weight".into(), vec![8192, 768]),
        ("lm_head.bias".into(), vec![8192]),
    ]);
    v
}

fn classifier_names() -> Vec<(String, Vec<usize>)> {
    let mut v: Vec<(String, Vec<usize>)> = vec![
        ("beit.embeddings.cls_token".into(), vec![1, 1, 768]),
        (
            "beit.embeddings.patch_embeddings.projection.weight".into(),
            vec![768, 3, 16, 16],
        ),
        (
            "beit.embeddings.patch_embeddings.projection.bias".into(),
            vec![768],
        ),
    ];
    for i in 0..12 {
        v.extend(block_params(i, true));
    }
    v.extend([
        ("beit.pooler.layernorm.weight".into(), vec![768]),
        ("beit.pooler.layernorm.bias".into(), vec![768]),
        ("classifier.weight".into(), vec![1000, 768]),
        ("classifier.bias".into(), vec![1000]),
    ]);
    v
}

/// Vars with the right rank but one element per dimension (only names and ranks matter here).
fn vars(names: &[(String, Vec<usize>)]) -> Vec<(String, Var)> {
    names
        .iter()
        .map(|(n, s)| {
            let small: Vec<usize> = s.iter().map(|_| 1).collect();
            (
                n.clone(),
                Var::zeros(small.as_slice(), DType::F32, &Device::Cpu).unwrap(),
            )
        })
        .collect()
}

fn summary(groups: &[ParamGroup]) -> BTreeMap<String, (usize, f64, bool)> {
    groups
        .iter()
        .map(|g| (g.name.clone(), (g.params.len(), g.lr_scale, g.weight_decay)))
        .collect()
}

fn names_in<'a>(groups: &'a [ParamGroup], group: &str) -> Vec<&'a str> {
    groups
        .iter()
        .find(|g| g.name == group)
        .map(|g| g.params.iter().map(|(n, _)| n.as_str()).collect())
        .unwrap_or_default()
}

#[test]
fn mim_groups_pretrain() {
    let names = mim_names();
    assert_eq!(names.len(), 213); // BEiT-base MIM, shared relative table
    let groups = build_param_groups(vars(&names), &GroupingConfig::pretrain(12)).unwrap();
    let s = summary(&groups);
    // Embeddings: mask_token and the conv weight decay; cls_token and the conv bias do not.
    assert_eq!(s["layer_0_decay"], (2, 1.0, true));
    assert_eq!(s["layer_0_no_decay"], (2, 1.0, false));
    assert_eq!(
        names_in(&groups, "layer_0_decay"),
        [
            "beit.embeddings.mask_token",
            "beit.embeddings.patch_embeddings.projection.weight"
        ]
    );
    // Each block: 6 matrices decay, 11 vectors (biases, LN, lambdas) do not.
    for k in 1..=12 {
        assert_eq!(s[&format!("layer_{k}_decay")], (6, 1.0, true), "block {k}");
        assert_eq!(
            s[&format!("layer_{k}_no_decay")],
            (11, 1.0, false),
            "block {k}"
        );
    }
    // Top: shared table (decayed, unilm) + lm_head.weight; the rest no decay.
    assert_eq!(s["layer_13_decay"], (2, 1.0, true));
    assert_eq!(s["layer_13_no_decay"], (3, 1.0, false));
    assert_eq!(groups.iter().map(|g| g.params.len()).sum::<usize>(), 213);
    assert_eq!(groups.len(), 28);

    // Excluding rel-pos tables from decay moves the shared table.
    let cfg = GroupingConfig {
        decay_rel_pos_tables: false,
        ..GroupingConfig::pretrain(12)
    };
    let s = summary(&build_param_groups(vars(&names), &cfg).unwrap());
    assert_eq!(s["layer_13_decay"].0, 1);
    assert_eq!(s["layer_13_no_decay"].0, 4);
}

#[test]
fn classifier_groups_finetune_layer_decay() {
    let names = classifier_names();
    assert_eq!(names.len(), 223); // BEiT-base classifier, per-layer relative tables
    let groups = build_param_groups(vars(&names), &GroupingConfig::finetune(12, 0.65)).unwrap();
    let s = summary(&groups);
    let d: f64 = 0.65;
    assert_eq!(s["layer_0_decay"].0, 1); // conv weight only (no mask token)
    assert_eq!(s["layer_0_no_decay"].0, 2); // cls_token, conv bias
    assert!((s["layer_0_decay"].1 - d.powi(13)).abs() < 1e-15);
    assert!((s["layer_0_decay"].1 - 0.0037).abs() < 0.0001);
    for k in 1..=12 {
        // A block's own table follows the block and is decayed.
        assert_eq!(s[&format!("layer_{k}_decay")].0, 7, "block {k}");
        assert_eq!(s[&format!("layer_{k}_no_decay")].0, 11, "block {k}");
        assert!((s[&format!("layer_{k}_decay")].1 - d.powi(13 - k)).abs() < 1e-15);
    }
    assert!((s["layer_1_decay"].1 - 0.0057).abs() < 0.0001);
    assert!((s["layer_12_no_decay"].1 - 0.65).abs() < 1e-15);
    assert_eq!(s["layer_13_decay"], (1, 1.0, true)); // classifier.weight
    assert_eq!(s["layer_13_no_decay"], (3, 1.0, false)); // pooler LN, classifier.bias
    assert_eq!(groups.iter().map(|g| g.params.len()).sum::<usize>(), 223);
}

/// transformers v5 renames the modules; the grouping gives the same group sizes.
#[test]
fn transformers_v5_names_group_identically() {
    let p = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../fixtures/train/hf_v5_names.json"
    );
    let fx: Value = serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
    let read = |k: &str| -> Vec<(String, Vec<usize>)> {
        fx[k]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e[0].as_str().unwrap().to_string(),
                    e[1].as_array()
                        .unwrap()
                        .iter()
                        .map(|x| x.as_u64().unwrap() as usize)
                        .collect(),
                )
            })
            .collect()
    };
    for (k, classic, cfg) in [
        ("mim", mim_names(), GroupingConfig::pretrain(12)),
        (
            "classifier",
            classifier_names(),
            GroupingConfig::finetune(12, 0.75),
        ),
    ] {
        let v5 = summary(&build_param_groups(vars(&read(k)), &cfg).unwrap());
        let old = summary(&build_param_groups(vars(&classic), &cfg).unwrap());
        assert_eq!(v5, old, "{k}");
    }
}

#[test]
fn rejects_duplicates_and_out_of_range_blocks() {
    let v = vars(&[
        ("a.weight".into(), vec![2, 2]),
        ("a.weight".into(), vec![2, 2]),
    ]);
    let e = build_param_groups(v, &GroupingConfig::pretrain(2))
        .unwrap_err()
        .to_string();
    assert!(e.contains("a.weight"), "{e}");
    let v = vars(&[(
        "beit.encoder.layer.5.output.dense.weight".into(),
        vec![2, 2],
    )]);
    let e = build_param_groups(v, &GroupingConfig::pretrain(2))
        .unwrap_err()
        .to_string();
    assert!(e.contains("layer.5") && e.contains("2 blocks"), "{e}");
}
