//! The paper's fixed chunk counts.

use streamline_ir::{check_group, Axis, Graph, Group, Pass, Plan, Result};

/// Every group that can run sliced gets the paper's chunk count for its axis: frame-wise
/// groups `temporal_chunks` slices of the B*T frames, position-wise groups `spatial_chunks`
/// slices of the B*H*W positions (each capped at the axis length). Groups that can run sliced
/// along neither axis (per-batch embeddings) stay whole.
///
/// It keeps the input plan's groups and their workspace limits; on the trivial plan it slices
/// every node alone, and `streamline-grouping` merges the runs afterwards.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PaperSlicer {
    pub temporal_chunks: usize,
    pub spatial_chunks: usize,
}

impl PaperSlicer {
    fn chunks(&self, axis: Axis) -> usize {
        match axis {
            Axis::Frames => self.temporal_chunks,
            Axis::Positions => self.spatial_chunks,
            // The paper slices no rows, and `slice` only asks for `Axis::ALL`.
            Axis::Rows => 1,
        }
    }

    fn slice(&self, graph: &Graph, group: Group) -> Group {
        let along = |axis: Axis| Group {
            axis: Some(axis),
            chunks: 1,
            ..group.clone()
        };
        // Frames first: a pointwise group valid along both follows the frame-wise layers.
        let found = Axis::ALL
            .into_iter()
            .find_map(|axis| check_group(graph, &along(axis)).ok().map(|len| (axis, len)));
        match found {
            Some((axis, len)) => Group {
                chunks: self.chunks(axis).clamp(1, len),
                ..along(axis)
            },
            None => Group {
                axis: None,
                chunks: 1,
                ..group
            },
        }
    }
}

impl Pass for PaperSlicer {
    fn name(&self) -> &'static str {
        "paper-slicer"
    }

    fn run(&self, graph: Graph, plan: Plan) -> Result<(Graph, Plan)> {
        let groups = plan
            .groups
            .iter()
            .cloned()
            .map(|g| self.slice(&graph, g))
            .collect();
        Ok((
            graph,
            Plan {
                groups,
                kernels: plan.kernels,
            },
        ))
    }
}
