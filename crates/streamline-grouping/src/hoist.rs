//! Moving per-batch computations off the video path.

use streamline_ir::{AxisTag, Graph, Group, IrError, Pass, Plan, Producer, Result};

/// Places every node that computes only from whole values (per-batch embeddings, their
/// projections, constants) first, in their original order, followed by the rest in theirs.
/// Such nodes run once per step on tiny tensors; left in place, each would split a run of
/// sliced nodes in two. Names, ops and outputs are unchanged.
///
/// Reordering moves nodes between groups, so it takes a plan of single-node groups (the
/// trivial plan, or a slicer's output on it) and moves each group with its node.
#[derive(Clone, Copy, Debug, Default)]
pub struct HoistWhole;

impl Pass for HoistWhole {
    fn name(&self) -> &'static str {
        "hoist-whole"
    }

    fn run(&self, graph: Graph, plan: Plan) -> Result<(Graph, Plan)> {
        if let Some((gi, g)) = plan
            .groups
            .iter()
            .enumerate()
            .find(|(_, g)| g.nodes.len() != 1)
        {
            return Err(IrError::Plan(format!(
                "group {gi} covers nodes {:?}: hoisting reorders nodes one by one, so it runs \
                 before any pass that forms groups of several nodes",
                g.nodes
            )));
        }
        let order = whole_first(&graph);
        let groups = order
            .iter()
            .enumerate()
            .map(|(i, &old)| Group {
                nodes: i..i + 1,
                ..plan.groups[old].clone()
            })
            .collect();
        Ok((
            graph.reordered(&order)?,
            Plan {
                groups,
                kernels: plan.kernels,
            },
        ))
    }
}

/// The node order with whole-only nodes first.
fn whole_first(graph: &Graph) -> Vec<usize> {
    let whole = |tag: AxisTag| tag == AxisTag::Whole;
    let mut is_whole = vec![false; graph.values().len()];
    for (i, v) in graph.values().iter().enumerate() {
        let layout = v.info.layout;
        is_whole[i] = whole(layout.frames)
            && whole(layout.positions)
            && match v.producer {
                Producer::Input(_) => true,
                Producer::Node(n) => {
                    let node = graph.node(n);
                    !node.op.is_reduction() && node.inputs.iter().all(|inp| is_whole[inp.0])
                }
            };
    }
    let (mut first, rest): (Vec<usize>, Vec<usize>) =
        (0..graph.nodes().len()).partition(|&i| is_whole[graph.node(i).output.0]);
    first.extend(rest);
    first
}
