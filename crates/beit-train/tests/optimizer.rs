//! AdamW, clipping and accumulation against PyTorch (fixtures from scripts/fixtures/train_fixtures.py).

use std::collections::HashMap;

use beit_train::{clip_grad_norm, AdamW, AdamWConfig, GradAccumulator, ParamGroup};
use candle::{backprop::GradStore, Device, Tensor, Var};
use serde_json::Value;

fn fixture(name: &str) -> Value {
    let p = format!("{}/../../fixtures/train/{name}", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(&p).expect(&p)).expect(&p)
}

fn f32s(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn dims(v: &Value) -> Vec<usize> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect()
}

fn assert_close(got: &[f32], want: &[f32], tol: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= tol * (1.0 + w.abs()),
            "{what}[{i}]: got {g}, want {w}"
        );
    }
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
fn adamw_matches_torch_with_two_groups() -> anyhow::Result<()> {
    adamw_against_torch(true)
}

/// The tensor-op path (the one CUDA takes) gives the same result.
#[test]
fn adamw_tensor_op_path_matches_torch() -> anyhow::Result<()> {
    adamw_against_torch(false)
}

fn adamw_against_torch(fused: bool) -> anyhow::Result<()> {
    let fx = fixture("adamw.json");
    let dev = Device::Cpu;
    let mut vars: HashMap<String, Var> = HashMap::new();
    for (name, shape) in fx["shapes"].as_object().unwrap() {
        let init = f32s(&fx["init"][name]);
        vars.insert(name.clone(), Var::from_vec(init, dims(shape), &dev)?);
    }
    let groups: Vec<ParamGroup> = fx["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| ParamGroup {
            name: "g".into(),
            params: g["names"]
                .as_array()
                .unwrap()
                .iter()
                .map(|n| {
                    let n = n.as_str().unwrap().to_string();
                    (n.clone(), vars[&n].clone())
                })
                .collect(),
            lr_scale: g["lr_scale"].as_f64().unwrap(),
            weight_decay: g["weight_decay"].as_bool().unwrap(),
        })
        .collect();
    let cfg = AdamWConfig {
        beta1: fx["betas"][0].as_f64().unwrap(),
        beta2: fx["betas"][1].as_f64().unwrap(),
        eps: fx["eps"].as_f64().unwrap(),
    };
    let mut opt = AdamW::new(groups.clone(), cfg)?;
    opt.set_fused_cpu(fused);
    for (i, step) in fx["steps"].as_array().unwrap().iter().enumerate() {
        let mut grads = GradStore::default();
        for (name, g) in step["grads"].as_object().unwrap() {
            let v = &vars[name];
            grads.insert(v.as_tensor(), Tensor::from_vec(f32s(g), v.shape(), &dev)?);
        }
        let stats = opt.step(
            &grads,
            step["lr"].as_f64().unwrap(),
            step["weight_decay"].as_f64().unwrap(),
        )?;
        // Step 2 (0-based) has no gradient for a.bias: torch skips it.
        assert_eq!(stats.without_grad, usize::from(i == 2));
        for (name, want) in step["params_after"].as_object().unwrap() {
            assert_close(
                &values(vars[name].as_tensor()),
                &f32s(want),
                2e-6,
                &format!("step {i} {name}"),
            );
        }
    }
    // Final moments and per-parameter step counts.
    let st = opt.state_tensors()?;
    for (name, s) in fx["final_state"].as_object().unwrap() {
        assert_close(
            &values(&st[&format!("exp_avg.{name}")]),
            &f32s(&s["exp_avg"]),
            1e-6,
            name,
        );
        assert_close(
            &values(&st[&format!("exp_avg_sq.{name}")]),
            &f32s(&s["exp_avg_sq"]),
            1e-6,
            name,
        );
        let step: Vec<f64> = st[&format!("step.{name}")].to_vec1()?;
        assert_eq!(step[0] as u64, s["step"].as_u64().unwrap(), "{name}");
    }

    // Save/load round trip into a fresh optimizer reproduces the state exactly.
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("opt.safetensors");
    opt.save(&path)?;
    let mut opt2 = AdamW::new(groups.clone(), cfg)?;
    opt2.set_fused_cpu(fused);
    opt2.load(&path)?;
    let st2 = opt2.state_tensors()?;
    assert_eq!(st.len(), st2.len());
    for (k, v) in &st {
        assert_eq!(
            values(&v.to_dtype(candle::DType::F32)?),
            values(&st2[k].to_dtype(candle::DType::F32)?),
            "{k}"
        );
    }
    assert_eq!(opt2.steps_taken(), 5);

    // Loading into a different parameter set fails and names the entry.
    let other = Var::zeros((2, 2), candle::DType::F32, &dev)?;
    let mut opt3 = AdamW::new(
        vec![ParamGroup {
            name: "x".into(),
            params: vec![("zzz.weight".into(), other)],
            lr_scale: 1.0,
            weight_decay: true,
        }],
        cfg,
    )?;
    let err = opt3.load(&path).unwrap_err().to_string();
    assert!(
        err.contains("zzz.weight") && err.contains("opt.safetensors"),
        "{err}"
    );
    Ok(())
}

