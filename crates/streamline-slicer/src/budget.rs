//! Budget mode: the least slicing whose planned activation peak fits a byte budget.

use streamline_ir::{
    check_group, Executor, Graph, Group, Infeasible, IrError, Pass, Plan, PlanCost, Result,
};

/// Fits a plan to `bytes` of planned activation peak (see [`fit_budget`]). When the trivial
/// plan (original inference, no slicing at all) already fits, that is the answer: the least
/// slicing, and unsliced groups can plan a higher peak than single nodes, since a group's
/// inputs live until it ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FitBudget {
    pub bytes: usize,
}

impl Pass for FitBudget {
    fn name(&self) -> &'static str {
        "fit-budget"
    }

    fn run(&self, graph: Graph, plan: Plan) -> Result<(Graph, Plan)> {
        let trivial = Plan::trivial(&graph).with_kernels(plan.kernels);
        if Executor::plan_stats(&graph, &trivial)?.peak_bytes <= self.bytes {
            return Ok((graph, trivial));
        }
        let plan = fit_budget(&graph, plan, self.bytes)?;
        Ok((graph, plan))
    }
}

/// The next, more frugal setting of one group: twice the slices (up to one per index of the
/// axis), then half the op workspace limit, starting from half the group's `peak`. `None`
/// once both are exhausted.
fn tighten(graph: &Graph, group: &Group, peak: usize) -> Result<Option<Group>> {
    let len = check_group(graph, group)?;
    let mut next = group.clone();
    if group.axis.is_some() && group.chunks < len {
        next.chunks = (2 * group.chunks).min(len);
        return Ok(Some(next));
    }
    next.workspace_limit = match group.workspace_limit {
        None => Some(peak / 2),
        Some(0) => return Ok(None),
        Some(limit) => Some(limit / 2),
    };
    Ok(Some(next))
}

/// Tighten, one step at a time, the group whose planned peak is highest, keeping a step only
/// when it lowers that group's peak, until the whole plan's planned peak of activations is
/// within `budget` bytes. `plan` fixes the groups and their axes (slicer + grouping output);
/// its chunk counts are the starting points, so the result slices no more than needed.
///
/// Each step re-costs only the group it changes ([`PlanCost`]). The walk never looks at the
/// budget except to stop, so it is the same walk for every budget: when the highest group
/// cannot be lowered any further, the error ([`IrError::Infeasible`]) states the same smallest
/// feasible peak and the group that sets it whatever budget was asked.
pub fn fit_budget(graph: &Graph, plan: Plan, budget: usize) -> Result<Plan> {
    let mut cost = PlanCost::new(graph, plan)?;
    let n = cost.plan().groups.len();
    // Groups that no further step can lower.
    let mut settled = vec![false; n];
    while cost.peak() > budget {
        let peak = cost.peak();
        let peaks = cost.group_peaks();
        let worst = (0..n).filter(|&g| !settled[g]).max_by_key(|&g| peaks[g]);
        let Some(gi) = worst.filter(|&g| peaks[g] >= peak) else {
            return Err(infeasible(graph, &cost, budget));
        };
        let group_peak = peaks[gi];
        let mut setting = cost.plan().groups[gi].clone();
        let mut improved = false;
        while let Some(next) = tighten(graph, &setting, group_peak)? {
            let trial = cost.trial(gi, next.clone())?;
            if trial.peak < group_peak {
                tracing::debug!(group = gi, chunks = next.chunks, limit = ?next.workspace_limit, peak = trial.peak, "budget step");
                cost.accept(trial);
                improved = true;
                break;
            }
            setting = next;
        }
        settled[gi] = !improved;
    }
    Ok(cost.into_plan())
}

/// The refusal: the group at the plan's peak, which no step lowers.
fn infeasible(graph: &Graph, cost: &PlanCost, budget: usize) -> IrError {
    let peaks = cost.group_peaks();
    let gi = (0..peaks.len()).max_by_key(|&g| peaks[g]).unwrap_or(0);
    let nodes = &cost.plan().groups[gi].nodes;
    IrError::Infeasible(Box::new(Infeasible {
        budget,
        smallest: cost.peak(),
        group: gi,
        first: graph.node(nodes.start).name.clone(),
        last: graph.node(nodes.end - 1).name.clone(),
        held: cost.entry(gi),
    }))
}
