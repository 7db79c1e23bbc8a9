//! The prompt encoding, the denoising loop with classifier-free guidance and the per-frame
//! decode, as `AnimateDiffPipeline.__call__` runs them.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Module, Tensor};
use streamline_ir::Kernels;
use streamline_models::clip_text::{ClipTextModel, ClipTokenizer};
use streamline_models::load::load_config;
use streamline_models::sd::{
    AutoencoderKL, MotionAdapterConfig, MotionUNetConfig, UNet2DConfig, UNetMotionModel,
};
use streamline_models::svd::{UNetShape, VaeConfig};
use streamline_models::SizeRule;
use streamline_rehash::Rehash;

use crate::kernels::{kernels_for, DeviceKind, KernelChoice};
use crate::optimize::Optimization;
use crate::phases::{Phase, RunPlan};
use crate::planner::{plan_report, ModelSpec, PlanReport, PlanRequest, RehashMemory};
use crate::residency::{enter, PhaseMeter, Planned, Slot, SlotControl};
use crate::run::{
    decode_in_chunks, ensure_finite_step, ensure_frames, Batching, GuidanceReuse, PipelineError,
    Planning, RunReport, Sizes, Stage, UNetCalls,
};
use crate::scheduler::Scheduler;

/// The arguments of diffusers' call, with its defaults.
#[derive(Clone, Debug, PartialEq)]
pub struct AnimateDiffSettings {
    pub height: usize,
    pub width: usize,
    pub num_frames: usize,
    pub num_inference_steps: usize,
    /// Classifier-free guidance when above 1.
    pub guidance_scale: f64,
    /// Frames per VAE decoder call.
    pub decode_chunk_size: usize,
    /// Step Rehash (not a diffusers argument): which steps run the whole UNet.
    pub rehash: Rehash,
    /// Step Rehash's partial steps run the conditional half of classifier-free guidance
    /// alone and reuse the guidance difference of the last step that ran both.
    pub reuse_guidance: bool,
}

impl AnimateDiffSettings {
    /// What the planner needs of a run of these settings on the folders `model`, in
    /// `dtype` under `optimization` with `kernels`.
    pub fn plan_request(
        &self,
        model: ModelSpec,
        (dtype, optimization, kernels): (DType, Optimization, Kernels),
    ) -> PlanRequest {
        PlanRequest {
            model,
            height: self.height,
            width: self.width,
            num_frames: Some(self.num_frames),
            batch: 1,
            cfg: self.guidance_scale > 1.0,
            dtype,
            optimization,
            kernels,
            decode_chunk_size: self.decode_chunk_size,
            rehash: RehashMemory::of(&self.rehash),
        }
    }
}

impl Default for AnimateDiffSettings {
    fn default() -> Self {
        AnimateDiffSettings {
            height: 512,
            width: 512,
            num_frames: 16,
            num_inference_steps: 25,
            guidance_scale: 7.5,
            decode_chunk_size: 16,
            rehash: Rehash::Off,
            reuse_guidance: false,
        }
    }
}

/// AnimateDiff with its models loaded once; under a whole-run budget that needs it, each model
/// is on the device only in the phases that run it (see [`crate::phases`]).
pub struct AnimateDiff {
    unet: Slot<UNetMotionModel>,
    vae: Slot<AutoencoderKL>,
    text_encoder: Slot<ClipTextModel>,
    pub tokenizer: ClipTokenizer,
    unet_config: MotionUNetConfig,
    vae_config: VaeConfig,
    /// The SD folder and the motion adapter folder: configs for planning, weights for
    /// loading again.
    dirs: (PathBuf, PathBuf),
    /// Read once at load; each run clones it and sets its own step count.
    scheduler: Scheduler,
    sizes: Sizes,
    /// What runs the ops; every call is planned for it.
    kernels: Kernels,
    dtype: DType,
    device: Device,
}

/// An SD folder's and a motion adapter's configs, read and checked without any weights (see
/// [`AnimateDiff::configs`]).
pub struct AnimateDiffConfigs {
    pub sizes: Sizes,
    /// The UNet's input channels and the VAE's scale (pixels per latent along each side): the
    /// latents of a run are `(1, latent_channels, frames, height / scale, width / scale)`.
    pub latent_channels: usize,
    pub scale_factor: usize,
    scheduler: Scheduler,
}

