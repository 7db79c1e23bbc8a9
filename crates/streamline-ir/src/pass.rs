//! The shape every optimization takes.

use crate::error::Result;
use crate::graph::Graph;
use crate::plan::Plan;

/// One optimization step over a plan, like tract's optimizer passes: a graph and a plan in, a
/// plan out. A pass never changes the numbers a plan computes beyond float rounding; the
/// executor validates whatever it emits.
pub trait Pass {
    fn name(&self) -> &'static str;
    fn run(&self, graph: &Graph, plan: Plan) -> Result<Plan>;
}
