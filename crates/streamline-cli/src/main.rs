//! # streamline-cli
//!
//! **Owns** the `streamline` binary: argument parsing, progress display and error reporting
//! for the jobs the other crates implement: `streamline svd`, `streamline animatediff`,
//! `streamline batch svd | animatediff` (many videos, sharded and resumable),
//! `streamline score clip-sim`, `streamline plan` and `streamline rehash search | evaluate`.
//!
//! **Promises:** bad input exits non-zero with one message naming the file, tensor or flag and
//! the rule, each cause told once; every argument, size, output path and budget is checked,
//! and the run's plan against the machine's memory, before any weights load; NaN or infinite
//! numbers are refused where they enter, and a run whose latents stop being finite stops
//! naming the step, so no job writes a blank video; no half-written output is left behind,
//! not even by SIGINT / SIGTERM (exit 130 / 143); outputs get the process umask, nothing the
//! run did not write is deleted, and an output that would overwrite an input is refused; a
//! batch checks every job line before its first job and goes on past a failing job.
//!
//! **Tests:** `cargo test -p streamline-cli` runs the binary and snapshots its output;
//! `tests/bad_input.rs` is the corpus of bad and edge inputs, each refused before inference;
//! `tests/batch.rs` runs, shards, kills and resumes batches; `tests/score.rs` scores videos.

mod animatediff;
mod batch;
mod checks;
mod plan;
mod progress;
mod rehash;
mod score;
mod session;
mod signals;
mod svd;

use std::io::IsTerminal;

use anyhow::Result;
use candle_core::DType;
use clap::{Args, Parser, Subcommand, ValueEnum};
/// `--device cpu | cuda[:N] | metal[:N]`.
pub(crate) use streamline_pipeline::DeviceSpec as DeviceArg;
use streamline_pipeline::{
    kernels_for, parse_bytes, DeviceKind, KernelChoice, Kernels, Optimization,
};

/// Run video diffusion models (SVD, SVD-XT, AnimateDiff) in far less memory and time, with no
/// retraining: Feature Slicer, Operator Grouping and Step Rehash over one IR.
#[derive(Parser, Debug)]
#[command(name = "streamline", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Image-to-video with Stable Video Diffusion (SVD, SVD-XT).
    Svd(svd::SvdArgs),
    /// Text-to-video with AnimateDiff (an SD 1.5 model plus a motion adapter).
    Animatediff(animatediff::AnimateDiffArgs),
    /// Step Rehash: search key-step schedules by calibration, and evaluate them.
    #[command(subcommand)]
    Rehash(rehash::RehashCommand),
    /// Plan memory without weights, from the model's configs alone: each call's groups and
    /// slicing, and each phase's weights, held values and activations (`--json` for scripts).
    Plan(plan::PlanArgs),
    /// Many videos from one model load: a JSONL file of jobs, sharded across processes
    /// (Slurm job arrays, Kubernetes Indexed Jobs) and resumable (docs/batch.md).
    #[command(subcommand)]
    Batch(batch::BatchCommand),
    /// Score videos: CLIP-SIM against their prompts (docs/clip-sim.md).
    #[command(subcommand)]
    Score(score::ScoreCommand),
}

/// `--kernels`: which implementation of the ops runs.
#[derive(Clone, Copy, Debug, Default, ValueEnum)]
enum KernelsArg {
    /// streamline's CPU kernels on the CPU, the portable path on a GPU.
    #[default]
    Auto,
    /// streamline's CPU kernels (the CPU only).
    Cpu,
    /// The portable path GPUs run (candle ops, tiled to the plan), on any device.
    Portable,
}

