//! The one engine behind real runs, dry runs and per-group costing.
//!
//! Real and dry runs walk the same schedule with the same ledger calls, so the planned peak is
//! the measured peak of the same schedule plus the op workspaces that only the ops see.

mod rows;

use std::collections::HashMap;
use std::ops::Range;

use candle_core::{Device, Tensor};

use crate::error::{IrError, Result};
use crate::graph::{Graph, Node, ValueId};
use crate::ledger::{Ledger, RunStats};
use crate::op::{Kernels, SliceCtx};
use crate::plan::{chunk_ranges, Group, Plan};
use crate::value::{Axis, AxisTag, ValueInfo};

/// What the engine needs from tensors: real ones, or shapes standing in for them.
pub(crate) trait Backend {
    type V: Clone;
    /// Shapes only: equal slices cost alike, so one of each kind stands for the rest.
    const DRY: bool;
    fn bytes(v: &Self::V) -> usize;
    /// A slice of `v`, and whether making it contiguous took a copy.
    fn narrow(&self, v: &Self::V, dim: usize, range: Range<usize>) -> Result<(Self::V, bool)>;
    fn forward(
        &self,
        node: &Node,
        expected: &ValueInfo,
        inputs: &[&Self::V],
        ctx: &SliceCtx,
    ) -> Result<Self::V>;
    /// A value of `info`'s shape whose contents are left unset: its writer covers it whole.
    fn alloc(&self, info: &ValueInfo) -> Result<Self::V>;
    fn write(&self, dst: &Self::V, src: &Self::V, dim: usize, offset: usize) -> Result<()>;
    fn merge(&self, node: &Node, acc: &Self::V, partial: &Self::V) -> Result<Self::V>;
    /// `parts` joined along `dim` into a new value.
    fn cat(&self, parts: &[Self::V], dim: usize) -> Result<Self::V>;
}

pub(crate) struct Real<'d> {
    pub device: &'d Device,
}

impl Backend for Real<'_> {
    type V = Tensor;
    const DRY: bool = false;

    fn bytes(v: &Tensor) -> usize {
        v.elem_count() * v.dtype().size_in_bytes()
    }

    fn narrow(&self, v: &Tensor, dim: usize, range: Range<usize>) -> Result<(Tensor, bool)> {
        let s = v.narrow(dim, range.start, range.len())?;
        if s.is_contiguous() {
            Ok((s, false))
        } else {
            Ok((s.contiguous()?, true))
        }
    }

    fn forward(
        &self,
        node: &Node,
        expected: &ValueInfo,
        inputs: &[&Tensor],
        ctx: &SliceCtx,
    ) -> Result<Tensor> {
        let out = node.op.forward(inputs, ctx).map_err(|e| match e {
            IrError::Tensor(error) => IrError::Candle {
                node: node.name.clone(),
                error,
            },
            other => other,
        })?;
        if out.dims() != expected.shape.dims() || out.dtype() != expected.dtype {
            return Err(IrError::node(
                &node.name,
                format!(
                    "{} returned {:?} {:?} where its shape function promised {:?} {:?}",
                    node.op.kind(),
                    out.dtype(),
                    out.dims(),
                    expected.dtype,
                    expected.shape.dims()
                ),
            ));
        }
        Ok(out.contiguous()?)
    }

    fn alloc(&self, info: &ValueInfo) -> Result<Tensor> {
        // SAFETY: `alloc` makes the full-size outputs of sliced groups and row plans, which
        // their slices (or bands) write in full before anything reads them. Zeroing them
        // first would be one more pass over every such output, on this thread alone.
        Ok(unsafe { Tensor::empty(info.shape.clone(), info.dtype, self.device)? })
    }

    fn write(&self, dst: &Tensor, src: &Tensor, dim: usize, offset: usize) -> Result<()> {
        Ok(dst.slice_set(src, dim, offset)?)
    }

    fn merge(&self, node: &Node, acc: &Tensor, partial: &Tensor) -> Result<Tensor> {
        let merged = node.op.merge(acc, partial)?;
        if merged.dims() != acc.dims() {
            return Err(IrError::node(
                &node.name,
                format!(
                    "merge changed the shape {:?} to {:?}",
                    acc.dims(),
                    merged.dims()
                ),
            ));
        }
        Ok(merged.contiguous()?)
    }

    fn cat(&self, parts: &[Tensor], dim: usize) -> Result<Tensor> {
        Ok(Tensor::cat(parts, dim)?)
    }
}

