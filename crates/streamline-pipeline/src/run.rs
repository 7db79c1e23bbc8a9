//! What every pipeline shares: its error type, one planned model call, progress stages and
//! the report of a run.

use std::collections::HashMap;
use std::ops::Range;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use streamline_ir::{Executor, Graph, Kernels, Plan, Request, Result as IrResult, RunOutput};
use streamline_models::load::ModelError;
use streamline_models::{SizeError, SizeRule};
use streamline_rehash::{Rehash, StepError, StepRehash};
use thiserror::Error;

use crate::optimize::{plan_call, CallError, CallKind, Optimization};
use crate::planner::PlanError;
use crate::residency::PhaseMeasure;
use crate::scheduler::SchedulerError;

#[derive(Debug, Error)]
pub enum PipelineError {
    #[error("{path}: missing `{folder}/` ({expected})")]
    MissingFolder {
        path: PathBuf,
        folder: &'static str,
        /// What the folder should hold.
        expected: &'static str,
    },
    #[error("{0}")]
    Input(String),
    /// NaN or infinite values where finite ones are needed; says where (the step, the call).
    #[error("{0} are not finite (NaN or infinite): stopped rather than write a blank video")]
    NonFinite(String),
    #[error(transparent)]
    Size(#[from] SizeError),
    #[error(transparent)]
    Model(Box<ModelError>),
    #[error(transparent)]
    Plan(Box<CallError>),
    /// Planning the run from the folder's configs (a whole-run budget refused, ...).
    #[error(transparent)]
    Planning(Box<PlanError>),
    #[error(transparent)]
    Scheduler(Box<SchedulerError>),
    #[error(transparent)]
    Rehash(#[from] StepError),
    #[error(transparent)]
    Ir(#[from] streamline_ir::IrError),
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
}

impl From<ModelError> for PipelineError {
    fn from(e: ModelError) -> Self {
        PipelineError::Model(Box::new(e))
    }
}

impl From<PlanError> for PipelineError {
    fn from(e: PlanError) -> Self {
        PipelineError::Planning(Box::new(e))
    }
}

impl From<SchedulerError> for PipelineError {
    fn from(e: SchedulerError) -> Self {
        PipelineError::Scheduler(Box::new(e))
    }
}

impl From<CallError> for PipelineError {
    fn from(e: CallError) -> Self {
        PipelineError::Plan(Box::new(e))
    }
}

/// The sizes a model folder takes, read from its config.json files alone: no weights load.
#[derive(Clone, Debug)]
pub struct Sizes {
    pub rule: SizeRule,
    /// The `(height, width)` the model was trained at, when its UNet config records one
    /// (`sample_size` times the VAE's scale).
    pub native: Option<(usize, usize)>,
}

/// Where a run is, for progress displays.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    Denoise { step: usize, of: usize },
    Decode { chunk: usize, of: usize },
}

/// How a pipeline plans its model calls: the memory mode and the kernels that run them.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Planning {
    pub optimization: Optimization,
    pub kernels: Kernels,
}

impl Planning {
    pub fn new(optimization: Optimization, kernels: Kernels) -> Self {
        Planning {
            optimization,
            kernels,
        }
    }

    /// `kernels`, if they run on `device`.
    pub fn kernels_on(kernels: Kernels, device: &Device) -> Result<Kernels, PipelineError> {
        if kernels.runs_on(device) {
            Ok(kernels)
        } else {
            Err(PipelineError::Input(format!(
                "the {kernels} kernels cannot run on {device:?}"
            )))
        }
    }
}

/// One model call, planned once and run at every step.
pub(crate) struct Call {
    pub graph: Graph,
    pub plan: Plan,
}

impl Call {
    pub fn new(graph: &Graph, planning: Planning, kind: CallKind) -> Result<Self, PipelineError> {
        let (graph, plan) = plan_call(graph, planning.optimization, kind, planning.kernels)?;
        Ok(Call { graph, plan })
    }