impl AnimateDiffConfigs {
    /// Refuses a step count the scheduler cannot make (none, or more than its training
    /// timesteps).
    pub fn check_steps(&self, num_inference_steps: usize) -> Result<(), PipelineError> {
        Ok(self.scheduler.clone().set_timesteps(num_inference_steps)?)
    }
}

impl AnimateDiff {
    /// The configs of an SD folder with `motion_adapter` (UNet, adapter, VAE, scheduler), read
    /// and checked without any weights: a size, a step count or a config value is refused
    /// before anything loads.
    pub fn configs(
        model: &Path,
        motion_adapter: &Path,
    ) -> Result<AnimateDiffConfigs, PipelineError> {
        if !model.is_dir() {
            return Err(PipelineError::Input(format!(
                "{}: no such model folder (an SD 1.5 diffusers folder is expected)",
                model.display()
            )));
        }
        for folder in ["unet", "vae", "text_encoder", "tokenizer", "scheduler"] {
            if !model.join(folder).is_dir() {
                return Err(PipelineError::MissingFolder {
                    path: model.to_path_buf(),
                    folder,
                    expected: "an SD 1.5 diffusers folder has unet/, vae/, text_encoder/, tokenizer/ and scheduler/",
                });
            }
        }
        let adapter_config = motion_adapter.join("config.json");
        if !adapter_config.is_file() {
            return Err(PipelineError::Input(format!(
                "{}: not a motion adapter folder (no config.json)",
                motion_adapter.display()
            )));
        }
        let unet_config = model.join("unet/config.json");
        let unet: UNet2DConfig = load_config(&unet_config)?;
        let adapter: MotionAdapterConfig = load_config(&adapter_config)?;
        let config = MotionUNetConfig::new(unet, &unet_config, adapter, &adapter_config)?;
        let vae = AutoencoderKL::read_config(&model.join("vae"))?;
        let scale = vae.scale_factor();
        Ok(AnimateDiffConfigs {
            sizes: Sizes {
                rule: SizeRule::animatediff(&config, &vae),
                native: config.unet.sample_size.map(|s| (s * scale, s * scale)),
            },
            latent_channels: config.unet.in_channels,
            scale_factor: scale,
            scheduler: Scheduler::load(&model.join("scheduler/scheduler_config.json"))?,
        })
    }

    /// The sizes an SD folder with `motion_adapter` takes, from their configs alone (see
    /// [`Self::configs`]).
    pub fn sizes(model: &Path, motion_adapter: &Path) -> Result<Sizes, PipelineError> {
        Ok(Self::configs(model, motion_adapter)?.sizes)
    }

    /// Load an SD 1.5 diffusers folder and a motion adapter folder.
    pub fn load(
        model: &Path,
        motion_adapter: &Path,
        dtype: DType,
        device: &Device,
    ) -> Result<Self, PipelineError> {
        let AnimateDiffConfigs {
            sizes, scheduler, ..
        } = Self::configs(model, motion_adapter)?;
        let (unet_dir, adapter, dev) = (
            model.join("unet"),
            motion_adapter.to_path_buf(),
            device.clone(),
        );
        let unet = Slot::new("UNet", &[Phase::Denoise], move || {
            Ok(UNetMotionModel::load(&unet_dir, &adapter, dtype, &dev)?)
        })?;
        let (vae_dir, dev) = (model.join("vae"), device.clone());
        let vae = Slot::new("VAE", &[Phase::Decode], move || {
            Ok(AutoencoderKL::load(&vae_dir, dtype, &dev)?)
        })?;
        let (text_dir, dev) = (model.join("text_encoder"), device.clone());
        let text_encoder = Slot::new("text encoder", &[Phase::Encode], move || {
            Ok(ClipTextModel::load(&text_dir, dtype, &dev)?)
        })?;
        Ok(AnimateDiff {
            unet_config: unet.get()?.config().clone(),
            vae_config: vae.get()?.config().clone(),
            unet,
            vae,
            text_encoder,
            tokenizer: ClipTokenizer::load(&model.join("tokenizer"))?,
            dirs: (model.to_path_buf(), motion_adapter.to_path_buf()),
            scheduler,
            sizes,
            kernels: kernels_for(DeviceKind::of(device), KernelChoice::Auto)
                .map_err(PipelineError::Input)?,
            dtype,
            device: device.clone(),
        })
    }

