//! What `streamline plan` reports: each call's plan, and each phase's weights, held values and
//! activations, as text and as JSON.

use std::fmt;

use serde::Serialize;
use streamline_ir::{human, Executor, Graph, Kernels, Plan};
use streamline_rehash::{CacheError, CachePoint};

use super::{PlanError, PlanRequest};
use crate::optimize::{plan_call, CallError, CallKind, Optimization};
use crate::phases::{Footprint, Phase, Residency, RunPlan};

/// One model call's graph, plan, planned activation peak and FLOPs.
pub struct CallPlan {
    pub graph: Graph,
    pub plan: Plan,
    pub activations: usize,
    pub flops: u64,
}

impl CallPlan {
    pub(super) fn new(
        graph: &Graph,
        optimization: Optimization,
        kind: CallKind,
        kernels: Kernels,
    ) -> Result<Self, CallError> {
        let (graph, plan) = plan_call(graph, optimization, kind, kernels)?;
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

/// What Step Rehash costs and saves per UNet call at one cache point.
pub struct RehashPlan {
    pub cache_point: CachePoint,
    pub cache_value: String,
    pub cache_bytes: usize,
    /// Planned activation peaks of a key step (the cached value kept to the end) and of a
    /// partial step (the cached value given, everything it makes unnecessary pruned).
    pub key_step: usize,
    pub partial_step: usize,
    pub partial_flops: u64,
    /// Every up-block boundary's cached bytes and partial-step FLOPs, shallowest last, so
    /// that `plan` shows what moving the cache point trades.
    pub points: Vec<PointCost>,
}

/// A partial step's cost with the cache at one up-block boundary.
#[derive(Clone, Debug, Serialize)]
pub struct PointCost {
    pub cache_point: String,
    pub cache_value: String,
    pub cache_bytes: usize,
    pub partial_flops: u64,
}

impl RehashPlan {
    /// `None` for a UNet with no up-block boundary.
    pub(super) fn new(call: &CallPlan, point: CachePoint) -> Result<Option<Self>, PlanError> {
        let graph = &call.graph;
        let boundaries = CachePoint::boundaries(graph);
        if boundaries.is_empty() {
            return Ok(None);
        }
        let exec = Executor::dry(graph, &call.plan)?;
        // A partial step at every boundary; the one at `point` is the plan's.
        let partials = boundaries
            .iter()
            .map(|&n| {
                let (value, bytes) = cache_value(graph, CachePoint::UpBlock(n))?;
                let stats = exec.dry_run(&[], std::slice::from_ref(&value))?;
                Ok((n, value, bytes, stats))
            })
            .collect::<Result<Vec<_>, PlanError>>()?;
        let block = point.block(graph)?;
        let (_, value, cache_bytes, partial) = partials
            .iter()
            .find(|(n, ..)| *n == block)
            .expect("block() is one of the boundaries");
        let key = exec.dry_run(std::slice::from_ref(value), &[])?;
        Ok(Some(RehashPlan {
            cache_point: CachePoint::UpBlock(block),
            cache_value: value.clone(),
            cache_bytes: *cache_bytes,
            key_step: key.peak_bytes,
            partial_step: partial.peak_bytes,
            partial_flops: partial.flops,
            points: partials
                .iter()
                .map(|(n, value, bytes, stats)| PointCost {
                    cache_point: CachePoint::UpBlock(*n).to_string(),
                    cache_value: value.clone(),
                    cache_bytes: *bytes,
                    partial_flops: stats.flops,
                })
                .collect(),
        }))
    }

    /// The denoising loop's UNet FLOPs over `steps` steps of which `full` run the whole UNet
    /// (`full_flops` each); with `reuse_guidance` a partial step runs the conditional half of
    /// the guidance batch only, half its FLOPs (every UNet op is per batch item).
    pub fn loop_flops(
        &self,
        full_flops: u64,
        (steps, full): (usize, usize),
        reuse_guidance: bool,
    ) -> u64 {
        let partial = match reuse_guidance {
            true => self.partial_flops / 2,
            false => self.partial_flops,
        };
        full as u64 * full_flops + (steps - full) as u64 * partial
    }
}

/// The value Step Rehash caches at `point`, and its bytes.
pub(super) fn cache_value(graph: &Graph, point: CachePoint) -> Result<(String, usize), CacheError> {
    let id = point.value(graph)?;
    Ok((graph.value(id).name.clone(), graph.info(id).bytes()))
}

/// One phase as planned: the models on the device, what earlier phases handed on, and the
/// largest activation peak of its calls.
#[derive(Clone, Debug, Serialize)]
pub struct PhasePlan {
    pub phase: Phase,
    pub models: Vec<&'static str>,
    pub weights: usize,
    pub held: usize,
    pub activations: usize,
}

impl PhasePlan {
    pub fn peak(&self) -> usize {
        self.weights + self.held + self.activations
    }

    pub(super) fn new(
        phase: Phase,
        footprint: &Footprint,
        residency: Residency,
        activations: usize,
    ) -> Self {
        PhasePlan {
            phase,
            models: footprint
                .resident(phase, residency)
                .iter()
                .map(|m| m.model)
                .collect(),
            weights: footprint.weights(phase, residency),
            held: footprint.held[phase.index()],
            activations,
        }
    }
}

/// The planned memory of a run, from shapes alone: every call's plan and every phase's peak.
pub struct PlanReport {
    pub request: PlanRequest,
    pub model_name: String,
    pub frames: usize,
    pub latent: (usize, usize),
    /// SVD's VAE encode of the conditioning image (AnimateDiff has no IR call to encode).
    pub encode: Option<CallPlan>,
    pub unet: CallPlan,
    pub decoder: CallPlan,
    pub rehash: Option<RehashPlan>,
    /// The weights of every model, the phases that run them and the values handed on.
    pub footprint: Footprint,
    /// How each phase's calls are planned and where the weights are between phases.
    pub run: RunPlan,
    pub phases: Vec<PhasePlan>,
}

impl PlanReport {
    /// The whole run's planned peak: the largest phase.
    pub fn total(&self) -> usize {
        self.peak_phase().peak()
    }

    /// The phase that sets the run's peak (the later one on a tie).
    pub fn peak_phase(&self) -> &PhasePlan {
        self.phases
            .iter()
            .max_by_key(|p| p.peak())
            .expect("a run has phases")
    }

    /// The report as JSON, for scripts (`streamline plan --json`): bytes as integers.
    pub fn json(&self) -> serde_json::Value {
        let r = &self.request;
        let call = |c: &CallPlan| {
            serde_json::json!({
                "nodes": c.graph.nodes().len(),
                "groups": c.plan.groups.len(),
                "sliced_groups": c.sliced_groups(),
                "activations": c.activations,
                "flops": c.flops,
            })
        };
        serde_json::json!({
            "model": self.model_name,
            "height": r.height,
            "width": r.width,
            "frames": self.frames,
            "batch": r.batch,
            "cfg": r.cfg,
            "dtype": r.dtype.as_str(),
            "kernels": r.kernels.to_string(),
            "optimization": optimization_name(r.optimization),
            "decode_chunk_size": r.decode_chunk_size.min(self.frames),
            "residency": self.run.residency,
            "weights": self.footprint.models,
            "calls": {
                "encode": self.encode.as_ref().map(call),
                "unet_step": call(&self.unet),
                "decode": call(&self.decoder),
            },
            "phases": self.phases.iter().map(|p| serde_json::json!({
                "phase": p.phase,
                "models": p.models,
                "weights": p.weights,
                "held": p.held,
                "activations": p.activations,
                "peak": p.peak(),
            })).collect::<Vec<_>>(),
            "rehash": self.rehash.as_ref().map(|rh| serde_json::json!({
                "cache_point": rh.cache_point.to_string(),
                "cache_value": rh.cache_value,
                "cache_bytes": rh.cache_bytes,
                "key_step_activations": rh.key_step,
                "partial_step_activations": rh.partial_step,
                "partial_flops": rh.partial_flops,
                "cache_points": rh.points,
            })),
            "peak": self.total(),
            "peak_phase": self.peak_phase().phase,
        })
    }
}

/// FLOPs in the largest unit that keeps a number above 1 (GFLOP to PFLOP).
pub fn flop_text(flops: u64) -> String {
    let flops = flops as f64;
    match flops {
        f if f >= 1e15 => format!("{:.2} PFLOP", f / 1e15),
        f if f >= 1e12 => format!("{:.1} TFLOP", f / 1e12),
        f => format!("{:.1} GFLOP", f / 1e9),
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
        Optimization::Budget { bytes } => {
            format!("memory budget {} for the whole run", human(bytes))
        }
        Optimization::Naive { temporal_chunks } => {
            format!("naive slicing into {temporal_chunks} frame chunks (inexact baseline; one chunk's call shown at full length)")
        }
    }
}

impl PlanReport {
    fn fmt_rehash(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Some(rh) = &self.rehash else {
            return Ok(());
        };
        writeln!(
            f,
            "step rehash   cache {} `{}` {}: key step activations {}, partial step {},",
            rh.cache_point,
            rh.cache_value,
            human(rh.cache_bytes),
            human(rh.key_step),
            human(rh.partial_step)
        )?;
        let share = |flops: u64| 100.0 * flops as f64 / self.unet.flops as f64;
        writeln!(
            f,
            "              a partial step runs {:.0}% of a full step's {}",
            share(rh.partial_flops),
            flop_text(self.unet.flops),
        )?;
        let points: Vec<String> = rh
            .points
            .iter()
            .map(|p| format!("{} {:.0}%", p.cache_point, share(p.partial_flops)))
            .collect();
        writeln!(
            f,
            "              at each cache point: {}",
            points.join(", ")
        )
    }

    fn fmt_phases(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "residency     {}", self.run.residency)?;
        writeln!(
            f,
            "{:<13} {:>11} {:>11} {:>11} {:>11}  models",
            "phase", "weights", "held", "activations", "peak"
        )?;
        for p in &self.phases {
            writeln!(
                f,
                "{:<13} {:>11} {:>11} {:>11} {:>11}  {}",
                p.phase.to_string(),
                human(p.weights),
                human(p.held),
                human(p.activations),
                human(p.peak()),
                p.models.join(", ")
            )?;
        }
        writeln!(
            f,
            "planned peak  {}, set by the {} phase (weights + held + activations)",
            human(self.total()),
            self.peak_phase().phase
        )
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
        let calls = [
            ("VAE encode", self.encode.as_ref()),
            ("UNet step", Some(&self.unet)),
            ("VAE decode", Some(&self.decoder)),
        ];
        for (name, call) in calls {
            let Some(call) = call else { continue };
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
        self.fmt_rehash(f)?;
        writeln!(f)?;
        self.fmt_phases(f)
    }
}

/// One line per group of a call's plan, for `streamline plan --groups`.
pub fn group_listing(call: &CallPlan) -> String {
    call.plan.dump(&call.graph).to_string()
}