    pub fn run(
        &self,
        inputs: Vec<Tensor>,
        device: &Device,
    ) -> Result<(Tensor, usize), PipelineError> {
        let mut out = self.run_with(inputs, device, &Request::default())?;
        Ok((out.outputs.remove(0), out.stats.peak_bytes))
    }

    pub fn run_with(
        &self,
        inputs: Vec<Tensor>,
        device: &Device,
        request: &Request,
    ) -> Result<RunOutput, PipelineError> {
        let exec = Executor::new(&self.graph, &self.plan, device)?;
        Ok(exec.run(inputs, request)?)
    }
}

/// What a run produced besides the frames.
#[derive(Clone, Debug, Default)]
pub struct RunReport {
    /// Largest live-tensor peak of one UNet step and of one decode call (executor-measured).
    pub unet_peak_bytes: usize,
    pub decode_peak_bytes: usize,
    /// UNet evaluations that ran the whole network, and Step Rehash's partial ones.
    pub full_steps: usize,
    pub partial_steps: usize,
    /// The denoising steps that ran the whole UNet (all of them without Step Rehash; an
    /// auto schedule's choice), in order.
    pub key_steps: Vec<usize>,
    /// Floating-point operations of all UNet evaluations (from the IR).
    pub unet_flops: u64,
    /// Seconds spent in the denoising loop.
    pub denoise_seconds: f64,
    /// With [`Rehash::Record`]: the cached features of every step, in step order.
    pub recorded: Vec<Tensor>,
    /// Each phase's planned peak, and its measured one where it is measured (see
    /// [`crate::residency::PhaseMeasure`]).
    pub phases: Vec<PhaseMeasure>,
}

/// A run's frame count: a video needs at least one frame.
pub(crate) fn ensure_frames(frames: usize) -> Result<(), PipelineError> {
    match frames {
        0 => Err(PipelineError::Input(
            "num_frames 0: a video needs at least one frame".into(),
        )),
        _ => Ok(()),
    }
}

/// Whether every element of `t` is finite. `0 * x` is zero exactly where `x` is finite (NaN
/// for NaN and infinities), so its sum is finite exactly when every element is, whatever their
/// magnitude; one scalar comes back to the host.
pub fn all_finite(t: &Tensor) -> candle_core::Result<bool> {
    let sum = t.affine(0.0, 0.0)?.sum_all()?.to_dtype(DType::F32)?;
    Ok(sum.to_scalar::<f32>()?.is_finite())
}

/// Refuses `t` if any element is NaN or infinite; `what` names it ("the latents after step 3
/// of 25").
pub(crate) fn ensure_finite(
    t: &Tensor,
    what: impl FnOnce() -> String,
) -> Result<(), PipelineError> {
    if all_finite(t)? {
        Ok(())
    } else {
        Err(PipelineError::NonFinite(what()))
    }
}

/// The check after every denoising step: the run stops at the first step whose latents are
/// not finite (NaN guidance, overflowing half precision, ...), naming it.
pub(crate) fn ensure_finite_step(
    latents: &Tensor,
    step: usize,
    steps: usize,
) -> Result<(), PipelineError> {
    ensure_finite(latents, || {
        format!("the latents after denoising step {} of {steps}", step + 1)
    })
}

/// `decode_latents` + `postprocess_video` of both pipelines: `latents` `(N, C, h, w)` (already
/// divided by the scaling factor) through the decoder `chunk` frames per call, then
/// `[-1, 1]` -> `[0, 1]` in f32. `lower(len)` is the decoder graph of a call of `len` frames
/// (planned once per length). Returns the frames and the largest call's live peak.
///
/// Each decoded frame is mapped to `[0, 1]` alone and written into the one f32 video, so the
/// phase holds the video once, not the decoded chunks and their f32 copies beside it.
pub(crate) fn decode_in_chunks(
    latents: &Tensor,
    chunk: usize,
    lower: impl Fn(usize) -> IrResult<Graph>,
    planning: Planning,
    device: &Device,
    progress: &mut dyn FnMut(Stage),
) -> Result<(Tensor, usize), PipelineError> {
    let frames = latents.dim(0)?;
    if chunk == 0 {
        return Err(PipelineError::Input(
            "decode_chunk_size 0: a decoder call needs at least one frame".into(),
        ));
    }
    let chunk = chunk.min(frames.max(1));
    let starts: Vec<usize> = (0..frames).step_by(chunk).collect();
    let mut calls: HashMap<usize, Call> = HashMap::new();
    let mut video: Option<Tensor> = None;
    let mut peak = 0;
    for (k, &start) in starts.iter().enumerate() {
        progress(Stage::Decode {
            chunk: k,
            of: starts.len(),
        });
        let len = chunk.min(frames - start);
        let call = match calls.entry(len) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(Call::new(&lower(len)?, planning, CallKind::Decode)?)
            }
        };
        let (out, p) = call.run(vec![latents.narrow(0, start, len)?], device)?;
        ensure_finite(&out, || {
            format!(
                "the frames {start}..{} of VAE decode call {} of {}",
                start + len,
                k + 1,
                starts.len()
            )
        })?;
        peak = peak.max(p);
        let (_, c, h, w) = out.dims4()?;
        let video = match &mut video {
            Some(v) => v,
            None => video.insert(Tensor::zeros((frames, c, h, w), DType::F32, device)?),
        };
        for i in 0..len {
            let frame = out.narrow(0, i, 1)?.to_dtype(DType::F32)?;
            video.slice_set(&((frame / 2.0)? + 0.5)?.clamp(0f32, 1f32)?, 0, start + i)?;
        }
    }
    video
        .ok_or_else(|| PipelineError::Input("no frames to decode".into()))
        .map(|v| (v, peak))
}

