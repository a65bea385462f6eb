//! MIM loss helpers: values against host-side computations, gradients, and error paths.

use anyhow::Result;
use beit_mim::{
    check_finite, gather_masked_labels, gather_masked_rows, mask_reads, masked_flat_indices,
    masked_token_loss, masked_token_loss_at, mim_cross_entropy, mim_loss, mim_loss_at,
    mlm_accuracy, normalize_patches, patchify, MaskingConfig, MimError, MimInputs, MimTarget,
    PixelRegressionHead,
};
use candle::{DType, Device, Module, Tensor, Var, D};
use candle_nn::{Linear, VarBuilder, VarMap};
use rand::{Rng, SeedableRng};

fn randn(rng: &mut rand::rngs::StdRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect()
}

/// Cross-entropy computed on the host in f64: mean over rows of `logsumexp(row) − row[label]`.
fn host_cross_entropy(logits: &[Vec<f32>], labels: &[u32]) -> f64 {
    let total: f64 = logits
        .iter()
        .zip(labels)
        .map(|(row, &l)| {
            let max = row.iter().cloned().fold(f32::MIN, f32::max) as f64;
            let lse = max
                + row
                    .iter()
                    .map(|&x| (x as f64 - max).exp())
                    .sum::<f64>()
                    .ln();
            lse - row[l as usize] as f64
        })
        .sum();
    total / labels.len() as f64
}

#[test]
fn gather_takes_masked_rows_in_row_major_order() -> Result<()> {
    let dev = Device::Cpu;
    let (b, n, c) = (2, 4, 3);
    let feats = Tensor::arange(0f32, (b * n * c) as f32, &dev)?.reshape((b, n, c))?;
    let mask = Tensor::new(&[[0u8, 1, 0, 1], [1, 0, 0, 0]], &dev)?;
    let rows = gather_masked_rows(&feats, &mask)?.to_vec2::<f32>()?;
    // Flat positions 1, 3, 4 -> rows starting at 3, 9, 12.
    assert_eq!(
        rows,
        vec![vec![3., 4., 5.], vec![9., 10., 11.], vec![12., 13., 14.]]
    );
    let labels = Tensor::new(&[[10u32, 11, 12, 13], [14, 15, 16, 17]], &dev)?;
    assert_eq!(
        gather_masked_labels(&labels, &mask)?.to_vec1::<u32>()?,
        vec![11, 13, 14]
    );
    // Features with the CLS token sliced off (a non-contiguous view) gather the same rows.
    let with_cls = Tensor::cat(&[feats.narrow(1, 0, 1)?, feats.clone()], 1)?;
    let sliced = with_cls.narrow(1, 1, n)?;
    assert!(!sliced.is_contiguous());
    assert_eq!(gather_masked_rows(&sliced, &mask)?.to_vec2::<f32>()?, rows);
    // A mask from the sampler works as is.
    let batch = MaskingConfig::new([2, 2], 2).build()?.sample_batch(0, 0, 2);
    let m = batch.to_tensor(&dev)?;
    assert_eq!(m.dtype(), DType::U8);
    let got = gather_masked_rows(&feats, &m)?;
    assert_eq!(got.dims()[0], batch.counts().iter().sum::<usize>());
    // Shape mismatch is an error naming the mask.
    let bad = Tensor::zeros((2, 5), DType::U8, &dev)?;
    let err = gather_masked_rows(&feats, &bad).unwrap_err().to_string();
    assert!(err.contains("mask"), "{err}");
    Ok(())
}

