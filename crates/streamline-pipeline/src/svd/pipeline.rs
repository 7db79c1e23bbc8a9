//! The denoising loop and the decode, as `StableVideoDiffusionPipeline.__call__` runs them.

use std::path::{Path, PathBuf};

use super::preprocess::{clip_input, Planes};
use crate::kernels::{kernels_for, DeviceKind, KernelChoice};
use crate::optimize::{CallKind, Optimization};
use crate::phases::{Phase, RunPlan};
use crate::planner::{plan_report, ModelSpec, PlanReport, PlanRequest, RehashMemory};
use crate::residency::{enter, PhaseMeter, Planned, Slot, SlotControl};
use crate::run::{
    decode_in_chunks, ensure_finite_step, ensure_frames, Batching, Call, GuidanceReuse,
    PipelineError, Planning, RunReport, Sizes, Stage, UNetCalls,
};
use crate::scheduler::{EulerDiscreteScheduler, SchedulerClass, SchedulerConfig};
use candle_core::{DType, Device, Module, Tensor};
use serde::Deserialize;
use streamline_ir::Kernels;
use streamline_models::clip::ClipVisionModelWithProjection;
use streamline_models::load::load_config;
use streamline_models::svd::{
    AutoencoderKLTemporalDecoder, LatentDist, UNetConfig, UNetShape,
    UNetSpatioTemporalConditionModel, VaeConfig,
};
use streamline_models::SizeRule;
use streamline_rehash::Rehash;

/// The arguments of diffusers' call, with its defaults.
#[derive(Clone, Debug, PartialEq)]
pub struct SvdSettings {
    pub height: usize,
    pub width: usize,
    /// Defaults to the UNet config's `num_frames`.
    pub num_frames: Option<usize>,
    pub num_inference_steps: usize,
    pub min_guidance_scale: f64,
    pub max_guidance_scale: f64,
    pub fps: usize,
    pub motion_bucket_id: usize,
    pub noise_aug_strength: f64,
    /// Frames per VAE decoder call; defaults to all frames.
    pub decode_chunk_size: Option<usize>,
    /// Step Rehash (not a diffusers argument): which steps run the whole UNet.
    pub rehash: Rehash,
    /// Step Rehash's partial steps run the conditional half of classifier-free guidance
    /// alone and reuse the guidance difference of the last step that ran both.
    pub reuse_guidance: bool,
}

impl Default for SvdSettings {
    fn default() -> Self {
        SvdSettings {
            height: 576,
            width: 1024,
            num_frames: None,
            num_inference_steps: 25,
            min_guidance_scale: 1.0,
            max_guidance_scale: 3.0,
            fps: 7,
            motion_bucket_id: 127,
            noise_aug_strength: 0.02,
            decode_chunk_size: None,
            rehash: Rehash::Off,
            reuse_guidance: false,
        }
    }
}

impl SvdSettings {
    /// What the planner needs of a run of these settings with `frames` frames, on the
    /// folder `model`, in `dtype` under `optimization` with `kernels`.
    pub fn plan_request(
        &self,
        model: ModelSpec,
        frames: usize,
        (dtype, optimization, kernels): (DType, Optimization, Kernels),
    ) -> PlanRequest {
        PlanRequest {
            model,
            height: self.height,
            width: self.width,
            num_frames: Some(frames),
            batch: 1,
            cfg: self.guided(),
            dtype,
            optimization,
            kernels,
            decode_chunk_size: self.decode_chunk_size.unwrap_or(frames),
            rehash: RehashMemory::of(&self.rehash),
        }
    }

    /// Whether the run uses classifier-free guidance: as diffusers decides it, when the
    /// largest per-frame scale exceeds 1 (at 1 the guided prediction is the conditional one,
    /// so the unconditional half of every UNet call is skipped).
    pub fn guided(&self) -> bool {
        self.max_guidance_scale > 1.0
    }
}

