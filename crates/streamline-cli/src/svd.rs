//! `streamline svd`: image-to-video with Stable Video Diffusion / SVD-XT.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use clap::Args;
use streamline_pipeline::video::write_video;
use streamline_pipeline::Optimization;
use streamline_rehash::{Rehash, RehashArg};

use crate::session::SvdCommon;

#[derive(Args, Debug)]
pub struct SvdArgs {
    #[command(flatten)]
    common: SvdCommon,
    /// The conditioning image (PNG, JPEG, ...); resized to --height x --width.
    #[arg(long)]
    image: PathBuf,
    /// Unit-noise latents (safetensors, tensor `latents`, shape (1, F, 4, H/8, W/8)), used like
    /// diffusers' `latents` argument instead of noise from --seed.
    #[arg(long)]
    latents: Option<PathBuf>,
    /// `.gif` (animated GIF at --fps), a directory (PNG frames) or `.safetensors` (raw frames).
    #[arg(long)]
    output: PathBuf,
    /// The paper's naive baseline: cut the frames into --temporal-chunks runs denoised
    /// separately. Inexact on purpose; for comparisons only.
    #[arg(long, requires = "temporal_chunks", conflicts_with = "memory_budget")]
    naive_slicing: bool,
    /// Step Rehash: `off`, `uniform:K` (K full UNet evaluations spread evenly, the first step
    /// included) or a schedule from `streamline rehash search`.
    #[arg(long, default_value = "off")]
    rehash: RehashArg,
}

/// Peak resident memory of this process so far (VmHWM), where /proc has it.
fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace()
        .nth(1)?
        .parse::<u64>()
        .ok()
        .map(|kib| kib * 1024)
}

pub fn run(args: SvdArgs) -> Result<()> {
    let start = Instant::now();
    let session = args.common.load()?;
    let mut optimization = session.optimization;
    if args.naive_slicing {
        let temporal_chunks = args.common.optimization.temporal_chunks.unwrap_or(1);
        optimization = Optimization::Naive { temporal_chunks };
    }
    let rehash = match args.rehash.schedule(args.common.num_inference_steps)? {
        Some(schedule) => Rehash::Schedule(schedule),
        None => Rehash::Off,
    };
    let inputs = session.inputs(&args.image, args.common.seed, args.latents.as_deref())?;
    let (video, report) = session.generate(&inputs, optimization, rehash, "")?;
    write_video(&video, &args.output, args.common.fps as f64)?;
    let mib = |b: usize| b as f64 / (1u64 << 20) as f64;
    let settings = &session.settings;
    eprintln!(
        "wrote {} ({} frames {}x{}) in {:.1} s; UNet: {} full{} evaluations, {:.2} GFLOP; peak live tensors: UNet step {:.1} MiB, decode {:.1} MiB{}",
        args.output.display(),
        session.frames(),
        settings.height,
        settings.width,
        start.elapsed().as_secs_f64(),
        report.full_steps,
        if report.partial_steps > 0 {
            format!(" + {} partial (Step Rehash)", report.partial_steps)
        } else {
            String::new()
        },
        report.unet_flops as f64 / 1e9,
        mib(report.unet_peak_bytes),
        mib(report.decode_peak_bytes),
        peak_rss().map_or(String::new(), |b| format!("; process peak RSS {:.1} MiB", mib(b as usize)))
    );
    Ok(())
}