/// Shapes only: the planner's view of a run.
pub(crate) struct Dry;

impl Backend for Dry {
    type V = ValueInfo;
    const DRY: bool = true;

    fn bytes(v: &ValueInfo) -> usize {
        v.bytes()
    }

    fn narrow(&self, v: &ValueInfo, dim: usize, range: Range<usize>) -> Result<(ValueInfo, bool)> {
        let dims = v.shape.dims();
        let contiguous = range.len() == dims[dim] || dims[..dim].iter().all(|&d| d == 1);
        let mut out = dims.to_vec();
        out[dim] = range.len();
        Ok((ValueInfo::new(out, v.dtype, v.layout), !contiguous))
    }

    fn forward(
        &self,
        _: &Node,
        expected: &ValueInfo,
        _: &[&ValueInfo],
        _: &SliceCtx,
    ) -> Result<ValueInfo> {
        Ok(expected.clone())
    }

    fn alloc(&self, info: &ValueInfo) -> Result<ValueInfo> {
        Ok(info.clone())
    }

    fn write(&self, _: &ValueInfo, _: &ValueInfo, _: usize, _: usize) -> Result<()> {
        Ok(())
    }

    fn merge(&self, _: &Node, acc: &ValueInfo, _: &ValueInfo) -> Result<ValueInfo> {
        Ok(acc.clone())
    }

    fn cat(&self, parts: &[ValueInfo], dim: usize) -> Result<ValueInfo> {
        let mut dims = parts[0].shape.dims().to_vec();
        dims[dim] = parts.iter().map(|p| p.shape.dims()[dim]).sum();
        Ok(ValueInfo::new(dims, parts[0].dtype, parts[0].layout))
    }
}

/// Which nodes run and how long each value lives, for one plan and one request.
///
/// It depends on the plan's group boundaries only, never on chunk counts or workspace limits:
/// that is what lets [`crate::PlanCost`] re-cost one group alone.
pub(crate) struct Schedule {
    /// Whether each node runs (a node runs when something asked for needs its output).
    pub runs: Vec<bool>,
    /// The last group reading each value; `usize::MAX` for values kept to the end.
    pub last_use: Vec<Option<usize>>,
    /// Values the run must be given: graph inputs and substitutes that something needs.
    pub given: Vec<ValueId>,
}

impl Schedule {
    /// `pinned`: values returned at the end; `supplied`: values given rather than computed.
    pub fn new(graph: &Graph, plan: &Plan, pinned: &[ValueId], supplied: &[ValueId]) -> Self {
        let n_values = graph.values().len();
        let mut is_supplied = vec![false; n_values];
        for id in supplied {
            is_supplied[id.0] = true;
        }
        // Walk back from what is asked for; supplied values cut the walk.
        let mut demanded = vec![false; n_values];
        for id in pinned {
            demanded[id.0] = true;
        }
        let mut runs = vec![false; graph.nodes().len()];
        for (i, node) in graph.nodes().iter().enumerate().rev() {
            if demanded[node.output.0] && !is_supplied[node.output.0] {
                runs[i] = true;
                for inp in &node.inputs {
                    demanded[inp.0] = true;
                }
            }
        }
        let given = (0..n_values)
            .map(ValueId)
            .filter(|&id| demanded[id.0] && !graph.producer_node(id).is_some_and(|n| runs[n]))
            .collect();
        let mut last_use = vec![None; n_values];
        for (gi, group) in plan.groups.iter().enumerate() {
            for ni in group.nodes.clone().filter(|&n| runs[n]) {
                for inp in &graph.node(ni).inputs {
                    last_use[inp.0] = Some(gi);
                }
            }
        }
        for id in pinned {
            last_use[id.0] = Some(usize::MAX);
        }
        Schedule {
            runs,
            last_use,
            given,
        }
    }

    /// Whether `id` is still needed after group `gi`.
    pub fn outlives(&self, id: ValueId, gi: usize) -> bool {
        self.last_use[id.0].is_some_and(|last| last > gi)
    }

    /// The nodes of `group` that run.
    pub fn nodes(&self, group: &Group) -> Vec<usize> {
        group.nodes.clone().filter(|&n| self.runs[n]).collect()
    }
}