#[derive(Clone, Debug, Deserialize)]
struct FeatureExtractor {
    image_mean: [f32; 3],
    image_std: [f32; 3],
    #[serde(default = "clip_size")]
    crop_size: CropSize,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
enum CropSize {
    Square(usize),
    Sized { height: usize },
}

fn clip_size() -> CropSize {
    CropSize::Square(224)
}

/// SVD / SVD-XT with its models loaded once; under a whole-run budget that needs it, each
/// model is on the device only in the phases that run it (see [`crate::phases`]).
pub struct StableVideoDiffusion {
    unet: Slot<UNetSpatioTemporalConditionModel>,
    vae: Slot<AutoencoderKLTemporalDecoder>,
    image_encoder: Slot<ClipVisionModelWithProjection>,
    unet_config: UNetConfig,
    vae_config: VaeConfig,
    /// The model folder: configs for planning, weights for loading again.
    dir: PathBuf,
    /// Read once at load; each run clones it and sets its own step count.
    scheduler: EulerDiscreteScheduler,
    clip_mean: [f32; 3],
    clip_std: [f32; 3],
    clip_size: usize,
    sizes: Sizes,
    /// What runs the ops; every call is planned for it.
    kernels: Kernels,
    dtype: DType,
    device: Device,
}

/// The phases each model runs in.
const IMAGE_ENCODER_PHASES: &[Phase] = &[Phase::Encode];
const VAE_PHASES: &[Phase] = &[Phase::Encode, Phase::Decode];
const UNET_PHASES: &[Phase] = &[Phase::Denoise];

/// An SVD folder's configs, read and checked without any weights, so that everything a config
/// can refuse is refused before loading (see [`StableVideoDiffusion::configs`]).
pub struct SvdConfigs {
    pub sizes: Sizes,
    /// `unet/config.json`'s `num_frames`: the frames of a run that asks for none.
    pub num_frames: usize,
    /// The VAE's latent channels and its scale (pixels per latent along each side): the
    /// latents of a run are `(1, frames, latent_channels, height / scale, width / scale)`.
    pub latent_channels: usize,
    pub scale_factor: usize,
    scheduler: EulerDiscreteScheduler,
    feature_extractor: FeatureExtractor,
    unet_config: PathBuf,
}

impl SvdConfigs {
    /// The frames of a run asking for `requested` (else the UNet config's), at least one.
    pub fn frames(&self, requested: Option<usize>) -> Result<usize, PipelineError> {
        match requested {
            Some(n) => ensure_frames(n).map(|()| n),
            None if self.num_frames == 0 => Err(PipelineError::Input(format!(
                "{}: `num_frames` is 0, and the run asks for no frame count: a video needs at \
                 least one frame",
                self.unet_config.display()
            ))),
            None => Ok(self.num_frames),
        }
    }

    /// Refuses a step count the scheduler cannot make (none, or more than its training
    /// timesteps).
    pub fn check_steps(&self, num_inference_steps: usize) -> Result<(), PipelineError> {
        Ok(self.scheduler.clone().set_timesteps(num_inference_steps)?)
    }
}

/// The folder itself, then its five subfolders.
fn check_folders(dir: &Path) -> Result<(), PipelineError> {
    if !dir.is_dir() {
        return Err(PipelineError::Input(format!(
            "{}: {}",
            dir.display(),
            if dir.exists() {
                "is not a folder (a diffusers SVD folder is expected)"
            } else {
                "no such model folder"
            }
        )));
    }
    for folder in [
        "unet",
        "vae",
        "image_encoder",
        "scheduler",
        "feature_extractor",
    ] {
        if !dir.join(folder).is_dir() {
            return Err(PipelineError::MissingFolder {
                path: dir.to_path_buf(),
                folder,
                expected: "a diffusers SVD folder has unet/, vae/, image_encoder/, scheduler/ and feature_extractor/",
            });
        }
    }
    Ok(())
}

impl StableVideoDiffusion {
    /// The configs of the SVD folder `dir` (unet, vae, scheduler, feature extractor), read and
    /// checked without any weights: a size, a frame count, a step count or a config value is
    /// refused before anything loads. The scheduler must be `EulerDiscreteScheduler`, the one
    /// SVD samples with (its UNet is conditioned on Euler's continuous timesteps).
    pub fn configs(dir: &Path) -> Result<SvdConfigs, PipelineError> {
        check_folders(dir)?;
        let unet_config = dir.join("unet/config.json");
        let unet: UNetConfig = load_config(&unet_config)?;
        let vae = AutoencoderKLTemporalDecoder::read_config(&dir.join("vae"))?;
        let scale = vae.scale_factor();
        let scheduler_config = dir.join("scheduler/scheduler_config.json");
        let euler = [SchedulerClass::EulerDiscrete];
        let (_, scheduler) = SchedulerConfig::load_named(&scheduler_config, &euler)?;
        Ok(SvdConfigs {
            sizes: Sizes {
                rule: SizeRule::svd(&unet, &vae),
                native: unet
                    .sample_size
                    .map(|size| (size.dims().0 * scale, size.dims().1 * scale)),
            },
            num_frames: unet.num_frames,
            latent_channels: vae.latent_channels,
            scale_factor: scale,
            scheduler: EulerDiscreteScheduler::from_config(&scheduler)?,
            feature_extractor: load_config(
                &dir.join("feature_extractor/preprocessor_config.json"),
            )?,
            unet_config,
        })
    }

