//! Row groups: which plans along [`Axis::Rows`] are exact, and which rows every node of a
//! band needs.
//!
//! A row group splits the rows of its longest values into bands. Every band of every value
//! the group hands on (and of every reduction's input) is a fixed share of that value's rows,
//! so the bands partition each of them whatever its height; going backwards through the
//! group, each node's [`RowRule`] widens what its inputs must provide (the halos of windows,
//! the halving of upsampling), clamped at the image edges. Nodes upstream of two consumers
//! compute the hull of what both need. A reduction inside the group (norm statistics) splits
//! it into passes: pass `s` computes the reductions of stage `s` and whatever the group
//! hands on at that stage, recomputing the cheap chain before them band by band, so nothing
//! full-size exists between a reduction and its consumers.

use std::ops::Range;

use crate::error::{IrError, Result};
use crate::graph::{Graph, ValueId};
use crate::op::RowRule;
use crate::plan::Group;
use crate::value::Axis;

/// Exactness rules of a group along the rows; errors name the offending node. Returns the
/// row length the bands split: the longest of the group's values.
pub(crate) fn check_rows_group(graph: &Graph, group: &Group) -> Result<usize> {
    let mut longest = 0;
    for ni in group.nodes.clone() {
        let node = graph.node(ni);
        let fail = |reason: String| Err(IrError::node(&node.name, reason));
        let Some(rule) = node.op.rows() else {
            return fail(format!(
                "{} cannot run on bands of rows: it needs whole frames",
                node.op.kind()
            ));
        };
        let out = graph.info(node.output);
        let out_len = out.axis_len(Axis::Rows);
        match (rule == RowRule::Reduce, out_len.is_some()) {
            (true, true) => {
                return fail("a reduction over rows must make a value whole along the rows".into())
            }
            (false, false) => {
                return fail(format!(
                    "its output has rows tag `{}`: no dim holds the rows",
                    out.layout.rows
                ))
            }
            _ => {}
        }
        let mut in_len: Option<usize> = None;
        for &input in &node.inputs {
            let v = graph.value(input);
            match (v.info.layout.rows.blocks(), v.info.axis_len(Axis::Rows)) {
                (Some(_), Some(len)) => {
                    if in_len.is_some_and(|l| l != len) {
                        return fail(format!(
                            "input `{}` has {len} rows, another input {}; the inputs of a banded \
                             op share their rows",
                            v.name,
                            in_len.unwrap_or(0)
                        ));
                    }
                    in_len = Some(len);
                }
                _ if v.info.layout.rows == crate::AxisTag::Whole => {}
                _ => {
                    return fail(format!(
                        "input `{}` has rows tag `{}`: no dim holds its rows",
                        v.name, v.info.layout.rows
                    ))
                }
            }
        }
        let Some(in_len) = in_len else {
            return fail("reads no value with a dim holding the rows".into());
        };
        if let Some(out_len) = out_len {
            if rule.output_len(in_len) != Some(out_len) {
                return fail(format!(
                    "{rule:?} makes {:?} rows of {in_len}, but the output has {out_len}",
                    rule.output_len(in_len)
                ));
            }
            longest = longest.max(out_len);
        }
        longest = longest.max(in_len);
    }
    if group.chunks == 0 || group.chunks > longest {
        return Err(IrError::node(
            &graph.node(group.nodes.start).name,
            format!(
                "{} chunks along rows of length {longest}: chunks must be between 1 and the \
                 longest value's rows",
                group.chunks
            ),
        ));
    }
    Ok(longest)
}

/// The share of a value of `len` rows that band `band` (of `longest` rows) owns. The shares
/// of consecutive bands partition the value.
pub(crate) fn owned(band: &Range<usize>, longest: usize, len: usize) -> Range<usize> {
    band.start * len / longest..band.end * len / longest
}

/// The smallest range covering both (an empty range covers nothing).
fn hull(a: &Range<usize>, b: Range<usize>) -> Range<usize> {
    match (a.is_empty(), b.is_empty()) {
        (true, _) => b,
        (_, true) => a.clone(),
        _ => a.start.min(b.start)..a.end.max(b.end),
    }
}

/// The passes of a row group: the stage of each of its running nodes. A node's stage is one
/// more than that of any in-group reduction it depends on, so it runs in the pass after
/// that reduction has seen every band.
pub(crate) struct RowStages {
    /// By node index (nodes that do not run have none).
    pub stage: Vec<Option<usize>>,
    pub passes: usize,
    /// By value id: the value's slot in a band's [`BandNeeds::rows`], for the outputs and
    /// inputs of the group's nodes (`usize::MAX` for every other value). The planner walks
    /// every band of every pass of every group it tries, so a band's needs are sized to the
    /// group, not to the graph.
    slot: Vec<usize>,
    slots: usize,
}

