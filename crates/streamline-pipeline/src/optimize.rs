//! From a lowered graph and the user's choice to the graph and plan that run.

use streamline_grouping::{hoist_whole, OperatorGrouping};
use streamline_ir::{Executor, Graph, IrError, Pass, Plan};
use streamline_slicer::{fit_budget, BudgetError, PaperSlicer};
use thiserror::Error;

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
    /// Feature Slicer + Operator Grouping at fixed chunk counts (the paper's 7/7 setting).
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

#[derive(Debug, Error)]
pub enum OptimizeError {
    #[error(transparent)]
    Budget(#[from] BudgetError),
    #[error(transparent)]
    Ir(#[from] IrError),
}

/// The graph to execute (per-batch computations hoisted ahead of the video path, names
/// unchanged) and its plan under `optimization`.
pub fn optimize(graph: &Graph, optimization: Optimization) -> Result<(Graph, Plan), OptimizeError> {
    let graph = hoist_whole(graph)?;
    let trivial = Plan::trivial(&graph);
    let sliced = |t: usize, s: usize| {
        PaperSlicer {
            temporal_chunks: t,
            spatial_chunks: s,
        }
        .run(&graph, trivial.clone())
    };
    let plan = match optimization {
        Optimization::Original | Optimization::Naive { .. } => trivial.clone(),
        Optimization::SlicerOnly {
            temporal_chunks,
            spatial_chunks,
        } => sliced(temporal_chunks, spatial_chunks)?,
        Optimization::Paper {
            temporal_chunks,
            spatial_chunks,
        } => OperatorGrouping.run(&graph, sliced(temporal_chunks, spatial_chunks)?)?,
        // Unsliced groups can plan a higher peak than original inference (a group's inputs
        // live until the group ends), so a budget the original already meets keeps it.
        Optimization::Budget { bytes }
            if Executor::plan_stats(&graph, &trivial)?.peak_bytes <= bytes =>
        {
            trivial.clone()
        }
        Optimization::Budget { bytes } => {
            let grouped = OperatorGrouping.run(&graph, sliced(1, 1)?)?;
            fit_budget(&graph, grouped, bytes)?
        }
    };
    plan.validate(&graph)?;
    Ok((graph, plan))
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