    /// The sizes the SVD folder `dir` takes, from its configs alone (see [`Self::configs`]).
    pub fn sizes(dir: &Path) -> Result<Sizes, PipelineError> {
        Ok(Self::configs(dir)?.sizes)
    }

    /// Load a diffusers SVD folder (unet/, vae/, image_encoder/, scheduler/, feature_extractor/),
    /// its configs first.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self, PipelineError> {
        let SvdConfigs {
            sizes,
            scheduler,
            feature_extractor: fe,
            unet_config,
            ..
        } = Self::configs(dir)?;
        let folder = |name: &str| (dir.join(name), device.clone());
        let (unet_dir, dev) = folder("unet");
        let unet = Slot::new("UNet", UNET_PHASES, move || {
            Ok(UNetSpatioTemporalConditionModel::load(
                &unet_dir, dtype, &dev,
            )?)
        })?;
        let (vae_dir, dev) = folder("vae");
        let vae = Slot::new("VAE", VAE_PHASES, move || {
            Ok(AutoencoderKLTemporalDecoder::load(&vae_dir, dtype, &dev)?)
        })?;
        let (clip_dir, dev) = folder("image_encoder");
        let image_encoder = Slot::new("image encoder", IMAGE_ENCODER_PHASES, move || {
            Ok(ClipVisionModelWithProjection::load(&clip_dir, dtype, &dev)?)
        })?;
        Ok(StableVideoDiffusion {
            unet_config: load_config(&unet_config)?,
            vae_config: vae.get()?.config().clone(),
            unet,
            vae,
            image_encoder,
            dir: dir.to_path_buf(),
            scheduler,
            clip_mean: fe.image_mean,
            clip_std: fe.image_std,
            clip_size: match fe.crop_size {
                CropSize::Square(s) | CropSize::Sized { height: s } => s,
            },
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

    /// The `(height, width)` the model was trained at, when its config records one.
    pub fn native_size(&self) -> Option<(usize, usize)> {
        self.sizes.native
    }

    pub fn num_frames(&self, settings: &SvdSettings) -> usize {
        settings.num_frames.unwrap_or(self.unet_config.num_frames)
    }

    /// Pixels per latent along each side (the VAE's scale).
    pub fn scale_factor(&self) -> usize {
        self.vae_config.scale_factor()
    }

    /// The VAE's latent channels: latents are `(1, frames, channels, h, w)`.
    pub fn latent_channels(&self) -> usize {
        self.vae_config.latent_channels
    }

    /// `image_embeds` of the conditioning image (`_encode_image`), `(1, 1, D)`.
    pub fn image_embeddings(&self, image: &Planes) -> Result<Tensor, PipelineError> {
        let pixels = clip_input(image, self.clip_size, self.clip_mean, self.clip_std)
            .to_tensor(&self.device)?
            .unsqueeze(0)?
            .to_dtype(self.dtype)?;
        Ok(self.image_encoder.get()?.forward(&pixels)?.unsqueeze(1)?)
    }

    /// The VAE latent of the noise-augmented image (`_encode_vae_image`, `mode()`), `(1, 4, h, w)`.
    pub fn image_latents(
        &self,
        image: &Planes,
        noise: &Tensor,
        strength: f64,
        optimization: Optimization,
    ) -> Result<Tensor, PipelineError> {
        let x = ((image.to_tensor(&self.device)? * 2.0)? - 1.0)?.unsqueeze(0)?;
        let x = (x + (noise * strength)?)?.to_dtype(self.dtype)?;
        let (_, _, h, w) = x.dims4()?;
        let call = Call::new(
            &self.vae.get()?.lower_encoder(1, h, w)?,
            Planning::new(optimization, self.kernels),
            CallKind::Encode,
        )?;
        let (moments, _) = call.run(vec![x], &self.device)?;
        Ok(LatentDist::from_moments(&moments)?.mode().clone())
    }

    /// The run's plan from the folder's configs: each phase's call plans and where the
    /// weights are between phases (a budget is for the whole run).
    pub fn plan(
        &self,
        settings: &SvdSettings,
        optimization: Optimization,
    ) -> Result<PlanReport, PipelineError> {
        let model = ModelSpec::Path(self.dir.clone());
        let how = (self.dtype, optimization, self.kernels);
        let frames = self.num_frames(settings);
        Ok(plan_report(settings.plan_request(model, frames, how))?)
    }

    /// Generate frames `(F, 3, H, W)` in `[0, 1]` from `image` (`3 x H x W` in `[0, 1]`, already
    /// at the requested size), unit-noise `latents` `(1, F, 4, H/s, W/s)` and the
    /// noise-augmentation noise `image_noise` `(1, 3, H, W)`.
    pub fn generate(
        &self,
        image: &Planes,
        settings: &SvdSettings,
        latents: &Tensor,
        image_noise: &Tensor,
        optimization: Optimization,
        progress: &mut dyn FnMut(Stage),
    ) -> Result<(Tensor, RunReport), PipelineError> {
        let frames = self.num_frames(settings);
        ensure_frames(frames)?;
        let (h, w) = self.sizes.rule.check(settings.height, settings.width)?;
        let expected = [1, frames, self.latent_channels(), h, w];
        if latents.dims() != expected {
            return Err(PipelineError::Input(format!(
                "latents have shape {:?}, expected {expected:?} (1, frames, channels, height/{s}, width/{s})",
                latents.dims(),
                s = self.scale_factor()
            )));
        }
        if (image.height, image.width) != (settings.height, settings.width) {
            return Err(PipelineError::Input(format!(
                "the image is {}x{}, the pipeline expects it resized to {}x{}",
                image.height, image.width, settings.height, settings.width
            )));
        }
        let planned = Planned::new(self.plan(settings, optimization)?);
        let run = planned.run;
        let slots: [&dyn SlotControl; 3] = [&self.image_encoder, &self.vae, &self.unet];
        let mut meter = PhaseMeter::new(&planned, &slots, self.device.is_cpu());
        enter(&slots, Phase::Encode, run.residency, &mut meter)?;
        let conditioning = self.conditioning(image, image_noise, settings, frames, run)?;
        enter(&slots, Phase::Denoise, run.residency, &mut meter)?;
        let (latents, mut report) =
            self.denoise(latents, &conditioning, settings, run, progress)?;
        drop(conditioning);
        enter(&slots, Phase::Decode, run.residency, &mut meter)?;
        let (frames_out, peak) =
            self.decode(&latents, settings, run.call(Phase::Decode), progress)?;
        report.decode_peak_bytes = peak;
        report.phases = meter.finish();
        Ok((frames_out, report))
    }

    /// The encode phase: the image embedding and the image latents; under classifier-free
    /// guidance both halves (the unconditional half gets zeros, as diffusers does).
    fn conditioning(
        &self,
        image: &Planes,
        image_noise: &Tensor,
        settings: &SvdSettings,
        frames: usize,
        run: RunPlan,
    ) -> Result<Conditioning, PipelineError> {
        let halves = |t: Tensor| -> Result<Tensor, PipelineError> {
            Ok(match settings.guided() {
                true => Tensor::cat(&[&t.zeros_like()?, &t], 0)?,
                false => t,
            })
        };
        let embeds = halves(self.image_embeddings(image)?)?;
        let lat = self.image_latents(
            image,
            image_noise,
            settings.noise_aug_strength,
            run.call(Phase::Encode),
        )?;
        let lat = halves(lat)?.unsqueeze(1)?.repeat((1, frames, 1, 1, 1))?;
        let ids = Tensor::new(
            &[
                (settings.fps as f32 - 1.0),
                settings.motion_bucket_id as f32,
                settings.noise_aug_strength as f32,
            ],
            &self.device,
        )?
        .unsqueeze(0)?
        .repeat((embeds.dim(0)?, 1))?;
        Ok(Conditioning { embeds, lat, ids })
    }

    /// Per-frame guidance scales, `min` to `max` across the frames, `(1, F, 1, 1, 1)`.
    fn guidance(&self, settings: &SvdSettings, frames: usize) -> Result<Tensor, PipelineError> {
        let guidance: Vec<f32> = (0..frames)
            .map(|i| {
                let t = if frames > 1 {
                    i as f64 / (frames - 1) as f64
                } else {
                    0.0
                };
                (settings.min_guidance_scale
                    + t * (settings.max_guidance_scale - settings.min_guidance_scale))
                    as f32
            })
            .collect();
        Ok(Tensor::from_vec(guidance, (1, frames, 1, 1, 1), &self.device)?.to_dtype(self.dtype)?)
    }

    /// The denoise phase: Euler steps, with classifier-free guidance when the settings ask
    /// for it, each UNet call planned once (Step Rehash picks whole or partial per step).
    fn denoise(
        &self,
        latents: &Tensor,
        cond: &Conditioning,
        settings: &SvdSettings,
        run: RunPlan,
        progress: &mut dyn FnMut(Stage),
    ) -> Result<(Tensor, RunReport), PipelineError> {
        let dev = &self.device;
        let (_, frames, c, h, w) = latents.dims5()?;
        let mut scheduler = self.scheduler.clone();
        scheduler.set_timesteps(settings.num_inference_steps)?;
        let mut latents = (latents.to_dtype(DType::F32)?
            * f64::from(scheduler.init_noise_sigma()))?
        .to_dtype(self.dtype)?;
        let guidance = self.guidance(settings, frames)?;
        let batch = cond.embeds.dim(0)?;
        let steps = scheduler.timesteps().len();
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
                    context_len: 1,
                })
            },
        )?;
        drop(unet);
        let mut report = RunReport::default();
        let mut reuse = GuidanceReuse::default();
        let started = std::time::Instant::now();
        for i in 0..steps {
            progress(Stage::Denoise { step: i, of: steps });
            let conditional = calls.conditional_step(i);
            let (items, cond) = cond.items(conditional)?;
            let doubled = Tensor::cat(&vec![&latents; items], 0)?;
            let input = scheduler.scale_model_input(&doubled, i)?;
            let input = Tensor::cat(&[&input, &cond.lat], 2)?;
            let t = scheduler.timesteps()[i];
            let mut preds = Vec::with_capacity(calls.chunks.len());
            for k in 0..calls.chunks.len() {
                let range = calls.chunks[k].clone();
                let part = input.narrow(1, range.start, range.len())?.reshape((
                    items * range.len(),
                    2 * c,
                    h,
                    w,
                ))?;
                let inputs = vec![
                    part,
                    Tensor::new(vec![t; items], dev)?,
                    cond.embeds.clone(),
                    cond.ids.clone(),
                ];
                let out = calls.run(k, i, inputs, dev, &mut report)?;
                preds.push(out.reshape((items, range.len(), c, h, w))?);
            }
            let pred = Tensor::cat(&preds, 1)?;
            let guided = match (conditional, items) {
                (true, _) => reuse.reuse(&pred, &guidance)?,
                (false, 2) => reuse.combine(&pred, &guidance, settings.reuse_guidance)?,
                _ => pred,
            };
            latents = scheduler.step(&guided, i, &latents)?;
            ensure_finite_step(&latents, i, steps)?;
        }
        report.denoise_seconds = started.elapsed().as_secs_f64();
        calls.finish(&mut report);
        Ok((latents, report))
    }

    /// `decode_latents` + `postprocess_video`: chunks of `decode_chunk_size` frames through the
    /// temporal decoder, then `[-1, 1]` -> `[0, 1]`.
    pub fn decode(
        &self,
        latents: &Tensor,
        settings: &SvdSettings,
        optimization: Optimization,
        progress: &mut dyn FnMut(Stage),
    ) -> Result<(Tensor, usize), PipelineError> {
        let (_, frames, c, h, w) = latents.dims5()?;
        let latents = (latents.reshape((frames, c, h, w))? / self.vae_config.scaling_factor)?;
        let chunk = settings.decode_chunk_size.unwrap_or(frames);
        let vae = self.vae.get()?;
        decode_in_chunks(
            &latents,
            chunk,
            |len| vae.lower_decoder(1, len, h, w),
            Planning::new(optimization, self.kernels),
            &self.device,
            progress,
        )
    }
}

/// What the encode phase hands to the denoise phase.
impl Conditioning {
    /// The items a UNet call takes: all of them, or the conditional half alone (the second
    /// item under guidance) with their count.
    fn items(&self, conditional: bool) -> Result<(usize, Conditioning), PipelineError> {
        let n = self.embeds.dim(0)?;
        let take = |t: &Tensor| match conditional {
            true => t.narrow(0, n - 1, 1),
            false => Ok(t.clone()),
        };
        let items = Conditioning {
            embeds: take(&self.embeds)?,
            lat: take(&self.lat)?,
            ids: take(&self.ids)?,
        };
        Ok((if conditional { 1 } else { n }, items))
    }
}

struct Conditioning {
    /// The image embedding, `(B, 1, D)`: B = 2 under guidance (zeros first), else 1.
    embeds: Tensor,
    /// The image latents repeated over the frames, `(B, F, C, h, w)` (zeros first).
    lat: Tensor,
    /// fps - 1, motion bucket and noise strength, `(B, 3)`.
    ids: Tensor,
}
