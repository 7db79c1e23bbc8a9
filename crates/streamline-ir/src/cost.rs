//! Costing one group at a time, for passes that search over chunk counts and tilings.
//!
//! What is alive between groups depends only on where groups begin and end, never on how a
//! group is sliced or tiled. So once a plan's groups are fixed, the planned peak of one group
//! can be re-costed alone, from the bytes alive when it begins: a budget search re-costs the
//! group it changed instead of dry-running the whole graph at every step.

use std::collections::HashMap;

use crate::engine::{Dry, Engine, Schedule};
use crate::error::{IrError, Result};
use crate::graph::{Graph, ValueId};
use crate::plan::{check_group, Group, Plan};
use crate::value::ValueInfo;

/// The planned peaks of a plan's groups, kept up to date as single groups change.
pub struct PlanCost<'g> {
    graph: &'g Graph,
    plan: Plan,
    schedule: Schedule,
    /// Live bytes when each group begins.
    entries: Vec<usize>,
    /// Planned peak while each group runs (0 for groups none of whose nodes run).
    peaks: Vec<usize>,
    /// Bytes of the graph inputs, alive before any group runs.
    inputs: usize,
}

/// A candidate setting of one group, costed but not yet taken.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Trial {
    pub group: usize,
    pub setting: Group,
    /// The group's planned peak under `setting`.
    pub peak: usize,
}

impl<'g> PlanCost<'g> {
    /// Cost `plan` with one dry run of the whole graph.
    pub fn new(graph: &'g Graph, plan: Plan) -> Result<Self> {
        plan.validate(graph)?;
        let axis_lens = plan
            .groups
            .iter()
            .map(|g| check_group(graph, g))
            .collect::<Result<Vec<_>>>()?;
        let schedule = Schedule::new(graph, &plan, graph.outputs(), graph.inputs());
        let initial: HashMap<ValueId, ValueInfo> = graph
            .inputs()
            .iter()
            .map(|&id| (id, graph.info(id).clone()))
            .collect();
        let (_, stats) =
            Engine::new(graph, Dry, plan.kernels).run(&plan, &axis_lens, &schedule, initial)?;
        let n = plan.groups.len();
        let (mut peaks, mut entries) = (stats.group_peaks, stats.group_entries);
        peaks.resize(n, 0);
        entries.resize(n, 0);
        let inputs = schedule
            .given
            .iter()
            .map(|&id| graph.info(id).bytes())
            .sum();
        Ok(PlanCost {
            graph,
            plan,
            schedule,
            entries,
            peaks,
            inputs,
        })
    }

    /// The planned peak of the whole plan, as [`crate::Executor::plan_stats`] reports it.
    pub fn peak(&self) -> usize {
        self.peaks.iter().copied().fold(self.inputs, usize::max)
    }

    pub fn group_peaks(&self) -> &[usize] {
        &self.peaks
    }

    /// Bytes alive when group `gi` begins: its floor, whatever its setting.
    pub fn entry(&self, gi: usize) -> usize {
        self.entries[gi]
    }

    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    pub fn into_plan(self) -> Plan {
        self.plan
    }

    /// Cost group `gi` under `setting` (the same nodes, any axis, chunks and workspace
    /// limit), every other group unchanged.
    pub fn trial(&self, gi: usize, setting: Group) -> Result<Trial> {
        let graph = self.graph;
        if setting.nodes != self.plan.groups[gi].nodes {
            return Err(IrError::Plan(format!(
                "a trial of group {gi} covers nodes {:?}, but the group covers {:?}",
                setting.nodes, self.plan.groups[gi].nodes
            )));
        }
        let len = check_group(graph, &setting)?;
        let nodes = self.schedule.nodes(&setting);
        let peak = if nodes.is_empty() {
            0
        } else {
            // Only the values the group reads from before it need standing in for.
            let mut live: HashMap<ValueId, ValueInfo> = HashMap::new();
            for &n in &nodes {
                for &inp in &graph.node(n).inputs {
                    if !graph
                        .producer_node(inp)
                        .is_some_and(|p| setting.nodes.contains(&p))
                    {
                        live.insert(inp, graph.info(inp).clone());
                    }
                }
            }
            let mut engine = Engine::new(graph, Dry, self.plan.kernels);
            engine.ledger.alloc(self.entries[gi]);
            engine.run_group(gi, &setting, len, &nodes, &self.schedule, &mut live)?;
            engine.ledger.peak()
        };
        Ok(Trial {
            group: gi,
            setting,
            peak,
        })
    }

    /// The plan with groups `first..=last` merged into one group under `setting` (their
    /// nodes, any axis, chunks and limit), costed without a dry run of the whole graph: what
    /// is alive when the merged group begins, and when each later group begins, is what was
    /// alive then before the merge, so only the merged group runs dry. Returns the costed
    /// plan and the merged group's planned peak.
    pub fn merged(
        &self,
        (first, last): (usize, usize),
        setting: Group,
    ) -> Result<(PlanCost<'g>, usize)> {
        let groups = &self.plan.groups;
        let nodes = groups[first].nodes.start..groups[last].nodes.end;
        if setting.nodes != nodes {
            return Err(IrError::Plan(format!(
                "a merge of groups {first}..={last} covers nodes {:?}, not {nodes:?}",
                setting.nodes
            )));
        }
        let mut plan = self.plan.clone();
        plan.groups.splice(first..=last, [setting.clone()]);
        let schedule = Schedule::new(self.graph, &plan, self.graph.outputs(), self.graph.inputs());
        let splice = |v: &[usize], at: usize| {
            let mut v = v.to_vec();
            v.splice(first..=last, [at]);
            v
        };
        // A group none of whose nodes run was never entered, so its entry reads 0: what is
        // alive when the merge begins is the entry of its first group that runs.
        let entry = (first..=last)
            .find(|&g| !self.schedule.nodes(&groups[g]).is_empty())
            .map_or(0, |g| self.entries[g]);
        let mut cost = PlanCost {
            graph: self.graph,
            entries: splice(&self.entries, entry),
            peaks: splice(&self.peaks, 0),
            schedule,
            inputs: self.inputs,
            plan,
        };
        let trial = cost.trial(first, setting)?;
        let peak = trial.peak;
        cost.accept(trial);
        Ok((cost, peak))
    }

    /// Take a costed setting into the plan.
    pub fn accept(&mut self, trial: Trial) {
        self.peaks[trial.group] = trial.peak;
        self.plan.groups[trial.group] = trial.setting;
    }
}
