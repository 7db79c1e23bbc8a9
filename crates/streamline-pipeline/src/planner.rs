//! `streamline plan`: groups, slicing and planned peaks of a model from its config alone.

use std::fmt;
use std::path::PathBuf;

use candle_core::{DType, Device};
use streamline_ir::{human, Executor, Graph, IrError, Kernels, Plan};
use streamline_models::clip::{ClipVisionConfig, ClipVisionModelWithProjection};
use streamline_models::clip_text::{ClipTextConfig, ClipTextModel};
use streamline_models::load::{load_config, ModelError, WeightSource};
use streamline_models::sd::{
    AutoencoderKL, MotionAdapterConfig, MotionUNetConfig, UNet2DConfig, UNetMotionModel,
};
use streamline_models::svd::{
    AutoencoderKLTemporalDecoder, UNetConfig, UNetShape, UNetSpatioTemporalConditionModel,
    VaeConfig,
};
use streamline_models::{SizeError, SizeRule};
use streamline_rehash::CachePoint;
use thiserror::Error;

use crate::optimize::{plan_call, CallError, CallKind, Optimization};

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
    #[error(transparent)]
    Ir(#[from] streamline_ir::IrError),
    #[error("building the model from its config")]
    Build(#[from] candle_core::Error),
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

/// One model call's graph, plan, planned activation peak and FLOPs.
pub struct CallPlan {
    pub graph: Graph,
    pub plan: Plan,
    pub activations: usize,
    pub flops: u64,
}

impl CallPlan {
    fn new(graph: &Graph, request: &PlanRequest, kind: CallKind) -> Result<Self, CallError> {
        let (graph, plan) = plan_call(graph, request.optimization, kind, request.kernels)?;
        let stats = Executor::plan_stats(&graph, &plan).map_err(|source| CallError {
            call: kind,
            source: Box::new(source),
        })?;
        Ok(CallPlan {
            graph,
            plan,
            activations: stats.peak_bytes,
            flops: stats.flops,
        })
    }

    fn sliced_groups(&self) -> usize {
        self.plan.groups.iter().filter(|g| g.chunks > 1).count()
    }
}

/// What Step Rehash costs and saves per UNet call at the default cache point.
pub struct RehashPlan {
    pub cache_value: String,
    pub cache_bytes: usize,
    /// Planned activation peaks of a key step (the cached value kept to the end) and of a
    /// partial step (the cached value given, everything it makes unnecessary pruned).
    pub key_step: usize,
    pub partial_step: usize,
    pub partial_flops: u64,
}

impl RehashPlan {
    /// `None` for a UNet with no up-block boundary.
    fn new(call: &CallPlan) -> Result<Option<Self>, PlanError> {
        let Ok(value) = CachePoint::default().value_name(&call.graph) else {
            return Ok(None);
        };
        let exec = Executor::dry(&call.graph, &call.plan)?;
        let names = std::slice::from_ref(&value);
        let key = exec.dry_run(names, &[])?;
        let partial = exec.dry_run(&[], names)?;
        Ok(Some(RehashPlan {
            cache_bytes: call.graph.info(call.graph.find(&value)?).bytes(),
            cache_value: value,
            key_step: key.peak_bytes,
            partial_step: partial.peak_bytes,
            partial_flops: partial.flops,
        }))
    }
}

/// The planned memory of one denoising step and one decode call, from shapes alone.
pub struct PlanReport {
    pub request: PlanRequest,
    pub model_name: String,
    pub frames: usize,
    pub latent: (usize, usize),
    pub unet: CallPlan,
    pub decoder: CallPlan,
    pub rehash: Option<RehashPlan>,
    /// The UNet's weights (with the motion adapter's, for AnimateDiff).
    pub unet_weights: usize,
    pub vae_weights: usize,
    /// "image encoder" (SVD's CLIP vision) or "text encoder" (AnimateDiff's CLIP text).
    pub encoder: &'static str,
    pub encoder_weights: usize,
}

impl PlanReport {
    /// Weights of every model the pipeline keeps loaded, plus the larger activation peak.
    pub fn total(&self) -> usize {
        self.unet_weights
            + self.vae_weights
            + self.encoder_weights
            + self.unet.activations.max(self.decoder.activations)
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

/// Build the models on a shape-only weight source and plan both calls.
pub fn plan_report(request: PlanRequest) -> Result<PlanReport, PlanError> {
    let Configs {
        name: model_name,
        models,
    } = request.model.configs()?;
    let dev = Device::Cpu;
    let dtype = request.dtype;
    let (rule, default_frames, context_len) = match &models {
        Models::Svd { unet, vae, .. } => (SizeRule::svd(unet, vae), unet.num_frames, 1),
        Models::AnimateDiff { unet, vae, text } => (
            SizeRule::animatediff(unet, vae),
            16,
            text.max_position_embeddings,
        ),
    };
    let (h, w) = rule.check(request.height, request.width)?;
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
    let shape = UNetShape {
        batch: request.batch * if request.cfg { 2 } else { 1 },
        frames,
        height: h,
        width: w,
        context_len,
    };
    let chunk = request.decode_chunk_size.min(frames);
    // Every model is built on a shape-only source that records what it would load.
    let shapes = || {
        let source = WeightSource::shapes_only();
        (source.usage(), source.var_builder(dtype, &dev))
    };
    let (unet_graph, unet_weights, decoder_graph, vae_weights, encoder, encoder_weights) =
        match &models {
            Models::Svd { unet, vae, clip } => {
                let (u_usage, u_vb) = shapes();
                let g = UNetSpatioTemporalConditionModel::new(unet, u_vb)?.lower(shape)?;
                let (v_usage, v_vb) = shapes();
                let d = AutoencoderKLTemporalDecoder::new(vae, v_vb)?.lower_decoder(
                    request.batch,
                    chunk,
                    h,
                    w,
                )?;
                let (c_usage, c_vb) = shapes();
                ClipVisionModelWithProjection::new(clip, c_vb)?;
                let bytes = |u: &streamline_models::load::Usage| u.bytes(dtype);
                (
                    g,
                    bytes(&u_usage),
                    d,
                    bytes(&v_usage),
                    "image encoder",
                    bytes(&c_usage),
                )
            }
            Models::AnimateDiff { unet, vae, text } => {
                let ((u_usage, u_vb), (a_usage, a_vb)) = (shapes(), shapes());
                let g = UNetMotionModel::new(unet, u_vb, a_vb)?.lower(shape)?;
                let (v_usage, v_vb) = shapes();
                let d = AutoencoderKL::new(vae, v_vb)?.lower_decoder(request.batch, chunk, h, w)?;
                let (t_usage, t_vb) = shapes();
                ClipTextModel::new(text, t_vb)?;
                let bytes = |u: &streamline_models::load::Usage| u.bytes(dtype);
                let unet_bytes = bytes(&u_usage) + bytes(&a_usage);
                (
                    g,
                    unet_bytes,
                    d,
                    bytes(&v_usage),
                    "text encoder",
                    bytes(&t_usage),
                )
            }
        };
    let calls = [
        (&unet_graph, CallKind::UNetStep),
        (&decoder_graph, CallKind::Decode),
    ];
    let planned = calls.map(|(g, kind)| CallPlan::new(g, &request, kind));
    if planned
        .iter()
        .any(|p| p.as_ref().is_err_and(|e| e.source.infeasible().is_some()))
    {
        return Err(smallest_feasible(&calls, &request).into());
    }
    let [unet_call, decoder] = planned;
    let (unet_call, decoder) = (unet_call?, decoder?);
    Ok(PlanReport {
        model_name,
        frames,
        latent: (h, w),
        rehash: RehashPlan::new(&unet_call)?,
        unet: unet_call,
        decoder,
        unet_weights,
        vae_weights,
        encoder,
        encoder_weights,
        request,
    })
}

/// A budget some call cannot meet, refused with the one figure that holds for every budget:
/// the largest of the calls' smallest feasible peaks, naming the call and group that set it.
fn smallest_feasible(calls: &[(&Graph, CallKind)], request: &PlanRequest) -> CallError {
    let Optimization::Budget { bytes } = request.optimization else {
        unreachable!("only a budget can be infeasible")
    };
    let floors = calls.iter().filter_map(|&(graph, kind)| {
        let zero = Optimization::Budget { bytes: 0 };
        let err = plan_call(graph, zero, kind, request.kernels).err()?;
        let floor = err.source.infeasible()?.clone();
        Some((kind, floor))
    });
    let (call, floor) = floors
        .max_by_key(|(_, f)| f.smallest)
        .expect("a call refused the budget, so it has a floor");
    CallError {
        call,
        source: Box::new(IrError::Infeasible(Box::new(streamline_ir::Infeasible {
            budget: bytes,
            ..floor
        }))),
    }
}

fn optimization_name(o: Optimization) -> String {
    match o {
        Optimization::Original => "original".into(),
        Optimization::SlicerOnly {
            temporal_chunks,
            spatial_chunks,
        } => {
            format!("slicer only, {temporal_chunks} temporal / {spatial_chunks} spatial chunks")
        }
        Optimization::Paper {
            temporal_chunks,
            spatial_chunks,
        } => {
            format!(
                "slicer + grouping, {temporal_chunks} temporal / {spatial_chunks} spatial chunks"
            )
        }
        Optimization::Budget { bytes } => format!("memory budget {}", human(bytes)),
        Optimization::Naive { temporal_chunks } => {
            format!("naive slicing into {temporal_chunks} frame chunks (inexact baseline; one chunk's call shown at full length)")
        }
    }
}

impl fmt::Display for PlanReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = &self.request;
        let batch = r.batch * if r.cfg { 2 } else { 1 };
        writeln!(f, "model         {}", self.model_name)?;
        writeln!(
            f,
            "video         {}x{}, {} frames, {} video(s){}, {:?}",
            r.height,
            r.width,
            self.frames,
            r.batch,
            if r.cfg { ", CFG (UNet batch x2)" } else { "" },
            r.dtype
        )?;
        writeln!(
            f,
            "latents       {}x{}, UNet batch {batch}",
            self.latent.0, self.latent.1
        )?;
        writeln!(f, "optimization  {}", optimization_name(r.optimization))?;
        writeln!(f)?;
        for (name, call) in [("UNet step", &self.unet), ("VAE decode", &self.decoder)] {
            writeln!(
                f,
                "{name:<13} {} nodes in {} groups ({} sliced), activations {}",
                call.graph.nodes().len(),
                call.plan.groups.len(),
                call.sliced_groups(),
                human(call.activations)
            )?;
        }
        writeln!(
            f,
            "              (VAE decode in chunks of {} frames)",
            r.decode_chunk_size.min(self.frames)
        )?;
        if let Some(rh) = &self.rehash {
            writeln!(
                f,
                "step rehash   cache `{}` {}: key step activations {}, partial step {},",
                rh.cache_value,
                human(rh.cache_bytes),
                human(rh.key_step),
                human(rh.partial_step)
            )?;
            let flops = self.unet.flops as f64;
            let (amount, unit) = if flops >= 1e12 {
                (flops / 1e12, "TFLOP")
            } else {
                (flops / 1e9, "GFLOP")
            };
            writeln!(
                f,
                "              a partial step runs {:.0}% of a full step's {amount:.1} {unit}",
                100.0 * rh.partial_flops as f64 / flops,
            )?;
        }
        writeln!(f)?;
        writeln!(
            f,
            "weights       UNet {}, VAE {}, {} {}",
            human(self.unet_weights),
            human(self.vae_weights),
            self.encoder,
            human(self.encoder_weights)
        )?;
        writeln!(
            f,
            "planned peak  {} (all weights + the larger activation peak)",
            human(self.total())
        )
    }
}

/// One line per group of a call's plan, for `streamline plan --groups`.
pub fn group_listing(call: &CallPlan) -> String {
    call.plan.dump(&call.graph).to_string()
}
