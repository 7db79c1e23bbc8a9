//! What every SVD job shares: the model and sampling flags, loading, noise, and a generation
//! with progress bars.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use streamline_pipeline::svd::{
    default_model_dir, unit_noise, Planes, RunReport, StableVideoDiffusion, Stage, SvdSettings,
    DEFAULT_MODEL_ENV,
};
use streamline_pipeline::video::load_image;
use streamline_pipeline::{Optimization, SizeError};
use streamline_rehash::Rehash;

use crate::{DeviceArg, Dtype, OptimizationArgs, VideoSize, DIFFUSERS_HEIGHT, DIFFUSERS_WIDTH};

/// Flags named after diffusers' `StableVideoDiffusionPipeline.__call__`, plus the model,
/// precision, device and optimization.
#[derive(Args, Debug)]
pub struct SvdCommon {
    /// A diffusers SVD folder: unet/, vae/, image_encoder/, scheduler/, feature_extractor/.
    /// Defaults to the built-in tiny model (64x64, 8 frames; docs/default-model.md).
    #[arg(long)]
    model: Option<PathBuf>,
    #[command(flatten)]
    video: VideoSize,
    #[arg(long, default_value_t = 25)]
    pub num_inference_steps: usize,
    #[arg(long, default_value_t = 1.0)]
    min_guidance_scale: f64,
    #[arg(long, default_value_t = 3.0)]
    max_guidance_scale: f64,
    /// Frames per second: conditions the model (fps - 1) and times the GIF.
    #[arg(long, default_value_t = 7)]
    pub fps: usize,
    #[arg(long, default_value_t = 127)]
    motion_bucket_id: usize,
    #[arg(long, default_value_t = 0.02)]
    noise_aug_strength: f64,
    /// Frames per VAE decoder call (defaults to all frames).
    #[arg(long)]
    decode_chunk_size: Option<usize>,
    /// Seed of the initial latents and the noise augmentation.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, value_enum, default_value = "f32")]
    dtype: Dtype,
    /// `cpu`, `cuda[:N]` or `metal[:N]`.
    #[arg(long, default_value = "cpu")]
    device: DeviceArg,
    #[command(flatten)]
    pub optimization: OptimizationArgs,
}

/// A loaded model and the settings of its runs.
pub struct Session {
    pub pipe: StableVideoDiffusion,
    pub device: Device,
    pub settings: SvdSettings,
    pub optimization: Optimization,
}

impl SvdCommon {
    pub fn load(&self) -> Result<Session> {
        let VideoSize {
            height,
            width,
            num_frames,
        } = self.video;
        let optimization = self.optimization.optimization()?;
        let kernels = self.optimization.kernels.kernels(self.device.kind)?;
        let device = self.device.device()?;
        let model = match &self.model {
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
        // The size is checked against the model's rule from its configs, before any weights
        // load. The built-in model only knows its training size; real checkpoints get
        // diffusers' defaults.
        let sizes = StableVideoDiffusion::sizes(&model)?;
        let native = self.model.is_none().then_some(sizes.native).flatten();
        let height = height.or(native.map(|n| n.0)).unwrap_or(DIFFUSERS_HEIGHT);
        let width = width.or(native.map(|n| n.1)).unwrap_or(DIFFUSERS_WIDTH);
        sizes.rule.check(height, width).map_err(flag_error)?;
        let mut pipe = StableVideoDiffusion::load(&model, self.dtype.into(), &device)?;
        pipe.set_kernels(kernels)?;
        let settings = SvdSettings {
            height,
            width,
            num_frames,
            num_inference_steps: self.num_inference_steps,
            min_guidance_scale: self.min_guidance_scale,
            max_guidance_scale: self.max_guidance_scale,
            fps: self.fps,
            motion_bucket_id: self.motion_bucket_id,
            noise_aug_strength: self.noise_aug_strength,
            decode_chunk_size: self.decode_chunk_size,
            rehash: Rehash::Off,
        };
        Ok(Session {
            pipe,
            device,
            settings,
            optimization,
        })
    }
}

/// A size refusal as the flag it came from: `--height 72 must be ...`.
pub fn flag_error(e: SizeError) -> anyhow::Error {
    anyhow::anyhow!("--{e}")
}

/// Unit-noise latents from `--latents FILE` (tensor `latents` of shape `expected`, described
/// as `layout` in errors), in f32.
pub fn read_latents(path: &Path, expected: &[usize], layout: &str) -> Result<Tensor> {
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
            "--latents {}: tensor `latents` has shape {:?}, expected {expected:?} ({layout})",
            path.display(),
            latents.dims()
        );
    }
    Ok(latents.to_dtype(DType::F32)?)
}