#[test]
fn cross_entropy_and_accuracy_match_host_values() -> Result<()> {
    let dev = Device::Cpu;
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let (m, v) = (7, 11);
    let data = randn(&mut rng, m * v);
    let rows: Vec<Vec<f32>> = data
        .chunks(v)
        .map(|r| r.iter().map(|x| x * 4.0).collect())
        .collect();
    let labels: Vec<u32> = (0..m).map(|_| rng.random_range(0..v as u32)).collect();
    let logits = Tensor::from_vec(rows.concat(), (m, v), &dev)?;
    let lab = Tensor::from_slice(&labels, m, &dev)?;
    let loss = mim_cross_entropy(&logits, &lab)?.to_scalar::<f32>()?;
    let expected = host_cross_entropy(&rows, &labels);
    assert!(
        (loss as f64 - expected).abs() < 1e-5,
        "{loss} vs {expected}"
    );
    // bf16 logits are scored in f32.
    let loss_bf16 = mim_cross_entropy(&logits.to_dtype(DType::BF16)?, &lab)?;
    assert_eq!(loss_bf16.dtype(), DType::F32);
    assert!((loss_bf16.to_scalar::<f32>()? as f64 - expected).abs() < 0.05);

    let argmax: Vec<u32> = rows
        .iter()
        .map(|r| {
            (0..v)
                .max_by(|&a, &b| r[a].partial_cmp(&r[b]).unwrap())
                .unwrap() as u32
        })
        .collect();
    let hits = argmax.iter().zip(&labels).filter(|(a, b)| a == b).count();
    assert_eq!(mlm_accuracy(&logits, &lab)?, hits as f32 / m as f32);
    // Labels equal to the arg-max give accuracy 1.
    let perfect = Tensor::from_slice(&argmax, m, &dev)?;
    assert_eq!(mlm_accuracy(&logits, &perfect)?, 1.0);

    let empty = Tensor::zeros((0, v), DType::F32, &dev)?;
    let none = Tensor::zeros(0, DType::U32, &dev)?;
    assert!(matches!(
        mim_cross_entropy(&empty, &none),
        Err(MimError::NoMaskedPositions)
    ));
    Ok(())
}

#[test]
fn check_finite_reports_the_step() -> Result<()> {
    let dev = Device::Cpu;
    assert_eq!(check_finite(&Tensor::new(2.5f32, &dev)?, 3)?, 2.5);
    let err = check_finite(&Tensor::new(f32::NAN, &dev)?, 42).unwrap_err();
    assert!(matches!(err, MimError::NonFiniteLoss { step: 42, .. }));
    assert!(err.to_string().contains("step 42"), "{err}");
    let err = check_finite(&Tensor::new(&[f32::INFINITY], &dev)?, 7).unwrap_err();
    assert!(err.to_string().contains("inf"), "{err}");
    assert!(check_finite(&Tensor::new(&[1f32, 2.], &dev)?, 0).is_err());
    Ok(())
}

#[test]
fn patchify_orders_patches_and_pixels() -> Result<()> {
    let dev = Device::Cpu;
    let (b, c, h, w, p) = (2, 3, 4, 6, 2);
    let px = Tensor::arange(0f32, (b * c * h * w) as f32, &dev)?.reshape((b, c, h, w))?;
    let patches = patchify(&px, p)?;
    assert_eq!(patches.dims(), &[b, (h / p) * (w / p), p * p * c]);
    let got = patches.to_vec3::<f32>()?;
    let value = |bi: usize, ci: usize, y: usize, x: usize| ((bi * c + ci) * h + y) * w + x;
    for (bi, got_b) in got.iter().enumerate() {
        for gy in 0..h / p {
            for gx in 0..w / p {
                let row = &got_b[gy * (w / p) + gx];
                for py in 0..p {
                    for pxi in 0..p {
                        for ci in 0..c {
                            let expect = value(bi, ci, gy * p + py, gx * p + pxi) as f32;
                            assert_eq!(row[(py * p + pxi) * c + ci], expect);
                        }
                    }
                }
            }
        }
    }
    let err = patchify(&px, 4).unwrap_err().to_string();
    assert!(err.contains("6"), "{err}");

    let norm = normalize_patches(&patches)?;
    let mean = norm
        .mean_keepdim(D::Minus1)?
        .abs()?
        .max_all()?
        .to_scalar::<f32>()?;
    assert!(mean < 1e-4, "mean {mean}");
    let var = (norm.sqr()?.sum_keepdim(D::Minus1)? / (p * p * c - 1) as f64)?;
    let dev_from_one = (var - 1.0)?.abs()?.max_all()?.to_scalar::<f32>()?;
    assert!(dev_from_one < 1e-3, "{dev_from_one}");
    Ok(())
}

