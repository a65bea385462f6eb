//! Progress bar for training loops (indicatif), hidden when stderr is not a terminal.
//!
//! Set `BEIT_NO_PROGRESS=1` to hide it on a terminal too (e.g. when logs are captured).

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A bar over optimizer steps showing loss, lr, images/s and the ETA.
#[derive(Debug, Clone)]
pub struct TrainProgress {
    bar: ProgressBar,
}

impl TrainProgress {
    /// A bar for `total` steps starting at `start` (non-zero when resuming), labelled `label`.
    pub fn new(total: u64, start: u64, label: &str) -> Self {
        let visible =
            std::io::stderr().is_terminal() && std::env::var_os("BEIT_NO_PROGRESS").is_none();
        let bar = if visible {
            ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr())
        } else {
            ProgressBar::hidden()
        };
        bar.set_length(total);
        bar.set_position(start);
        bar.set_prefix(label.to_string());
        let style = ProgressStyle::with_template(
            "{prefix} {bar:30.cyan/blue} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar());
        bar.set_style(style);
        if visible {
            bar.enable_steady_tick(Duration::from_millis(500));
        }
        Self { bar }
    }

    /// A bar that never draws (tests, non-interactive use).
    pub fn hidden(total: u64) -> Self {
        let bar = ProgressBar::hidden();
        bar.set_length(total);
        Self { bar }
    }

    /// Move to `step` and show the latest numbers.
    pub fn update(&self, step: u64, loss: f64, lr: f64, images_per_sec: f64) {
        self.bar.set_position(step);
        self.bar.set_message(format!(
            "loss {loss:.4} lr {lr:.2e} {images_per_sec:.1} img/s"
        ));
    }

    /// Print a line above the bar (or to stderr when hidden).
    pub fn println(&self, msg: impl AsRef<str>) {
        if self.bar.is_hidden() {
            eprintln!("{}", msg.as_ref());
        } else {
            self.bar.println(msg);
        }
    }

    /// Finish and leave the bar on screen.
    pub fn finish(&self) {
        self.bar.finish();
    }

    /// The underlying indicatif bar.
    pub fn bar(&self) -> &ProgressBar {
        &self.bar
    }
}
