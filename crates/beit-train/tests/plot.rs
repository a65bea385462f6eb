//! The plot writes a readable PNG from a metrics log.

use beit_train::{plot_metrics, MetricsWriter, PlotOptions};
use serde_json::json;

#[test]
fn writes_png_with_all_series() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let log = dir.path().join("metrics.jsonl");
    let mut w = MetricsWriter::create(&log)?;
    for s in 1..=60u64 {
        let x = s as f64;
        w.write(&json!({"kind": "step", "step": s, "epoch": (s - 1) / 20,
            "loss": 9.0 * (-x / 25.0).exp() + 0.1 * (x * 0.7).sin() + 1.0,
            "lr": 1.5e-3 * (x / 10.0).min(1.0), "grad_norm": 2.0 / (1.0 + x / 10.0),
            "mlm_acc": 0.5 * (1.0 - (-x / 30.0).exp()), "images_per_sec": 100.0 + x,
            "bad": f64::NAN}))?;
        if s % 20 == 0 {
            w.write(&json!({"kind": "eval", "step": s, "epoch": s / 20, "acc1": 0.2 + x / 200.0}))?;
        }
    }
    drop(w);
    let png = dir.path().join("curves.png");
    let series = plot_metrics(&log, &png, &PlotOptions::default())?;
    assert!(series.contains(&"step/loss".to_string()));
    assert!(series.contains(&"eval/acc1".to_string()));
    assert!(
        !series.iter().any(|s| s.ends_with("/bad")),
        "NaN-only series is skipped"
    );
    let bytes = std::fs::read(&png)?;
    assert!(bytes.len() > 5000, "{} bytes", bytes.len());
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    // Keep a copy for a human look when asked to.
    if let Ok(p) = std::env::var("BEIT_TRAIN_PLOT_OUT") {
        std::fs::copy(&png, p)?;
    }
    // Nothing plottable is an error naming the output.
    let empty = dir.path().join("empty.jsonl");
    std::fs::write(&empty, "{\"kind\": \"step\"}\n")?;
    let e = plot_metrics(&empty, &dir.path().join("x.png"), &PlotOptions::default()).unwrap_err();
    assert!(e.to_string().contains("x.png"));
    Ok(())
}