    /// Run on `kernels` instead of the device's default ([`KernelChoice::Auto`]).
    pub fn set_kernels(&mut self, kernels: Kernels) -> Result<(), PipelineError> {
        self.kernels = Planning::kernels_on(kernels, &self.device)?;
        Ok(())
    }

    /// Pixels per latent along each side.
    pub fn scale_factor(&self) -> usize {
        self.vae_config.scale_factor()
    }

    /// The shape of the unit-noise latents a run takes: `(1, C, F, H/s, W/s)`, as diffusers'.
    pub fn latent_shape(&self, settings: &AnimateDiffSettings) -> [usize; 5] {
        let s = self.scale_factor();
        [
            1,
            self.unet_config.unet.in_channels,
            settings.num_frames,
            settings.height / s,
            settings.width / s,
        ]
    }

    /// `encode_prompt` for one prompt: the text encoder's last hidden state `(1, L, D)`. A prompt
    /// longer than the tokenizer's maximum is truncated with a warning, as diffusers does.
    pub fn encode_prompt(&self, prompt: &str) -> Result<Tensor, PipelineError> {
        let encoding = self.tokenizer.encode(prompt)?;
        let ids = Tensor::new(encoding.ids.as_slice(), &self.device)?.unsqueeze(0)?;
        Ok(self
            .text_encoder
            .get()?
            .forward(&ids)?
            .to_dtype(self.dtype)?)
    }

    /// The run's plan from the folders' configs: each phase's call plans and where the
    /// weights are between phases (a budget is for the whole run).
    pub fn plan(
        &self,
        settings: &AnimateDiffSettings,
        optimization: Optimization,
    ) -> Result<PlanReport, PipelineError> {
        let (model, adapter) = self.dirs.clone();
        let model = ModelSpec::AnimateDiffFolders { model, adapter };
        let how = (self.dtype, optimization, self.kernels);
        Ok(plan_report(settings.plan_request(model, how))?)
    }

    /// Generate frames `(F, 3, H, W)` in `[0, 1]` from `prompt` and unit-noise `latents`
    /// `(1, C, F, H/s, W/s)`; `negative_prompt` defaults to the empty prompt under guidance.
    pub fn generate(
        &self,
        prompt: &str,
        negative_prompt: Option<&str>,
        settings: &AnimateDiffSettings,
        latents: &Tensor,
        optimization: Optimization,
        progress: &mut dyn FnMut(Stage),
    ) -> Result<(Tensor, RunReport), PipelineError> {
        ensure_frames(settings.num_frames)?;
        self.sizes.rule.check(settings.height, settings.width)?;
        let expected = self.latent_shape(settings);
        if latents.dims() != expected {
            return Err(PipelineError::Input(format!(
                "latents have shape {:?}, expected {expected:?} (1, channels, frames, height/{s}, width/{s})",
                latents.dims(),
                s = self.scale_factor()
            )));
        }
        let planned = Planned::new(self.plan(settings, optimization)?);
        let run = planned.run;
        let slots: [&dyn SlotControl; 3] = [&self.text_encoder, &self.unet, &self.vae];
        let mut meter = PhaseMeter::new(&planned, &slots, self.device.is_cpu());
        enter(&slots, Phase::Encode, run.residency, &mut meter)?;
        let cfg = settings.guidance_scale > 1.0;
        let prompt_embeds = self.encode_prompt(prompt)?;
        let context = if cfg {
            let negative = self.encode_prompt(negative_prompt.unwrap_or(""))?;
            Tensor::cat(&[&negative, &prompt_embeds], 0)?
        } else {
            prompt_embeds
        };
        enter(&slots, Phase::Denoise, run.residency, &mut meter)?;
        let (latents, mut report) = self.denoise(latents, &context, settings, run, progress)?;
        drop(context);
        enter(&slots, Phase::Decode, run.residency, &mut meter)?;
        let [_, _, _, h, w] = expected;
        // `decode_latents`: every frame alone through the 2D decoder.
        let latents =
            (latents.squeeze(0)?.permute((1, 0, 2, 3))? / self.vae_config.scaling_factor)?;
        let vae = self.vae.get()?;
        let (video, peak) = decode_in_chunks(
            &latents,
            settings.decode_chunk_size,
            |len| vae.lower_decoder(1, len, h, w),
            Planning::new(run.call(Phase::Decode), self.kernels),
            &self.device,
            progress,
        )?;
        report.decode_peak_bytes = peak;
        report.phases = meter.finish();
        Ok((video, report))
    }

