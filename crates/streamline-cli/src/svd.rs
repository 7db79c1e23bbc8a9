//! `streamline svd`: image-to-video with Stable Video Diffusion / SVD-XT.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use streamline_pipeline::svd::{
    default_model_dir, unit_noise, Planes, StableVideoDiffusion, Stage, SvdSettings,
    DEFAULT_MODEL_ENV,
};
use streamline_pipeline::video::{load_image, write_video};
use streamline_pipeline::Optimization;

use crate::{DeviceArg, Dtype, OptimizationArgs, VideoSize, DIFFUSERS_HEIGHT, DIFFUSERS_WIDTH};

/// Flags named after diffusers' `StableVideoDiffusionPipeline.__call__`.
#[derive(Args, Debug)]
pub struct SvdArgs {
    /// A diffusers SVD folder: unet/, vae/, image_encoder/, scheduler/, feature_extractor/.
    /// Defaults to the built-in tiny model (64x64, 8 frames; docs/default-model.md).
    #[arg(long)]
    model: Option<PathBuf>,
    /// The conditioning image (PNG, JPEG, ...); resized to --height x --width.
    #[arg(long)]
    image: PathBuf,
    #[command(flatten)]
    video: VideoSize,
    #[arg(long, default_value_t = 25)]
    num_inference_steps: usize,
    #[arg(long, default_value_t = 1.0)]
    min_guidance_scale: f64,
    #[arg(long, default_value_t = 3.0)]
    max_guidance_scale: f64,
    /// Frames per second: conditions the model (fps - 1) and times the GIF.
    #[arg(long, default_value_t = 7)]
    fps: usize,
    #[arg(long, default_value_t = 127)]
    motion_bucket_id: usize,
    #[arg(long, default_value_t = 0.02)]
    noise_aug_strength: f64,
    /// Frames per VAE decoder call (defaults to all frames).
    #[arg(long)]
    decode_chunk_size: Option<usize>,
    /// Seed of the initial latents and the noise augmentation.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Unit-noise latents (safetensors, tensor `latents`, shape (1, F, 4, H/8, W/8)), used like
    /// diffusers' `latents` argument instead of noise from --seed.
    #[arg(long)]
    latents: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "f32")]
    dtype: Dtype,
    #[arg(long, value_enum, default_value = "cpu")]
    device: DeviceArg,
    /// `.gif` (animated GIF at --fps), a directory (PNG frames) or `.safetensors` (raw frames).
    #[arg(long)]
    output: PathBuf,
    #[command(flatten)]
    optimization: OptimizationArgs,
    /// The paper's naive baseline: cut the frames into --temporal-chunks runs denoised
    /// separately. Inexact on purpose; for comparisons only.
    #[arg(long, requires = "temporal_chunks", conflicts_with = "memory_budget")]
    naive_slicing: bool,
}

fn read_latents(path: &Path, expected: &[usize]) -> Result<Tensor> {
    let tensors = candle_core::safetensors::load(path, &Device::Cpu).with_context(|| {
        format!(
            "--latents {}: not a readable safetensors file",
            path.display()
        )
    })?;
    let latents = tensors
        .get("latents")
        .with_context(|| format!("--latents {}: no tensor named `latents`", path.display()))?;
    if latents.dims() != expected {
        bail!(
            "--latents {}: tensor `latents` has shape {:?}, expected {expected:?} (1, frames, channels, height/8, width/8)",
            path.display(),
            latents.dims()
        );
    }
    Ok(latents.to_dtype(DType::F32)?)
}

fn bar(len: usize, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(len as u64);
    bar.set_style(
        ProgressStyle::with_template("{msg:>10} [{bar:30}] {pos}/{len} {elapsed_precise}")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    bar.set_message(what.to_string());
    bar
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
    let VideoSize {
        height,
        width,
        num_frames,
    } = args.video;
    for (flag, value) in [("height", height), ("width", width)] {
        if let Some(value) = value.filter(|v| *v == 0 || v % 8 != 0) {
            bail!(
                "--{flag} {value}: must be a positive multiple of 8 (the VAE works in 8x8 blocks)"
            );
        }
    }
    let mut optimization = args.optimization.optimization()?;
    if args.naive_slicing {
        let temporal_chunks = args.optimization.temporal_chunks.unwrap_or(1);
        optimization = Optimization::Naive { temporal_chunks };
    }
    let start = Instant::now();
    let device = args.device.device()?;
    let model = match &args.model {
        Some(dir) => dir.clone(),
        None => {
            let dir = default_model_dir();
            if !dir.is_dir() {
                bail!(
                    "no --model given and the built-in default model is not at {} (it ships in the source tree; pass --model or set {DEFAULT_MODEL_ENV})",
                    dir.display()
                );
            }
            dir
        }
    };
    let pipe = StableVideoDiffusion::load(&model, args.dtype.into(), &device)?;
    // The built-in model only knows its training size; real checkpoints get diffusers' defaults.
    let native = args.model.is_none().then(|| pipe.native_size()).flatten();
    let height = height.or(native.map(|n| n.0)).unwrap_or(DIFFUSERS_HEIGHT);
    let width = width.or(native.map(|n| n.1)).unwrap_or(DIFFUSERS_WIDTH);
    let image = load_image(&args.image, Some((height, width)))?;
    let image = Planes::from_tensor(&image)?;
    let settings = SvdSettings {
        height,
        width,
        num_frames,
        num_inference_steps: args.num_inference_steps,
        min_guidance_scale: args.min_guidance_scale,
        max_guidance_scale: args.max_guidance_scale,
        fps: args.fps,
        motion_bucket_id: args.motion_bucket_id,
        noise_aug_strength: args.noise_aug_strength,
        decode_chunk_size: args.decode_chunk_size,
    };
    let frames = pipe.num_frames(&settings);
    let s = pipe.vae.scale_factor();
    let shape = [
        1,
        frames,
        pipe.vae.config().latent_channels,
        height / s,
        width / s,
    ];
    let latents = match &args.latents {
        Some(path) => read_latents(path, &shape)?,
        None => unit_noise(shape.as_slice(), args.seed, &Device::Cpu)?,
    }
    .to_device(&device)?;
    let image_noise = unit_noise((1, 3, height, width), args.seed.wrapping_add(1), &device)?;

    let mut current: Option<ProgressBar> = None;
    let mut progress = |stage: Stage| {
        let (what, pos, len) = match stage {
            Stage::Denoise { step, of } => ("denoise", step, of),
            Stage::Decode { chunk, of } => ("decode", chunk, of),
        };
        if pos == 0 {
            if let Some(done) = current.take() {
                done.finish();
            }
            current = Some(bar(len, what));
        }
        if let Some(b) = &current {
            b.set_position(pos as u64 + 1);
        }
    };
    let (video, report) = pipe.generate(
        &image,
        &settings,
        &latents,
        &image_noise,
        optimization,
        &mut progress,
    )?;
    if let Some(done) = current.take() {
        done.finish();
    }
    write_video(&video, &args.output, args.fps as f64)?;
    let mib = |b: usize| b as f64 / (1u64 << 20) as f64;
    eprintln!(
        "wrote {} ({frames} frames {}x{}) in {:.1} s; peak live tensors: UNet step {:.1} MiB, decode {:.1} MiB{}",
        args.output.display(),
        height,
        width,
        start.elapsed().as_secs_f64(),
        mib(report.unet_peak_bytes),
        mib(report.decode_peak_bytes),
        peak_rss().map_or(String::new(), |b| format!("; process peak RSS {:.1} MiB", mib(b as usize)))
    );
    Ok(())
}
