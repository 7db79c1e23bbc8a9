//! Budget mode: the least slicing whose planned activation peak fits a byte budget.

use streamline_ir::{
    check_group, Axis, Executor, Graph, Group, Infeasible, IrError, Pass, Plan, PlanCost, Result,
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
/// When the highest group cannot be lowered along its own axis (a frame-wise layer needs
/// whole frames, a temporal one every frame of a position, and the values between groups are
/// whole), it and its neighbours become one group on bands of rows ([`rows_around`]), which
/// holds no full-size value between them, and the walk goes on from that plan.
///
/// Each step re-costs only the group it changes ([`PlanCost`]). When the walk for the budget
/// gets stuck, the walk for no budget at all (which merges row groups as far as they go)
/// gives the smallest feasible peak: its plan when that fits after all, else the error
/// ([`IrError::Infeasible`]), which so states the same smallest peak and the group that sets
/// it whatever budget was asked.
pub fn fit_budget(graph: &Graph, plan: Plan, budget: usize) -> Result<Plan> {
    if let Ok(plan) = descend(graph, plan.clone(), budget)? {
        return Ok(plan);
    }
    // A walk for a budget stops merging row groups once they fit it; the walk for no budget
    // at all merges to the end and reaches the one floor that every refusal states.
    let floor = match descend(graph, plan, 0)? {
        Ok(plan) => return Ok(plan),
        Err(floor) => floor,
    };
    if floor.peak() <= budget {
        return Ok(floor.into_plan());
    }
    Err(infeasible(graph, &floor, budget))
}

/// The walk towards `budget`: the fitted plan, or the costed plan where it got stuck.
fn descend<'g>(
    graph: &'g Graph,
    plan: Plan,
    budget: usize,
) -> Result<std::result::Result<Plan, PlanCost<'g>>> {
    let mut cost = PlanCost::new(graph, plan)?;
    while let Some(gi) = walk(graph, &mut cost, budget)? {
        // Taken when it lowers the stuck group and nothing else rises: each time a group
        // turns to rows or groups merge, so the walk ends.
        let stuck = cost.group_peaks()[gi];
        match rows_around(graph, &cost, gi, budget)? {
            Some((next, peak)) if peak < stuck && next.peak() <= cost.peak() => cost = next,
            _ => return split_for_rows(graph, cost, gi, budget),
        }
    }
    Ok(Ok(cost.into_plan()))
}

/// The walk on from stuck group `gi` split into its runs of nodes that can run on rows and
/// the nodes between them (spatial attention): a frame-wise group that holds both, as a
/// whole VAE decoder does, cannot run on rows as one, but its convolutions at full
/// resolution can, each run with whole values between it and the attention (at the lowest
/// resolution, the smallest values of the group). Each piece starts on the group's axis
/// and slices, and the walk turns the pieces at the peak to rows. Taken when the walk from
/// there ends lower; else `cost` stays the stuck plan. The pieces cannot split again, so
/// this recursion ends.
fn split_for_rows<'g>(
    graph: &'g Graph,
    cost: PlanCost<'g>,
    gi: usize,
    budget: usize,
) -> Result<std::result::Result<Plan, PlanCost<'g>>> {
    let Some(pieces) = row_pieces(graph, &cost.plan().groups[gi]) else {
        return Ok(Err(cost));
    };
    let mut split = cost.plan().clone();
    split.groups.splice(gi..=gi, pieces);
    match descend(graph, split, budget)? {
        Ok(plan) => Ok(Ok(plan)),
        Err(floor) if floor.peak() < cost.peak() => Ok(Err(floor)),
        Err(_) => Ok(Err(cost)),
    }
}

/// `group` cut into maximal runs of nodes that run on rows together and runs of nodes that
/// do not, each on the group's axis with its slices (no more than its own axis length);
/// `None` when the group is one such run already or a piece is not a valid group.
fn row_pieces(graph: &Graph, group: &Group) -> Option<Vec<Group>> {
    let on_rows = |nodes: std::ops::Range<usize>| {
        check_group(graph, &Group::sliced(nodes, Axis::Rows, 1)).is_ok()
    };
    let mut runs: Vec<std::ops::Range<usize>> = Vec::new();
    let mut start = group.nodes.start;
    while start < group.nodes.end {
        let rows = on_rows(start..start + 1);
        let mut end = start + 1;
        while end < group.nodes.end
            && on_rows(end..end + 1) == rows
            && (!rows || on_rows(start..end + 1))
        {
            end += 1;
        }
        runs.push(start..end);
        start = end;
    }
    if runs.len() < 2 {
        return None;
    }
    runs.into_iter()
        .map(|nodes| {
            let piece = Group {
                nodes,
                ..group.clone()
            };
            let len = check_group(graph, &piece).ok()?;
            Some(Group {
                chunks: piece.chunks.min(len.max(1)),
                ..piece
            })
        })
        .collect()
}

