//! The Rust blockwise generator against a Python restatement of the reference generator.
//!
//! `fixtures/mim/masking_stats.json` holds, for four configurations, statistics of 200,000 masks
//! drawn by `scripts/fixtures/mim_fixtures.py` (Python `random`, the reference algorithm line by line):
//! mean/std of the masked count, of "exactly the target" (0/1), of the number of 4-connected
//! groups, of the masked share of border and inner cells, and the masking frequency of every cell.
//!
//! The Rust generator draws `RUST_DRAWS` masks per configuration (fixed seed, so the test is
//! deterministic) and every statistic is compared by a two-sample z-test,
//! `z = (mean_rust − mean_py) / sqrt(s_rust²/n_rust + s_py²/n_py)`. For a correct generator `z` is
//! standard normal: `|z| < 4.5` fails with probability about 7e-6 per statistic. Cell
//! frequencies use the binomial standard error and `|z| < 5` (about 6e-7 per cell, so under 4e-4
//! over the 576 cells of the largest grid). A deliberately wrong parameter must fail these
//! bounds (`wrong_parameters_are_detected`), showing they are tight enough to matter.
//!
//! Print the table with `cargo test -p beit-mim --test masking_stats -- --nocapture`.

use beit_mim::stats::{border_inner_fractions, connected_components, masked_count};
use beit_mim::{MaskSampler, MaskingConfig, MaskingGenerator};
use serde_json::Value;

const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../fixtures/mim/masking_stats.json"
);
const RUST_DRAWS: usize = 20_000;
const Z_SCALAR: f64 = 4.5;
const Z_CELL: f64 = 5.0;
const SEED: u64 = 1234;

/// `BEIT_MIM_STATS_SEED` / `BEIT_MIM_STATS_DRAWS` override the seed and draw count, to re-run the
/// comparison on other streams when investigating.
fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn fixture() -> Vec<Value> {
    let text = std::fs::read_to_string(FIXTURE).expect("read fixtures/mim/masking_stats.json");
    let doc: Value = serde_json::from_str(&text).expect("parse masking_stats.json");
    doc["results"].as_array().expect("`results` array").clone()
}

fn config_of(entry: &Value) -> MaskingConfig {
    let c = &entry["config"];
    let size = c["input_size"].as_array().unwrap();
    MaskingConfig {
        input_size: [
            size[0].as_u64().unwrap() as usize,
            size[1].as_u64().unwrap() as usize,
        ],
        num_masking_patches: c["num_masking_patches"].as_u64().unwrap() as usize,
        min_num_patches: c["min_num_patches"].as_u64().unwrap() as usize,
        max_num_patches: c["max_num_patches"].as_u64().map(|v| v as usize),
        min_aspect: c["min_aspect"].as_f64().unwrap(),
        ..MaskingConfig::default()
    }
}

/// Running mean and (population) standard deviation.
#[derive(Default)]
struct Moments {
    n: f64,
    sum: f64,
    sum_sq: f64,
}

impl Moments {
    fn push(&mut self, x: f64) {
        self.n += 1.0;
        self.sum += x;
        self.sum_sq += x * x;
    }
    fn mean(&self) -> f64 {
        self.sum / self.n
    }
    fn std(&self) -> f64 {
        (self.sum_sq / self.n - self.mean().powi(2)).max(0.0).sqrt()
    }
}