pub fn bar(len: usize, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(len as u64);
    bar.set_style(
        ProgressStyle::with_template("{msg:>12} [{bar:30}] {pos}/{len} {elapsed_precise}")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    bar.set_message(what.to_string());
    bar
}

/// One progress bar per stage of a run (denoising steps, decode calls).
pub struct Progress {
    label: String,
    current: Option<ProgressBar>,
}

impl Progress {
    /// `label` prefixes the bars when several runs share a screen.
    pub fn new(label: &str) -> Self {
        Progress {
            label: label.to_string(),
            current: None,
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
            done.finish();
        }
    }
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

/// The line a finished generation prints: output, size, time, UNet evaluations and peaks.
pub fn summary(
    output: &Path,
    (frames, height, width): (usize, usize, usize),
    seconds: f64,
    report: &RunReport,
) -> String {
    let mib = |b: usize| b as f64 / (1u64 << 20) as f64;
    format!(
        "wrote {} ({frames} frames {height}x{width}) in {seconds:.1} s; UNet: {} full{} evaluations, {:.2} GFLOP; peak live tensors: UNet step {:.1} MiB, decode {:.1} MiB{}",
        output.display(),
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
    )
}

/// The conditioning image and the noise of one generation.
pub struct Inputs {
    pub image: Planes,
    pub latents: Tensor,
    pub image_noise: Tensor,
}

impl Session {
    pub fn frames(&self) -> usize {
        self.pipe.num_frames(&self.settings)
    }

    /// The image at the run's size, and noise from `seed` (or unit-noise `latents` from a file).
    pub fn inputs(&self, image: &Path, seed: u64, latents: Option<&Path>) -> Result<Inputs> {
        let SvdSettings { height, width, .. } = self.settings;
        let planes = Planes::from_tensor(&load_image(image, Some((height, width)))?)?;
        let s = self.pipe.vae.scale_factor();
        let shape = [
            1,
            self.frames(),
            self.pipe.vae.config().latent_channels,
            height / s,
            width / s,
        ];
        let latents = match latents {
            Some(path) => read_latents(path, &shape, "1, frames, channels, height/8, width/8")?,
            None => unit_noise(shape.as_slice(), seed, &Device::Cpu)?,
        }
        .to_device(&self.device)?;
        let image_noise = unit_noise((1, 3, height, width), seed.wrapping_add(1), &self.device)?;
        Ok(Inputs {
            image: planes,
            latents,
            image_noise,
        })
    }

    /// Generate with progress bars (`label` prefixes them when several runs share a screen).
    pub fn generate(
        &self,
        inputs: &Inputs,
        optimization: Optimization,
        rehash: Rehash,
        label: &str,
    ) -> Result<(Tensor, RunReport)> {
        let settings = SvdSettings {
            rehash,
            ..self.settings.clone()
        };
        let mut progress = Progress::new(label);
        let out = self.pipe.generate(
            &inputs.image,
            &settings,
            &inputs.latents,
            &inputs.image_noise,
            optimization,
            &mut |stage| progress.update(stage),
        )?;
        progress.finish();
        Ok(out)
    }
}
