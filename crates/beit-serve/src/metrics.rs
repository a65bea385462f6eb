//! Prometheus counters of the server: requests by route and status, latency, batch sizes and the
//! queue depth, rendered in the text exposition format for `GET /metrics`.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Upper bounds of the latency histogram, in seconds.
const LATENCY_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];
/// Upper bounds of the batch-size histogram, in images.
const BATCH_BUCKETS: [f64; 8] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0];

/// A cumulative histogram.
#[derive(Debug, Clone, Default)]
struct Histogram {
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn observe(&mut self, bounds: &[f64], v: f64) {
        if self.counts.is_empty() {
            self.counts = vec![0; bounds.len()];
        }
        for (c, &b) in self.counts.iter_mut().zip(bounds) {
            if v <= b {
                *c += 1;
            }
        }
        self.sum += v;
        self.count += 1;
    }

    fn render(&self, out: &mut String, name: &str, labels: &str, bounds: &[f64]) {
        let sep = if labels.is_empty() { "" } else { "," };
        for (i, b) in bounds.iter().enumerate() {
            let c = self.counts.get(i).copied().unwrap_or(0);
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {c}");
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}",
            self.count
        );
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{braces} {}", self.sum);
        let _ = writeln!(out, "{name}_count{braces} {}", self.count);
    }
}

/// The server's counters.
#[derive(Debug, Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    latency: Mutex<BTreeMap<String, Histogram>>,
    batches: Mutex<Histogram>,
    /// Requests queued for the model and not yet taken by the batching thread.
    pub queue_depth: AtomicUsize,
}

impl Metrics {
    /// Count one answered request.
    pub fn observe_request(&self, route: &str, status: u16, elapsed: Duration) {
        if let Ok(mut r) = self.requests.lock() {
            *r.entry((route.to_string(), status)).or_default() += 1;
        }
        if let Ok(mut l) = self.latency.lock() {
            l.entry(route.to_string())
                .or_default()
                .observe(&LATENCY_BUCKETS, elapsed.as_secs_f64());
        }
    }

    /// Count one forward pass of `images` images.
    pub fn observe_batch(&self, images: usize) {
        if let Ok(mut b) = self.batches.lock() {
            b.observe(&BATCH_BUCKETS, images as f64);
        }
    }

    /// The Prometheus text exposition of every counter.
    pub fn render(&self) -> String {
        let mut out = String::new();
        out.push_str("# HELP beit_requests_total Requests answered, by route and status.\n");
        out.push_str("# TYPE beit_requests_total counter\n");
        if let Ok(r) = self.requests.lock() {
            for ((route, status), n) in r.iter() {
                let _ = writeln!(
                    out,
                    "beit_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}"
                );
            }
        }
        out.push_str("# HELP beit_request_duration_seconds Time from arrival to answer.\n");
        out.push_str("# TYPE beit_request_duration_seconds histogram\n");
        if let Ok(l) = self.latency.lock() {
            for (route, h) in l.iter() {
                let labels = format!("route=\"{route}\"");
                h.render(
                    &mut out,
                    "beit_request_duration_seconds",
                    &labels,
                    &LATENCY_BUCKETS,
                );
            }
        }
        out.push_str("# HELP beit_batch_size Images per forward pass.\n");
        out.push_str("# TYPE beit_batch_size histogram\n");
        if let Ok(b) = self.batches.lock() {
            b.render(&mut out, "beit_batch_size", "", &BATCH_BUCKETS);
        }
        out.push_str("# HELP beit_queue_depth Requests waiting for the model.\n");
        out.push_str("# TYPE beit_queue_depth gauge\n");
        let depth = self.queue_depth.load(Ordering::SeqCst);
        let _ = writeln!(out, "beit_queue_depth {depth}");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counts_and_cumulative_buckets() {
        let m = Metrics::default();
        m.observe_request("/v1/classify", 200, Duration::from_millis(3));
        m.observe_request("/v1/classify", 200, Duration::from_millis(30));
        m.observe_batch(3);
        let text = m.render();
        assert!(text.contains("beit_requests_total{route=\"/v1/classify\",status=\"200\"} 2"));
        assert!(text.contains(
            "beit_request_duration_seconds_bucket{route=\"/v1/classify\",le=\"0.005\"} 1"
        ));
        assert!(text.contains("beit_batch_size_bucket{le=\"2\"} 0"));
        assert!(text.contains("beit_batch_size_bucket{le=\"4\"} 1"));
        assert!(text.contains("beit_batch_size_sum 3"));
        assert!(text.contains("beit_queue_depth 0"));
    }
}