struct RustStats {
    scalars: Vec<(&'static str, Moments)>,
    count_min: usize,
    count_max: usize,
    cell_freq: Vec<f64>,
}

fn rust_stats(cfg: &MaskingConfig, draws: usize, seed: u64) -> RustStats {
    let g = MaskingGenerator::new(cfg).unwrap();
    let (h, w) = g.grid();
    let target = cfg.num_masking_patches;
    let names = [
        "count",
        "exact_share",
        "components",
        "border_fraction",
        "inner_fraction",
    ];
    let mut scalars: Vec<(&'static str, Moments)> =
        names.iter().map(|&n| (n, Moments::default())).collect();
    let mut hits = vec![0usize; h * w];
    let (mut count_min, mut count_max) = (usize::MAX, 0);
    for i in 0..draws as u64 {
        let m = g.sample_at(seed, 0, i);
        let n = masked_count(&m);
        count_min = count_min.min(n);
        count_max = count_max.max(n);
        let (border, inner) = border_inner_fractions(&m, h, w);
        let values = [
            n as f64,
            f64::from(u8::from(n == target)),
            connected_components(&m, h, w) as f64,
            border,
            inner,
        ];
        for ((_, mom), v) in scalars.iter_mut().zip(values) {
            mom.push(v);
        }
        for (c, &b) in hits.iter_mut().zip(&m) {
            *c += usize::from(b);
        }
    }
    RustStats {
        scalars,
        count_min,
        count_max,
        cell_freq: hits.iter().map(|&c| c as f64 / draws as f64).collect(),
    }
}

/// Every (statistic, |z|) pair plus the report lines; the worst cell is reported as `cell_frequency`.
fn compare(entry: &Value, cfg: &MaskingConfig, draws: usize) -> (Vec<(String, f64, f64)>, String) {
    let py_n = entry["draws"].as_f64().unwrap();
    let rs = rust_stats(cfg, draws, env_or("BEIT_MIM_STATS_SEED", SEED));
    let name = entry["config"]["name"].as_str().unwrap();
    let mut report = format!(
        "{name} {:?} target {} min {} max {:?} aspect {}: count range rust [{}, {}] python [{}, {}]\n",
        cfg.input_size,
        cfg.num_masking_patches,
        cfg.min_num_patches,
        cfg.max_num_patches,
        cfg.min_aspect,
        rs.count_min,
        rs.count_max,
        entry["count_min"],
        entry["count_max"]
    );
    let mut zs = Vec::new();
    for (stat, mom) in &rs.scalars {
        let py_mean = entry[*stat]["mean"].as_f64().unwrap();
        let py_std = entry[*stat]["std"].as_f64().unwrap();
        let se = (mom.std().powi(2) / mom.n + py_std.powi(2) / py_n).sqrt();
        let z = if se == 0.0 {
            if (mom.mean() - py_mean).abs() < 1e-12 {
                0.0
            } else {
                f64::INFINITY
            }
        } else {
            (mom.mean() - py_mean) / se
        };
        report += &format!(
            "  {stat:<16} rust {:>9.4} (sd {:.4})  python {:>9.4} (sd {:.4})  z {:+.2}\n",
            mom.mean(),
            mom.std(),
            py_mean,
            py_std,
            z
        );
        zs.push((stat.to_string(), z.abs(), Z_SCALAR));
    }
    let py_cells: Vec<f64> = entry["cell_frequency"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    assert_eq!(py_cells.len(), rs.cell_freq.len());
    let (mut worst, mut worst_i) = (0.0f64, 0);
    for (i, (&pr, &pp)) in rs.cell_freq.iter().zip(&py_cells).enumerate() {
        let pooled = (pr * draws as f64 + pp * py_n) / (draws as f64 + py_n);
        let se = (pooled * (1.0 - pooled) * (1.0 / draws as f64 + 1.0 / py_n)).sqrt();
        let z = if se == 0.0 { 0.0 } else { (pr - pp).abs() / se };
        if z > worst {
            worst = z;
            worst_i = i;
        }
    }
    report += &format!(
        "  cell frequency   worst |z| {worst:.2} at cell {worst_i} (rust {:.4}, python {:.4}); corner rust {:.4} python {:.4}\n",
        rs.cell_freq[worst_i], py_cells[worst_i], rs.cell_freq[0], py_cells[0]
    );
    zs.push(("cell_frequency".to_string(), worst, Z_CELL));
    assert!(
        rs.count_max <= cfg.num_masking_patches,
        "{name}: a mask exceeded the target"
    );
    (zs, report)
}

#[test]
fn statistics_match_the_python_reference() {
    let entries = fixture();
    assert_eq!(entries.len(), 4);
    let mut failures = Vec::new();
    for entry in &entries {
        let cfg = config_of(entry);
        let (zs, report) = compare(entry, &cfg, env_or("BEIT_MIM_STATS_DRAWS", RUST_DRAWS));
        eprint!("{report}");
        for (stat, z, bound) in zs {
            if z >= bound {
                failures.push(format!("{}: {stat} |z| = {z:.2}", entry["config"]["name"]));
            }
        }
    }
    assert!(failures.is_empty(), "statistics differ: {failures:?}");
}

#[test]
fn wrong_parameters_are_detected() {
    // The same comparison must reject generators that differ from the reference in one
    // parameter; fewer draws keep this cheap and still separate them clearly.
    let entries = fixture();
    let base = &entries[0];
    assert_eq!(base["config"]["name"], "beit-224");
    let right = config_of(base);
    let wrongs = [
        MaskingConfig {
            min_num_patches: 12,
            ..right.clone()
        },
        MaskingConfig {
            min_aspect: 0.5,
            ..right.clone()
        },
        MaskingConfig {
            max_num_patches: Some(50),
            ..right.clone()
        },
    ];
    for wrong in wrongs {
        let (zs, report) = compare(base, &wrong, 10_000);
        let worst = zs
            .iter()
            .map(|(_, z, bound)| z / bound)
            .fold(0.0f64, f64::max);
        eprintln!(
            "wrong min {} / aspect {} / max {:?}: worst |z|/bound = {worst:.1}",
            wrong.min_num_patches, wrong.min_aspect, wrong.max_num_patches
        );
        assert!(
            worst > 1.0,
            "a wrong generator passed the statistical comparison:\n{report}"
        );
    }
}
