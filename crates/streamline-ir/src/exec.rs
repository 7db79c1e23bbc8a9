//! Running a plan: for real on a candle device, or dry on shapes alone.
//!
//! Both runs share one engine, so the planned peak is the measured peak of the same schedule
//! plus the op workspaces that only the ops themselves see.

use std::collections::{HashMap, HashSet};
use std::ops::Range;

use candle_core::{Device, Tensor};

use crate::error::{IrError, Result};
use crate::graph::{Graph, Node, ValueId};
use crate::ledger::{Ledger, RunStats};
use crate::op::SliceCtx;
use crate::plan::{check_group, chunk_ranges, Plan};
use crate::value::{AxisTag, ValueInfo};

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
        let backend = Real {
            device: &self.device,
        };
        let (mut results, stats) = Engine::new(self, backend).run(initial, &keep)?;
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
        let mut initial: HashMap<ValueId, ValueInfo> = self
            .graph
            .inputs()
            .iter()
            .map(|&id| (id, self.graph.info(id).clone()))
            .collect();
        for id in self.ids(substitute)? {
            initial.insert(id, self.graph.info(id).clone());
        }
        let keep = self.ids(keep)?;
        Engine::new(self, Dry)
            .run(initial, &keep)
            .map(|(_, stats)| stats)
    }

    /// The planned cost of `plan` from shapes alone, without a device (planners and passes).
    pub fn plan_stats(graph: &Graph, plan: &Plan) -> Result<RunStats> {
        Executor::new(graph, plan, &Device::Cpu)?.dry_run(&[], &[])
    }

    fn ids(&self, names: &[String]) -> Result<Vec<ValueId>> {
        names.iter().map(|n| self.graph.find(n)).collect()
    }
}

/// What the engine needs from tensors: real ones, or shapes standing in for them.
trait Backend {
    type V: Clone;
    const COUNTS_WORKSPACE: bool;
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
    fn alloc(&self, info: &ValueInfo) -> Result<Self::V>;
    fn write(&self, dst: &Self::V, src: &Self::V, dim: usize, offset: usize) -> Result<()>;
    fn merge(&self, node: &Node, acc: &Self::V, partial: &Self::V) -> Result<Self::V>;
}

struct Real<'d> {
    device: &'d Device,
}

impl Backend for Real<'_> {
    type V = Tensor;
    const COUNTS_WORKSPACE: bool = false;

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
            IrError::Tensor(source) => IrError::Candle {
                node: node.name.clone(),
                source,
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
        Ok(Tensor::zeros(info.shape.clone(), info.dtype, self.device)?)
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
}

/// Shapes only: the planner's view of a run.
struct Dry;

impl Backend for Dry {
    type V = ValueInfo;
    const COUNTS_WORKSPACE: bool = true;

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
}

/// A slice of one group in flight: per-slice values and narrowed views of earlier values.
struct SliceState<V> {
    local: HashMap<ValueId, V>,
    /// Narrowed views of values made before the group, and whether each is a copy.
    narrowed: HashMap<ValueId, (V, bool)>,
}

struct Engine<'e, B: Backend> {
    graph: &'e Graph,
    plan: &'e Plan,
    axis_lens: &'e [usize],
    backend: B,
    ledger: Ledger,
    stats: RunStats,
}

impl<'e, B: Backend> Engine<'e, B> {
    fn new(exec: &'e Executor<'e>, backend: B) -> Self {
        Engine {
            graph: exec.graph,
            plan: exec.plan,
            axis_lens: &exec.axis_lens,
            backend,
            ledger: Ledger::default(),
            stats: RunStats::default(),
        }
    }

