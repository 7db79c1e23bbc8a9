//! `streamline plan`: groups, slicing and planned peaks of a model from its config alone.

mod footprint;
mod report;

use std::path::PathBuf;

use candle_core::{DType, Device};
use streamline_ir::{Graph, Kernels, SHALLOW_MARK};
use streamline_models::clip::{ClipVisionConfig, ClipVisionModelWithProjection};
use streamline_models::clip_text::{ClipTextConfig, ClipTextModel};
use streamline_models::load::{load_config, ModelError, Usage, WeightSource};
use streamline_models::sd::{
    AutoencoderKL, MotionAdapterConfig, MotionUNetConfig, UNet2DConfig, UNetMotionModel,
};
use streamline_models::svd::{
    AutoencoderKLTemporalDecoder, UNetConfig, UNetShape, UNetSpatioTemporalConditionModel,
    VaeConfig,
};
use streamline_models::{SizeError, SizeRule};
use streamline_rehash::{CacheError, CachePoint, Rehash};
use thiserror::Error;

use crate::optimize::{CallError, Optimization};
use crate::phases::{fit_run, BudgetError, Footprint, ModelWeights, Phase, RunPlan};
use footprint::{clip_activations, RunShape};
use report::cache_value;
pub use report::{
    flop_text, group_listing, CallPlan, PhasePlan, PlanReport, PointCost, RehashPlan,
};

/// Which model to plan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModelSpec {
    /// Stable Video Diffusion (14 frames).
    Svd,
    /// SVD-XT: the same network, 25 frames.
    SvdXt,
    /// AnimateDiff: SD 1.5's UNet with motion adapter v1-5-2, CLIP ViT-L/14's text encoder and
    /// SD's VAE (16 frames).
    AnimateDiff,
    /// A UNet `config.json`, or a diffusers model folder with `unet/config.json` (and
    /// `vae/config.json`, else SVD's VAE).
    Path(PathBuf),
    /// An SD 1.5 diffusers folder (`unet/`, `vae/`, `text_encoder/` configs) with a motion
    /// adapter folder: what `streamline animatediff` runs.
    AnimateDiffFolders { model: PathBuf, adapter: PathBuf },
}

impl ModelSpec {
    pub fn parse(text: &str) -> Self {
        match text {
            "svd" => ModelSpec::Svd,
            "svd-xt" => ModelSpec::SvdXt,
            "animatediff" => ModelSpec::AnimateDiff,
            other => ModelSpec::Path(PathBuf::from(other)),
        }
    }

    /// diffusers' default video size for the model: 576x1024 for SVD, 512x512 for AnimateDiff.
    pub fn default_size(&self) -> (usize, usize) {
        match self {
            ModelSpec::AnimateDiff | ModelSpec::AnimateDiffFolders { .. } => (512, 512),
            _ => (576, 1024),
        }
    }

    fn configs(&self) -> Result<Configs, PlanError> {
        let svd = |name: &str, frames| Configs {
            name: name.into(),
            models: Models::Svd {
                unet: Box::new(UNetConfig::svd(frames)),
                vae: VaeConfig::svd(),
                clip: ClipVisionConfig::vit_h14(),
            },
        };
        Ok(match self {
            ModelSpec::Svd => svd("svd", 14),
            ModelSpec::SvdXt => svd("svd-xt", 25),
            ModelSpec::AnimateDiff => {
                let builtin = std::path::Path::new("<built-in config>");
                Configs {
                    name: "animatediff (SD 1.5 + motion adapter v1-5-2)".into(),
                    models: Models::AnimateDiff {
                        unet: Box::new(MotionUNetConfig::new(
                            UNet2DConfig::sd15(),
                            builtin,
                            MotionAdapterConfig::v1_5_2(),
                            builtin,
                        )?),
                        vae: VaeConfig::sd(),
                        text: ClipTextConfig::vit_l14(),
                    },
                }
            }
            ModelSpec::AnimateDiffFolders { model, adapter } => {
                let (unet, adapter) = (model.join("unet/config.json"), adapter.join("config.json"));
                Configs {
                    name: model.display().to_string(),
                    models: Models::AnimateDiff {
                        unet: Box::new(MotionUNetConfig::new(
                            load_config(&unet)?,
                            &unet,
                            load_config(&adapter)?,
                            &adapter,
                        )?),
                        vae: load_config(&model.join("vae/config.json"))?,
                        text: ClipTextConfig::load(&model.join("text_encoder/config.json"))?,
                    },
                }
            }
            ModelSpec::Path(p) if p.is_dir() => {
                let (vae, clip) = (
                    p.join("vae/config.json"),
                    p.join("image_encoder/config.json"),
                );
                Configs {
                    name: p.display().to_string(),
                    models: Models::Svd {
                        unet: Box::new(load_config(&p.join("unet/config.json"))?),
                        vae: if vae.is_file() {
                            load_config(&vae)?
                        } else {
                            VaeConfig::svd()
                        },
                        clip: if clip.is_file() {
                            ClipVisionConfig::load(&clip)?
                        } else {
                            ClipVisionConfig::vit_h14()
                        },
                    },
                }
            }
            ModelSpec::Path(p) => Configs {
                name: p.display().to_string(),
                models: Models::Svd {
                    unet: Box::new(load_config(p)?),
                    vae: VaeConfig::svd(),
                    clip: ClipVisionConfig::vit_h14(),
                },
            },
        })
    }
}