/// The UNet calls of one denoising loop: one per run of frames (several only for the naive
/// baseline, which denoises each run as a video of its own), each planned once with its own
/// Step Rehash state; with guidance reuse, the same calls for the conditional half alone.
pub(crate) struct UNetCalls {
    /// The frames each call covers.
    pub chunks: Vec<Range<usize>>,
    calls: Vec<Call>,
    rehash: Vec<StepRehash>,
    /// The calls at half the batch, for partial steps that reuse the guidance (empty
    /// without guidance reuse).
    conditional: Vec<Call>,
    /// Whether the batch is both halves of classifier-free guidance (unconditional first).
    guided: bool,
}

/// How a denoising loop batches its UNet calls.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Batching {
    /// Items per call: 2 under classifier-free guidance (one video), else 1.
    pub batch: usize,
    /// Partial steps run the conditional half alone and reuse the guidance difference of
    /// the last step that ran both (see [`GuidanceReuse`]).
    pub reuse_guidance: bool,
}

impl UNetCalls {
    /// `lower(n, batch)`: the UNet graph for a call of `n` frames and `batch` items.
    pub fn new(
        frames: usize,
        planning: Planning,
        (rehash, steps): (&Rehash, usize),
        batching: Batching,
        lower: impl Fn(usize, usize) -> IrResult<Graph>,
    ) -> Result<Self, PipelineError> {
        let chunks = planning.optimization.frame_runs(frames);
        if chunks.len() > 1 && matches!(rehash, Rehash::Record(_)) {
            return Err(PipelineError::Input(
                "calibration records one UNet call per step; naive slicing makes several".into(),
            ));
        }
        let guided = batching.batch == 2;
        let plan = |batch| {
            chunks
                .iter()
                .map(|r| Call::new(&lower(r.len(), batch)?, planning, CallKind::UNetStep))
                .collect::<Result<Vec<_>, PipelineError>>()
        };
        let calls = plan(batching.batch)?;
        let conditional = match batching.reuse_guidance && guided && *rehash != Rehash::Off {
            true => plan(1)?,
            false => Vec::new(),
        };
        let rehash = calls
            .iter()
            .map(|call| StepRehash::new(rehash.clone(), &call.graph, steps))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(UNetCalls {
            chunks,
            calls,
            rehash,
            conditional,
            guided,
        })
    }

