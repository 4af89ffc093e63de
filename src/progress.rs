//! Progress bars for long puts and gets: drawn on stderr only when it is a terminal and the
//! transfer is large, so scripts and pipes see nothing extra.

use indicatif::{ProgressBar, ProgressStyle};

/// Transfers smaller than this finish too fast for a bar to help.
const BAR_BYTES_MIN: u64 = 64 << 20;

/// A progress bar, or nothing.
pub struct Progress(Option<ProgressBar>);

impl Progress {
    /// A byte counter towards `total` (0 when unknown).
    pub fn bytes(total: u64, what: &str) -> Self {
        if !crate::commands::stderr_is_terminal() || (total > 0 && total < BAR_BYTES_MIN) {
            return Progress(None);
        }
        let bar = if total > 0 { ProgressBar::new(total) } else { ProgressBar::new_spinner() };
        let style = ProgressStyle::with_template("{msg} {bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar());
        bar.set_style(style);
        bar.set_message(what.to_string());
        Progress(Some(bar))
    }

    /// An item counter.
    pub fn count(what: &str) -> Self {
        if !crate::commands::stderr_is_terminal() {
            return Progress(None);
        }
        let bar = ProgressBar::new_spinner();
        bar.set_message(what.to_string());
        Progress(Some(bar))
    }

    /// Moves the bar to `n`.
    pub fn set(&mut self, n: u64) {
        if let Some(b) = &self.0 {
            b.set_position(n);
        }
    }

    /// Removes the bar.
    pub fn finish(self) {
        if let Some(b) = self.0 {
            b.finish_and_clear();
        }
    }
}
