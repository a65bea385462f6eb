//! unilm initialisation applied by name to a small BEiT-shaped VarMap.

use beit_model::init::{
    init_beit, init_kind, trunc_normal_vec, var_values, InitConfig, InitKind, Truncation,
};
// `StdRng::seed_from_u64` draws the same numbers as the training engine's `TrainRng`.
use candle::{DType, Device};
use candle_nn::{Init, VarMap};
use rand::{rngs::StdRng, SeedableRng};

const D: usize = 32;
const L: usize = 3;

fn tiny_classifier() -> VarMap {
    let vm = VarMap::new();
    let dev = Device::Cpu;
    let add = |name: &str, shape: &[usize]| {
        vm.get(shape, name, Init::Const(7.0), DType::F32, &dev)
            .unwrap();
    };
    add("beit.embeddings.cls_token", &[1, 1, D]);
    add(
        "beit.embeddings.patch_embeddings.projection.weight",
        &[D, 3, 4, 4],
    );
    add("beit.embeddings.patch_embeddings.projection.bias", &[D]);
    for i in 0..L {
        let p = format!("beit.encoder.layer.{i}.");
        for (n, s) in [
            ("attention.attention.query.weight", vec![D, D]),
            ("attention.attention.query.bias", vec![D]),
            ("attention.attention.key.weight", vec![D, D]),
            ("attention.attention.value.weight", vec![D, D]),
            ("attention.attention.value.bias", vec![D]),
            (
                "attention.attention.relative_position_bias.relative_position_bias_table",
                vec![12, 2],
            ),
            ("attention.output.dense.weight", vec![D, D]),
            ("attention.output.dense.bias", vec![D]),
            ("intermediate.dense.weight", vec![4 * D, D]),
            ("intermediate.dense.bias", vec![4 * D]),
            ("output.dense.weight", vec![D, 4 * D]),
            ("output.dense.bias", vec![D]),
            ("layernorm_before.weight", vec![D]),
            ("layernorm_before.bias", vec![D]),
            ("layernorm_after.weight", vec![D]),
            ("layernorm_after.bias", vec![D]),
            ("lambda_1", vec![D]),
            ("lambda_2", vec![D]),
        ] {
            add(&format!("{p}{n}"), &s);
        }
    }
    add("beit.pooler.layernorm.weight", &[D]);
    add("beit.pooler.layernorm.bias", &[D]);
    add("classifier.weight", &[10, D]);
    add("classifier.bias", &[10]);
    vm
}

fn std_of(v: &[f32]) -> f64 {
    let n = v.len() as f64;
    let m = v.iter().map(|&x| x as f64).sum::<f64>() / n;
    (v.iter().map(|&x| (x as f64 - m).powi(2)).sum::<f64>() / n).sqrt()
}

#[test]
fn unilm_rules_by_name() -> anyhow::Result<()> {
    let vm = tiny_classifier();
    let cfg = InitConfig::finetune(L, 0.1);
    init_beit(&vm, &cfg, &mut StdRng::seed_from_u64(3))?;
    let v = |n: &str| var_values(&vm, n).unwrap();
    assert!(v("beit.encoder.layer.0.attention.attention.query.bias")
        .iter()
        .all(|&x| x == 0.0));
    assert!(v("beit.encoder.layer.1.layernorm_after.weight")
        .iter()
        .all(|&x| x == 1.0));
    assert!(v("beit.pooler.layernorm.bias").iter().all(|&x| x == 0.0));
    assert!(v("beit.encoder.layer.2.lambda_2").iter().all(|&x| x == 0.1));
    assert!(v("beit.encoder.layer.2.attention.attention.relative_position_bias.relative_position_bias_table")
        .iter()
        .all(|&x| x == 0.0));
    // Conv keeps torch's default: uniform within 1/sqrt(fan_in) = 1/sqrt(48).
    let bound = 1.0 / 48f32.sqrt();
    let conv = v("beit.embeddings.patch_embeddings.projection.weight");
    assert!(
        conv.iter().all(|x| x.abs() <= bound) && std_of(&conv) > 0.5 * bound as f64 / 3f64.sqrt()
    );
    // Linear weights ~ N(0, .02); layer l output projections divided by sqrt(2l).
    let q = v("beit.encoder.layer.2.attention.attention.query.weight");
    assert!((std_of(&q) - 0.02).abs() < 0.003, "{}", std_of(&q));
    for l in 1..=L {
        for n in ["attention.output.dense.weight", "output.dense.weight"] {
            let w = v(&format!("beit.encoder.layer.{}.{n}", l - 1));
            let want = 0.02 / (2.0 * l as f64).sqrt();
            assert!(
                (std_of(&w) - want).abs() < 0.15 * want,
                "layer {l} {n}: {} vs {want}",
                std_of(&w)
            );
        }
        let w = v(&format!(
            "beit.encoder.layer.{}.intermediate.dense.weight",
            l - 1
        ));
        assert!(
            (std_of(&w) - 0.02).abs() < 0.003,
            "intermediate is not rescaled"
        );
    }
    // Head x 0.001.
    let h = v("classifier.weight");
    assert!((std_of(&h) - 2e-5).abs() < 5e-6, "{}", std_of(&h));
    assert!(v("classifier.bias").iter().all(|&x| x == 0.0));

    // Same seed, same model; another seed, another model.
    let vm2 = tiny_classifier();
    init_beit(&vm2, &cfg, &mut StdRng::seed_from_u64(3))?;
    assert_eq!(var_values(&vm2, "classifier.weight")?, h);
    let vm3 = tiny_classifier();
    init_beit(&vm3, &cfg, &mut StdRng::seed_from_u64(4))?;
    assert_ne!(var_values(&vm3, "classifier.weight")?, h);
    Ok(())
}

