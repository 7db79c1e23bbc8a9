//! Budget mode: the least slicing whose planned activation peak fits a byte budget.

use streamline_ir::{check_group, Executor, Graph, Group, IrError, Plan};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum BudgetError {
    #[error(
        "a memory budget of {} cannot be met: the smallest feasible peak of activations is {} ({budget} < {smallest} bytes)",
        human(*budget),
        human(*smallest)
    )]
    Infeasible { budget: usize, smallest: usize },
    #[error(transparent)]
    Ir(#[from] IrError),
}

/// Bytes as `1.50 GiB` / `320.0 MiB` for messages.
pub fn human(bytes: usize) -> String {
    const GIB: f64 = (1u64 << 30) as f64;
    const MIB: f64 = (1u64 << 20) as f64;
    let b = bytes as f64;
    if b >= GIB {
        format!("{:.2} GiB", b / GIB)
    } else {
        format!("{:.1} MiB", b / MIB)
    }
}

/// The next, more frugal setting of one group: twice the slices (up to one per index of the
/// axis), then half the op workspace limit, starting from half the group's `peak`. `None`
/// once both are exhausted.
fn tighten(graph: &Graph, group: &Group, peak: usize) -> Result<Option<Group>, IrError> {
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
/// When the highest group cannot be lowered any further, its peak is the smallest feasible one
/// and the error states it.
pub fn fit_budget(graph: &Graph, plan: Plan, budget: usize) -> Result<Plan, BudgetError> {
    let mut plan = plan;
    let mut stats = Executor::plan_stats(graph, &plan)?;
    // Groups that no further step can lower.
    let mut settled = vec![false; plan.groups.len()];
    while stats.peak_bytes > budget {
        let worst = stats
            .group_peaks
            .iter()
            .enumerate()
            .filter(|(g, _)| !settled[*g])
            .max_by_key(|(_, p)| **p)
            .map(|(g, p)| (g, *p));
        let Some((gi, group_peak)) = worst.filter(|(_, p)| *p >= stats.peak_bytes) else {
            return Err(BudgetError::Infeasible {
                budget,
                smallest: stats.peak_bytes,
            });
        };
        let mut candidate = plan.clone();
        let mut improved = false;
        while let Some(next) = tighten(graph, &candidate.groups[gi], group_peak)? {
            candidate.groups[gi] = next;
            let trial = Executor::plan_stats(graph, &candidate)?;
            if trial.group_peaks[gi] < group_peak {
                tracing::debug!(group = gi, chunks = candidate.groups[gi].chunks, limit = ?candidate.groups[gi].workspace_limit, peak = trial.peak_bytes, "budget step");
                plan = candidate;
                stats = trial;
                improved = true;
                break;
            }
        }
        if !improved {
            settled[gi] = true;
        }
    }
    Ok(plan)
}
