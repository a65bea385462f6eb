//! The cosine schedule against unilm's `cosine_scheduler` values (fixture).

use beit_train::CosineSchedule;
use serde_json::Value;

#[test]
fn matches_unilm_cosine_scheduler() {
    let p = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../fixtures/train/schedule.json"
    );
    let fx: Value = serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
    for case in fx["cases"].as_array().unwrap() {
        let u = |k: &str| case[k].as_u64().unwrap();
        let s = CosineSchedule::from_epochs(
            case["base_value"].as_f64().unwrap(),
            case["final_value"].as_f64().unwrap(),
            u("epochs"),
            u("niter_per_ep"),
            u("warmup_epochs"),
            case.get("warmup_steps").and_then(Value::as_u64),
        )
        .unwrap();
        let want: Vec<f64> = case["values"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        let got = s.values();
        assert_eq!(got.len(), want.len(), "{case}");
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                (g - w).abs() <= 1e-15 + 1e-12 * w.abs(),
                "case {case} step {i}: {g} vs {w}"
            );
        }
    }
}