impl RowStages {
    pub fn new(graph: &Graph, nodes: &[usize]) -> Self {
        let mut stage: Vec<Option<usize>> = vec![None; graph.nodes().len()];
        for &n in nodes {
            let s = graph
                .node(n)
                .inputs
                .iter()
                .filter_map(|&v| graph.producer_node(v))
                .filter_map(|p| {
                    let reduces = graph.node(p).op.rows() == Some(RowRule::Reduce);
                    stage[p].map(|s| s + usize::from(reduces))
                })
                .max()
                .unwrap_or(0);
            stage[n] = Some(s);
        }
        let passes = stage.iter().flatten().copied().max().map_or(1, |s| s + 1);
        let mut slot = vec![usize::MAX; graph.values().len()];
        let mut slots = 0;
        for &n in nodes {
            let node = graph.node(n);
            for v in node.inputs.iter().chain([&node.output]) {
                if slot[v.0] == usize::MAX {
                    (slot[v.0], slots) = (slots, slots + 1);
                }
            }
        }
        RowStages {
            stage,
            passes,
            slot,
            slots,
        }
    }
}

/// What one band of one pass computes.
#[derive(Debug, Default)]
pub(crate) struct BandNeeds {
    /// The rows of each value (by its [`RowStages`] slot) the band holds (in-group values)
    /// or reads (earlier values); empty where it needs none. A vector, not a map: the
    /// planner walks every band of every pass of every group it tries.
    rows: Vec<Range<usize>>,
    /// The nodes that run, in group order: for a reduction, the input rows it reduces.
    pub active: Vec<(usize, Range<usize>)>,
    /// Group outputs written in this pass and the rows of each this band writes.
    pub writes: Vec<(ValueId, Range<usize>)>,
}

impl BandNeeds {
    /// The rows of `input` that node `n` reads when it computes `out` (its output rows, or
    /// for a reduction the rows it reduces).
    pub fn input_rows(graph: &Graph, n: usize, out: &Range<usize>, input: ValueId) -> Range<usize> {
        let rule = graph.node(n).op.rows().expect("validated: banded op");
        let len = graph.info(input).axis_len(Axis::Rows).unwrap_or(0);
        rule.input_rows(out, len)
    }

    /// Walk back from pass `pass`'s targets in band `band` of a group whose longest value
    /// has `longest` rows; `outputs`: the group's values read after it.
    pub fn new(
        graph: &Graph,
        nodes: &[usize],
        stages: &RowStages,
        (pass, band, longest): (usize, &Range<usize>, usize),
        outputs: &[ValueId],
    ) -> Self {
        let mut needs = BandNeeds {
            rows: vec![0..0; stages.slots],
            ..BandNeeds::default()
        };
        let slot = |v: ValueId| stages.slot[v.0];
        let len_of = |v: ValueId| graph.info(v).axis_len(Axis::Rows).unwrap_or(0);
        // By position in `nodes`.
        let mut reduced: Vec<Option<Range<usize>>> = vec![None; nodes.len()];
        for (i, &n) in nodes.iter().enumerate() {
            if stages.stage[n] != Some(pass) {
                continue;
            }
            let node = graph.node(n);
            if node.op.rows() == Some(RowRule::Reduce) {
                let input = node
                    .inputs
                    .iter()
                    .find_map(|&v| graph.info(v).axis_len(Axis::Rows))
                    .unwrap_or(0);
                reduced[i] = Some(owned(band, longest, input));
            } else if outputs.contains(&node.output) {
                let rows = owned(band, longest, len_of(node.output));
                needs.writes.push((node.output, rows.clone()));
                needs.rows[slot(node.output)] = rows;
            }
        }
        for (i, &n) in nodes.iter().enumerate().rev() {
            let node = graph.node(n);
            let out = match &reduced[i] {
                Some(rows) => rows.clone(),
                None if node.op.rows() == Some(RowRule::Reduce) => continue,
                None => needs.rows[slot(node.output)].clone(),
            };
            if out.is_empty() {
                continue;
            }
            for &input in &node.inputs {
                if graph.info(input).layout.rows.blocks().is_none() {
                    continue;
                }
                let want = Self::input_rows(graph, n, &out, input);
                needs.rows[slot(input)] = hull(&needs.rows[slot(input)], want);
            }
            needs.active.push((n, out));
        }
        needs.active.reverse();
        needs
    }

    /// The lengths that decide what the band costs: bands with equal keys allocate and
    /// compute alike (the dry run costs one of them for all).
    pub fn cost_key(&self, graph: &Graph, stages: &RowStages) -> Vec<usize> {
        let held = |v: ValueId| self.rows[stages.slot[v.0]].len();
        let mut key = Vec::new();
        for (n, out) in &self.active {
            key.extend([*n, out.len()]);
            for &input in &graph.node(*n).inputs {
                if graph.info(input).layout.rows.blocks().is_some() {
                    let want = Self::input_rows(graph, *n, out, input);
                    key.extend([held(input), want.len()]);
                }
            }
        }
        for (v, rows) in &self.writes {
            key.extend([v.0, rows.len(), held(*v)]);
        }
        key
    }
}
