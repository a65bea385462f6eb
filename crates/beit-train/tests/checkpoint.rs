//! Checkpoint atomicity, rotation, best copy and error messages.

use std::path::Path;

use beit_train::checkpoint::{FileWriter, MODEL_FILE, OPTIMIZER_FILE, STATE_FILE};
use beit_train::{
    build_param_groups, load_model, named_vars, AdamW, AdamWConfig, Checkpoint, CheckpointManager,
    GroupingConfig, TrainError, TrainRng, TrainerState,
};
use candle::{DType, Device, Tensor};
use candle_nn::{Init, VarMap};

fn model(value: f32) -> VarMap {
    let vm = VarMap::new();
    vm.get(
        (3, 2),
        "fc.weight",
        Init::Const(value as f64),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    vm.get(3, "fc.bias", Init::Const(0.5), DType::F32, &Device::Cpu)
        .unwrap();
    vm
}

fn optimizer(vm: &VarMap) -> AdamW {
    let groups = build_param_groups(named_vars(vm), &GroupingConfig::pretrain(0)).unwrap();
    AdamW::new(groups, AdamWConfig::default()).unwrap()
}

fn state(step: u64) -> TrainerState {
    let mut s = TrainerState::new(
        1,
        TrainRng::seed_from_u64(1).state(),
        serde_json::json!({}),
        serde_json::json!({"run": "t"}),
    );
    s.step = step;
    s
}

fn weight(vm: &VarMap) -> Vec<f32> {
    beit_model::init::var_values(vm, "fc.weight").unwrap()
}

#[test]
fn failed_write_leaves_previous_checkpoint_intact() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mgr = CheckpointManager::new(dir.path(), 3)?;
    let vm = model(1.0);
    let opt = optimizer(&vm);
    mgr.save(&vm, &opt, &state(1))?;
    mgr.save_as("best", &vm, &opt, &state(1))?;

    // Step 2: the model file is written, then the optimizer writer fails half-way.
    let vm2 = model(2.0);
    let files: Vec<(&str, FileWriter<'_>)> = vec![
        (
            MODEL_FILE,
            Box::new(|p: &Path| beit_train::save_model(&vm2, p)),
        ),
        (
            OPTIMIZER_FILE,
            Box::new(|p: &Path| {
                std::fs::write(p, b"partial").map_err(|source| TrainError::Io {
                    path: p.to_path_buf(),
                    source,
                })?;
                Err(TrainError::Config("simulated crash while writing".into()))
            }),
        ),
    ];
    let err = mgr.write_atomic("checkpoint-00000002", files).unwrap_err();
    assert!(err.to_string().contains("simulated"));
    // Same for an overwrite of `best`.
    let files: Vec<(&str, FileWriter<'_>)> = vec![(
        MODEL_FILE,
        Box::new(|_: &Path| Err(TrainError::Config("simulated".into()))),
    )];
    assert!(mgr.write_atomic("best", files).is_err());

    // Nothing half-written is visible; the old checkpoints load with their values.
    assert!(!mgr.step_dir(2).exists());
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())?
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    for p in [dir.path().to_path_buf(), mgr.best_dir()] {
        let ck = Checkpoint::open(&p)?;
        assert_eq!(ck.state.step, 1);
        let fresh = model(9.0);
        ck.load_model(&fresh)?;
        assert_eq!(weight(&fresh), vec![1.0; 6]);
        let mut o = optimizer(&fresh);
        ck.load_optimizer(&mut o)?;
    }

    // A stale temporary directory from a killed process is cleaned up on the next start.
    std::fs::create_dir(dir.path().join(".tmp-checkpoint-00000009-1-1"))?;
    CheckpointManager::new(dir.path(), 3)?;
    assert!(!dir.path().join(".tmp-checkpoint-00000009-1-1").exists());
    Ok(())
}

#[test]
fn keeps_last_n_and_resolves_latest() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mgr = CheckpointManager::new(dir.path(), 2)?;
    let vm = model(1.0);
    let opt = optimizer(&vm);
    for step in [10, 20, 30, 40] {
        mgr.save(&vm, &opt, &state(step))?;
    }
    let steps: Vec<u64> = mgr.list()?.into_iter().map(|(s, _)| s).collect();
    assert_eq!(steps, [30, 40]);
    assert_eq!(Checkpoint::open(dir.path())?.state.step, 40);
    assert_eq!(Checkpoint::open(&mgr.step_dir(30))?.state.step, 30);
    // Overwriting an existing name works.
    mgr.save(&model(3.0), &opt, &state(40))?;
    let fresh = model(0.0);
    Checkpoint::open(&mgr.step_dir(40))?.load_model(&fresh)?;
    assert_eq!(weight(&fresh), vec![3.0; 6]);
    Ok(())
}

#[test]
fn clear_errors_on_missing_or_corrupt_files() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mgr = CheckpointManager::new(dir.path(), 2)?;
    let vm = model(1.0);
    let opt = optimizer(&vm);
    let ck = mgr.save(&vm, &opt, &state(5))?;

    // Corrupt model file: the error names it.
    std::fs::write(ck.join(MODEL_FILE), b"not a safetensors file")?;
    let e = Checkpoint::open(&ck)?
        .load_model(&model(0.0))
        .unwrap_err()
        .to_string();
    assert!(e.contains(MODEL_FILE), "{e}");
    // Missing optimizer file.
    std::fs::remove_file(ck.join(OPTIMIZER_FILE))?;
    let e = Checkpoint::open(&ck).unwrap_err().to_string();
    assert!(e.contains(OPTIMIZER_FILE), "{e}");
    // Broken JSON.
    let ck2 = mgr.save(&vm, &opt, &state(6))?;
    std::fs::write(ck2.join(STATE_FILE), b"{\"step\": ")?;
    let e = Checkpoint::open(&ck2).unwrap_err().to_string();
    assert!(e.contains(STATE_FILE), "{e}");
    // Not a checkpoint at all.
    let empty = tempfile::tempdir()?;
    assert!(Checkpoint::open(empty.path()).is_err());

    // Strict loading names missing / unexpected / mis-shaped tensors.
    let path = dir.path().join("w.safetensors");
    let mut t = std::collections::HashMap::new();
    t.insert(
        "fc.weight".to_string(),
        Tensor::zeros((2, 3), DType::F32, &Device::Cpu)?,
    );
    candle::safetensors::save(&t, &path)?;
    let e = load_model(&model(0.0), &path, false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("fc.weight") && e.contains("[2, 3]"), "{e}");
    t.insert(
        "fc.weight".to_string(),
        Tensor::zeros((3, 2), DType::F32, &Device::Cpu)?,
    );
    t.insert(
        "extra".to_string(),
        Tensor::zeros(1, DType::F32, &Device::Cpu)?,
    );
    candle::safetensors::save(&t, &path)?;
    let r = load_model(&model(0.0), &path, false)?;
    assert_eq!(r.missing, ["fc.bias"]);
    assert_eq!(r.unexpected, ["extra"]);
    let e = load_model(&model(0.0), &path, true)
        .unwrap_err()
        .to_string();
    assert!(e.contains("fc.bias") && e.contains("extra"), "{e}");
    Ok(())
}
