//! `beit-cli embed` then `beit-cli knn` on a small ImageFolder of the fixture photos, with the
//! small classifier of `fixtures/model/predict`.

mod common;

use common::{cli, run_ok};

#[test]
fn embed_writes_features_and_knn_reads_them() {
    let model = common::fixtures("model").join("predict");
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    for (split, class, file) in [
        ("train", "cat", "cat_gray.png"),
        ("train", "cat", "cat_small.jpg"),
        ("train", "rocket", "rocket.jpg"),
        ("train", "rocket", "rocket_rgba.png"),
        ("val", "cat", "cat_small.jpg"),
        ("val", "rocket", "rocket.jpg"),
    ] {
        let dir = data.join(split).join(class);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(model.join(file), dir.join(file)).unwrap();
    }
    let embed = |split: &str, extra: &[&str]| {
        let out = tmp.path().join(format!("{split}.safetensors"));
        run_ok(
            cli()
                .args([
                    "embed",
                    "--batch-size",
                    "3",
                    "--workers",
                    "1",
                    "--split",
                    split,
                ])
                .arg("--model")
                .arg(&model)
                .arg("--data")
                .arg(&data)
                .arg("--out")
                .arg(&out)
                .args(extra),
        );
        out
    };
    let train = embed("train", &[]);
    let val = embed("val", &["--pool", "cls", "--layer", "1"]);
    let bytes = std::fs::read(&train).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.tensor("features").unwrap().shape(), &[4, 32]);
    assert_eq!(st.tensor("labels").unwrap().shape(), &[4]);
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let meta = header.metadata().clone().unwrap();
    assert_eq!(meta["pool"], "mean");
    assert_eq!(meta["layer"], "2");
    let paths: Vec<String> = serde_json::from_str(&meta["paths"]).unwrap();
    assert!(paths.iter().any(|p| p.ends_with("rocket.jpg")), "{paths:?}");
    // No temporary file left beside the outputs.
    let names: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 3, "{names:?}");

    let out = run_ok(
        cli()
            .args(["knn", "--k", "1,3", "--json", "--train"])
            .arg(&train)
            .arg("--val")
            .arg(&val),
    );
    let got: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(got.as_array().unwrap().len(), 2);
    for r in got.as_array().unwrap() {
        let top1 = r["top1"].as_f64().unwrap();
        assert!((0.0..=100.0).contains(&top1));
        assert_eq!(
            r["top5"].as_f64().unwrap(),
            100.0,
            "two classes: always in the top 5"
        );
    }
}