    fn run(
        mut self,
        mut initial: HashMap<ValueId, B::V>,
        keep: &[ValueId],
    ) -> Result<(HashMap<ValueId, B::V>, RunStats)> {
        let graph = self.graph;
        let pinned: HashSet<ValueId> = graph.outputs().iter().chain(keep).copied().collect();
        // Walk back from what is asked for; substituted values cut the walk.
        let mut demanded = vec![false; graph.values().len()];
        for id in &pinned {
            demanded[id.0] = true;
        }
        let mut runs = vec![false; graph.nodes().len()];
        for (i, node) in graph.nodes().iter().enumerate().rev() {
            if demanded[node.output.0] && !initial.contains_key(&node.output) {
                runs[i] = true;
                for inp in &node.inputs {
                    demanded[inp.0] = true;
                }
            }
        }
        // Inputs nobody needs are dropped now; the rest move into `live` and are freed after
        // their last use.
        let mut live: HashMap<ValueId, B::V> = HashMap::new();
        for (id, value) in graph.values().iter().enumerate() {
            let id = ValueId(id);
            let computed = graph.producer_node(id).is_some_and(|n| runs[n]);
            if demanded[id.0] && !computed {
                let v = initial.remove(&id).ok_or_else(|| {
                    IrError::value(&value.name, "is needed but was neither given nor computed")
                })?;
                self.ledger.alloc(B::bytes(&v));
                live.insert(id, v);
            }
        }
        drop(initial);
        // The last group that reads each value; pinned values live to the end.
        let mut last_use: HashMap<ValueId, usize> = HashMap::new();
        for (gi, group) in self.plan.groups.iter().enumerate() {
            for ni in group.nodes.clone().filter(|&n| runs[n]) {
                for inp in &graph.node(ni).inputs {
                    last_use.insert(*inp, gi);
                }
            }
        }
        for id in &pinned {
            last_use.insert(*id, usize::MAX);
        }
        for (gi, group) in self.plan.groups.iter().enumerate() {
            let nodes: Vec<usize> = group.nodes.clone().filter(|&n| runs[n]).collect();
            if nodes.is_empty() {
                continue;
            }
            self.ledger.enter_group(gi);
            self.run_group(gi, &nodes, &last_use, &mut live)?;
            live.retain(|id, v| {
                let keep = last_use.get(id).is_some_and(|&last| last > gi);
                if !keep {
                    self.ledger.free(B::bytes(v));
                }
                keep
            });
        }
        self.stats.peak_bytes = self.ledger.peak();
        self.stats.peak_group = self.ledger.peak_group();
        self.stats.group_peaks = self.ledger.group_peaks().to_vec();
        Ok((live, self.stats))
    }

    fn run_group(
        &mut self,
        gi: usize,
        nodes: &[usize],
        last_use: &HashMap<ValueId, usize>,
        live: &mut HashMap<ValueId, B::V>,
    ) -> Result<()> {
        let graph = self.graph;
        let group = &self.plan.groups[gi];
        let len = self.axis_lens[gi];
        let outputs: Vec<ValueId> = nodes
            .iter()
            .map(|&n| graph.node(n).output)
            .filter(|id| last_use.get(id).is_some_and(|&last| last > gi))
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
                if !node.op.is_reduction() {
                    let v = self.backend.alloc(graph.info(id))?;
                    self.ledger.alloc(B::bytes(&v));
                    full.insert(id, v);
                }
            }
        }
        let mut partials: HashMap<ValueId, B::V> = HashMap::new();
        for range in ranges {
            let ctx = SliceCtx {
                workspace_limit: group.workspace_limit,
                ..match group.axis {
                    Some(axis) => SliceCtx {
                        axis: Some(axis),
                        range,
                        len,
                        workspace_limit: None,
                    },
                    None => SliceCtx::whole(),
                }
            };
            let mut state = SliceState {
                local: HashMap::new(),
                narrowed: HashMap::new(),
            };
            for (k, &n) in nodes.iter().enumerate() {
                let node = graph.node(n);
                self.run_node(node, &ctx, &mut state, live)?;
                let out = node.output;
                let value = state.local.remove(&out).expect("node output");
                let is_output = outputs.contains(&out);
                if node.op.is_reduction() && sliced {
                    self.fold_partial(node, &mut partials, value)?;
                } else {
                    if let (Some(dst), Some(axis)) = (full.get(&out), ctx.axis) {
                        let AxisTag::Dim(d) = graph.info(out).layout.tag(axis) else {
                            unreachable!("validated: sliced outputs have a dim on the axis")
                        };
                        self.backend.write(dst, &value, d, ctx.range.start)?;
                    }
                    let direct_output = is_output && !sliced;
                    if direct_output || last_reader.get(&out).is_some_and(|&r| r > k) {
                        state.local.insert(out, value);
                    } else {
                        self.ledger.free(B::bytes(&value));
                    }
                }
                for inp in &node.inputs {
                    if last_reader.get(inp) != Some(&k) {
                        continue;
                    }
                    if let Some((v, copied)) = state.narrowed.remove(inp) {
                        if copied {
                            self.ledger.free(B::bytes(&v));
                        }
                    }
                    let direct_output = outputs.contains(inp) && !sliced;
                    if !direct_output {
                        if let Some(v) = state.local.remove(inp) {
                            self.ledger.free(B::bytes(&v));
                        }
                    }
                }
            }
            if !sliced {
                for id in &outputs {
                    if let Some(v) = state.local.remove(id) {
                        live.insert(*id, v);
                    }
                }
            }
        }
        live.extend(full);
        live.extend(partials);
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
        let expected = if node.op.is_reduction() {
            graph.info(node.output).clone()
        } else {
            slice_info(node.output)
        };
        let in_refs: Vec<&ValueInfo> = in_infos.iter().collect();
        self.stats.flops += node.op.flops(&in_refs, &expected);
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
        if B::COUNTS_WORKSPACE {
            let workspace = node
                .op
                .workspace_bytes(&in_refs, &expected, ctx.workspace_limit);
            self.ledger.transient(workspace);
        }
        state.local.insert(node.output, out);
        Ok(())
    }
}
