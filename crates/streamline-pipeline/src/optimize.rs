//! From a lowered graph and the user's choice to the graph and plan that run.

use std::fmt;
use std::ops::Range;

use streamline_grouping::{HoistWhole, OperatorGrouping};
use streamline_ir::{human, Graph, IrError, Kernels, Pass, PassPipeline, Plan};
use streamline_slicer::naive::frame_chunks;
use streamline_slicer::{Coarsen, FitBudget, PaperSlicer};

/// How a model call runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Optimization {
    /// One node at a time, unsliced: diffusers' inference.
    Original,
    /// Feature Slicer alone: every node sliced, each node its own group, so every node's
    /// output is still materialized at full size.
    SlicerOnly {
        temporal_chunks: usize,
        spatial_chunks: usize,
    },
    /// Feature Slicer + Operator Grouping at fixed chunk counts (the paper's 7/7 setting),
    /// then fewer slices for every group that peaks below the plan's peak with fewer
    /// ([`Coarsen`]): the planned peak of the paper's setting, without the calls of slicing
    /// the small groups that never set it ([`paper_passes`] is the setting alone).
    Paper {
        temporal_chunks: usize,
        spatial_chunks: usize,
    },
    /// Slicer + grouping with the least slicing whose planned activation peak fits `bytes`.
    Budget { bytes: usize },
    /// The paper's naive baseline (Sec. 3): frames cut into `temporal_chunks` runs, each
    /// denoised as a video of its own, temporal layers included. **Not exact** (motion breaks
    /// at chunk borders); kept for comparisons. Each call runs unsliced; the pipeline splits
    /// the frames (`streamline_slicer::naive`).
    Naive { temporal_chunks: usize },
}

impl Optimization {
    /// The passes that make this optimization's plan, in order. Every mode starts by hoisting
    /// per-batch computations ahead of the video path (names unchanged).
    pub fn passes(self) -> PassPipeline {
        let hoisted = PassPipeline::new().then(HoistWhole);
        match self {
            Optimization::Original | Optimization::Naive { .. } => hoisted,
            Optimization::SlicerOnly {
                temporal_chunks,
                spatial_chunks,
            } => hoisted.then(PaperSlicer {
                temporal_chunks,
                spatial_chunks,
            }),
            Optimization::Paper {
                temporal_chunks,
                spatial_chunks,
            } => paper_passes(temporal_chunks, spatial_chunks).then(Coarsen),
            // The paper's setting at one chunk: the groups and axes the budget search slices.
            Optimization::Budget { bytes } => paper_passes(1, 1).then(FitBudget { bytes }),
        }
    }

    /// The runs of frames a pipeline evaluates the UNet on, each as a video of its own: all
    /// frames at once, except under the naive baseline.
    pub fn frame_runs(self, frames: usize) -> Vec<Range<usize>> {
        match self {
            Optimization::Naive { temporal_chunks } => frame_chunks(frames, temporal_chunks),
            _ => frame_chunks(frames, 1),
        }
    }
}

/// The paper's setting as the official code runs it: hoisting, then Feature Slicer at fixed
/// chunk counts on every group, then Operator Grouping. [`Optimization::Paper`] runs it and
/// then [`Coarsen`]; the exactness tests run it alone too, so that slicing every group at the
/// fixed counts stays covered.
pub fn paper_passes(temporal_chunks: usize, spatial_chunks: usize) -> PassPipeline {
    PassPipeline::new()
        .then(HoistWhole)
        .then(PaperSlicer {
            temporal_chunks,
            spatial_chunks,
        })
        .then(OperatorGrouping)
}

/// The graph to execute (per-batch computations hoisted ahead of the video path, names
/// unchanged) and its plan under `optimization`, for the CPU kernels.
pub fn optimize(graph: &Graph, optimization: Optimization) -> Result<(Graph, Plan), IrError> {
    optimize_for(graph, optimization, Kernels::Cpu)
}

/// [`optimize`] for `kernels`: the plan's costs, and so a budget's slicing, are theirs.
pub fn optimize_for(
    graph: &Graph,
    optimization: Optimization,
    kernels: Kernels,
) -> Result<(Graph, Plan), IrError> {
    let plan = Plan::trivial(graph).with_kernels(kernels);
    optimization.passes().run(graph.clone(), plan)
}

/// The model calls a pipeline plans, named in errors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CallKind {
    /// The VAE encoder call on the conditioning image (SVD).
    Encode,
    /// One UNet evaluation of a denoising step.
    UNetStep,
    /// One VAE decoder call over a chunk of frames.
    Decode,
}

impl CallKind {
    /// What would lower this call's smallest feasible peak, for a refused budget.
    pub(crate) fn remedy(self) -> &'static str {
        match self {
            CallKind::Encode => "a smaller --height/--width lowers it",
            CallKind::UNetStep => "fewer --num-frames or a smaller --height/--width lowers it",
            CallKind::Decode => {
                "a smaller --decode-chunk-size or a smaller --height/--width lowers it"
            }
        }
    }
}

impl fmt::Display for CallKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CallKind::Encode => "VAE encode",
            CallKind::UNetStep => "UNet step",
            CallKind::Decode => "VAE decode",
        })
    }
}

/// Planning one model call failed; a refused budget says which call and group set the
/// smallest feasible peak, and what would lower it.
#[derive(Debug)]
pub struct CallError {
    pub call: CallKind,
    pub source: Box<IrError>,
}

/// A refused budget is told whole in this error's own message; anything else is its source.
impl std::error::Error for CallError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self.source.infeasible() {
            Some(_) => None,
            None => Some(self.source.as_ref()),
        }
    }
}

impl fmt::Display for CallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Some(i) = self.source.infeasible() else {
            return write!(f, "planning the {}", self.call);
        };
        write!(
            f,
            "a memory budget of {} cannot be met: the smallest feasible peak of activations is {}, \
             set by the {} in group {} ({}), {} of it values kept for later groups; {}",
            human(i.budget),
            human(i.smallest),
            self.call,
            i.group,
            i.nodes(),
            human(i.held),
            self.call.remedy()
        )
    }
}

/// [`optimize_for`] for one call of a pipeline, its errors naming the call.
pub fn plan_call(
    graph: &Graph,
    optimization: Optimization,
    call: CallKind,
    kernels: Kernels,
) -> Result<(Graph, Plan), CallError> {
    optimize_for(graph, optimization, kernels).map_err(|source| CallError {
        call,
        source: Box::new(source),
    })
}

/// Parse a byte count such as `8GiB`, `320MiB`, `1.5GB`, `512M` or `1000000`.
/// Binary (KiB, MiB, GiB) and decimal (KB, MB, GB) units; a bare K/M/G is binary.
pub fn parse_bytes(text: &str) -> Result<usize, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a size like 8GiB or 320MiB"))?;
    let scale: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kib" => 1024.0,
        "m" | "mib" => 1024.0 * 1024.0,
        "g" | "gib" => 1024.0 * 1024.0 * 1024.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        other => {
            return Err(format!(
                "`{text}`: unknown unit `{other}` (use B, KiB, MiB, GiB, KB, MB, GB)"
            ))
        }
    };
    let bytes = value * scale;
    if !bytes.is_finite() || bytes < 1.0 {
        return Err(format!("`{text}` is not a positive size"));
    }
    Ok(bytes as usize)
}
