//! `mim_loss` against PyTorch: losses, `mlm_acc` and feature gradients of the three Table 4
//! targets on a small batch (`fixtures/mim/loss_reference.json`, written by
//! `scripts/fixtures/mim_fixtures.py` in float64: `F.cross_entropy(logits[bool_masked_pos], ...)` as in
//! `transformers`' `BeitForMaskedImageModeling`, all-position CE, and MSE on normalised patches).

use std::collections::HashMap;

use anyhow::Result;
use beit_mim::{mim_loss, MimInputs, MimTarget, PixelRegressionHead};
use candle::{DType, Device, Tensor, Var};
use candle_nn::{Linear, VarBuilder};
use serde_json::Value;

const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../fixtures/mim/loss_reference.json"
);

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn ints(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn losses_and_gradients_match_torch() -> Result<()> {
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(FIXTURE)?)?;
    let dev = Device::Cpu;
    let dim = |k: &str| doc[k].as_u64().unwrap() as usize;
    let (b, grid, c, vocab, patch) = (
        dim("batch"),
        dim("grid"),
        dim("hidden"),
        dim("vocab"),
        dim("patch"),
    );
    let n = grid * grid;
    let features = Var::from_vec(floats(&doc["features"]), (b, n, c), &dev)?;
    let mask = Tensor::from_vec(
        ints(&doc["mask"])
            .iter()
            .map(|&m| m as u8)
            .collect::<Vec<_>>(),
        (b, n),
        &dev,
    )?;
    let ids = Tensor::from_vec(ints(&doc["token_ids"]), (b, n), &dev)?;
    let side = grid * patch;
    let pixels = Tensor::from_vec(floats(&doc["pixels"]), (b, 3, side, side), &dev)?;
    let lm_head = Linear::new(
        Tensor::from_vec(floats(&doc["lm_head"]["weight"]), (vocab, c), &dev)?,
        Some(Tensor::from_vec(
            floats(&doc["lm_head"]["bias"]),
            vocab,
            &dev,
        )?),
    );
    // The pixel head is loaded by name, as from a checkpoint.
    let out = patch * patch * 3;
    let tensors = HashMap::from([
        (
            "pixel_head.weight".to_string(),
            Tensor::from_vec(floats(&doc["pixel_head"]["weight"]), (out, c), &dev)?,
        ),
        (
            "pixel_head.bias".to_string(),
            Tensor::from_vec(floats(&doc["pixel_head"]["bias"]), out, &dev)?,
        ),
    ]);
    let vb = VarBuilder::from_tensors(tensors, DType::F32, &dev);
    let pixel_head = PixelRegressionHead::new(c, patch, 3, vb)?;

    let inputs = MimInputs {
        features: features.as_tensor(),
        mask: &mask,
        token_ids: Some(&ids),
        pixels: Some(&pixels),
    };
    for target in MimTarget::ALL {
        let want = &doc["targets"][target.as_str()];
        let got = mim_loss(target, &inputs, &lm_head, Some(&pixel_head))?;
        let loss = got.loss.to_scalar::<f32>()?;
        let want_loss = want["loss"].as_f64().unwrap() as f32;
        assert!(
            (loss - want_loss).abs() < 1e-5 * want_loss.abs().max(1.0),
            "{target}: loss {loss} vs torch {want_loss}"
        );
        let got_acc = got
            .mlm_acc
            .as_ref()
            .map(|t| t.to_scalar::<f32>())
            .transpose()?;
        match want.get("mlm_acc") {
            Some(acc) => assert_eq!(got_acc, Some(acc.as_f64().unwrap() as f32), "{target}"),
            None => assert_eq!(got_acc, None),
        }
        let grads = got.loss.backward()?;
        let g = grads
            .get(features.as_tensor())
            .unwrap()
            .flatten_all()?
            .to_vec1::<f32>()?;
        let want_g = floats(&want["features_grad"]);
        let worst = g
            .iter()
            .zip(&want_g)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            worst < 1e-6,
            "{target}: feature gradient differs by {worst}"
        );
    }
    Ok(())
}