/// What to plan for.
/// The configs a plan needs; SVD's where a folder lacks one.
struct Configs {
    name: String,
    models: Models,
}

enum Models {
    Svd {
        unet: Box<UNetConfig>,
        vae: VaeConfig,
        clip: ClipVisionConfig,
    },
    AnimateDiff {
        unet: Box<MotionUNetConfig>,
        vae: VaeConfig,
        text: ClipTextConfig,
    },
}

#[derive(Clone, Debug)]
pub struct PlanRequest {
    pub model: ModelSpec,
    pub height: usize,
    pub width: usize,
    /// Defaults to the UNet config's `num_frames` (SVD) or 16 (AnimateDiff).
    pub num_frames: Option<usize>,
    /// Videos per call; classifier-free guidance doubles the UNet's batch.
    pub batch: usize,
    pub cfg: bool,
    pub dtype: DType,
    pub optimization: Optimization,
    /// What runs the ops on the device planned for (see [`crate::kernels_for`]).
    pub kernels: Kernels,
    /// Frames per VAE decoder call.
    pub decode_chunk_size: usize,
    /// What Step Rehash holds through the denoising loop.
    pub rehash: RehashMemory,
}

/// What Step Rehash holds through a denoising loop, beyond each call's activations.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RehashMemory {
    /// No Step Rehash.
    #[default]
    Off,
    /// The cached features at a cache point.
    Cache(CachePoint),
    /// The cache, and the shallow features an auto schedule watches: each step's kept copy
    /// and the previous step's.
    CacheAndShallow(CachePoint),
}

impl RehashMemory {
    pub fn of(rehash: &Rehash) -> Self {
        match (rehash, rehash.cache_point()) {
            (Rehash::Auto(_), Some(point)) => RehashMemory::CacheAndShallow(point),
            (_, Some(point)) => RehashMemory::Cache(point),
            (_, None) => RehashMemory::Off,
        }
    }

    /// Where the features are cached (the default point when off: `plan` reports it).
    pub fn cache_point(self) -> CachePoint {
        match self {
            RehashMemory::Off => CachePoint::default(),
            RehashMemory::Cache(p) | RehashMemory::CacheAndShallow(p) => p,
        }
    }
}