    /// The denoise phase: the scheduler's steps with classifier-free guidance when
    /// `context` holds both prompts, each UNet call planned once.
    fn denoise(
        &self,
        latents: &Tensor,
        context: &Tensor,
        settings: &AnimateDiffSettings,
        run: RunPlan,
        progress: &mut dyn FnMut(Stage),
    ) -> Result<(Tensor, RunReport), PipelineError> {
        let dev = &self.device;
        let [_, c, frames, h, w] = self.latent_shape(settings);
        let cfg = settings.guidance_scale > 1.0;
        let batch = context.dim(0)?;
        let mut scheduler = self.scheduler.clone();
        scheduler.set_timesteps(settings.num_inference_steps)?;
        let mut latents = (latents.to_dtype(DType::F32)?
            * f64::from(scheduler.init_noise_sigma()))?
        .to_dtype(self.dtype)?;
        let steps = scheduler.timesteps().len();
        let context_len = context.dim(1)?;
        let unet = self.unet.get()?;
        let batching = Batching {
            batch,
            reuse_guidance: settings.reuse_guidance,
        };
        let mut calls = UNetCalls::new(
            frames,
            Planning::new(run.call(Phase::Denoise), self.kernels),
            (&settings.rehash, steps),
            batching,
            |n, batch| {
                unet.lower(UNetShape {
                    batch,
                    frames: n,
                    height: h,
                    width: w,
                    context_len,
                })
            },
        )?;
        drop(unet);
        let mut report = RunReport::default();
        let mut reuse = GuidanceReuse::default();
        let scale = Tensor::new(settings.guidance_scale as f32, dev)?.to_dtype(self.dtype)?;
        let positive = context.narrow(0, batch - 1, 1)?;
        let started = std::time::Instant::now();
        for i in 0..steps {
            progress(Stage::Denoise { step: i, of: steps });
            let conditional = calls.conditional_step(i);
            let (items, context) = match conditional {
                true => (1, &positive),
                false => (batch, context),
            };
            let input = if cfg && !conditional {
                Tensor::cat(&[&latents, &latents], 0)?
            } else {
                latents.clone()
            };
            let input = scheduler.scale_model_input(&input, i)?;
            let t = scheduler.timesteps()[i];
            let mut preds = Vec::with_capacity(calls.chunks.len());
            for k in 0..calls.chunks.len() {
                let range = calls.chunks[k].clone();
                // diffusers' (B, C, F, h, w) to the graph's frame-major (B*F, C, h, w).
                let part = input
                    .narrow(2, range.start, range.len())?
                    .permute((0, 2, 1, 3, 4))?
                    .reshape((items * range.len(), c, h, w))?;
                let inputs = vec![part, Tensor::new(vec![t; items], dev)?, context.clone()];
                let pred = calls.run(k, i, inputs, dev, &mut report)?.reshape((
                    items,
                    range.len(),
                    c,
                    h,
                    w,
                ))?;
                preds.push(pred.permute((0, 2, 1, 3, 4))?);
            }
            let pred = Tensor::cat(&preds, 2)?;
            let guided = match (conditional, cfg) {
                (true, _) => reuse.reuse(&pred, &scale)?,
                (false, true) => reuse.combine(&pred, &scale, settings.reuse_guidance)?,
                (false, false) => pred,
            };
            latents = scheduler.step(&guided, i, &latents)?;
            ensure_finite_step(&latents, i, steps)?;
        }
        report.denoise_seconds = started.elapsed().as_secs_f64();
        calls.finish(&mut report);
        Ok((latents, report))
    }
}
