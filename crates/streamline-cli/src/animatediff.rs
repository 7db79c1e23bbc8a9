//! `streamline animatediff`: text-to-video with AnimateDiff (an SD 1.5 folder plus a motion
//! adapter).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use candle_core::{DType, Device};
use clap::Args;
use streamline_pipeline::animatediff::{AnimateDiff, AnimateDiffConfigs, AnimateDiffSettings};
use streamline_pipeline::planner::ModelSpec;
use streamline_pipeline::svd::unit_noise;
use streamline_pipeline::video::VideoOutput;
use streamline_pipeline::{DeviceKind, Kernels, Optimization};
use streamline_rehash::{Rehash, RehashArg};

use crate::checks::{check_run, compute_dtype, finite, positive, refuse_overwriting, Source};
use crate::progress::Progress;
use crate::session::{read_latents, summary};
use crate::{DeviceArg, Dtype, OptimizationArgs, SingleVideoArgs};

/// Flags named after diffusers' `AnimateDiffPipeline.__call__` that every video of a run (or
/// of a batch) shares, plus the models, precision, device and optimization.
#[derive(Args, Debug)]
pub struct AnimateDiffCommon {
    /// A diffusers SD 1.5 folder: unet/, vae/, text_encoder/, tokenizer/, scheduler/.
    #[arg(long)]
    model: PathBuf,
    /// A diffusers motion adapter folder (e.g. animatediff-motion-adapter-v1-5-2).
    #[arg(long)]
    motion_adapter: PathBuf,
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
    pub seed: u64,
    /// Frames per second of the MP4 or GIF.
    #[arg(long, default_value_t = 8)]
    pub fps: usize,
    /// Precision of weights and compute (bf16 needs a GPU).
    #[arg(long, value_enum, default_value = "f32")]
    dtype: Dtype,
    /// `cpu`, `cuda[:N]` or `metal[:N]`.
    #[arg(long, default_value = "cpu")]
    device: DeviceArg,
    #[command(flatten)]
    optimization: OptimizationArgs,
    /// Step Rehash: `off`, `uniform:K` (K full UNet evaluations spread evenly, the first step
    /// included), `auto:THRESHOLD` (key steps chosen during the run: the next step runs the
    /// whole UNet once its output has changed by THRESHOLD, relative L1 summed, since the
    /// last one; e.g. auto:0.3) or a schedule from a calibration search.
    #[arg(long, default_value = "off")]
    rehash: RehashArg,
    /// With --rehash: partial steps run only the conditional half of classifier-free
    /// guidance and reuse the last full step's guidance difference (about half a partial
    /// step's work; not original inference).
    #[arg(long)]
    reuse_guidance: bool,
}

#[derive(Args, Debug)]
pub struct AnimateDiffArgs {
    #[command(flatten)]
    common: AnimateDiffCommon,
    #[arg(long)]
    prompt: String,
    /// What to steer away from under guidance (diffusers' default: the empty prompt).
    #[arg(long)]
    negative_prompt: Option<String>,
    /// Unit-noise latents (safetensors, tensor `latents`, shape (1, 4, F, H/8, W/8)), used like
    /// diffusers' `latents` argument instead of noise from --seed.
    #[arg(long)]
    latents: Option<PathBuf>,
    #[command(flatten)]
    single: SingleVideoArgs,
}

/// What the flags and configs give every run, checked before any weights load; each run's
/// settings are checked with [`Prepared::check_settings`].
pub struct Prepared {
    configs: AnimateDiffConfigs,
    /// What the plan of each run is made from.
    model: ModelSpec,
    rehash: RehashArg,
    device_kind: DeviceKind,
    dtype: DType,
    kernels: Kernels,
    pub optimization: Optimization,
    /// The flags' settings, not yet checked.
    pub settings: AnimateDiffSettings,
}

impl AnimateDiffCommon {
    pub fn prepare(&self) -> Result<Prepared> {
        let configs = AnimateDiff::configs(&self.model, &self.motion_adapter)?;
        let kind = self.device.kind;
        Ok(Prepared {
            configs,
            model: ModelSpec::AnimateDiffFolders {
                model: self.model.clone(),
                adapter: self.motion_adapter.clone(),
            },
            rehash: self.rehash.clone(),
            device_kind: kind,
            optimization: self.optimization.optimization()?,
            kernels: self.optimization.kernels.kernels(kind)?,
            dtype: compute_dtype(self.dtype, kind)?,
            settings: AnimateDiffSettings {
                height: self.height,
                width: self.width,
                num_frames: self.num_frames,
                num_inference_steps: self.num_inference_steps,
                guidance_scale: self.guidance_scale,
                decode_chunk_size: self.decode_chunk_size,
                rehash: Rehash::Off,
                reuse_guidance: self.reuse_guidance,
            },
        })
    }