/// A slice of one group in flight: per-slice values and narrowed views of earlier values.
struct SliceState<V> {
    local: HashMap<ValueId, V>,
    /// Narrowed views of values made before the group, and whether each is a copy.
    narrowed: HashMap<ValueId, (V, bool)>,
}

pub(crate) struct Engine<'e, B: Backend> {
    graph: &'e Graph,
    backend: B,
    kernels: Kernels,
    /// Whether a dry run may cost one slice of each kind for all its equals.
    shortcut: bool,
    pub ledger: Ledger,
    pub stats: RunStats,
}

impl<'e, B: Backend> Engine<'e, B> {
    pub fn new(graph: &'e Graph, backend: B, kernels: Kernels) -> Self {
        Engine {
            graph,
            backend,
            kernels,
            shortcut: B::DRY,
            ledger: Ledger::default(),
            stats: RunStats::default(),
        }
    }

    /// Run every group of `plan` (`axis_lens`: each group's sliced-axis length) from the
    /// values in `initial`; returns what is live at the end.
    pub fn run(
        mut self,
        plan: &Plan,
        axis_lens: &[usize],
        schedule: &Schedule,
        mut initial: HashMap<ValueId, B::V>,
    ) -> Result<(HashMap<ValueId, B::V>, RunStats)> {
        let graph = self.graph;
        // Inputs nobody needs are dropped now; the rest move into `live` and are freed after
        // their last use.
        let mut live: HashMap<ValueId, B::V> = HashMap::new();
        for &id in &schedule.given {
            let v = initial.remove(&id).ok_or_else(|| {
                IrError::value(
                    &graph.value(id).name,
                    "is needed but was neither given nor computed",
                )
            })?;
            self.ledger.alloc(B::bytes(&v));
            live.insert(id, v);
        }
        drop(initial);
        for (gi, group) in plan.groups.iter().enumerate() {
            let nodes = schedule.nodes(group);
            if nodes.is_empty() {
                continue;
            }
            self.ledger.enter_group(gi);
            self.run_group(gi, group, axis_lens[gi], &nodes, schedule, &mut live)?;
            live.retain(|id, v| {
                let keep = schedule.outlives(*id, gi);
                if !keep {
                    self.ledger.free(B::bytes(v));
                }
                keep
            });
        }
        self.stats.peak_bytes = self.ledger.peak();
        self.stats.peak_group = self.ledger.peak_group();
        self.stats.group_peaks = self.ledger.group_peaks().to_vec();
        self.stats.group_entries = self.ledger.group_entries().to_vec();
        Ok((live, self.stats))
    }

    /// Run group `gi` (set to `group`, axis length `len`; `nodes` those of it that run),
    /// adding its outputs to `live`.
    pub fn run_group(
        &mut self,
        gi: usize,
        group: &Group,
        len: usize,
        nodes: &[usize],
        schedule: &Schedule,
        live: &mut HashMap<ValueId, B::V>,
    ) -> Result<()> {
        if group.axis == Some(Axis::Rows) {
            return self.run_rows(gi, group, len, nodes, schedule, live);
        }
        let graph = self.graph;
        let outputs: Vec<ValueId> = nodes
            .iter()
            .map(|&n| graph.node(n).output)
            .filter(|&id| schedule.outlives(id, gi))
            .collect();
        // Position (in `nodes`) of the last in-group reader of each value.
        let mut last_reader: HashMap<ValueId, usize> = HashMap::new();
        for (k, &n) in nodes.iter().enumerate() {
            for inp in &graph.node(n).inputs {
                last_reader.insert(*inp, k);
            }
        }
        let ranges = match group.axis {
            Some(_) if group.chunks > 1 => chunk_ranges(len, group.chunks),
            _ => std::iter::once(0..len).collect(),
        };
        let sliced = ranges.len() > 1;
        // Sliced groups write every slice into full-size outputs made up front.
        let mut full: HashMap<ValueId, B::V> = HashMap::new();
        if sliced {
            for &id in &outputs {
                let node = graph.node(graph.producer_node(id).expect("node output"));
                if !group.axis.is_some_and(|a| node.op.reduces(a)) {
                    let v = self.backend.alloc(graph.info(id))?;
                    self.ledger.alloc(B::bytes(&v));
                    full.insert(id, v);
                }
            }
        }
        let mut partials: HashMap<ValueId, B::V> = HashMap::new();
        // A dry run costs the first slice and the first later slice of each length; every
        // later slice of that length starts from the same ledger and costs the same.
        let mut costed: Vec<(usize, u64)> = Vec::new();
        for (k, range) in ranges.into_iter().enumerate() {
            if self.shortcut && k > 0 {
                if let Some(&(_, flops)) = costed.iter().find(|(l, _)| *l == range.len()) {
                    self.stats.flops = self.stats.flops.saturating_add(flops);
                    continue;
                }
            }
            let flops_before = self.stats.flops;
            let ctx = SliceCtx {
                workspace_limit: group.workspace_limit,
                kernels: self.kernels,
                ..match group.axis {
                    Some(axis) => SliceCtx {
                        axis: Some(axis),
                        range: range.clone(),
                        len,
                        ..SliceCtx::whole()
                    },
                    None => SliceCtx::whole(),
                }
            };
            let slice = Slice {
                ctx: &ctx,
                nodes,
                outputs: &outputs,
                last_reader: &last_reader,
                sliced,
            };
            self.run_slice(&slice, &full, &mut partials, live)?;
            if k > 0 {
                costed.push((range.len(), self.stats.flops - flops_before));
            }
        }
        live.extend(full);
        live.extend(partials);
        Ok(())
    }

