//! The paper's fixed chunk counts.

use streamline_ir::{check_group, Axis, Graph, Group, Pass, Plan, Result};

/// Frame-wise nodes in `temporal_chunks` slices of the frames, position-wise nodes in
/// `spatial_chunks` slices of the positions (each capped at the axis length). Nodes that can
/// run sliced along neither axis (per-batch embeddings) stay whole.
///
/// Takes a plan of single-node groups (e.g. `Plan::trivial`) and returns one of the same
/// shape; `streamline-grouping` merges the runs afterwards.
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
        }
    }
}

/// The axis a single node can be sliced along, with that axis' length; frames first.
pub(crate) fn node_axis(graph: &Graph, node: usize) -> Option<(Axis, usize)> {
    Axis::ALL.into_iter().find_map(|axis| {
        check_group(graph, &Group::sliced(node..node + 1, axis, 1))
            .ok()
            .map(|len| (axis, len))
    })
}

impl Pass for PaperSlicer {
    fn name(&self) -> &'static str {
        "paper-slicer"
    }

    fn run(&self, graph: &Graph, _plan: Plan) -> Result<Plan> {
        let groups = (0..graph.nodes().len())
            .map(|i| match node_axis(graph, i) {
                Some((axis, len)) => Group::sliced(i..i + 1, axis, self.chunks(axis).clamp(1, len)),
                None => Group::whole(i..i + 1),
            })
            .collect();
        Ok(Plan { groups })
    }
}
