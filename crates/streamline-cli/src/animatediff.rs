//! `streamline animatediff`: text-to-video with AnimateDiff (an SD 1.5 folder plus a motion
//! adapter).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use candle_core::{DType, Device};
use clap::Args;
use streamline_pipeline::animatediff::{AnimateDiff, AnimateDiffSettings};
use streamline_pipeline::planner::{ModelSpec, PlanRequest};
use streamline_pipeline::svd::unit_noise;
use streamline_pipeline::video::VideoOutput;
use streamline_pipeline::{Kernels, Optimization};
use streamline_rehash::{Rehash, RehashArg};

use crate::checks::{check_run, compute_dtype, finite, positive, refuse_overwriting};
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
    #[arg(long, default_value_t = 16, value_parser = positive)]
    num_frames: usize,
    #[arg(long, default_value_t = 512)]
    height: usize,
    #[arg(long, default_value_t = 512)]
    width: usize,
    #[arg(long, default_value_t = 25, value_parser = positive)]
    num_inference_steps: usize,
    /// Classifier-free guidance; 1 or less turns it off.
    #[arg(long, default_value_t = 7.5, value_parser = finite)]
    guidance_scale: f64,
    /// Frames per VAE decoder call.
    #[arg(long, default_value_t = 16, value_parser = positive)]
    decode_chunk_size: usize,
    /// Seed of the initial latents.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Unit-noise latents (safetensors, tensor `latents`, shape (1, 4, F, H/8, W/8)), used like
    /// diffusers' `latents` argument instead of noise from --seed.
    #[arg(long)]
    latents: Option<PathBuf>,
    /// `.mp4` (H.264 at --fps), `.gif` (animated GIF at --fps), a directory (PNG frames) or
    /// `.safetensors` (raw frames).
    #[arg(long)]
    output: PathBuf,
    /// Frames per second of the MP4 or GIF.
    #[arg(long, default_value_t = 8)]
    fps: usize,
    /// Precision of weights and compute (bf16 needs a GPU).
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

/// What the flags and configs give a run, checked (with its plan and memory) before any
/// weights load.
struct Checked {
    /// `(1, C, F, h, w)`, and its layout for errors.
    latent_shape: [usize; 5],
    layout: String,
    dtype: DType,
    kernels: Kernels,
    optimization: Optimization,
    rehash: Rehash,
}

fn check(args: &AnimateDiffArgs) -> Result<Checked> {
    let configs = AnimateDiff::configs(&args.model, &args.motion_adapter)?;
    let (h, w) = configs
        .sizes
        .rule
        .check(args.height, args.width)
        .map_err(flag_error)?;
    let steps = args.num_inference_steps;
    configs
        .check_steps(steps)
        .map_err(|e| anyhow::anyhow!("--num-inference-steps {steps}: {e}"))?;
    let mut optimization = args.optimization.optimization()?;
    let rehash = match args.rehash.schedule(steps)? {
        Some(schedule) => Rehash::Schedule(schedule),
        None => Rehash::Off,
    };
    let kind = args.device.kind;
    let kernels = args.optimization.kernels.kernels(kind)?;
    let dtype = compute_dtype(args.dtype, kind)?;
    check_run(
        PlanRequest {
            model: ModelSpec::AnimateDiffFolders {
                model: args.model.clone(),
                adapter: args.motion_adapter.clone(),
            },
            height: args.height,
            width: args.width,
            num_frames: Some(args.num_frames),
            batch: 1,
            cfg: args.guidance_scale > 1.0,
            dtype,
            optimization,
            kernels,
            decode_chunk_size: args.decode_chunk_size,
            rehash: rehash != Rehash::Off,
        },
        kind,
    )?;
    if args.naive_slicing {
        let temporal_chunks = args.optimization.temporal_chunks.unwrap_or(1);
        optimization = Optimization::Naive { temporal_chunks };
    }
    let s = configs.scale_factor;
    Ok(Checked {
        latent_shape: [1, configs.latent_channels, args.num_frames, h, w],
        layout: format!("1, channels, frames, height/{s}, width/{s}"),
        dtype,
        kernels,
        optimization,
        rehash,
    })
}

pub fn run(args: AnimateDiffArgs) -> Result<()> {
    let start = Instant::now();
    let checked = check(&args)?;
    let output = VideoOutput::create(&args.output, args.fps as f64)?;
    output.check_size(args.height, args.width)?;
    let latents_flag = args.latents.as_deref().map(|l| ("--latents", l));
    refuse_overwriting(
        ("--output", output.path()),
        |p| output.overwrites(p),
        latents_flag,
    )?;
    let shape = checked.latent_shape;
    let latents = match &args.latents {
        Some(path) => read_latents(path, &shape, &checked.layout)?,
        None => unit_noise(shape.as_slice(), args.seed, &Device::Cpu)?,
    };
    if args.prompt.trim().is_empty() {
        tracing::warn!("--prompt is empty: the video is unconditioned (guided only away from the negative prompt)");
    }
    let device = args.device.device().map_err(anyhow::Error::msg)?;
    let latents = latents.to_device(&device)?;
    let mut pipe = AnimateDiff::load(&args.model, &args.motion_adapter, checked.dtype, &device)?;
    pipe.set_kernels(checked.kernels)?;
    let settings = AnimateDiffSettings {
        height: args.height,
        width: args.width,
        num_frames: args.num_frames,
        num_inference_steps: args.num_inference_steps,
        guidance_scale: args.guidance_scale,
        decode_chunk_size: args.decode_chunk_size,
        rehash: checked.rehash,
    };
    let mut progress = Progress::new("");
    let (video, report) = pipe.generate(
        &args.prompt,
        args.negative_prompt.as_deref(),
        &settings,
        &latents,
        checked.optimization,
        &mut |stage| progress.update(stage),
    )?;
    progress.finish();
    output.write(&video)?;
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