    /// One slice of a group: every node in order, each value freed after its last reader.
    fn run_slice(
        &mut self,
        slice: &Slice,
        full: &HashMap<ValueId, B::V>,
        partials: &mut HashMap<ValueId, B::V>,
        live: &mut HashMap<ValueId, B::V>,
    ) -> Result<()> {
        let graph = self.graph;
        let ctx = slice.ctx;
        let mut state = SliceState {
            local: HashMap::new(),
            narrowed: HashMap::new(),
        };
        for (k, &n) in slice.nodes.iter().enumerate() {
            let node = graph.node(n);
            self.run_node(node, ctx, &mut state, live)?;
            let out = node.output;
            let value = state.local.remove(&out).expect("node output");
            let is_output = slice.outputs.contains(&out);
            if slice.sliced && ctx.axis.is_some_and(|a| node.op.reduces(a)) {
                self.fold_partial(node, partials, value)?;
            } else {
                if let (Some(dst), Some(axis)) = (full.get(&out), ctx.axis) {
                    let AxisTag::Dim(d) = graph.info(out).layout.tag(axis) else {
                        unreachable!("validated: sliced outputs have a dim on the axis")
                    };
                    self.backend.write(dst, &value, d, ctx.range.start)?;
                }
                let direct_output = is_output && !slice.sliced;
                if direct_output || slice.last_reader.get(&out).is_some_and(|&r| r > k) {
                    state.local.insert(out, value);
                } else {
                    self.ledger.free(B::bytes(&value));
                }
            }
            for inp in &node.inputs {
                if slice.last_reader.get(inp) != Some(&k) {
                    continue;
                }
                if let Some((v, copied)) = state.narrowed.remove(inp) {
                    if copied {
                        self.ledger.free(B::bytes(&v));
                    }
                }
                let direct_output = slice.outputs.contains(inp) && !slice.sliced;
                if !direct_output {
                    if let Some(v) = state.local.remove(inp) {
                        self.ledger.free(B::bytes(&v));
                    }
                }
            }
        }
        if !slice.sliced {
            for id in slice.outputs {
                if let Some(v) = state.local.remove(id) {
                    live.insert(*id, v);
                }
            }
        }
        Ok(())
    }

    fn fold_partial(
        &mut self,
        node: &Node,
        partials: &mut HashMap<ValueId, B::V>,
        partial: B::V,
    ) -> Result<()> {
        match partials.remove(&node.output) {
            None => {
                partials.insert(node.output, partial);
            }
            Some(acc) => {
                let merged = self.backend.merge(node, &acc, &partial)?;
                self.ledger.alloc(B::bytes(&merged));
                self.ledger.free(B::bytes(&acc));
                self.ledger.free(B::bytes(&partial));
                partials.insert(node.output, merged);
            }
        }
        Ok(())
    }

