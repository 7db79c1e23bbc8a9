//! The shape every optimization takes, and the pipeline that composes them.

use std::fmt;

use crate::error::{IrError, Result};
use crate::graph::Graph;
use crate::plan::Plan;

/// One optimization step, like one of tract's optimizer passes: a graph and a plan in, a
/// graph and a plan out. A pass never changes the numbers the plan computes beyond float
/// rounding; a pass that reorders the graph maps the plan onto the new order.
pub trait Pass: fmt::Debug + Send + Sync {
    /// Short name, used in errors and dumps (e.g. `paper-slicer`).
    fn name(&self) -> &'static str;
    fn run(&self, graph: Graph, plan: Plan) -> Result<(Graph, Plan)>;
}

/// An ordered list of passes. It starts from the trivial plan (original inference) and
/// validates the plan after every pass, so an invalid plan is blamed on the pass that made
/// it; every error names its pass.
#[derive(Debug, Default)]
pub struct PassPipeline {
    passes: Vec<Box<dyn Pass>>,
}

impl PassPipeline {
    /// No passes: the trivial plan.
    pub fn new() -> Self {
        Self::default()
    }

    /// This pipeline with `pass` appended.
    pub fn then(mut self, pass: impl Pass + 'static) -> Self {
        self.passes.push(Box::new(pass));
        self
    }

    pub fn push(&mut self, pass: Box<dyn Pass>) {
        self.passes.push(pass);
    }

    /// The passes' names, in order.
    pub fn names(&self) -> Vec<&'static str> {
        self.passes.iter().map(|p| p.name()).collect()
    }

    /// Run every pass on `graph`, starting from [`Plan::trivial`].
    pub fn optimize(&self, graph: Graph) -> Result<(Graph, Plan)> {
        let plan = Plan::trivial(&graph);
        self.run(graph, plan)
    }
}

/// A pipeline is a pass too, so pipelines nest.
impl Pass for PassPipeline {
    fn name(&self) -> &'static str {
        "pipeline"
    }

    fn run(&self, graph: Graph, plan: Plan) -> Result<(Graph, Plan)> {
        plan.validate(&graph)?;
        let (mut graph, mut plan) = (graph, plan);
        for pass in &self.passes {
            let blame = |error: IrError| IrError::Pass {
                pass: pass.name(),
                error: Box::new(error),
            };
            (graph, plan) = pass.run(graph, plan).map_err(blame)?;
            plan.validate(&graph).map_err(blame)?;
            tracing::debug!(pass = pass.name(), groups = plan.groups.len(), "pass done");
        }
        Ok((graph, plan))
    }
}