#[test]
fn pretrain_truncates_at_one_std() -> anyhow::Result<()> {
    let cfg = InitConfig::pretrain(L, 0.1);
    assert_eq!(cfg.truncation, Truncation::StdMultiple(1.0));
    let vm = tiny_classifier();
    init_beit(&vm, &cfg, &mut StdRng::seed_from_u64(1))?;
    let q = var_values(&vm, "beit.encoder.layer.0.attention.attention.key.weight")?;
    assert!(q.iter().all(|x| x.abs() <= 0.02));
    // A N(0,1) truncated to [-1, 1] has std 0.5376.
    let s = trunc_normal_vec(&mut StdRng::seed_from_u64(0), 20000, 0.0, 1.0, -1.0, 1.0)?;
    assert!((std_of(&s) - 0.5376).abs() < 0.01, "{}", std_of(&s));
    assert!(trunc_normal_vec(&mut StdRng::seed_from_u64(0), 1, 0.0, 1.0, 1.0, -1.0).is_err());
    Ok(())
}

#[test]
fn unknown_parameter_is_an_error() {
    assert_eq!(
        init_kind("lm_head.weight", &[8192, 768]).unwrap(),
        InitKind::TruncNormal
    );
    assert_eq!(
        init_kind("beit.embeddings.mask_token", &[1, 1, 8]).unwrap(),
        InitKind::TruncNormal
    );
    assert_eq!(init_kind("layernorm.weight", &[8]).unwrap(), InitKind::Ones);
    let e = init_kind("something.scale", &[8]).unwrap_err().to_string();
    assert!(e.contains("something.scale"), "{e}");
}

#[test]
fn transformers_scheme() -> anyhow::Result<()> {
    let vm = tiny_classifier();
    let cfg = InitConfig::transformers(L, 0.1);
    let report = init_beit(&vm, &cfg, &mut StdRng::seed_from_u64(5))?;
    let v = |n: &str| var_values(&vm, n).unwrap();
    // Zero class token, normal patch embedding with a zero bias, no depth rescale, no head scale.
    assert!(v("beit.embeddings.cls_token").iter().all(|&x| x == 0.0));
    let conv = v("beit.embeddings.patch_embeddings.projection.weight");
    assert!((std_of(&conv) - 0.02).abs() < 0.004, "{}", std_of(&conv));
    assert!(v("beit.embeddings.patch_embeddings.projection.bias")
        .iter()
        .all(|&x| x == 0.0));
    for l in 0..L {
        let w = v(&format!("beit.encoder.layer.{l}.output.dense.weight"));
        assert!(
            (std_of(&w) - 0.02).abs() < 0.003,
            "layer {l}: {}",
            std_of(&w)
        );
    }
    assert!((std_of(&v("classifier.weight")) - 0.02).abs() < 0.006);
    assert!(v("beit.encoder.layer.2.lambda_1").iter().all(|&x| x == 0.1));
    // Untruncated: a wide tensor has values beyond 2 std (P(|z| > 2) is 4.6%).
    let wide = v("beit.encoder.layer.0.intermediate.dense.weight");
    assert!(wide.iter().any(|x| x.abs() > 0.04));
    assert!(report
        .iter()
        .any(|(n, k)| n == "beit.embeddings.cls_token" && *k == InitKind::Zeros));
    Ok(())
}

/// The rules come from the model's `ParamInfo`: a toy model with its own names initialises by
/// the roles it reports, and a name it has no role for is an error naming it.
#[test]
fn roles_come_from_the_model() -> anyhow::Result<()> {
    use beit_model::init::init_beit_with;
    use beit_model::param_info::{ParamInfo, ParamRole};
    struct Toy;
    impl ParamInfo for Toy {
        fn num_layers(&self) -> usize {
            1
        }
        fn block_index(&self, name: &str) -> Option<usize> {
            name.starts_with("blk.").then_some(0)
        }
        fn layer_id(&self, _: &str) -> usize {
            0
        }
        fn no_weight_decay(&self, _: &str) -> bool {
            false
        }
        fn role(&self, name: &str, _: &[usize]) -> Option<ParamRole> {
            match name {
                "blk.out" => Some(ParamRole::ResidualOutputWeight),
                "gain" => Some(ParamRole::NormWeight),
                "head" => Some(ParamRole::ClassifierWeight),
                _ => None,
            }
        }
    }
    let vm = VarMap::new();
    for n in ["blk.out", "gain", "head"] {
        vm.get((64, 64), n, Init::Const(7.0), DType::F32, &Device::Cpu)?;
    }
    let cfg = InitConfig::finetune(1, 0.1);
    init_beit_with(&vm, &cfg, &mut StdRng::seed_from_u64(0), &Toy)?;
    assert!(var_values(&vm, "gain")?.iter().all(|&x| x == 1.0));
    let out = std_of(&var_values(&vm, "blk.out")?);
    assert!((out - 0.02 / 2f64.sqrt()).abs() < 0.002, "{out}");
    assert!((std_of(&var_values(&vm, "head")?) - 2e-5).abs() < 3e-6);
    vm.get(3, "other", Init::Const(7.0), DType::F32, &Device::Cpu)?;
    let e = init_beit_with(&vm, &cfg, &mut StdRng::seed_from_u64(0), &Toy)
        .unwrap_err()
        .to_string();
    assert!(e.contains("other"), "{e}");
    let e = init_beit_with(
        &vm,
        &InitConfig::finetune(2, 0.1),
        &mut StdRng::seed_from_u64(0),
        &Toy,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("2 blocks"), "{e}");
    Ok(())
}
