//! SIGINT and SIGTERM: every output still being written is removed, then the process exits
//! with 128 + the signal (130, 143), as shells report a process killed by it.

use anyhow::{Context, Result};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

/// Handles both signals on a thread of their own, so the main thread needs no polling: a run
/// stops mid-step, and a frame being written finishes before its directory is removed (see
/// `streamline_pipeline::video::remove_staged`).
pub fn install() -> Result<()> {
    let mut signals =
        Signals::new([SIGINT, SIGTERM]).context("installing the SIGINT / SIGTERM handler")?;
    std::thread::spawn(move || {
        if let Some(signal) = signals.forever().next() {
            streamline_pipeline::video::remove_staged();
            let name = if signal == SIGINT {
                "SIGINT"
            } else {
                "SIGTERM"
            };
            eprintln!("\ninterrupted by {name}: unfinished outputs removed");
            std::process::exit(128 + signal);
        }
    });
    Ok(())
}