    /// Loads the models on the flags' device.
    pub fn load(&self, prepared: &Prepared) -> Result<(AnimateDiff, Device)> {
        let device = self.device.device().map_err(anyhow::Error::msg)?;
        let mut pipe =
            AnimateDiff::load(&self.model, &self.motion_adapter, prepared.dtype, &device)?;
        pipe.set_kernels(prepared.kernels)?;
        Ok((pipe, device))
    }
}

impl Prepared {
    /// Checks `settings` (the flags', or a batch job's, as `source` says) against the configs,
    /// with `--rehash` for their step count, and the run's plan against the budget and the
    /// machine's memory; returns them with their Step Rehash.
    pub fn check_settings(
        &self,
        settings: AnimateDiffSettings,
        source: Source,
    ) -> Result<AnimateDiffSettings> {
        let configs = &self.configs;
        configs
            .sizes
            .rule
            .check(settings.height, settings.width)
            .map_err(|e| source.size_error(e))?;
        let steps = settings.num_inference_steps;
        configs
            .check_steps(steps)
            .map_err(|e| anyhow::anyhow!("{} {steps}: {e}", source.name("num_inference_steps")))?;
        let rehash = self.rehash.rehash(steps)?;
        let settings = AnimateDiffSettings { rehash, ..settings };
        let how = (self.dtype, self.optimization, self.kernels);
        check_run(
            settings.plan_request(self.model.clone(), how),
            self.device_kind,
        )?;
        Ok(settings)
    }

    /// The unit-noise latents of a run with `settings` (checked): `(1, C, F, h, w)`.
    pub fn latent_shape(&self, settings: &AnimateDiffSettings) -> Result<[usize; 5]> {
        let rule = &self.configs.sizes.rule;
        let (h, w) = rule.check(settings.height, settings.width)?;
        Ok([1, self.configs.latent_channels, settings.num_frames, h, w])
    }

    fn layout(&self) -> String {
        let s = self.configs.scale_factor;
        format!("1, channels, frames, height/{s}, width/{s}")
    }
}

/// Warns that an empty prompt gives an unconditioned video.
pub fn warn_if_empty(prompt: &str, what: &str) {
    if prompt.trim().is_empty() {
        tracing::warn!("{what} is empty: the video is unconditioned (guided only away from the negative prompt)");
    }
}

pub fn run(args: AnimateDiffArgs) -> Result<()> {
    let start = Instant::now();
    let common = &args.common;
    let prepared = common.prepare()?;
    let settings = prepared.check_settings(prepared.settings.clone(), Source::Flags)?;
    let mut optimization = prepared.optimization;
    if args.single.naive_slicing {
        let temporal_chunks = common.optimization.temporal_chunks.unwrap_or(1);
        optimization = Optimization::Naive { temporal_chunks };
    }
    let output = VideoOutput::create(&args.single.output, common.fps as f64)?;
    output.check_size(settings.height, settings.width)?;
    let latents_flag = args.latents.as_deref().map(|l| ("--latents", l));
    refuse_overwriting(
        ("--output", output.path()),
        |p| output.overwrites(p),
        latents_flag,
    )?;
    let shape = prepared.latent_shape(&settings)?;
    let latents = match &args.latents {
        Some(path) => read_latents(path, &shape, &prepared.layout())?,
        None => unit_noise(shape.as_slice(), common.seed, &Device::Cpu)?,
    };
    warn_if_empty(&args.prompt, "--prompt");
    let (pipe, device) = common.load(&prepared)?;
    let mut progress = Progress::new("");
    let (video, report) = pipe.generate(
        &args.prompt,
        args.negative_prompt.as_deref(),
        &settings,
        &latents.to_device(&device)?,
        optimization,
        &mut |stage| progress.update(stage),
    )?;
    progress.finish();
    output.write(&video)?;
    eprintln!(
        "{}",
        summary(
            &args.single.output,
            (settings.num_frames, settings.height, settings.width),
            start.elapsed().as_secs_f64(),
            &report
        )
    );
    Ok(())
}
