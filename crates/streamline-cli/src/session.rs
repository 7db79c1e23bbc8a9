//! What every SVD job shares: the model and sampling flags, their checks against the model's
//! configs and the run's plan (all before any weights load), loading, noise, and a generation
//! with progress bars.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use clap::Args;
use streamline_ir::human;
use streamline_pipeline::planner::ModelSpec;
use streamline_pipeline::run::all_finite;
use streamline_pipeline::svd::{
    default_model_dir, unit_noise, Planes, RunReport, StableVideoDiffusion, SvdConfigs,
    SvdSettings, DEFAULT_MODEL_ENV,
};
use streamline_pipeline::video::load_image;
use streamline_pipeline::{DeviceKind, Kernels, Optimization};
use streamline_rehash::Rehash;

use crate::checks::{check_run, compute_dtype, finite, non_negative, positive, Source};
use crate::progress::Progress;
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
    #[arg(long, default_value_t = 25, value_parser = positive)]
    pub num_inference_steps: usize,
    #[arg(long, default_value_t = 1.0, value_parser = finite)]
    min_guidance_scale: f64,
    #[arg(long, default_value_t = 3.0, value_parser = finite)]
    max_guidance_scale: f64,
    /// Frames per second: conditions the model (fps - 1) and times the GIF.
    #[arg(long, default_value_t = 7)]
    pub fps: usize,
    #[arg(long, default_value_t = 127)]
    motion_bucket_id: usize,
    #[arg(long, default_value_t = 0.02, value_parser = non_negative)]
    noise_aug_strength: f64,
    /// Frames per VAE decoder call (defaults to all frames).
    #[arg(long, value_parser = positive)]
    decode_chunk_size: Option<usize>,
    /// Seed of the initial latents and the noise augmentation.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Precision of weights and compute (bf16 needs a GPU).
    #[arg(long, value_enum, default_value = "f32")]
    dtype: Dtype,
    /// `cpu`, `cuda[:N]` or `metal[:N]`.
    #[arg(long, default_value = "cpu")]
    device: DeviceArg,
    #[command(flatten)]
    pub optimization: OptimizationArgs,
    /// With --rehash: partial steps run only the conditional half of classifier-free
    /// guidance and reuse the last full step's guidance difference (about half a partial
    /// step's work; not original inference).
    #[arg(long)]
    reuse_guidance: bool,
}

/// A run whose flags, configs, plan and memory have been checked; no weights loaded yet.
pub struct Checked {
    model: PathBuf,
    configs: SvdConfigs,
    dtype: DType,
    kernels: Kernels,
    device_kind: DeviceKind,
    device: Device,
    pub settings: SvdSettings,
    pub optimization: Optimization,
}

/// A loaded model and the settings of its runs.
pub struct Session {
    pub pipe: StableVideoDiffusion,
    pub settings: SvdSettings,
    pub optimization: Optimization,
}

/// The size of a run that names none: the model's training size when its config records one
/// of another pixel count than diffusers' 576x1024 (the built-in model and copies of it,
/// 64x64), else 576x1024 (SVD and SVD-XT record 96x96 latents, 768x768 pixels: the same count,
/// and diffusers' default).
fn default_size(native: Option<(usize, usize)>) -> (usize, usize) {
    match native {
        Some((h, w)) if h * w != DIFFUSERS_HEIGHT * DIFFUSERS_WIDTH => (h, w),
        _ => (DIFFUSERS_HEIGHT, DIFFUSERS_WIDTH),
    }
}

impl SvdCommon {
    fn model_dir(&self) -> Result<PathBuf> {
        if let Some(dir) = &self.model {
            return Ok(dir.clone());
        }
        let dir = default_model_dir();
        if !dir.is_dir() {
            bail!(
                "no --model given and the built-in default model is not at {} (it ships in the source tree; pass --model or set {DEFAULT_MODEL_ENV})",
                dir.display()
            );
        }
        Ok(dir)
    }

    /// Checks every flag against the model's configs and the run's plan against the budget
    /// and the machine's memory, before any weights load.
    pub fn check(&self) -> Result<Checked> {
        let checked = self.prepare()?;
        let settings = checked.check_settings(checked.settings.clone(), Source::Flags)?;
        Ok(Checked {
            settings,
            ..checked
        })
    }

    /// The model, precision, device and optimization of the flags, and the settings they give
    /// at the model's default size, not yet checked against the configs: what every run of a
    /// batch starts from.
    pub fn prepare(&self) -> Result<Checked> {
        let optimization = self.optimization.optimization()?;
        let device_kind = self.device.kind;
        let kernels = self.optimization.kernels.kernels(device_kind)?;
        let dtype = compute_dtype(self.dtype, device_kind)?;
        let model = self.model_dir()?;
        let configs = StableVideoDiffusion::configs(&model)?;
        let (default_height, default_width) = default_size(configs.sizes.native);
        let settings = SvdSettings {
            height: self.video.height.unwrap_or(default_height),
            width: self.video.width.unwrap_or(default_width),
            num_frames: self.video.num_frames,
            num_inference_steps: self.num_inference_steps,
            min_guidance_scale: self.min_guidance_scale,
            max_guidance_scale: self.max_guidance_scale,
            fps: self.fps,
            motion_bucket_id: self.motion_bucket_id,
            noise_aug_strength: self.noise_aug_strength,
            decode_chunk_size: self.decode_chunk_size,
            rehash: Rehash::Off,
            reuse_guidance: self.reuse_guidance,
        };
        Ok(Checked {
            device: self.device.device().map_err(anyhow::Error::msg)?,
            model,
            configs,
            dtype,
            kernels,
            device_kind,
            settings,
            optimization,
        })
    }
}

