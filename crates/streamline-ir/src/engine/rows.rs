//! Running a group on bands of rows, pass by pass (see `crate::rows`): the same code for real
//! and dry runs, so what a row plan is planned to hold is what it holds.

use std::collections::{HashMap, HashSet};
use std::ops::Range;

use super::{Backend, Engine, Schedule};
use crate::error::{IrError, Result};
use crate::graph::ValueId;
use crate::op::{RowBand, RowRule, SliceCtx};
use crate::plan::{chunk_ranges, Group};
use crate::rows::{BandNeeds, RowStages};
use crate::value::{Axis, AxisTag};

/// `range` shifted to start where `within` starts.
fn relative(range: &Range<usize>, within: &Range<usize>) -> Range<usize> {
    range.start - within.start..range.end - within.start
}

/// What one band of one pass shares with the rest of its group.
struct BandRun<'b, V> {
    group: &'b Group,
    needs: &'b BandNeeds,
    /// The group's outputs, made full-size before the first pass.
    full: &'b HashMap<ValueId, V>,
    /// Reductions finished in earlier passes.
    done: &'b HashMap<ValueId, V>,
    /// Nodes already counted in [`crate::RunStats::nodes_run`].
    counted: &'b mut HashSet<usize>,
}

impl<B: Backend> Engine<'_, B> {
    /// Rows `range` of `v`, whose rows (tag `tag`) number `len`: a narrow, or a copy when the
    /// rows are not one run (the bool says which).
    fn take_rows(
        &self,
        v: &B::V,
        tag: AxisTag,
        range: &Range<usize>,
        len: usize,
    ) -> Result<(B::V, bool)> {
        let (dim, _, _) = tag.blocks().expect("validated: rows tag with a dim");
        let runs = tag.runs(range, len);
        if let [(start, n)] = runs[..] {
            return self.backend.narrow(v, dim, start..start + n);
        }
        let parts = runs
            .into_iter()
            .map(|(start, n)| Ok(self.backend.narrow(v, dim, start..start + n)?.0))
            .collect::<Result<Vec<_>>>()?;
        Ok((self.backend.cat(&parts, dim)?, true))
    }

    /// Write `src`, rows `range` of `dst` (tag `tag`, `len` rows), into `dst`.
    fn put_rows(
        &self,
        dst: &B::V,
        src: &B::V,
        tag: AxisTag,
        range: &Range<usize>,
        len: usize,
    ) -> Result<()> {
        let (dim, _, _) = tag.blocks().expect("validated: rows tag with a dim");
        let runs = tag.runs(range, len);
        if let [(start, _)] = runs[..] {
            return self.backend.write(dst, src, dim, start);
        }
        let mut at = 0;
        for (start, n) in runs {
            let (piece, _) = self.backend.narrow(src, dim, at..at + n)?;
            self.backend.write(dst, &piece, dim, start)?;
            at += n;
        }
        Ok(())
    }

    /// Run group `gi` along the rows of its longest value (`longest` rows): one pass per
    /// stage of its reductions, every pass over every band.
    pub(super) fn run_rows(
        &mut self,
        gi: usize,
        group: &Group,
        longest: usize,
        nodes: &[usize],
        schedule: &Schedule,
        live: &mut HashMap<ValueId, B::V>,
    ) -> Result<()> {
        let graph = self.graph;
        let outputs: Vec<ValueId> = nodes
            .iter()
            .map(|&n| graph.node(n).output)
            .filter(|&id| schedule.outlives(id, gi))
            .collect();
        let mut full: HashMap<ValueId, B::V> = HashMap::new();
        for &id in &outputs {
            let node = graph.node(graph.producer_node(id).expect("node output"));
            if node.op.rows() != Some(RowRule::Reduce) {
                let v = self.backend.alloc(graph.info(id))?;
                self.ledger.alloc(B::bytes(&v));
                full.insert(id, v);
            }
        }
        let stages = RowStages::new(graph, nodes);
        let bands = chunk_ranges(longest, group.chunks);
        let mut done: HashMap<ValueId, B::V> = HashMap::new();
        let mut counted = HashSet::new();
        for pass in 0..stages.passes {
            let mut partials: HashMap<ValueId, B::V> = HashMap::new();
            // As for slices: the first band and the first later band of each shape are
            // costed, every later band of that shape costs the same.
            let mut costed: Vec<(Vec<usize>, u64)> = Vec::new();
            for (k, band) in bands.iter().enumerate() {
                let needs = BandNeeds::new(graph, nodes, &stages, (pass, band, longest), &outputs);
                // A reduction's first partial is kept, later ones are merged: that differs.
                let key =
                    if self.shortcut && k > 0 {
                        let mut key = needs.cost_key(graph, &stages);
                        key.extend(needs.active.iter().map(|(n, _)| {
                            usize::from(partials.contains_key(&graph.node(*n).output))
                        }));
                        key
                    } else {
                        Vec::new()
                    };
                if let Some((_, flops)) = costed.iter().find(|(c, _)| *c == key) {
                    self.stats.flops = self.stats.flops.saturating_add(*flops);
                    continue;
                }
                let before = self.stats.flops;
                let run = BandRun {
                    group,
                    needs: &needs,
                    full: &full,
                    done: &done,
                    counted: &mut counted,
                };
                self.run_band(run, &mut partials, live)?;
                if self.shortcut && k > 0 {
                    costed.push((key, self.stats.flops - before));
                }
            }
            done.extend(partials);
        }
        for (id, v) in done {
            if outputs.contains(&id) {
                live.insert(id, v);
            } else {
                self.ledger.free(B::bytes(&v));
            }
        }
        live.extend(full);
        Ok(())
    }

    /// One band of one pass: the active nodes in order, each band value freed after its last
    /// reader, group outputs written as they are made.
    fn run_band(
        &mut self,
        mut run: BandRun<B::V>,
        partials: &mut HashMap<ValueId, B::V>,
        live: &HashMap<ValueId, B::V>,
    ) -> Result<()> {
        let graph = self.graph;
        let mut last_reader: HashMap<ValueId, usize> = HashMap::new();
        for (k, (n, _)) in run.needs.active.iter().enumerate() {
            for &inp in &graph.node(*n).inputs {
                last_reader.insert(inp, k);
            }
        }
        let mut local: HashMap<ValueId, (B::V, Range<usize>)> = HashMap::new();
        for (k, (n, rows)) in run.needs.active.iter().enumerate() {
            let node = graph.node(*n);
            let out = self.run_banded_node(&mut run, *n, rows, &local, live)?;
            if node.op.rows() == Some(RowRule::Reduce) {
                self.fold_partial(node, partials, out)?;
            } else {
                if let Some((_, owned)) = run.needs.writes.iter().find(|(v, _)| *v == node.output) {
                    self.write_owned(&run, node.output, &out, rows, owned)?;
                }
                if last_reader.get(&node.output).is_some_and(|&r| r > k) {
                    local.insert(node.output, (out, rows.clone()));
                } else {
                    self.ledger.free(B::bytes(&out));
                }
            }
            for inp in &node.inputs {
                if last_reader.get(inp) == Some(&k) {
                    if let Some((v, _)) = local.remove(inp) {
                        self.ledger.free(B::bytes(&v));
                    }
                }
            }
        }
        Ok(())
    }

    /// Write the rows `owned` of `value` (which holds rows `held`) into the group output.
    fn write_owned(
        &mut self,
        run: &BandRun<B::V>,
        value: ValueId,
        out: &B::V,
        held: &Range<usize>,
        owned: &Range<usize>,
    ) -> Result<()> {
        let info = self.graph.info(value);
        let tag = info.layout.rows;
        let len = info.axis_len(Axis::Rows).expect("validated: rows dim");
        let (piece, copied) = self.take_rows(out, tag, &relative(owned, held), held.len())?;
        if copied {
            self.ledger.alloc(B::bytes(&piece));
        }
        self.put_rows(&run.full[&value], &piece, tag, owned, len)?;
        if copied {
            self.ledger.free(B::bytes(&piece));
        }
        Ok(())
    }

    /// Run node `n` on output rows `rows` (for a reduction: the input rows it reduces), from
    /// the band values in `local`, the finished reductions and the values made before the
    /// group. Rows an input holds beyond what the node reads are cut off first.
    fn run_banded_node(
        &mut self,
        run: &mut BandRun<B::V>,
        n: usize,
        rows: &Range<usize>,
        local: &HashMap<ValueId, (B::V, Range<usize>)>,
        live: &HashMap<ValueId, B::V>,
    ) -> Result<B::V> {
        let graph = self.graph;
        let node = graph.node(n);
        let reduce = node.op.rows() == Some(RowRule::Reduce);
        let mut cut: Vec<Option<(B::V, bool)>> = Vec::with_capacity(node.inputs.len());
        let mut in_infos = Vec::with_capacity(node.inputs.len());
        let mut band_input = (0..0, 0);
        for &inp in &node.inputs {
            let info = graph.info(inp);
            let Some(len) = info.axis_len(Axis::Rows) else {
                cut.push(None);
                in_infos.push(info.clone());
                continue;
            };
            let want = BandNeeds::input_rows(graph, n, rows, inp);
            in_infos.push(info.sliced(Axis::Rows, want.len()));
            let tag = info.layout.rows;
            let piece = match local.get(&inp) {
                Some((_, held)) if *held == want => None,
                Some((v, held)) => {
                    Some(self.take_rows(v, tag, &relative(&want, held), held.len())?)
                }
                None => {
                    let v = live.get(&inp).ok_or_else(|| missing(graph, n, inp))?;
                    Some(self.take_rows(v, tag, &want, len)?)
                }
            };
            if let Some((v, true)) = &piece {
                self.ledger.alloc(B::bytes(v));
            }
            cut.push(piece);
            band_input = (want, len);
        }
        let out_info = graph.info(node.output);
        let (expected, out_len) = if reduce {
            (out_info.clone(), band_input.1)
        } else {
            let len = out_info.axis_len(Axis::Rows).expect("validated: rows dim");
            (out_info.sliced(Axis::Rows, rows.len()), len)
        };
        let ctx = SliceCtx {
            axis: Some(Axis::Rows),
            range: rows.clone(),
            len: out_len,
            workspace_limit: run.group.workspace_limit,
            kernels: self.kernels,
            band: Some(RowBand {
                out: rows.clone(),
                out_len,
                input: band_input.0,
                input_len: band_input.1,
            }),
        };
        let in_refs: Vec<_> = in_infos.iter().collect();
        self.stats.flops = self
            .stats
            .flops
            .saturating_add(node.op.flops(&in_refs, &expected));
        if run.counted.insert(n) {
            self.stats.nodes_run += 1;
        }
        let inputs = node
            .inputs
            .iter()
            .zip(&cut)
            .map(|(inp, c)| match c {
                Some((v, _)) => Ok(v),
                None => local
                    .get(inp)
                    .map(|(v, _)| v)
                    .or_else(|| run.done.get(inp))
                    .or_else(|| live.get(inp))
                    .ok_or_else(|| missing(graph, n, *inp)),
            })
            .collect::<Result<Vec<_>>>()?;
        let out = self.backend.forward(node, &expected, &inputs, &ctx)?;
        self.ledger.alloc(B::bytes(&out));
        if B::DRY {
            let ws = node
                .op
                .workspace_bytes(&in_refs, &expected, ctx.workspace());
            self.ledger.transient(ws);
        }
        for (v, copied) in cut.into_iter().flatten() {
            if copied {
                self.ledger.free(B::bytes(&v));
            }
        }
        Ok(out)
    }
}

fn missing(graph: &crate::Graph, n: usize, inp: ValueId) -> IrError {
    IrError::node(
        &graph.node(n).name,
        format!("input `{}` is not available", graph.value(inp).name),
    )
}