struct Setup {
    varmap: VarMap,
    features: Var,
    lm_head: Linear,
    pixel_head: PixelRegressionHead,
    mask: Tensor,
    ids: Tensor,
    pixels: Tensor,
    unmasked_row: usize,
}

impl Setup {
    /// The features, mask, token ids and pixels: what every target needs.
    fn inputs(&self) -> MimInputs<'_> {
        MimInputs {
            features: self.features.as_tensor(),
            mask: &self.mask,
            token_ids: Some(&self.ids),
            pixels: Some(&self.pixels),
        }
    }
}

fn setup() -> Result<Setup> {
    let dev = Device::Cpu;
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let (b, n, c, v, p) = (2, 16, 8, 13, 2);
    let features = Var::from_vec(randn(&mut rng, b * n * c), (b, n, c), &dev)?;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let lm_head = candle_nn::linear(c, v, vb.pp("lm_head"))?;
    let pixel_head = PixelRegressionHead::new(c, p, 3, vb.clone())?;
    let batch = MaskingConfig {
        min_num_patches: 2,
        ..MaskingConfig::new([4, 4], 6)
    }
    .build()?
    .sample_batch(9, 0, b);
    let mask = batch.to_tensor(&dev)?;
    let ids: Vec<u32> = (0..b * n).map(|_| rng.random_range(0..v as u32)).collect();
    let ids = Tensor::from_vec(ids, (b, n), &dev)?;
    let pixels = Tensor::from_vec(randn(&mut rng, b * 3 * 8 * 8), (b, 3, 8, 8), &dev)?;
    let unmasked_row = batch.masks[0].iter().position(|&m| !m).unwrap();
    Ok(Setup {
        varmap,
        features,
        lm_head,
        pixel_head,
        mask,
        ids,
        pixels,
        unmasked_row,
    })
}

fn grad_norms(grads: &candle::backprop::GradStore, t: &Tensor) -> Result<f32> {
    let g = grads.get(t).expect("a gradient for the tensor");
    let norm = g.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?;
    assert!(norm.is_finite());
    Ok(norm)
}

#[test]
fn every_target_backpropagates_to_features_and_heads() -> Result<()> {
    let s = setup()?;
    let inputs = s.inputs();
    for target in MimTarget::ALL {
        let out = mim_loss(target, &inputs, &s.lm_head, Some(&s.pixel_head))?;
        let value = check_finite(&out.loss, 0)?;
        assert!(value > 0.0, "{target}: loss {value}");
        assert_eq!(out.mlm_acc.is_some(), target != MimTarget::PixelRegression);
        assert_eq!(
            out.num_masked,
            s.mask.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()? as usize
        );
        let grads = out.loss.backward()?;
        assert!(
            grad_norms(&grads, s.features.as_tensor())? > 0.0,
            "{target}"
        );
        // The head used by the target gets a non-zero gradient; the other gets none.
        let data = s.varmap.data().lock().unwrap();
        let used = if target.needs_pixel_head() {
            ["pixel_head.weight", "pixel_head.bias"]
        } else {
            ["lm_head.weight", "lm_head.bias"]
        };
        for name in used {
            assert!(
                grad_norms(&grads, data[name].as_tensor())? > 0.0,
                "{target} {name}"
            );
        }
        let unused = if target.needs_pixel_head() {
            "lm_head.weight"
        } else {
            "pixel_head.weight"
        };
        assert!(
            grads.get(data[unused].as_tensor()).is_none(),
            "{target} {unused}"
        );

        // Masked-only targets leave visible positions without gradient; all-tokens does not.
        let g = grads.get(s.features.as_tensor()).unwrap();
        let visible = g
            .get(0)?
            .get(s.unmasked_row)?
            .abs()?
            .sum_all()?
            .to_scalar::<f32>()?;
        if target == MimTarget::AllTokens {
            assert!(visible > 0.0, "all-tokens must train visible positions");
        } else {
            assert_eq!(visible, 0.0, "{target}: a visible position got a gradient");
        }
    }
    Ok(())
}

