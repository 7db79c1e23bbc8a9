//! Merging runs of sliced groups.

use streamline_ir::{check_group, Graph, Group, Pass, Plan, Result};

/// Merges consecutive groups with the same axis, chunk count and workspace limit into one, as
/// long as the merged group is valid; unsliced groups merge with nothing.
#[derive(Clone, Copy, Debug, Default)]
pub struct OperatorGrouping;

impl Pass for OperatorGrouping {
    fn name(&self) -> &'static str {
        "operator-grouping"
    }

    fn run(&self, graph: Graph, plan: Plan) -> Result<(Graph, Plan)> {
        let mut groups: Vec<Group> = Vec::with_capacity(plan.groups.len());
        for next in plan.groups.iter().cloned() {
            if let Some(current) = groups.last_mut() {
                let joinable = current.axis.is_some()
                    && current.axis == next.axis
                    && current.chunks == next.chunks
                    && current.workspace_limit == next.workspace_limit;
                let merged = Group {
                    nodes: current.nodes.start..next.nodes.end,
                    ..current.clone()
                };
                if joinable && check_group(&graph, &merged).is_ok() {
                    *current = merged;
                    continue;
                }
            }
            groups.push(next);
        }
        Ok((
            graph,
            Plan {
                groups,
                kernels: plan.kernels,
            },
        ))
    }
}
