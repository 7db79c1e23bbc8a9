//! # streamline-bench
//!
//! **Owns** one benchmark measurement per process, for `cargo xtask bench` (which runs it once
//! per scenario x mode, beside the diffusers peers, and writes the reports).
//!
//! - `prepare-unet`: random svd-small-like UNet weights in diffusers' folder layout, and the
//!   inputs of one step, so that every implementation reads the same safetensors;
//! - `unet`: one UNet step under one optimization (timed runs, peak RSS, live heap peak,
//!   planned peak), output tensor to a file;
//! - `svd`: the SVD pipeline end to end on a model folder, frames to a file;
//! - `planning`: how long `streamline plan` takes for the full-size models at many budgets;
//! - `kernels`: streamline's CPU kernels against candle's ops on fixed shapes (medians);
//! - `compare`: relative L2 (and PSNR of frames) of one output against another.
//!
//! **Promises:** the first run after loading is the memory run, measured from a fresh
//! baseline (`measure`); the timed runs follow it, so the first also warms up.
//!
//! **Tests:** `cargo test -p streamline-bench` checks the memory method (a touched allocation
//! shows in both peaks, a fresh baseline forgets it); `cargo xtask bench --quick` runs the whole
//! harness. The optimizations it measures are tested in their own crates.

mod device;
mod kernels;
mod measure;
mod planning;
mod svd;
mod unet;

use std::collections::HashMap;
use std::fs;
use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use clap::{Args, Parser, Subcommand, ValueEnum};
use streamline_ir::alloc::TrackingAllocator;
use streamline_models::svd::{UNetConfig, UNetShape};
use streamline_pipeline::{
    kernels_for, parse_bytes, DeviceSpec, KernelChoice, Kernels, Optimization,
};
use streamline_rehash::{RehashArg, Schedule};

#[global_allocator]
static ALLOC: TrackingAllocator = TrackingAllocator;

#[derive(Parser)]
#[command(name = "streamline-bench")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum ModelConfig {
    /// SVD's UNet at a fifth of the width (`UNetConfig::svd_small`).
    SvdSmall,
    /// AnimateDiff's UNet (SD 1.5 + motion adapter v1-5-2) at a fifth of the width.
    AnimatediffSmall,
}

#[derive(Subcommand)]
enum Task {
    /// Write DIR/unet (random weights, diffusers layout) and DIR/inputs.safetensors.
    PrepareUnet {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, value_enum)]
        config: ModelConfig,
        #[arg(long)]
        frames: usize,
        #[arg(long)]
        batch: usize,
        /// Latent height and width.
        #[arg(long)]
        latent: usize,
        #[arg(long, default_value_t = 2024)]
        seed: u64,
    },
    /// One UNet step of the model prepared in DIR.
    Unet {
        #[arg(long)]
        dir: PathBuf,
        #[command(flatten)]
        how: How,
    },
    /// Error of an output against the reference output: relative L2 (and PSNR for frames in
    /// [0, 1]), as JSON on stdout.
    Compare {
        #[arg(long)]
        output: PathBuf,
        #[arg(long)]
        reference: PathBuf,
        /// The tensors are frames in [0, 1]: report PSNR too.
        #[arg(long)]
        frames: bool,
    },
    /// Kernel micro-benchmarks: the `[[kernel]]` cases of a TOML file, as JSON timings.
    Kernels {
        #[arg(long)]
        cases: PathBuf,
        /// Only these cases (by name); all when none is given.
        #[arg(long)]
        only: Vec<String>,
        #[arg(long, default_value_t = 3)]
        runs: usize,
        #[arg(long)]
        out: PathBuf,
    },
    /// Planning times of the full-size models (fp16, CFG) at many budgets, as JSON.
    Planning {
        #[arg(long)]
        out: PathBuf,
    },
    /// The SVD pipeline end to end.
    Svd {
        #[command(flatten)]
        args: svd::SvdArgs,
        #[command(flatten)]
        how: How,
    },
}