/// The walk of [`fit_budget`] along the groups' own axes; `Some(group)`: the group at the
/// peak, which no step lowers, while the plan is above `budget`.
fn walk(graph: &Graph, cost: &mut PlanCost, budget: usize) -> Result<Option<usize>> {
    let n = cost.plan().groups.len();
    // Groups that no further step can lower.
    let mut settled = vec![false; n];
    while cost.peak() > budget {
        let peak = cost.peak();
        let peaks = cost.group_peaks();
        let worst = (0..n).filter(|&g| !settled[g]).max_by_key(|&g| peaks[g]);
        let Some(gi) = worst.filter(|&g| peaks[g] >= peak) else {
            let top = (0..n).max_by_key(|&g| peaks[g]).unwrap_or(0);
            return Ok(Some(top));
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
    Ok(None)
}

/// Group `gi` as a group on bands of rows, merged with as few neighbours as it takes: one
/// group at a time, on the side whose merge plans the lower peak, until the merged group's
/// planned peak fits `budget` or no neighbour can join (each merge removes the whole values
/// between the groups, and each reduction inside adds a pass over the bands, so the group
/// grows no more than the budget needs); then the fewest bands that fit ([`refine`]).
/// `None` when group `gi` cannot run on rows; else the plan and the row group's peak.
fn rows_around<'g>(
    graph: &'g Graph,
    cost: &PlanCost<'g>,
    gi: usize,
    budget: usize,
) -> Result<Option<(PlanCost<'g>, usize)>> {
    let Some(mut best) = row_window(graph, cost, (gi, gi))? else {
        return Ok(None);
    };
    let (mut s, mut e) = (gi, gi);
    // The window grown so far, and the lowest of the windows on its way: a window that fits
    // is the answer; with none fitting, the lowest is (more merged is not always lower).
    let mut lowest: Option<((PlanCost<'g>, usize), usize)> = None;
    while best.1 > budget {
        let left = match s {
            0 => None,
            _ => row_window(graph, cost, (s - 1, e))?,
        };
        let right = row_window(graph, cost, (s, e + 1))?;
        let (next, window) = match (left, right) {
            (Some(l), Some(r)) if r.1 < l.1 => (r, (s, e + 1)),
            (Some(l), _) => (l, (s - 1, e)),
            (None, Some(r)) => (r, (s, e + 1)),
            (None, None) => break,
        };
        if lowest.as_ref().is_none_or(|(l, _)| best.1 < l.1) {
            lowest = Some((best, s));
        }
        (s, e) = window;
        best = next;
    }
    let (best, s) = match lowest {
        Some((l, ls)) if best.1 > budget && l.1 < best.1 => (l, ls),
        _ => (best, s),
    };
    refine(graph, best.0, s, budget).map(Some)
}

/// Groups `s..=e` of `cost`'s plan as one group on bands of rows, costed at as many bands
/// as its shortest value has rows (re-costing that group alone), with the group's planned
/// peak. `None` when the nodes cannot run on rows together.
fn row_window<'g>(
    graph: &'g Graph,
    cost: &PlanCost<'g>,
    (s, e): (usize, usize),
) -> Result<Option<(PlanCost<'g>, usize)>> {
    let plan = cost.plan();
    let Some(last) = plan.groups.get(e) else {
        return Ok(None);
    };
    let nodes = plan.groups[s].nodes.start..last.nodes.end;
    let group = Group::sliced(nodes, Axis::Rows, 1);
    let Ok(len) = check_group(graph, &group) else {
        return Ok(None);
    };
    let (counts, probe) = band_counts(graph, &group, len);
    let chunks = counts.get(probe).copied().unwrap_or(1);
    cost.merged((s, e), Group { chunks, ..group }).map(Some)
}

/// Row group `s` of `cost` at the fewest bands (of [`band_counts`]) that fit `budget`,
/// found by bisection below the probed count; when even that does not fit, more bands while
/// they lower the peak. Returns the plan and the group's peak.
fn refine<'g>(
    graph: &'g Graph,
    mut cost: PlanCost<'g>,
    s: usize,
    budget: usize,
) -> Result<(PlanCost<'g>, usize)> {
    let group = cost.plan().groups[s].clone();
    let len = check_group(graph, &group)?;
    let (counts, probe) = band_counts(graph, &group, len);
    let with = |chunks: usize| Group {
        chunks,
        ..group.clone()
    };
    let mut best = cost.trial(s, group.clone())?;
    if best.peak <= budget {
        // The probe fits: the fewest bands that still do.
        let (mut lo, mut hi) = (0, probe);
        while lo < hi {
            let mid = (lo + hi) / 2;
            let trial = cost.trial(s, with(counts[mid]))?;
            if trial.peak <= budget {
                (hi, best) = (mid, trial);
            } else {
                lo = mid + 1;
            }
        }
    } else {
        // More bands until one fits or stops lowering the peak (their halos then cost more
        // than the thinner bands save).
        for &chunks in counts.iter().skip(probe + 1) {
            let trial = cost.trial(s, with(chunks))?;
            if trial.peak >= best.peak {
                break;
            }
            best = trial;
            if best.peak <= budget {
                break;
            }
        }
    }
    let peak = best.peak;
    cost.accept(best);
    Ok((cost, peak))
}

/// The band counts a row group tries, fewest first, and which of them to probe first: the
/// divisors of its shortest value's rows (the probe: that many bands, one row each of it),
/// then multiples up to its longest's (`len`). With such counts the bands of every value in
/// the group are equal but near the image edges, so a dry run costs a few bands per pass
/// for all of them, and planning stays quick.
fn band_counts(graph: &Graph, group: &Group, len: usize) -> (Vec<usize>, usize) {
    let shortest = group
        .nodes
        .clone()
        .filter_map(|n| graph.info(graph.node(n).output).axis_len(Axis::Rows))
        .min()
        .unwrap_or(len);
    let mut counts: Vec<usize> = (2..=shortest).filter(|d| shortest % d == 0).collect();
    let probe = counts.len().saturating_sub(1);
    let mut more = 2 * shortest;
    while more <= len {
        counts.push(more);
        more *= 2;
    }
    (counts, probe)
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
