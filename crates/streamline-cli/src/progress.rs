//! Progress bars and the log lines printed among them.
//!
//! Every bar of the process belongs to one `MultiProgress`, so a batch's bar over its jobs
//! stays above each video's own bars (denoising steps, decode calls), and log lines go out
//! through it ([`log_writer`]), printed above the bars instead of through them. Where stderr
//! is no terminal (a Slurm or Kubernetes log) bars are hidden and log lines go out as they are.

use std::io::{self, Write};
use std::sync::LazyLock;

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use streamline_pipeline::svd::Stage;

static BARS: LazyLock<MultiProgress> = LazyLock::new(MultiProgress::new);

/// A bar of `len` steps labelled `what`, below the bars already shown.
pub fn bar(len: usize, what: &str) -> ProgressBar {
    let bar = BARS.add(ProgressBar::new(len as u64));
    bar.set_style(
        ProgressStyle::with_template("{msg:>12} [{bar:30}] {pos}/{len} {elapsed_precise}")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    bar.set_message(what.to_string());
    bar
}

/// A bar over a batch's jobs, with the time left.
pub fn jobs_bar(len: usize) -> ProgressBar {
    let bar = bar(len, "jobs");
    bar.set_style(
        ProgressStyle::with_template(
            "{msg:>12} [{bar:30}] {pos}/{len} {elapsed_precise} (ETA {eta})",
        )
        .expect("a valid template")
        .progress_chars("#> "),
    );
    bar
}

/// One progress bar per stage of a run (denoising steps, decode calls).
pub struct Progress {
    label: String,
    current: Option<ProgressBar>,
    /// Whether finished bars leave the screen (a batch's videos) or stay (a single run's).
    transient: bool,
}

impl Progress {
    /// `label` prefixes the bars when several runs share a screen.
    pub fn new(label: &str) -> Self {
        Progress::with(label, false)
    }

    /// Bars that go once their stage is done, for one video among many.
    pub fn transient(label: &str) -> Self {
        Progress::with(label, true)
    }

    fn with(label: &str, transient: bool) -> Self {
        Progress {
            label: label.to_string(),
            current: None,
            transient,
        }
    }

    pub fn update(&mut self, stage: Stage) {
        let (what, pos, len) = match stage {
            Stage::Denoise { step, of } => ("denoise", step, of),
            Stage::Decode { chunk, of } => ("decode", chunk, of),
        };
        if pos == 0 {
            self.finish();
            self.current = Some(bar(len, &format!("{}{what}", self.label)));
        }
        if let Some(b) = &self.current {
            b.set_position(pos as u64 + 1);
        }
    }

    pub fn finish(&mut self) {
        if let Some(done) = self.current.take() {
            if self.transient {
                done.finish_and_clear();
                BARS.remove(&done);
            } else {
                done.finish();
            }
        }
    }
}

impl Drop for Progress {
    /// A run that fails midway takes its bars with it.
    fn drop(&mut self) {
        self.finish();
    }
}

/// The `tracing` writer: each log line is printed whole while the bars are hidden.
pub fn log_writer() -> LogLine {
    LogLine(Vec::new())
}

/// One log event's bytes, written out when the event is complete.
pub struct LogLine(Vec<u8>);

impl Write for LogLine {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for LogLine {
    fn drop(&mut self) {
        // Nothing to do with a failed write to stderr; the line is lost either way.
        BARS.suspend(|| {
            let _ = io::stderr().write_all(&self.0);
        });
    }
}
