//! # streamline-cli
//!
//! **Owns** the `streamline` binary: argument parsing, progress display and error reporting
//! for the jobs the other crates implement (`streamline svd`, `streamline animatediff`,
//! `streamline plan`, `streamline rehash search` as their issues land).
//!
//! **Promises:** bad input exits non-zero with a message naming the file, tensor or flag, and
//! leaves no half-written output.
//!
//! **Tests:** `cargo test -p streamline-cli`.

use clap::{CommandFactory, Parser};

/// Run video diffusion models (SVD, SVD-XT, AnimateDiff) in far less memory and time, with no
/// retraining: Feature Slicer, Operator Grouping and Step Rehash over one IR.
#[derive(Parser, Debug)]
#[command(name = "streamline", version, about, long_about = None)]
struct Cli {}

fn main() {
    let _cli = Cli::parse();
    // No job has landed yet: show what the tool is and how to ask for help.
    Cli::command().print_help().expect("stdout is writable");
}