impl KernelsArg {
    fn kernels(self, device: DeviceKind) -> Result<Kernels> {
        let choice = match self {
            KernelsArg::Auto => KernelChoice::Auto,
            KernelsArg::Cpu => KernelChoice::Cpu,
            KernelsArg::Portable => KernelChoice::Portable,
        };
        kernels_for(device, choice).map_err(anyhow::Error::msg)
    }
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Dtype {
    F32,
    F16,
    Bf16,
}

impl From<Dtype> for DType {
    fn from(d: Dtype) -> DType {
        match d {
            Dtype::F32 => DType::F32,
            Dtype::F16 => DType::F16,
            Dtype::Bf16 => DType::BF16,
        }
    }
}

/// The optimization flags every job shares.
#[derive(Args, Debug)]
struct OptimizationArgs {
    /// Slices of the B*T frames for frame-wise layers (Feature Slicer + Operator Grouping).
    #[arg(long, requires = "spatial_chunks")]
    temporal_chunks: Option<usize>,
    /// Slices of the B*H*W positions for temporal layers.
    #[arg(long, requires = "temporal_chunks")]
    spatial_chunks: Option<usize>,
    /// Least slicing whose planned activation peak fits this size, e.g. 8GiB.
    #[arg(long, value_parser = parse_bytes, conflicts_with = "temporal_chunks")]
    memory_budget: Option<usize>,
    /// Feature Slicer without Operator Grouping (every node's output materialized).
    #[arg(long, requires = "temporal_chunks")]
    no_grouping: bool,
    /// Which implementation of the ops runs; plans are made for it.
    #[arg(long, value_enum, default_value = "auto")]
    kernels: KernelsArg,
}

impl OptimizationArgs {
    fn optimization(&self) -> Result<Optimization> {
        Ok(
            match (
                self.temporal_chunks,
                self.spatial_chunks,
                self.memory_budget,
            ) {
                (_, _, Some(bytes)) => Optimization::Budget { bytes },
                (Some(t), Some(s), None) => {
                    anyhow::ensure!(
                        t > 0 && s > 0,
                        "--temporal-chunks and --spatial-chunks must be at least 1"
                    );
                    if self.no_grouping {
                        Optimization::SlicerOnly {
                            temporal_chunks: t,
                            spatial_chunks: s,
                        }
                    } else {
                        Optimization::Paper {
                            temporal_chunks: t,
                            spatial_chunks: s,
                        }
                    }
                }
                _ => Optimization::Original,
            },
        )
    }
}

/// The flags only a single-video command has: where it writes, and the paper's naive baseline
/// (for comparisons, which batches do not make).
#[derive(Args, Debug)]
struct SingleVideoArgs {
    /// `.mp4` (H.264 at --fps), `.gif` (animated GIF at --fps), a directory (PNG frames) or
    /// `.safetensors` (raw frames); checked, with its folder, before anything runs.
    #[arg(long)]
    output: std::path::PathBuf,
    /// The paper's naive baseline: cut the frames into --temporal-chunks runs denoised
    /// separately. Inexact on purpose; for comparisons only.
    #[arg(long, requires = "temporal_chunks", conflicts_with = "memory_budget")]
    naive_slicing: bool,
}

/// diffusers' default SVD frame size.
const DIFFUSERS_HEIGHT: usize = 576;
const DIFFUSERS_WIDTH: usize = 1024;

/// The video size flags every job shares.
#[derive(Args, Debug)]
struct VideoSize {
    /// Defaults to 576 (diffusers' SVD default; 512 for `plan --model animatediff`); `svd`
    /// and `rehash` default to the model's training size instead when its config records one
    /// of another pixel count (the built-in model: 64).
    #[arg(long)]
    height: Option<usize>,
    /// Defaults to 1024 (diffusers' SVD default; 512 for `plan --model animatediff`); `svd`
    /// and `rehash` default to the model's training size instead when its config records one
    /// of another pixel count (the built-in model: 64).
    #[arg(long)]
    width: Option<usize>,
    /// Defaults to the UNet config's `num_frames` (14 for SVD, 25 for SVD-XT).
    #[arg(long, value_parser = checks::positive)]
    num_frames: Option<usize>,
}

/// Counts heap bytes so that a run's summary can give each phase's measured peak beside the
/// planned one (relaxed atomic counters: no measurable cost next to tensor work).
#[global_allocator]
static ALLOC: streamline_ir::alloc::TrackingAllocator = streamline_ir::alloc::TrackingAllocator;

fn main() {
    streamline_ir::alloc::keep_freed_memory();
    tracing_subscriber::fmt()
        // Warnings (a truncated prompt, ...) and a batch's progress through its jobs show
        // unless RUST_LOG says otherwise.
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                tracing_subscriber::EnvFilter::new(
                    "warn,streamline::batch=info,streamline_pipeline::batch=info",
                )
            }),
        )
        .with_writer(progress::log_writer)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let cli = Cli::parse();
    // On one of rayon's workers, so each kernel's threads join rather than wake and sleep.
    let result = signals::install().and_then(|()| {
        streamline_kernels::on_worker(|| match cli.command {
            Command::Svd(args) => svd::run(args),
            Command::Animatediff(args) => animatediff::run(args),
            Command::Plan(args) => plan::run(args),
            Command::Rehash(command) => rehash::run(command),
            Command::Batch(command) => batch::run(command),
            Command::Score(command) => score::run(command),
        })
    });
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
