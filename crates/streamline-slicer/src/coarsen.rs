//! Fewer slices wherever more would not lower the plan's peak.

use streamline_ir::{Graph, Group, Pass, Plan, PlanCost, Result};

/// Cuts every sliced group back to the fewest slices (1, 2, 4, ... below its count) whose
/// planned peak stays within the whole plan's planned peak.
///
/// A plan's peak is set by its largest groups, those at full resolution. A fixed chunk count
/// slices every other group just as finely, where the slices lower nothing the plan keeps:
/// a group at a quarter of the resolution peaks far below the plan even whole. Each of its
/// slices still costs every op a call, a thread hand-off and a smaller, less efficient
/// product, and at the lowest resolutions a slice is a few dozen rows. What is alive between
/// groups does not depend on how a group is sliced, so each group is costed alone and the
/// plan's peak cannot rise.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Coarsen;

impl Pass for Coarsen {
    fn name(&self) -> &'static str {
        "coarsen"
    }

    fn run(&self, graph: Graph, plan: Plan) -> Result<(Graph, Plan)> {
        let plan = coarsen(&graph, plan)?;
        Ok((graph, plan))
    }
}

/// [`Coarsen`] on `plan`.
pub fn coarsen(graph: &Graph, plan: Plan) -> Result<Plan> {
    let mut cost = PlanCost::new(graph, plan)?;
    let ceiling = cost.peak();
    for gi in 0..cost.plan().groups.len() {
        let group = cost.plan().groups[gi].clone();
        if group.axis.is_none() {
            continue;
        }
        let mut chunks = 1;
        while chunks < group.chunks {
            let trial = cost.trial(
                gi,
                Group {
                    chunks,
                    ..group.clone()
                },
            )?;
            if trial.peak <= ceiling {
                cost.accept(trial);
                break;
            }
            chunks *= 2;
        }
    }
    Ok(cost.into_plan())
}
