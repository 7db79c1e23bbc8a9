//! `streamline animatediff`: text-to-video with AnimateDiff (an SD 1.5 folder plus a motion
//! adapter).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Result};
use clap::Args;
use streamline_pipeline::animatediff::{AnimateDiff, AnimateDiffSettings};
use streamline_pipeline::svd::unit_noise;
use streamline_pipeline::video::write_video;
use streamline_pipeline::Optimization;
use streamline_rehash::{Rehash, RehashArg};

use crate::session::{flag_error, read_latents, summary, Progress};
use crate::{DeviceArg, Dtype, OptimizationArgs};

/// Flags named after diffusers' `AnimateDiffPipeline.__call__`, plus the models, precision,
/// device and optimization.
#[derive(Args, Debug)]
pub struct AnimateDiffArgs {
    /// A diffusers SD 1.5 folder: unet/, vae/, text_encoder/, tokenizer/, scheduler/.
    #[arg(long)]
    model: PathBuf,
    /// A diffusers motion adapter folder (e.g. animatediff-motion-adapter-v1-5-2).
    #[arg(long)]
    motion_adapter: PathBuf,
    #[arg(long)]
    prompt: String,
    /// What to steer away from under guidance (diffusers' default: the empty prompt).
    #[arg(long)]
    negative_prompt: Option<String>,
    #[arg(long, default_value_t = 16)]
    num_frames: usize,
    #[arg(long, default_value_t = 512)]
    height: usize,
    #[arg(long, default_value_t = 512)]
    width: usize,
    #[arg(long, default_value_t = 25)]
    num_inference_steps: usize,
    /// Classifier-free guidance; 1 or less turns it off.
    #[arg(long, default_value_t = 7.5)]
    guidance_scale: f64,
    /// Frames per VAE decoder call.
    #[arg(long, default_value_t = 16)]
    decode_chunk_size: usize,
    /// Seed of the initial latents.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Unit-noise latents (safetensors, tensor `latents`, shape (1, 4, F, H/8, W/8)), used like
    /// diffusers' `latents` argument instead of noise from --seed.
    #[arg(long)]
    latents: Option<PathBuf>,
    /// `.gif` (animated GIF at --fps), a directory (PNG frames) or `.safetensors` (raw frames).
    #[arg(long)]
    output: PathBuf,
    /// Frames per second of the GIF.
    #[arg(long, default_value_t = 8)]
    fps: usize,
    #[arg(long, value_enum, default_value = "f32")]
    dtype: Dtype,
    /// `cpu`, `cuda[:N]` or `metal[:N]`.
    #[arg(long, default_value = "cpu")]
    device: DeviceArg,
    #[command(flatten)]
    optimization: OptimizationArgs,
    /// The paper's naive baseline: cut the frames into --temporal-chunks runs denoised
    /// separately. Inexact on purpose; for comparisons only.
    #[arg(long, requires = "temporal_chunks", conflicts_with = "memory_budget")]
    naive_slicing: bool,
    /// Step Rehash: `off`, `uniform:K` (K full UNet evaluations spread evenly, the first step
    /// included) or a schedule from a calibration search.
    #[arg(long, default_value = "off")]
    rehash: RehashArg,
}

pub fn run(args: AnimateDiffArgs) -> Result<()> {
    let start = Instant::now();
    AnimateDiff::sizes(&args.model, &args.motion_adapter)?
        .rule
        .check(args.height, args.width)
        .map_err(flag_error)?;
    if args.num_frames == 0 {
        bail!("--num-frames 0: at least one frame");
    }
    let mut optimization = args.optimization.optimization()?;
    if args.naive_slicing {
        let temporal_chunks = args.optimization.temporal_chunks.unwrap_or(1);
        optimization = Optimization::Naive { temporal_chunks };
    }
    let rehash = match args.rehash.schedule(args.num_inference_steps)? {
        Some(schedule) => Rehash::Schedule(schedule),
        None => Rehash::Off,
    };
    let kernels = args.optimization.kernels.kernels(args.device.kind)?;
    let device = args.device.device()?;
    let mut pipe = AnimateDiff::load(
        &args.model,
        &args.motion_adapter,
        args.dtype.into(),
        &device,
    )?;
    pipe.set_kernels(kernels)?;
    let settings = AnimateDiffSettings {
        height: args.height,
        width: args.width,
        num_frames: args.num_frames,
        num_inference_steps: args.num_inference_steps,
        guidance_scale: args.guidance_scale,
        decode_chunk_size: args.decode_chunk_size,
        rehash,
    };
    if args.prompt.trim().is_empty() {
        tracing::warn!("--prompt is empty: the video is unconditioned (guided only away from the negative prompt)");
    }
    let shape = pipe.latent_shape(&settings);
    let latents = match &args.latents {
        Some(path) => read_latents(path, &shape, "1, channels, frames, height/8, width/8")?,
        None => unit_noise(shape.as_slice(), args.seed, &candle_core::Device::Cpu)?,
    }
    .to_device(&device)?;
    let mut progress = Progress::new("");
    let (video, report) = pipe.generate(
        &args.prompt,
        args.negative_prompt.as_deref(),
        &settings,
        &latents,
        optimization,
        &mut |stage| progress.update(stage),
    )?;
    progress.finish();
    write_video(&video, &args.output, args.fps as f64)?;
    eprintln!(
        "{}",
        summary(
            &args.output,
            (args.num_frames, args.height, args.width),
            start.elapsed().as_secs_f64(),
            &report
        )
    );
    Ok(())
}