    /// Run one node on one slice; its output lands in `state.local`.
    fn run_node(
        &mut self,
        node: &Node,
        ctx: &SliceCtx,
        state: &mut SliceState<B::V>,
        live: &HashMap<ValueId, B::V>,
    ) -> Result<()> {
        let graph = self.graph;
        for &inp in &node.inputs {
            if state.local.contains_key(&inp) || state.narrowed.contains_key(&inp) {
                continue;
            }
            let v = live.get(&inp).ok_or_else(|| {
                IrError::node(
                    &node.name,
                    format!("input `{}` is not available", graph.value(inp).name),
                )
            })?;
            let slice = match (ctx.axis, ctx.axis.map(|a| graph.info(inp).layout.tag(a))) {
                (Some(_), Some(AxisTag::Dim(d))) => {
                    let (s, copied) = self.backend.narrow(v, d, ctx.range.clone())?;
                    if copied {
                        self.ledger.alloc(B::bytes(&s));
                    }
                    (s, copied)
                }
                _ => (v.clone(), false),
            };
            state.narrowed.insert(inp, slice);
        }
        let slice_info = |id: ValueId| -> ValueInfo {
            let info = graph.info(id);
            match ctx.axis {
                Some(axis) => info.sliced(axis, ctx.range.len()),
                None => info.clone(),
            }
        };
        let in_infos: Vec<ValueInfo> = node.inputs.iter().map(|&v| slice_info(v)).collect();
        let expected = if ctx.axis.is_some_and(|a| node.op.reduces(a)) {
            graph.info(node.output).clone()
        } else {
            slice_info(node.output)
        };
        let in_refs: Vec<&ValueInfo> = in_infos.iter().collect();
        self.stats.flops = self
            .stats
            .flops
            .saturating_add(node.op.flops(&in_refs, &expected));
        self.stats.nodes_run += usize::from(ctx.range.start == 0);
        let inputs: Vec<&B::V> = node
            .inputs
            .iter()
            .map(|inp| match state.local.get(inp) {
                Some(v) => v,
                None => &state.narrowed[inp].0,
            })
            .collect();
        let out = self.backend.forward(node, &expected, &inputs, ctx)?;
        self.ledger.alloc(B::bytes(&out));
        if B::DRY {
            let workspace = node
                .op
                .workspace_bytes(&in_refs, &expected, ctx.workspace());
            self.ledger.transient(workspace);
        }
        state.local.insert(node.output, out);
        Ok(())
    }
}

/// What every node of one slice shares.
struct Slice<'s> {
    ctx: &'s SliceCtx,
    nodes: &'s [usize],
    /// Values of the group read after it.
    outputs: &'s [ValueId],
    last_reader: &'s HashMap<ValueId, usize>,
    sliced: bool,
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::testing::{dims, random_graph, random_plan, steps};

    impl<B: Backend> Engine<'_, B> {
        fn every_slice(mut self) -> Self {
            self.shortcut = false;
            self
        }
    }

    proptest! {
        /// Costing one slice of each kind is exact: the same peaks and FLOPs as visiting
        /// every slice.
        #[test]
        fn equal_slices_cost_alike(
            d in dims(),
            steps in steps(14),
            choices in prop::collection::vec(any::<u32>(), 1..48),
        ) {
            let g = random_graph(d, &steps);
            let plan = random_plan(&g, &choices);
            prop_assert_eq!(dry_costs(&g, &plan, false), dry_costs(&g, &plan, true));
        }

        /// The same along the rows: bands of one shape cost alike, in every pass.
        #[test]
        fn equal_bands_cost_alike(
            h in 1usize..12,
            steps in steps(12),
            choices in prop::collection::vec(any::<u32>(), 1..48),
        ) {
            let d = crate::testing::rows::RowDims { b: 2, t: 2, c: 1, h, w: 2 };
            let g = crate::testing::rows::random_row_graph(d, &steps);
            let plan = random_plan(&g, &choices);
            prop_assert_eq!(dry_costs(&g, &plan, false), dry_costs(&g, &plan, true));
        }
    }

    /// A dry run of `plan`, costing every slice or one of each kind.
    fn dry_costs(g: &Graph, plan: &Plan, every: bool) -> RunStats {
        let lens: Vec<usize> = plan
            .groups
            .iter()
            .map(|gr| crate::check_group(g, gr).unwrap())
            .collect();
        let schedule = Schedule::new(g, plan, g.outputs(), g.inputs());
        let initial = g
            .inputs()
            .iter()
            .map(|&id| (id, g.info(id).clone()))
            .collect();
        let mut engine = Engine::new(g, Dry, plan.kernels);
        if every {
            engine = engine.every_slice();
        }
        engine.run(plan, &lens, &schedule, initial).unwrap().1
    }
}
