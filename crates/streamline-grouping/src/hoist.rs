//! Moving per-batch computations off the video path.

use streamline_ir::{AxisTag, Graph, Producer, Result};

fn whole(tag: AxisTag) -> bool {
    tag == AxisTag::Whole
}

/// The same graph with every node that computes only from whole values (per-batch
/// embeddings, their projections, constants) placed first, in their original order, followed
/// by the rest in theirs. Such nodes run once per step on tiny tensors; left in place, each
/// would split a run of sliced nodes in two.
pub fn hoist_whole(graph: &Graph) -> Result<Graph> {
    let mut is_whole = vec![false; graph.values().len()];
    for (i, v) in graph.values().iter().enumerate() {
        let layout = v.info.layout;
        let all_whole = whole(layout.frames) && whole(layout.positions);
        is_whole[i] = all_whole
            && match v.producer {
                Producer::Input(_) => true,
                Producer::Node(n) => {
                    let node = graph.node(n);
                    !node.op.is_reduction() && node.inputs.iter().all(|inp| is_whole[inp.0])
                }
            };
    }
    let (mut first, mut rest) = (Vec::new(), Vec::new());
    for (i, node) in graph.nodes().iter().enumerate() {
        if is_whole[node.output.0] {
            first.push(i);
        } else {
            rest.push(i);
        }
    }
    first.extend(rest);
    graph.reordered(&first)
}