/// How a measurement runs and where it reports.
#[derive(Args, Clone, Debug)]
struct How {
    #[arg(long, value_enum)]
    optimization: OptimizationKind,
    #[arg(long, default_value_t = 7)]
    temporal_chunks: usize,
    #[arg(long, default_value_t = 7)]
    spatial_chunks: usize,
    /// Activation budget of `--optimization budget`, e.g. 320MiB.
    #[arg(long, value_parser = parse_bytes)]
    memory_budget: Option<usize>,
    /// Step Rehash on top of the optimization: `off`, `uniform:K` or a schedule file.
    #[arg(long, default_value = "off")]
    rehash: RehashArg,
    /// Denoising steps the rehash schedule is for.
    #[arg(long, default_value_t = 25)]
    num_inference_steps: usize,
    /// Timed runs after the measured first run.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Follow each timed run with one of the original plan (no Step Rehash) in this process:
    /// the ratio of each pair is the mode's cost against original inference at that moment.
    #[arg(long)]
    paired: bool,
    /// `cpu` or `cuda[:N]` (in a build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    device: DeviceSpec,
    /// Which implementation of the ops runs: `auto`, `cpu` or `portable`.
    #[arg(long, default_value = "auto")]
    kernels: KernelChoice,
    /// The measurement, as JSON.
    #[arg(long)]
    out: PathBuf,
    /// The output tensor (`output`), as safetensors.
    #[arg(long)]
    output: PathBuf,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum OptimizationKind {
    Original,
    Naive,
    SlicerOnly,
    Paper,
    Budget,
}

impl How {
    fn optimization(&self) -> Result<Optimization> {
        let (t, s) = (self.temporal_chunks, self.spatial_chunks);
        Ok(match self.optimization {
            OptimizationKind::Original => Optimization::Original,
            OptimizationKind::Naive => Optimization::Naive { temporal_chunks: t },
            OptimizationKind::SlicerOnly => Optimization::SlicerOnly {
                temporal_chunks: t,
                spatial_chunks: s,
            },
            OptimizationKind::Paper => Optimization::Paper {
                temporal_chunks: t,
                spatial_chunks: s,
            },
            OptimizationKind::Budget => Optimization::Budget {
                bytes: self
                    .memory_budget
                    .context("--optimization budget needs --memory-budget")?,
            },
        })
    }

    fn device(&self) -> Result<Device> {
        self.device.device().map_err(anyhow::Error::msg)
    }

    fn kernels(&self) -> Result<Kernels> {
        kernels_for(self.device.kind, self.kernels).map_err(anyhow::Error::msg)
    }

    fn schedule(&self) -> Result<Option<Schedule>> {
        Ok(self.rehash.schedule(self.num_inference_steps)?)
    }

    /// Write the measurement and the output tensor.
    fn report(&self, measurement: &measure::Measurement, output: Tensor) -> Result<()> {
        let tensors = HashMap::from([("output".to_string(), output)]);
        candle_core::safetensors::save(&tensors, &self.output)
            .with_context(|| format!("cannot write {}", self.output.display()))?;
        fs::write(&self.out, serde_json::to_string_pretty(measurement)?)
            .with_context(|| format!("cannot write {}", self.out.display()))
    }
}

fn main() -> Result<()> {
    streamline_ir::alloc::keep_freed_memory();
    let cli = Cli::parse();
    // Timed the way the CLI runs: on one of rayon's workers.
    streamline_kernels::on_worker(|| run(cli))
}

fn run(cli: Cli) -> Result<()> {
    match cli.task {
        Task::PrepareUnet {
            dir,
            config,
            frames,
            batch,
            latent,
            seed,
        } => {
            let (config, context_len) = match config {
                ModelConfig::SvdSmall => (
                    unet::Config::Svd(Box::new(UNetConfig::svd_small(frames))),
                    1,
                ),
                ModelConfig::AnimatediffSmall => {
                    let (unet, adapter) = unet::animatediff_small();
                    (unet::Config::Motion(Box::new((unet, adapter))), 77)
                }
            };
            let shape = UNetShape {
                batch,
                frames,
                height: latent,
                width: latent,
                context_len,
            };
            unet::prepare(&dir, &config, shape, seed)
        }
        Task::Unet { dir, how } => {
            let (m, output) = unet::run(&dir, &how)?;
            how.report(&m, output)
        }
        Task::Compare {
            output,
            reference,
            frames,
        } => measure::compare(&output, &reference, frames),
        Task::Kernels {
            cases,
            only,
            runs,
            out,
        } => kernels::run(&cases, &only, runs, &out),
        Task::Planning { out } => planning::run(&out),
        Task::Svd { args, how } => {
            let (m, output) = svd::run(&args, &how)?;
            how.report(&m, output)
        }
    }
}