#[test]
fn clipping_matches_torch() -> anyhow::Result<()> {
    let fx = fixture("clip.json");
    let dev = Device::Cpu;
    for case in fx["cases"].as_array().unwrap() {
        let shapes: Vec<Vec<usize>> = case["shapes"]
            .as_array()
            .unwrap()
            .iter()
            .map(dims)
            .collect();
        let vars: Vec<Var> = shapes
            .iter()
            .map(|s| Var::zeros(s.as_slice(), candle::DType::F32, &dev))
            .collect::<candle::Result<_>>()?;
        let mut grads = GradStore::default();
        for (v, g) in vars.iter().zip(case["grads"].as_array().unwrap()) {
            grads.insert(v.as_tensor(), Tensor::from_vec(f32s(g), v.shape(), &dev)?);
        }
        let max_norm = case["max_norm"].as_f64().unwrap();
        let norm = clip_grad_norm(&mut grads, &vars, max_norm)?;
        let want = case["total_norm"].as_f64().unwrap();
        assert!((norm - want).abs() < 1e-5 * want, "norm {norm} vs {want}");
        for (v, w) in vars.iter().zip(case["clipped"].as_array().unwrap()) {
            assert_close(
                &values(grads.get(v.as_tensor()).unwrap()),
                &f32s(w),
                1e-6,
                "clipped",
            );
        }
    }
    Ok(())
}

/// Two half-batches with the loss divided by 2 give the gradient of the full batch.
#[test]
fn accumulation_equals_full_batch() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    let w = Var::from_vec(vec![0.3f32, -0.2, 0.5, 0.1, 0.7, -0.4], (3, 2), &dev)?;
    let x = Tensor::from_vec(
        (0..16).map(|i| (i as f32 * 0.37).sin()).collect::<Vec<_>>(),
        (8, 2),
        &dev,
    )?;
    let loss_of = |x: &Tensor| -> candle::Result<Tensor> {
        x.matmul(&w.as_tensor().t()?)?.tanh()?.sqr()?.mean_all()
    };
    let full = loss_of(&x)?.backward()?;
    let mut acc = GradAccumulator::new();
    for half in [x.narrow(0, 0, 4)?, x.narrow(0, 4, 4)?] {
        acc.add(
            (loss_of(&half)? / 2.0)?.backward()?,
            std::slice::from_ref(&w),
        )?;
    }
    assert_eq!(acc.micro_batches(), 2);
    let summed = acc.take();
    assert_close(
        &values(summed.get(w.as_tensor()).unwrap()),
        &values(full.get(w.as_tensor()).unwrap()),
        1e-6,
        "accumulated grad",
    );
    assert_eq!(acc.micro_batches(), 0);
    Ok(())
}
