//! Plans: how the nodes of a graph are grouped and sliced.

use std::fmt;
use std::ops::Range;

use crate::error::{IrError, Result};
use crate::graph::{Graph, ValueId};
use crate::op::Kernels;
use crate::value::{Axis, AxisTag};

/// A run of consecutive nodes executed slice by slice along one axis.
///
/// Inside a group every intermediate exists one slice at a time; values used after the group
/// are written slice by slice into preallocated outputs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Group {
    /// Node indices, consecutive.
    pub nodes: Range<usize>,
    /// `None`: the group runs unsliced.
    pub axis: Option<Axis>,
    /// Number of slices; 1 unless `axis` is set. Need not divide the axis length.
    pub chunks: usize,
    /// Bytes of transient workspace one op call may use; ops that can tile (attention query
    /// chunks, im2col row tiles) obey it. `None`: ops run untiled.
    pub workspace_limit: Option<usize>,
}

impl Group {
    pub fn whole(nodes: Range<usize>) -> Self {
        Group {
            nodes,
            axis: None,
            chunks: 1,
            workspace_limit: None,
        }
    }

    pub fn sliced(nodes: Range<usize>, axis: Axis, chunks: usize) -> Self {
        Group {
            nodes,
            axis: Some(axis),
            chunks,
            workspace_limit: None,
        }
    }
}

/// Ordered groups covering every node of a graph once, in graph order, for one
/// implementation of the ops.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    pub groups: Vec<Group>,
    /// What runs the ops; what they allocate, and so the plan's costs, depend on it.
    pub kernels: Kernels,
}

/// Split `len` into `chunks` contiguous ranges whose sizes differ by at most one.
pub fn chunk_ranges(len: usize, chunks: usize) -> Vec<Range<usize>> {
    let chunks = chunks.clamp(1, len.max(1));
    let (base, extra) = (len / chunks, len % chunks);
    let mut start = 0;
    (0..chunks)
        .map(|i| {
            let size = base + usize::from(i < extra);
            let range = start..start + size;
            start += size;
            range
        })
        .collect()
}

impl Plan {
    /// `groups` for the CPU kernels.
    pub fn new(groups: Vec<Group>) -> Plan {
        Plan {
            groups,
            kernels: Kernels::Cpu,
        }
    }

    /// This plan for `kernels`.
    pub fn with_kernels(self, kernels: Kernels) -> Plan {
        Plan { kernels, ..self }
    }

    /// One node per group, unsliced: original inference.
    pub fn trivial(graph: &Graph) -> Plan {
        Plan::new(
            (0..graph.nodes().len())
                .map(|i| Group::whole(i..i + 1))
                .collect(),
        )
    }

    /// Check that the groups cover the graph in order and that every sliced group is exact.
    pub fn validate(&self, graph: &Graph) -> Result<()> {
        let mut next = 0;
        for (gi, group) in self.groups.iter().enumerate() {
            if group.nodes.start != next || group.nodes.is_empty() {
                return Err(IrError::Plan(format!(
                    "group {gi} covers nodes {:?}, expected a non-empty run starting at node {next}",
                    group.nodes
                )));
            }
            next = group.nodes.end;
            if next > graph.nodes().len() {
                return Err(IrError::Plan(format!(
                    "group {gi} reaches node {next}, but the graph has {} nodes",
                    graph.nodes().len()
                )));
            }
            check_group(graph, group)?;
        }
        if next != graph.nodes().len() {
            return Err(IrError::Plan(format!(
                "groups end at node {next}, but the graph has {} nodes",
                graph.nodes().len()
            )));
        }
        Ok(())
    }
}