#[derive(Debug, Error)]
pub enum PlanError {
    #[error("--{flag} {value}: {reason}")]
    Flag {
        flag: &'static str,
        value: usize,
        reason: String,
    },
    /// Told whole as the flag it breaks, so not a source.
    #[error("--{0}")]
    Size(SizeError),
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Model(Box<ModelError>),
    #[error(transparent)]
    Call(Box<CallError>),
    /// A whole-run budget that no residency and no plan meets.
    #[error(transparent)]
    Budget(Box<BudgetError>),
    #[error(transparent)]
    Ir(#[from] streamline_ir::IrError),
    /// A Step Rehash cache point the UNet does not have (told whole, so not a source).
    #[error("--rehash: {0}")]
    CachePoint(CacheError),
    #[error("building the model from its config")]
    Build(#[from] candle_core::Error),
}

impl From<CacheError> for PlanError {
    fn from(e: CacheError) -> Self {
        PlanError::CachePoint(e)
    }
}

impl From<ModelError> for PlanError {
    fn from(e: ModelError) -> Self {
        PlanError::Model(Box::new(e))
    }
}

impl From<SizeError> for PlanError {
    fn from(e: SizeError) -> Self {
        PlanError::Size(e)
    }
}

impl From<CallError> for PlanError {
    fn from(e: CallError) -> Self {
        PlanError::Call(Box::new(e))
    }
}

fn multiple(flag: &'static str, value: usize, of: usize, why: &str) -> Result<(), PlanError> {
    if value == 0 || value % of != 0 {
        return Err(PlanError::Flag {
            flag,
            value,
            reason: format!("must be a positive multiple of {of} ({why})"),
        });
    }
    Ok(())
}

/// Everything a plan is made from: the three calls' graphs, the models' weights and the run's
/// shape.
struct Lowered {
    encode: Option<Graph>,
    unet: Graph,
    decoder: Graph,
    footprint: Footprint,
    /// Activations of the CLIP encoder the encode phase runs outside the IR.
    clip_activations: usize,
}

/// Build the models on a shape-only weight source and plan every phase; a whole-run budget
/// is spread over the phases (see [`fit_run`]).
pub fn plan_report(request: PlanRequest) -> Result<PlanReport, PlanError> {
    let Configs {
        name: model_name,
        models,
    } = request.model.configs()?;
    let (rule, default_frames, latent_channels) = match &models {
        Models::Svd { unet, vae, .. } => (
            SizeRule::svd(unet, vae),
            unet.num_frames,
            vae.latent_channels,
        ),
        Models::AnimateDiff { unet, vae, .. } => {
            (SizeRule::animatediff(unet, vae), 16, vae.latent_channels)
        }
    };
    let latent = rule.check(request.height, request.width)?;
    let frames = request.num_frames.unwrap_or(default_frames);
    if request.num_frames.is_none() && frames == 0 {
        return Err(PlanError::Config(format!(
            "{model_name}: the UNet config's `num_frames` is 0 (pass --num-frames)"
        )));
    }
    multiple("num-frames", frames, 1, "at least one frame")?;
    multiple("batch", request.batch, 1, "at least one video")?;
    multiple(
        "decode-chunk-size",
        request.decode_chunk_size,
        1,
        "at least one frame",
    )?;
    let shape = RunShape {
        frames,
        pixels: (request.height, request.width),
        latent,
        latent_channels,
        batch: request.batch,
        cfg: request.cfg,
        dtype: request.dtype,
    };
    let lowered = lower(&models, shape, &request)?;
    let kernels = request.kernels;
    let plan_phase = |phase: Phase, optimization| -> Result<(Option<CallPlan>, usize), CallError> {
        let graph = match phase {
            Phase::Encode => lowered.encode.as_ref(),
            Phase::Denoise => Some(&lowered.unet),
            Phase::Decode => Some(&lowered.decoder),
        };
        let Some(graph) = graph else {
            return Ok((None, lowered.clip_activations));
        };
        let call = CallPlan::new(graph, optimization, phase.call(), kernels)?;
        let activations = match phase {
            Phase::Encode => call.activations.max(lowered.clip_activations),
            _ => call.activations,
        };
        Ok((Some(call), activations))
    };
    let (run, planned) = match request.optimization {
        Optimization::Budget { bytes } => {
            fit_run(bytes, &lowered.footprint, plan_phase).map_err(|e| match e {
                BudgetError::Call(e) => PlanError::Call(e),
                refused => PlanError::Budget(Box::new(refused)),
            })?
        }
        optimization => {
            let run = RunPlan::uniform(optimization);
            let planned = Phase::ALL
                .into_iter()
                .map(|phase| plan_phase(phase, run.call(phase)))
                .collect::<Result<Vec<_>, _>>()?;
            (run, planned)
        }
    };
    let phases = Phase::ALL
        .iter()
        .zip(&planned)
        .map(|(&phase, (_, activations))| {
            PhasePlan::new(phase, &lowered.footprint, run.residency, *activations)
        })
        .collect();
    let [(encode, _), (unet, _), (decoder, _)]: [(Option<CallPlan>, usize); 3] = planned
        .try_into()
        .unwrap_or_else(|_| unreachable!("one plan per phase"));
    let (unet, decoder) = (
        unet.expect("the denoise phase runs the UNet"),
        decoder.expect("the decode phase runs the decoder"),
    );
    Ok(PlanReport {
        model_name,
        frames,
        latent,
        rehash: RehashPlan::new(&unet, request.rehash.cache_point())?,
        encode,
        unet,
        decoder,
        footprint: lowered.footprint,
        run,
        phases,
        request,
    })
}

/// Each model built on a shape-only source (which records what it would load), its calls
/// lowered, and what every phase holds.
fn lower(models: &Models, shape: RunShape, request: &PlanRequest) -> Result<Lowered, PlanError> {
    let (dtype, dev) = (request.dtype, Device::Cpu);
    let shapes = || {
        let source = WeightSource::shapes_only();
        (source.usage(), source.var_builder(dtype, &dev))
    };
    let bytes = |u: &Usage| u.bytes(dtype);
    let weights = |model, usage: &[&Usage], phases: &[Phase]| ModelWeights {
        model,
        bytes: usage.iter().map(|u| bytes(u)).sum(),
        phases: phases.to_vec(),
    };
    let (h, w) = shape.latent;
    let (px_h, px_w) = shape.pixels;
    let (guided, frames) = (shape.batch * if shape.cfg { 2 } else { 1 }, shape.frames);
    let unet_shape = |context_len| UNetShape {
        batch: guided,
        frames,
        height: h,
        width: w,
        context_len,
    };
    let cache = |g: &Graph| {
        let shallow = || {
            let value = g.marked(SHALLOW_MARK).map_or(0, |v| g.info(v).bytes());
            2 * value
        };
        let cached = |point| cache_value(g, point).map(|(_, b)| b);
        Ok::<_, CacheError>(match request.rehash {
            RehashMemory::Off => 0,
            RehashMemory::Cache(point) => cached(point)?,
            RehashMemory::CacheAndShallow(point) => cached(point)? + shallow(),
        })
    };
    Ok(match models {
        Models::Svd { unet, vae, clip } => {
            let (u_usage, u_vb) = shapes();
            let unet_graph =
                UNetSpatioTemporalConditionModel::new(unet, u_vb)?.lower(unet_shape(1))?;
            let (v_usage, v_vb) = shapes();
            let vae_model = AutoencoderKLTemporalDecoder::new(vae, v_vb)?;
            let decoder = vae_model.lower_decoder(
                shape.batch,
                request.decode_chunk_size.min(shape.frames),
                h,
                w,
            )?;
            let encode = vae_model.lower_encoder(1, px_h, px_w)?;
            let (c_usage, c_vb) = shapes();
            ClipVisionModelWithProjection::new(clip, c_vb)?;
            let tokens = (clip.image_size / clip.patch_size).pow(2) + 1;
            Lowered {
                footprint: Footprint {
                    models: vec![
                        weights("image encoder", &[&c_usage], &[Phase::Encode]),
                        weights("VAE", &[&v_usage], &[Phase::Encode, Phase::Decode]),
                        weights("UNet", &[&u_usage], &[Phase::Denoise]),
                    ],
                    held: [
                        shape.svd_encode_held(),
                        shape.svd_denoise_held(clip.projection_dim) + cache(&unet_graph)?,
                        shape.decode_held(),
                    ],
                },
                clip_activations: clip_activations(
                    tokens,
                    clip.hidden_size,
                    clip.intermediate_size,
                    clip.num_attention_heads,
                    dtype,
                ),
                encode: Some(encode),
                unet: unet_graph,
                decoder,
            }
        }
        Models::AnimateDiff { unet, vae, text } => {
            let ((u_usage, u_vb), (a_usage, a_vb)) = (shapes(), shapes());
            let tokens = text.max_position_embeddings;
            let unet_graph = UNetMotionModel::new(unet, u_vb, a_vb)?.lower(unet_shape(tokens))?;
            let (v_usage, v_vb) = shapes();
            let decoder = AutoencoderKL::new(vae, v_vb)?.lower_decoder(
                shape.batch,
                request.decode_chunk_size.min(shape.frames),
                h,
                w,
            )?;
            let (t_usage, t_vb) = shapes();
            ClipTextModel::new(text, t_vb)?;
            Lowered {
                footprint: Footprint {
                    models: vec![
                        weights("text encoder", &[&t_usage], &[Phase::Encode]),
                        weights("UNet", &[&u_usage, &a_usage], &[Phase::Denoise]),
                        weights("VAE", &[&v_usage], &[Phase::Decode]),
                    ],
                    held: [
                        0,
                        shape.animatediff_denoise_held(tokens, text.hidden_size)
                            + cache(&unet_graph)?,
                        shape.decode_held(),
                    ],
                },
                clip_activations: clip_activations(
                    tokens,
                    text.hidden_size,
                    text.intermediate_size,
                    text.num_attention_heads,
                    dtype,
                ),
                encode: None,
                unet: unet_graph,
                decoder,
            }
        }
    })
}