impl Checked {
    /// Checks `settings` (the flags', or a batch job's, as `source` says) against the model's
    /// configs, and the run's plan against the budget and the machine's memory; returns them
    /// with the frame count resolved.
    pub fn check_settings(&self, settings: SvdSettings, source: Source) -> Result<SvdSettings> {
        let (height, width) = (settings.height, settings.width);
        let c = &self.configs;
        c.sizes
            .rule
            .check(height, width)
            .map_err(|e| source.size_error(e))?;
        let frames = c.frames(settings.num_frames)?;
        let steps = settings.num_inference_steps;
        c.check_steps(steps)
            .map_err(|e| anyhow::anyhow!("{} {steps}: {e}", source.name("num_inference_steps")))?;
        let how = (self.dtype, self.optimization, self.kernels);
        let model = ModelSpec::Path(self.model.clone());
        check_run(settings.plan_request(model, frames, how), self.device_kind)?;
        Ok(SvdSettings {
            num_frames: Some(frames),
            ..settings
        })
    }

    /// The image at the size of `settings`, and noise from `seed` (or unit-noise `latents`
    /// from a file, checked against the configs' latent shape).
    pub fn inputs(
        &self,
        settings: &SvdSettings,
        image: &Path,
        seed: u64,
        latents: Option<&Path>,
    ) -> Result<Inputs> {
        let SvdSettings { height, width, .. } = *settings;
        let planes = Planes::from_tensor(&load_image(image, Some((height, width)))?)?;
        let c = &self.configs;
        let s = c.scale_factor;
        let frames = settings.num_frames.unwrap_or(c.num_frames);
        let shape = [1, frames, c.latent_channels, height / s, width / s];
        let latents = match latents {
            Some(path) => {
                let layout = format!("1, frames, channels, height/{s}, width/{s}");
                read_latents(path, &shape, &layout)?
            }
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

    /// Loads the weights.
    pub fn load(&self) -> Result<Session> {
        let mut pipe = StableVideoDiffusion::load(&self.model, self.dtype, &self.device)?;
        pipe.set_kernels(self.kernels)?;
        Ok(Session {
            pipe,
            settings: self.settings.clone(),
            optimization: self.optimization,
        })
    }
}

/// Unit-noise latents from `--latents FILE` (tensor `latents` of shape `expected`, described
/// as `layout` in errors), in f32; NaN or infinite values are refused here, where they enter.
pub fn read_latents(path: &Path, expected: &[usize], layout: &str) -> Result<Tensor> {
    let named = || format!("--latents {}", path.display());
    let tensors = candle_core::safetensors::load(path, &Device::Cpu)
        .with_context(|| format!("{}: not a readable safetensors file", named()))?;
    let latents = tensors
        .get("latents")
        .with_context(|| format!("{}: no tensor named `latents`", named()))?;
    if latents.dims() != expected {
        bail!(
            "{}: tensor `latents` has shape {:?}, expected {expected:?} ({layout})",
            named(),
            latents.dims()
        );
    }
    let latents = latents.to_dtype(DType::F32)?;
    if !all_finite(&latents)? {
        bail!("{}: tensor `latents` holds NaN or infinite values", named());
    }
    Ok(latents)
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
    format!(
        "wrote {} ({frames} frames {height}x{width}) in {seconds:.1} s; UNet: {} full{} evaluations, {:.2} GFLOP; peak live tensors: UNet step {}, decode {}{}",
        output.display(),
        report.full_steps,
        if report.partial_steps > 0 {
            format!(
                " + {} partial (Step Rehash, key steps {:?})",
                report.partial_steps, report.key_steps
            )
        } else {
            String::new()
        },
        report.unet_flops as f64 / 1e9,
        human(report.unet_peak_bytes),
        human(report.decode_peak_bytes),
        peak_rss().map_or(String::new(), |b| format!("; process peak RSS {}", human(b as usize)))
    ) + &phases(report)
}

/// Each phase's planned peak beside its measured one (heap bytes above the run's baseline,
/// on the CPU).
fn phases(report: &RunReport) -> String {
    let phases: Vec<String> = report
        .phases
        .iter()
        .map(|p| {
            let measured = p.measured.map_or("not measured".to_string(), |m| {
                format!("measured {}", human(m))
            });
            format!("{} planned {}, {measured}", p.phase, human(p.planned))
        })
        .collect();
    if phases.is_empty() {
        String::new()
    } else {
        format!("\nphases: {}", phases.join("; "))
    }
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
        self.generate_with(&settings, inputs, optimization, &mut progress)
    }

    /// Generate with `settings` (checked by [`Checked::check_settings`]), showing `progress`.
    pub fn generate_with(
        &self,
        settings: &SvdSettings,
        inputs: &Inputs,
        optimization: Optimization,
        progress: &mut Progress,
    ) -> Result<(Tensor, RunReport)> {
        let out = self.pipe.generate(
            &inputs.image,
            settings,
            &inputs.latents,
            &inputs.image_noise,
            optimization,
            &mut |stage| progress.update(stage),
        )?;
        progress.finish();
        Ok(out)
    }
}
