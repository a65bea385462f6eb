//! Fine-tuning losses and top-k accuracy against timm / torch (fixture).

use beit_train::{label_smoothing_cross_entropy, soft_target_cross_entropy, topk_accuracy};
use candle::{Device, Tensor, Var};
use serde_json::Value;

fn f32s(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn close(got: &[f32], want: &[f32], what: &str) {
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() < 1e-6 + 1e-5 * w.abs(),
            "{what}[{i}]: {g} vs {w}"
        );
    }
}

#[test]
fn losses_and_gradients_match_timm() -> anyhow::Result<()> {
    let p = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../fixtures/train/losses.json"
    );
    let fx: Value = serde_json::from_str(&std::fs::read_to_string(p)?)?;
    let dev = Device::Cpu;
    let (n, c) = (
        fx["n"].as_u64().unwrap() as usize,
        fx["c"].as_u64().unwrap() as usize,
    );
    let logits = Var::from_vec(f32s(&fx["logits"]), (n, c), &dev)?;
    let targets: Vec<u32> = fx["targets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect();
    let targets = Tensor::from_vec(targets, n, &dev)?;
    let soft = Tensor::from_vec(f32s(&fx["soft_targets"]), (n, c), &dev)?;

    let ls = label_smoothing_cross_entropy(
        logits.as_tensor(),
        &targets,
        fx["smoothing"].as_f64().unwrap(),
    )?;
    close(
        &[ls.to_scalar::<f32>()?],
        &[fx["label_smoothing_loss"].as_f64().unwrap() as f32],
        "ls loss",
    );
    let g = ls.backward()?;
    close(
        &g.get(logits.as_tensor())
            .unwrap()
            .flatten_all()?
            .to_vec1()?,
        &f32s(&fx["label_smoothing_grad"]),
        "ls grad",
    );

    let st = soft_target_cross_entropy(logits.as_tensor(), &soft)?;
    close(
        &[st.to_scalar::<f32>()?],
        &[fx["soft_target_loss"].as_f64().unwrap() as f32],
        "soft loss",
    );
    let g = st.backward()?;
    close(
        &g.get(logits.as_tensor())
            .unwrap()
            .flatten_all()?
            .to_vec1()?,
        &f32s(&fx["soft_target_grad"]),
        "soft grad",
    );

    let ce = label_smoothing_cross_entropy(logits.as_tensor(), &targets, 0.0)?;
    close(
        &[ce.to_scalar::<f32>()?],
        &[fx["cross_entropy_loss"].as_f64().unwrap() as f32],
        "ce",
    );

    let acc = topk_accuracy(logits.as_tensor(), &targets, &[1, 3, 5])?;
    for (k, a) in [1, 3, 5].iter().zip(&acc) {
        let want = fx["topk_accuracy"][k.to_string()].as_f64().unwrap();
        assert!((a - want).abs() < 1e-6, "top-{k}: {a} vs {want}");
    }

    // Shape errors are reported, not panics.
    assert!(
        label_smoothing_cross_entropy(logits.as_tensor(), &targets.narrow(0, 0, 2)?, 0.1).is_err()
    );
    assert!(soft_target_cross_entropy(logits.as_tensor(), &soft.narrow(1, 0, 2)?).is_err());
    Ok(())
}
