//! PNG plots of the training curves from the metrics JSONL (plotters, bitmap backend).
//!
//! One image with a panel per series: every numeric field of every record kind becomes a series
//! named `"{kind}/{field}"` (e.g. `step/loss`, `step/lr`, `eval/acc1`) plotted against `step`.
//! Text is drawn with an embedded subset of DejaVu Sans (ASCII; licence in
//! `assets/DejaVuSans-LICENSE.txt`), so no system font library is needed.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Once;

use plotters::prelude::*;
use serde_json::Value;

use crate::error::{Result, TrainError};
use crate::metrics::read_jsonl;

static FONT: &[u8] = include_bytes!("../assets/DejaVuSans-ascii.ttf");
static REGISTER: Once = Once::new();

fn register_font() {
    REGISTER.call_once(|| {
        // The bytes are a valid TrueType file checked in with the crate; a failure here would
        // only mean missing text, so it is not fatal.
        if plotters::style::register_font("sans-serif", FontStyle::Normal, FONT).is_err() {
            tracing::warn!("embedded plot font could not be registered");
        }
    });
}

/// Fields never plotted as series.
const SKIP: &[&str] = &[
    "kind",
    "step",
    "epoch",
    "time",
    "micro_batches",
    "samples_seen",
];

/// Options of [`plot_metrics`].
#[derive(Debug, Clone)]
pub struct PlotOptions {
    /// Only these series (`"kind/field"`), in this order; `None` plots all.
    pub series: Option<Vec<String>>,
    /// Pixel size of one panel.
    pub panel_size: (u32, u32),
    /// Panels per row.
    pub columns: usize,
}

impl Default for PlotOptions {
    fn default() -> Self {
        Self {
            series: None,
            panel_size: (480, 300),
            columns: 2,
        }
    }
}

/// Collect `(step, value)` series from JSONL records.
pub fn collect_series(
    records: &[serde_json::Map<String, Value>],
) -> BTreeMap<String, Vec<(f64, f64)>> {
    let mut out: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for r in records {
        let kind = r.get("kind").and_then(Value::as_str).unwrap_or("record");
        let Some(step) = r.get("step").and_then(Value::as_f64) else {
            continue;
        };
        for (k, v) in r {
            if SKIP.contains(&k.as_str()) {
                continue;
            }
            if let Some(x) = v.as_f64().filter(|x| x.is_finite()) {
                out.entry(format!("{kind}/{k}"))
                    .or_default()
                    .push((step, x));
            }
        }
    }
    out
}

/// Plot the curves of the JSONL file `jsonl` into `out_png`; returns the plotted series names.
pub fn plot_metrics(jsonl: &Path, out_png: &Path, opts: &PlotOptions) -> Result<Vec<String>> {
    let records = read_jsonl(jsonl)?;
    let all = collect_series(&records);
    let names: Vec<String> = match &opts.series {
        Some(want) => want
            .iter()
            .filter(|n| all.contains_key(*n))
            .cloned()
            .collect(),
        None => all.keys().cloned().collect(),
    };
    if names.is_empty() {
        return Err(TrainError::Plot {
            path: out_png.to_path_buf(),
            message: format!("no numeric series with a `step` in {}", jsonl.display()),
        });
    }
    register_font();
    let perr = |e: &dyn std::fmt::Display| TrainError::Plot {
        path: out_png.to_path_buf(),
        message: e.to_string(),
    };
    let cols = opts.columns.max(1).min(names.len());
    let rows = names.len().div_ceil(cols);
    let (pw, ph) = opts.panel_size;
    let root =
        BitMapBackend::new(out_png, (pw * cols as u32, ph * rows as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| perr(&e))?;
    let panels = root.split_evenly((rows, cols));
    for (i, (name, panel)) in names.iter().zip(panels.iter()).enumerate() {
        let pts = &all[name];
        let (mut x0, mut x1) = (f64::INFINITY, f64::NEG_INFINITY);
        let (mut y0, mut y1) = (f64::INFINITY, f64::NEG_INFINITY);
        for &(x, y) in pts {
            x0 = x0.min(x);
            x1 = x1.max(x);
            y0 = y0.min(y);
            y1 = y1.max(y);
        }
        if x1 <= x0 {
            x1 = x0 + 1.0;
        }
        let pad = if y1 > y0 {
            0.05 * (y1 - y0)
        } else {
            y0.abs().max(1e-12) * 0.05 + 1e-12
        };
        let (y0, y1) = (y0 - pad, y1 + pad);
        let color = Palette99::pick(i).to_rgba();
        let mut chart = ChartBuilder::on(panel)
            .caption(name, ("sans-serif", 18))
            .margin(8)
            .x_label_area_size(36)
            .y_label_area_size(60)
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(|e| perr(&e))?;
        chart
            .configure_mesh()
            .x_desc("step")
            .x_labels(6)
            .y_labels(6)
            .x_label_formatter(&|x| format!("{}", x.round() as i64))
            .y_label_formatter(&|y| format_tick(*y))
            .label_style(("sans-serif", 12))
            .draw()
            .map_err(|e| perr(&e))?;
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))
            .map_err(|e| perr(&e))?;
        if pts.len() <= 50 {
            chart
                .draw_series(pts.iter().map(|&p| Circle::new(p, 2, color.filled())))
                .map_err(|e| perr(&e))?;
        }
    }
    root.present().map_err(|e| perr(&e))?;
    Ok(names)
}

fn format_tick(y: f64) -> String {
    let a = y.abs();
    if a != 0.0 && !(1e-2..1e4).contains(&a) {
        format!("{y:.1e}")
    } else {
        format!("{y:.3}")
    }
}
