//! `streamline svd`: image-to-video with Stable Video Diffusion / SVD-XT.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use clap::Args;
use streamline_pipeline::video::write_video;
use streamline_pipeline::Optimization;
use streamline_rehash::{Rehash, RehashArg};

use crate::session::{summary, SvdCommon};

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
    let settings = &session.settings;
    eprintln!(
        "{}",
        summary(
            &args.output,
            (session.frames(), settings.height, settings.width),
            start.elapsed().as_secs_f64(),
            &report
        )
    );
    Ok(())
}