#[test]
fn visual_token_loss_equals_cross_entropy_on_masked_rows() -> Result<()> {
    let s = setup()?;
    let inputs = MimInputs {
        pixels: None,
        ..s.inputs()
    };
    let out = mim_loss(MimTarget::VisualTokens, &inputs, &s.lm_head, None)?;
    // Reference: logits of all positions, then boolean selection (what transformers does).
    let all = s.lm_head.forward(s.features.as_tensor())?;
    let (b, n, v) = all.dims3()?;
    let all_rows = all.reshape((b * n, v))?.to_vec2::<f32>()?;
    let ids = s.ids.flatten_all()?.to_vec1::<u32>()?;
    let mask = s.mask.flatten_all()?.to_vec1::<u8>()?;
    let (rows, labels): (Vec<Vec<f32>>, Vec<u32>) = all_rows
        .into_iter()
        .zip(ids)
        .zip(mask)
        .filter(|(_, m)| *m == 1)
        .map(|(x, _)| x)
        .unzip();
    let expected = host_cross_entropy(&rows, &labels);
    let got = out.loss.to_scalar::<f32>()? as f64;
    assert!((got - expected).abs() < 1e-5, "{got} vs {expected}");
    Ok(())
}

#[test]
fn missing_inputs_are_named() -> Result<()> {
    let s = setup()?;
    let inputs = MimInputs {
        token_ids: None,
        pixels: None,
        ..s.inputs()
    };
    let err = mim_loss(MimTarget::VisualTokens, &inputs, &s.lm_head, None).unwrap_err();
    assert!(err.to_string().contains("visual-tokens"), "{err}");
    let err = mim_loss(
        MimTarget::PixelRegression,
        &inputs,
        &s.lm_head,
        Some(&s.pixel_head),
    )
    .unwrap_err();
    assert!(err.to_string().contains("pixels"), "{err}");
    let empty = s.mask.zeros_like()?;
    let inputs = MimInputs {
        mask: &empty,
        token_ids: Some(&s.ids),
        ..inputs
    };
    assert!(matches!(
        mim_loss(MimTarget::VisualTokens, &inputs, &s.lm_head, None),
        Err(MimError::NoMaskedPositions)
    ));
    Ok(())
}

/// The training step's form: the masked positions come from the host, the mask is not read back,
/// and every target gives the same loss and accuracy, bit for bit.
#[test]
fn host_masked_positions_give_the_same_loss_without_reading_the_mask() -> Result<()> {
    let s = setup()?;
    let inputs = s.inputs();
    let idx = masked_flat_indices(&s.mask)?;
    let value = |t: &Tensor| t.to_scalar::<f32>().map(f32::to_bits);
    for target in MimTarget::ALL {
        let read = mim_loss(target, &inputs, &s.lm_head, Some(&s.pixel_head))?;
        let before = mask_reads();
        let host = mim_loss_at(target, &inputs, &idx, &s.lm_head, Some(&s.pixel_head))?;
        assert_eq!(mask_reads(), before, "{target} read the mask");
        assert_eq!(value(&host.loss)?, value(&read.loss)?, "{target}");
        assert_eq!(host.num_masked, read.num_masked);
        if let (Some(a), Some(b)) = (&host.mlm_acc, &read.mlm_acc) {
            assert_eq!(value(a)?, value(b)?, "{target}");
        }
    }
    let logits = s
        .lm_head
        .forward(&gather_masked_rows(s.features.as_tensor(), &s.mask)?)?;
    let read = masked_token_loss(&logits, &s.mask, Some(&s.ids))?;
    let before = mask_reads();
    let host = masked_token_loss_at(&logits, s.mask.dims2()?, &idx, Some(&s.ids))?;
    assert_eq!(mask_reads(), before);
    assert_eq!(value(&host.loss)?, value(&read.loss)?);
    let unordered = [idx[1], idx[0]];
    assert!(mim_loss_at(
        MimTarget::VisualTokens,
        &inputs,
        &unordered,
        &s.lm_head,
        None
    )
    .is_err());
    Ok(())
}
