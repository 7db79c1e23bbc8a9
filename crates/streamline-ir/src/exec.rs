//! Running a plan: for real on a candle device, or dry on shapes alone.
//!
//! Both runs share one engine (`engine.rs`), so the planned peak is the measured peak of the
//! same schedule plus the op workspaces that only the ops themselves see.

use std::collections::HashMap;

use candle_core::{Device, Tensor};

use crate::engine::{Dry, Engine, Real, Schedule};
use crate::error::{IrError, Result};
use crate::graph::{Graph, ValueId};
use crate::ledger::RunStats;
use crate::plan::{check_group, Plan};
use crate::value::ValueInfo;

/// What a run should hand back besides the graph outputs, and what it can skip.
#[derive(Clone, Debug, Default)]
pub struct Request {
    /// Names of intermediate values to return (Step Rehash caches them).
    pub keep: Vec<String>,
    /// Values supplied for nodes: those nodes do not run, nor does anything only they needed.
    pub substitute: Vec<(String, Tensor)>,
}

#[derive(Debug)]
pub struct RunOutput {
    pub outputs: Vec<Tensor>,
    pub kept: HashMap<String, Tensor>,
    pub stats: RunStats,
}

/// Runs one plan of one graph. Construction validates the plan.
pub struct Executor<'a> {
    graph: &'a Graph,
    plan: &'a Plan,
    device: Device,
    axis_lens: Vec<usize>,
}

impl<'a> Executor<'a> {
    pub fn new(graph: &'a Graph, plan: &'a Plan, device: &Device) -> Result<Self> {
        if !plan.kernels.runs_on(device) {
            return Err(IrError::Plan(format!(
                "a plan for the {} kernels cannot run on {device:?}",
                plan.kernels
            )));
        }
        Executor::build(graph, plan, device)
    }

    fn build(graph: &'a Graph, plan: &'a Plan, device: &Device) -> Result<Self> {
        plan.validate(graph)?;
        let axis_lens = plan
            .groups
            .iter()
            .map(|g| check_group(graph, g))
            .collect::<Result<_>>()?;
        Ok(Executor {
            graph,
            plan,
            device: device.clone(),
            axis_lens,
        })
    }

    /// Run on real tensors, `inputs` in graph-input order. The executor owns the inputs so it
    /// can free each one after its last use.
    pub fn run(&self, inputs: Vec<Tensor>, request: &Request) -> Result<RunOutput> {
        let graph = self.graph;
        if inputs.len() != graph.inputs().len() {
            return Err(IrError::Plan(format!(
                "the graph takes {} inputs, {} were given",
                graph.inputs().len(),
                inputs.len()
            )));
        }
        let mut initial = HashMap::new();
        let supplied = graph.inputs().iter().copied().zip(inputs);
        let substitutes = request
            .substitute
            .iter()
            .map(|(name, t)| Ok((graph.find(name)?, t.clone())))
            .collect::<Result<Vec<_>>>()?;
        for (id, t) in supplied.chain(substitutes) {
            let value = graph.value(id);
            if t.dims() != value.info.shape.dims() || t.dtype() != value.info.dtype {
                return Err(IrError::value(
                    &value.name,
                    format!(
                        "expected {:?} {:?}, got {:?} {:?}",
                        value.info.dtype,
                        value.info.shape.dims(),
                        t.dtype(),
                        t.dims()
                    ),
                ));
            }
            initial.insert(id, t.to_device(&self.device)?.contiguous()?);
        }
        let keep = self.ids(&request.keep)?;
        let supplied: Vec<ValueId> = initial.keys().copied().collect();
        let schedule = self.schedule(&keep, &supplied);
        let backend = Real {
            device: &self.device,
        };
        let (mut results, stats) = Engine::new(graph, backend, self.plan.kernels).run(
            self.plan,
            &self.axis_lens,
            &schedule,
            initial,
        )?;
        let mut take = |id: &ValueId| {
            results
                .get(id)
                .cloned()
                .ok_or_else(|| IrError::value(&graph.value(*id).name, "was not computed"))
        };
        let outputs = graph
            .outputs()
            .iter()
            .map(&mut take)
            .collect::<Result<_>>()?;
        let kept = keep
            .iter()
            .map(|id| Ok((graph.value(*id).name.clone(), take(id)?)))
            .collect::<Result<_>>()?;
        results.clear();
        Ok(RunOutput {
            outputs,
            kept,
            stats,
        })
    }

    /// The planned cost from shapes alone: no tensor is allocated. `substitute` names the
    /// values a real run would be given.
    pub fn dry_run(&self, keep: &[String], substitute: &[String]) -> Result<RunStats> {
        let mut supplied: Vec<ValueId> = self.graph.inputs().to_vec();
        supplied.extend(self.ids(substitute)?);
        let initial: HashMap<ValueId, ValueInfo> = supplied
            .iter()
            .map(|&id| (id, self.graph.info(id).clone()))
            .collect();
        let schedule = self.schedule(&self.ids(keep)?, &supplied);
        Engine::new(self.graph, Dry, self.plan.kernels)
            .run(self.plan, &self.axis_lens, &schedule, initial)
            .map(|(_, stats)| stats)
    }

    /// The planned cost of `plan` from shapes alone, without a device (planners and passes).
    pub fn plan_stats(graph: &Graph, plan: &Plan) -> Result<RunStats> {
        Executor::dry(graph, plan)?.dry_run(&[], &[])
    }

    /// An executor for dry runs alone: no device is needed, whatever the plan's kernels, so a
    /// plan for a GPU is made on a machine without one.
    pub fn dry(graph: &'a Graph, plan: &'a Plan) -> Result<Self> {
        Executor::build(graph, plan, &Device::Cpu)
    }

    /// Graph outputs and `keep` are pinned to the end of the run.
    fn schedule(&self, keep: &[ValueId], supplied: &[ValueId]) -> Schedule {
        let mut pinned = self.graph.outputs().to_vec();
        pinned.extend_from_slice(keep);
        Schedule::new(self.graph, self.plan, &pinned, supplied)
    }

    fn ids(&self, names: &[String]) -> Result<Vec<ValueId>> {
        names.iter().map(|n| self.graph.find(n)).collect()
    }
}
