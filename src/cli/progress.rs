//! indicatif progress bars behind attest's `Progress` trait, drawn only when stderr is a terminal.

use std::io::IsTerminal;

use attest::progress::{Progress, ProgressTask};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Progress bars for downloads and hashing.
pub struct TermProgress {
    bars: Option<MultiProgress>,
}

impl TermProgress {
    /// Bars when `enabled` and stderr is a terminal.
    pub fn new(enabled: bool) -> Self {
        let bars = (enabled && std::io::stderr().is_terminal())
            .then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()));
        Self { bars }
    }

    #[cfg(feature = "inference")]
    /// Prints a line above the bars (or plainly to stderr).
    pub fn note(&self, line: &str) {
        match &self.bars {
            Some(bars) => {
                let _ = bars.println(line);
            }
            None => eprintln!("{line}"),
        }
    }
}

struct Bar(ProgressBar);

impl ProgressTask for Bar {
    fn advance(&self, bytes: u64) {
        self.0.inc(bytes);
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        self.0.finish_and_clear();
    }
}

struct NoBar;

impl ProgressTask for NoBar {
    fn advance(&self, _bytes: u64) {}
}

impl Progress for TermProgress {
    fn start(&self, label: &str, total: Option<u64>) -> Box<dyn ProgressTask + '_> {
        let Some(bars) = &self.bars else {
            return Box::new(NoBar);
        };
        let bar = match total {
            Some(total) => ProgressBar::new(total).with_style(
                ProgressStyle::with_template(
                    "{msg:30!} {bar:30} {bytes:>10}/{total_bytes:<10} {bytes_per_sec:>12} {eta:>4}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            ),
            None => {
                let spinner = ProgressBar::new_spinner();
                spinner.enable_steady_tick(std::time::Duration::from_millis(120));
                spinner
            }
        };
        Box::new(Bar(bars.add(bar.with_message(label.to_owned()))))
    }
}
