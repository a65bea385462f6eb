//! The weighted k-NN against PyTorch on the features of `fixtures/knn/` (scripts/fixtures/knn_fixtures.py).

use std::path::PathBuf;

use beit_recipes::feature_file::FeatureFile;
use beit_recipes::knn::{knn_classify, LabelledFeatures};
use candle::Device;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/knn")
        .join(name)
}

fn labelled(name: &str) -> LabelledFeatures {
    let f = FeatureFile::read(&fixture(name)).unwrap();
    LabelledFeatures {
        features: f.tensor(&Device::Cpu).unwrap(),
        labels: f.labels.iter().map(|&l| l as u32).collect(),
    }
}

#[test]
fn knn_matches_pytorch() {
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("expected.json")).unwrap()).unwrap();
    let t = expected["temperature"].as_f64().unwrap();
    let classes = expected["num_classes"].as_u64().unwrap() as usize;
    let want = expected["results"].as_array().unwrap();
    let ks: Vec<usize> = want
        .iter()
        .map(|r| r["k"].as_u64().unwrap() as usize)
        .collect();
    let got = knn_classify(
        &labelled("train.safetensors"),
        &labelled("val.safetensors"),
        &ks,
        t,
        classes,
    )
    .unwrap();
    for (g, w) in got.iter().zip(want) {
        println!(
            "k = {}: top-1 {} (torch {}), top-5 {} (torch {})",
            g.k, g.top1, w["top1"], g.top5, w["top5"]
        );
        assert!(
            (g.top1 - w["top1"].as_f64().unwrap()).abs() < 1e-9,
            "k = {}: top-1",
            g.k
        );
        assert!(
            (g.top5 - w["top5"].as_f64().unwrap()).abs() < 1e-9,
            "k = {}: top-5",
            g.k
        );
    }
}