/// Exactness rules for one group; errors name the offending node.
///
/// Returns the length of the sliced axis (0 for an unsliced group).
pub fn check_group(graph: &Graph, group: &Group) -> Result<usize> {
    let first = &graph.node(group.nodes.start).name;
    let Some(axis) = group.axis else {
        if group.chunks != 1 {
            return Err(IrError::node(
                first,
                format!("an unsliced group must have 1 chunk, not {}", group.chunks),
            ));
        }
        return Ok(0);
    };
    if axis == Axis::Rows {
        return crate::rows::check_rows_group(graph, group);
    }
    let mut axis_len: Option<(usize, String)> = None;
    let mut see_len = |len: usize, who: &str, node: &str| -> Result<()> {
        match &axis_len {
            Some((l, first_who)) if *l != len => Err(IrError::node(
                node,
                format!("{who} has {axis} length {len}, but {first_who} has {l}; a group slices one axis of one length"),
            )),
            Some(_) => Ok(()),
            None => {
                axis_len = Some((len, who.to_string()));
                Ok(())
            }
        }
    };
    let in_group = |v: ValueId| {
        graph
            .producer_node(v)
            .is_some_and(|p| group.nodes.contains(&p))
    };
    for ni in group.nodes.clone() {
        let node = graph.node(ni);
        let op = &node.op;
        if !op.allows(axis) {
            return Err(IrError::node(
                &node.name,
                format!(
                    "{} is not independent along {axis} ({:?}); it cannot be sliced along it",
                    op.kind(),
                    op.independence()
                ),
            ));
        }
        let out = graph.info(node.output);
        match (out.layout.tag(axis), op.reduces(axis)) {
            (AxisTag::Dim(_), false) | (AxisTag::Whole, true) => {}
            (tag, reduction) => {
                return Err(IrError::node(
                    &node.name,
                    format!(
                    "its output has {axis} tag `{tag}`, which a {} cannot produce slice by slice",
                    if reduction {
                        "reduction"
                    } else {
                        "sliced node"
                    }
                ),
                ))
            }
        }
        if let Some(len) = out.axis_len(axis) {
            see_len(len, &format!("output of `{}`", node.name), &node.name)?;
        }
        for (k, &input) in node.inputs.iter().enumerate() {
            let v = graph.value(input);
            match v.info.layout.tag(axis) {
                AxisTag::Dim(_) => {
                    let len = v.info.axis_len(axis).unwrap_or(0);
                    see_len(len, &format!("input `{}`", v.name), &node.name)?;
                }
                AxisTag::Whole => {
                    let reduced_here = graph
                        .producer_node(input)
                        .is_some_and(|p| in_group(input) && graph.node(p).op.reduces(axis));
                    if reduced_here {
                        return Err(IrError::node(
                            &node.name,
                            format!(
                                "reads `{}`, a reduction finished only after the whole group; put it in a later group",
                                v.name
                            ),
                        ));
                    }
                }
                AxisTag::Interleaved | AxisTag::Blocks { .. } => {
                    if !op.gathers_input(k, axis) || in_group(input) {
                        return Err(IrError::node(
                            &node.name,
                            format!(
                                "input `{}` is interleaved along {axis} and {} cannot gather it slice by slice",
                                v.name,
                                op.kind()
                            ),
                        ));
                    }
                }
            }
        }
    }
    let len = axis_len.map(|(l, _)| l).unwrap_or(0);
    if group.chunks == 0 || group.chunks > len {
        return Err(IrError::node(
            first,
            format!(
                "{} chunks along {axis} of length {len}: chunks must be between 1 and the axis length",
                group.chunks
            ),
        ));
    }
    Ok(len)
}

/// One line per group: `g2 nodes 4..7 [a .. c] positions x3`.
pub struct PlanDump<'a> {
    pub plan: &'a Plan,
    pub graph: &'a Graph,
}

impl fmt::Display for PlanDump<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (gi, g) in self.plan.groups.iter().enumerate() {
            let first = &self.graph.node(g.nodes.start).name;
            let names = if g.nodes.len() == 1 {
                first.clone()
            } else {
                format!("{first} .. {}", self.graph.node(g.nodes.end - 1).name)
            };
            let mut slicing = match g.axis {
                Some(axis) => format!("{axis} x{}", g.chunks),
                None => "whole".to_string(),
            };
            if let Some(limit) = g.workspace_limit {
                slicing.push_str(&format!(" ws<={limit}"));
            }
            writeln!(
                f,
                "g{gi} nodes {}..{} [{names}] {slicing}",
                g.nodes.start, g.nodes.end
            )?;
        }
        Ok(())
    }
}

impl Plan {
    pub fn dump<'a>(&'a self, graph: &'a Graph) -> PlanDump<'a> {
        PlanDump { plan: self, graph }
    }
}