    /// Whether `step` runs the conditional half alone: guidance reuse is on and every call
    /// makes it a partial step.
    pub fn conditional_step(&self, step: usize) -> bool {
        !self.conditional.is_empty() && self.rehash.iter().all(|r| !r.is_full(step))
    }

    /// Run call `k` at `step` (whole or partial, as Step Rehash decides; on the conditional
    /// half alone where [`Self::conditional_step`] says so, with `inputs` for that half),
    /// adding its peak and FLOPs to `report`; returns the UNet output.
    pub fn run(
        &mut self,
        k: usize,
        step: usize,
        inputs: Vec<Tensor>,
        device: &Device,
        report: &mut RunReport,
    ) -> Result<Tensor, PipelineError> {
        let conditional = self.conditional_step(step);
        let rehash = &mut self.rehash[k];
        let (call, request) = match conditional {
            true => (&self.conditional[k], rehash.request_conditional(step)?),
            false => (&self.calls[k], rehash.request(step)?),
        };
        let mut out = call.run_with(inputs, device, &request)?;
        rehash.absorb(std::mem::take(&mut out.kept))?;
        report.unet_peak_bytes = report.unet_peak_bytes.max(out.stats.peak_bytes);
        report.unet_flops += out.stats.flops;
        rehash.observe(step, self.guided && !conditional)?;
        Ok(out.outputs.remove(0))
    }

    /// Count whole and partial evaluations into `report`, with what calibration recorded.
    pub fn finish(self, report: &mut RunReport) {
        for r in self.rehash {
            let (full, partial) = r.counts();
            report.full_steps += full;
            report.partial_steps += partial;
            report.key_steps.extend(r.key_steps());
            report.recorded.extend(r.into_recorded());
        }
        // Calls over runs of frames (the naive baseline) each choose: their union.
        report.key_steps.sort_unstable();
        report.key_steps.dedup();
    }
}

/// Classifier-free guidance with reuse: a step that runs both halves gives `uncond + g (cond
/// - uncond)` and keeps the difference `cond - uncond`; a partial step that runs the
/// conditional half alone gives `cond + (g - 1) d` with the kept `d`, the guided prediction as
/// if its unconditional half were `cond - d` (FasterCache's reuse of the guidance branch).
#[derive(Default)]
pub(crate) struct GuidanceReuse {
    difference: Option<Tensor>,
}

impl GuidanceReuse {
    /// The guided prediction from `pred` `(2, ...)` (unconditional first), scaled by
    /// `scale` (broadcast); keeps the difference when `keep`.
    pub fn combine(
        &mut self,
        pred: &Tensor,
        scale: &Tensor,
        keep: bool,
    ) -> candle_core::Result<Tensor> {
        let (uncond, cond) = (pred.narrow(0, 0, 1)?, pred.narrow(0, 1, 1)?);
        let difference = (&cond - &uncond)?;
        let guided = (&uncond + scale.broadcast_mul(&difference)?)?;
        if keep {
            self.difference = Some(difference);
        }
        Ok(guided)
    }

    /// The guided prediction from the conditional half `cond` `(1, ...)` alone.
    pub fn reuse(&self, cond: &Tensor, scale: &Tensor) -> Result<Tensor, PipelineError> {
        let difference = self.difference.as_ref().ok_or_else(|| {
            PipelineError::Input("guidance reuse before any step ran both halves".into())
        })?;
        let scaled = (scale - 1.0)?.broadcast_mul(difference)?;
        Ok((cond + scaled)?)
    }
}
