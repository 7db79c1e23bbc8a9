//! The harness every pass is tested on (cargo feature `testing`): toy ops with the same
//! slicing contracts as the real layers, small enough to fuzz, random graphs of them, random
//! valid plans, and the exactness check a pass's output must pass.
//!
//! Frame-major values are `(B*T, C, S)` (S = H*W flattened), position-major values
//! `(B*S, T, C)`. Each op does real mixing along the axis it is *not* independent of, so a
//! wrong slicing shows in the numbers.

use candle_core::{DType, Device, Tensor};
use proptest::prelude::*;

/// A toy op's `Op` impl: the methods every toy op spells alike (its kind and independence,
/// and where it has them its row rule, a same-shape output, FLOPs and workspace as multiples
/// of the first input's elements and bytes) from one line, then its own methods.
macro_rules! toy_op {
    (
        $ty:ty: $kind:literal, $indep:ident
        $(, rows $rows:ident)?
        $(, infer $same:ident)?
        $(, flops $flops:literal)?
        $(, workspace $ws:literal)?;
        $($body:tt)*
    ) => {
        impl Op for $ty {
            crate::op_contract!($kind, $indep $(, rows RowRule::$rows)?);
            $(fn infer(&self, i: &[&ValueInfo]) -> Result<ValueInfo> {
                $same(i)
            })?
            $(fn flops(&self, i: &[&ValueInfo], _: &ValueInfo) -> u64 {
                $flops * i[0].shape.elem_count() as u64
            })?
            $(fn workspace_bytes(&self, i: &[&ValueInfo], _: &ValueInfo, _: Workspace) -> usize {
                $ws * i[0].bytes()
            })?
            $($body)*
        }
    };
}

pub mod rows;

use crate::{
    check_group, Axis, AxisTag, Executor, Graph, Group, Independence, IrError, Layout, Op, Plan,
    PlanCost, Request, Result, RowRule, SliceCtx, ValueId, ValueInfo, Workspace,
};

#[derive(Copy, Clone, Debug)]
pub struct Dims {
    pub b: usize,
    pub t: usize,
    pub c: usize,
    pub s: usize,
}

impl Dims {
    pub fn new(b: usize, t: usize, c: usize, s: usize) -> Self {
        Dims { b, t, c, s }
    }

    pub fn frame_info(&self) -> ValueInfo {
        ValueInfo::new(
            (self.b * self.t, self.c, self.s),
            DType::F32,
            Layout::FRAME_MAJOR,
        )
    }
    pub fn position_info(&self) -> ValueInfo {
        ValueInfo::new(
            (self.b * self.s, self.t, self.c),
            DType::F32,
            Layout::POSITION_MAJOR,
        )
    }
}

fn pieces(rows: std::ops::Range<usize>, per: usize) -> Vec<(usize, std::ops::Range<usize>)> {
    let mut out = Vec::new();
    let mut s = rows.start;
    while s < rows.end {
        let b = s / per;
        let e = rows.end.min((b + 1) * per);
        out.push((b, s - b * per..e - b * per));
        s = e;
    }
    out
}

fn cat0(parts: Vec<Tensor>) -> Result<Tensor> {
    Ok(if parts.len() == 1 {
        parts.into_iter().next().unwrap()
    } else {
        Tensor::cat(&parts, 0)?
    })
}

fn same(inputs: &[&ValueInfo]) -> Result<ValueInfo> {
    Ok(inputs[0].clone())
}

/// Frame-wise: scales each frame by its own mean magnitude.
#[derive(Debug)]
pub struct FrameNorm;
toy_op! {
    FrameNorm: "frame_norm", Frames, infer same, flops 3, workspace 1;
    fn forward(&self, x: &[&Tensor], _: &SliceCtx) -> Result<Tensor> {
        let m = x[0].abs()?.mean_keepdim(2)?.mean_keepdim(1)?;
        Ok(x[0].broadcast_div(&(m + 1.0)?)?)
    }
}

/// Position-wise: each frame adds half of the previous frame at the same position.
#[derive(Debug)]
pub struct TimeMix;
toy_op! {
    TimeMix: "time_mix", Positions, rows Same, infer same, flops 2, workspace 3;
    fn forward(&self, x: &[&Tensor], _: &SliceCtx) -> Result<Tensor> {
        let (n, t, c) = x[0].dims3()?;
        if t == 1 {
            return Ok(x[0].clone());
        }
        let zeros = Tensor::zeros((n, 1, c), x[0].dtype(), x[0].device())?;
        let prev = Tensor::cat(&[&zeros, &x[0].narrow(1, 0, t - 1)?], 1)?;
        Ok((x[0] + (prev * 0.5)?)?)
    }
}

/// Pointwise on any layout.
#[derive(Debug)]
pub struct Squash;
toy_op! {
    Squash: "squash", Both, rows Same, infer same, flops 4, workspace 3;
    fn forward(&self, x: &[&Tensor], _: &SliceCtx) -> Result<Tensor> {
        Ok(((x[0].tanh()? * 0.1)? + (x[0] * 0.9)?)?)
    }
}

/// Pointwise sum of two values of the same layout (a skip connection).
#[derive(Debug)]
pub struct Add;
toy_op! {
    Add: "add", Both, rows Same, flops 1;
    fn infer(&self, i: &[&ValueInfo]) -> Result<ValueInfo> {
        if i[0] != i[1] {
            return Err(IrError::Plan(format!("add of {} and {}", i[0], i[1])));
        }
        same(i)
    }
    fn forward(&self, x: &[&Tensor], _: &SliceCtx) -> Result<Tensor> {
        Ok((x[0] + x[1])?)
    }
}

/// Rows `rows` of the other layout, gathered from `x`: per batch item, `x` holds `src` rows
/// and the other layout `per` rows; each piece narrows dim `dim` and permutes by `perm`.
fn gather(
    x: &Tensor,
    rows: std::ops::Range<usize>,
    (per, src): (usize, usize),
    dim: usize,
    perm: (usize, usize, usize),
) -> Result<Tensor> {
    let parts = pieces(rows, per)
        .into_iter()
        .map(|(b, r)| {
            Ok(x.narrow(0, b * src, src)?
                .narrow(dim, r.start, r.len())?
                .permute(perm)?
                .contiguous()?)
        })
        .collect::<Result<Vec<_>>>()?;
    cat0(parts)
}

/// Frame-major to position-major (`to` positions) or back (`to` frames), gathering its slice
/// of the axis it makes.
#[derive(Debug)]
pub struct Relayout {
    pub to: Axis,
    pub d: Dims,
}

impl Relayout {
    pub fn to_positions(d: Dims) -> Self {
        Relayout {
            to: Axis::Positions,
            d,
        }
    }

    pub fn to_frames(d: Dims) -> Self {
        Relayout {
            to: Axis::Frames,
            d,
        }
    }
}

impl Op for Relayout {
    fn kind(&self) -> &'static str {
        match self.to {
            Axis::Positions => "to_positions",
            _ => "to_frames",
        }
    }
    fn independence(&self) -> Independence {
        match self.to {
            Axis::Positions => Independence::Positions,
            _ => Independence::Frames,
        }
    }
    fn gathers_input(&self, input: usize, axis: Axis) -> bool {
        input == 0 && axis == self.to
    }
    fn infer(&self, _: &[&ValueInfo]) -> Result<ValueInfo> {
        Ok(match self.to {
            Axis::Positions => self.d.position_info(),
            _ => self.d.frame_info(),
        })
    }
    fn workspace_bytes(&self, _: &[&ValueInfo], o: &ValueInfo, _: Workspace) -> usize {
        o.bytes()
    }
    fn flops(&self, _: &[&ValueInfo], _: &ValueInfo) -> u64 {
        0
    }
    fn forward(&self, x: &[&Tensor], ctx: &SliceCtx) -> Result<Tensor> {
        let d = self.d;
        match self.to {
            Axis::Positions => gather(x[0], ctx.rows(d.b * d.s), (d.s, d.t), 2, (2, 0, 1)),
            _ => gather(x[0], ctx.rows(d.b * d.t), (d.t, d.s), 1, (1, 2, 0)),
        }
    }
}

/// Reduction: per batch item, the sum of squares over all its positions, frames, channels.
#[derive(Debug)]
pub struct SumSq(pub Dims);
toy_op! {
    SumSq: "sum_sq", Positions, flops 2, workspace 1;
    fn is_reduction(&self) -> bool {
        true
    }
    fn merge(&self, acc: &Tensor, partial: &Tensor) -> Result<Tensor> {
        Ok((acc + partial)?)
    }
    fn infer(&self, _: &[&ValueInfo]) -> Result<ValueInfo> {
        Ok(ValueInfo::new((self.0.b, 1), DType::F32, Layout::WHOLE))
    }
    fn forward(&self, x: &[&Tensor], ctx: &SliceCtx) -> Result<Tensor> {
        let d = self.0;
        let rows = ctx.rows(d.b * d.s);
        let mut sums = vec![0f32; d.b];
        for (b, r) in pieces(rows.clone(), d.s) {
            let off = b * d.s + r.start - rows.start;
            let piece = x[0].narrow(0, off, r.len())?;
            sums[b] = piece.sqr()?.sum_all()?.to_scalar::<f32>()?;
        }
        Ok(Tensor::from_vec(sums, (d.b, 1), x[0].device())?)
    }
}

/// Pointwise per position, with the per-batch statistic of [`SumSq`] read whole.
#[derive(Debug)]
pub struct Normalize(pub Dims);
toy_op! {
    Normalize: "normalize", Positions, infer same, flops 1;
    fn workspace_bytes(&self, _: &[&ValueInfo], o: &ValueInfo, _: Workspace) -> usize {
        o.bytes()
    }
    fn forward(&self, x: &[&Tensor], ctx: &SliceCtx) -> Result<Tensor> {
        let d = self.0;
        let rows = ctx.rows(d.b * d.s);
        let stats = x[1].flatten_all()?.to_vec1::<f32>()?;
        let parts = pieces(rows.clone(), d.s)
            .into_iter()
            .map(|(b, r)| {
                let off = b * d.s + r.start - rows.start;
                let scale = 1.0 / (1.0 + stats[b] as f64 / (d.s * d.t * d.c) as f64).sqrt();
                Ok((x[0].narrow(0, off, r.len())? * scale)?)
            })
            .collect::<Result<Vec<_>>>()?;
        cat0(parts)
    }
}

/// Frame-wise: adds a per-frame embedding `(B*T, C)` (a side input sliced with the frames).
#[derive(Debug)]
pub struct AddFrameEmb;
toy_op! {
    AddFrameEmb: "add_frame_emb", Frames, infer same, flops 1;
    fn forward(&self, x: &[&Tensor], _: &SliceCtx) -> Result<Tensor> {
        Ok(x[0].broadcast_add(&x[1].unsqueeze(2)?)?)
    }
}

/// Position-wise: adds per-batch conditioning `(B, C)` read whole; the batch item of each
/// row comes from the slice context.
#[derive(Debug)]
pub struct AddCond(pub Dims);
toy_op! {
    AddCond: "add_cond", Positions, infer same, flops 1;
    fn workspace_bytes(&self, _: &[&ValueInfo], o: &ValueInfo, _: Workspace) -> usize {
        o.bytes()
    }
    fn forward(&self, x: &[&Tensor], ctx: &SliceCtx) -> Result<Tensor> {
        let d = self.0;
        let rows = ctx.rows(d.b * d.s);
        let parts = pieces(rows.clone(), d.s)
            .into_iter()
            .map(|(b, r)| {
                let off = b * d.s + r.start - rows.start;
                let cond = x[1].narrow(0, b, 1)?.unsqueeze(0)?;
                Ok(x[0].narrow(0, off, r.len())?.broadcast_add(&cond)?)
            })
            .collect::<Result<Vec<_>>>()?;
        cat0(parts)
    }
}

/// The three inputs every toy graph starts from: the video, a per-frame embedding and a
/// per-batch conditioning.
pub fn toy_inputs(g: &mut Graph, d: Dims) -> (ValueId, ValueId, ValueId) {
    let x = g.input("x", d.frame_info()).unwrap();
    let emb_layout = Layout {
        rows: AxisTag::Interleaved,
        ..Layout::PER_FRAME
    };
    let emb = g
        .input(
            "emb",
            ValueInfo::new((d.b * d.t, d.c), DType::F32, emb_layout),
        )
        .unwrap();
    let cond = g
        .input(
            "cond",
            ValueInfo::new((d.b, d.c), DType::F32, Layout::WHOLE),
        )
        .unwrap();
    (x, emb, cond)
}

/// Deterministic input tensors for a graph built with [`toy_inputs`].
pub fn toy_tensors(d: Dims, seed: u64) -> Vec<Tensor> {
    let dev = Device::Cpu;
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut next = move |n: usize| -> Vec<f32> {
        (0..n)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
            })
            .collect()
    };
    vec![
        Tensor::from_vec(next(d.b * d.t * d.c * d.s), (d.b * d.t, d.c, d.s), &dev).unwrap(),
        Tensor::from_vec(next(d.b * d.t * d.c), (d.b * d.t, d.c), &dev).unwrap(),
        Tensor::from_vec(next(d.b * d.c), (d.b, d.c), &dev).unwrap(),
    ]
}

/// A fixed graph touching every op kind: the subject of the dump snapshots and examples.
pub fn sample_graph(d: Dims) -> Graph {
    let mut g = Graph::new();
    let (x, emb, cond) = toy_inputs(&mut g, d);
    let a = g.push("down.norm", FrameNorm, &[x]).unwrap();
    let a = g.push("down.emb", AddFrameEmb, &[a, emb]).unwrap();
    let p = g
        .push("temporal.in", Relayout::to_positions(d), &[a])
        .unwrap();
    let s = g.push("temporal.stats", SumSq(d), &[p]).unwrap();
    let p = g.push("temporal.norm", Normalize(d), &[p, s]).unwrap();
    let p = g.push("temporal.mix", TimeMix, &[p]).unwrap();
    let p = g.push("temporal.cond", AddCond(d), &[p, cond]).unwrap();
    let f = g
        .push("temporal.out", Relayout::to_frames(d), &[p])
        .unwrap();
    let f = g.push("up.skip", Add, &[f, a]).unwrap();
    let f = g.push("up.act", Squash, &[f]).unwrap();
    g.set_outputs(&[f]);
    g
}

/// `|a - b| / |b|`, summed in f64 so that the figure does not drown in f32 rounding (a
/// zero `b` counts as a tiny norm, not a division by zero).
pub fn rel_l2(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let sum_sq = |t: &Tensor| -> f64 {
        let t = t.to_dtype(DType::F64).unwrap();
        t.sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let diff = (a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap()).unwrap();
    (sum_sq(&diff) / sum_sq(b).max(1e-300)).sqrt()
}

/// A random graph: each step `(kind, a, b)` applies one toy op to earlier values of the right
/// layout (`a`, `b` pick them). Outputs: the last frame-major value and the last position-major
/// one, if any.
pub fn random_graph(d: Dims, steps: &[(u8, u16, u16)]) -> Graph {
    let mut g = Graph::new();
    let (x, emb, cond) = toy_inputs(&mut g, d);
    let (mut fs, mut ps): (Vec<ValueId>, Vec<ValueId>) = (vec![x], vec![]);
    let pick = |v: &[ValueId], r: u16| v[r as usize % v.len()];
    for (i, &(kind, a, b)) in steps.iter().enumerate() {
        let name = format!("n{i}");
        let kind = if ps.is_empty() && matches!(kind % 9, 2 | 3 | 6 | 8) {
            1
        } else {
            kind % 9
        };
        let both = |pf: bool| if pf { &ps } else { &fs };
        match kind {
            0 => fs.push(g.push(&name, FrameNorm, &[pick(&fs, a)]).unwrap()),
            1 => ps.push(
                g.push(&name, Relayout::to_positions(d), &[pick(&fs, a)])
                    .unwrap(),
            ),
            2 => ps.push(g.push(&name, TimeMix, &[pick(&ps, a)]).unwrap()),
            3 => fs.push(
                g.push(&name, Relayout::to_frames(d), &[pick(&ps, a)])
                    .unwrap(),
            ),
            4 | 5 => {
                let on_p = b % 2 == 1 && !ps.is_empty();
                let pool = both(on_p).clone();
                let v = if kind == 4 {
                    g.push(&name, Squash, &[pick(&pool, a)]).unwrap()
                } else {
                    g.push(&name, Add, &[pick(&pool, a), pick(&pool, b / 2)])
                        .unwrap()
                };
                if on_p {
                    ps.push(v)
                } else {
                    fs.push(v)
                }
            }
            6 => {
                let p = pick(&ps, a);
                let s = g.push(&format!("{name}.stats"), SumSq(d), &[p]).unwrap();
                ps.push(g.push(&name, Normalize(d), &[p, s]).unwrap());
            }
            7 => fs.push(g.push(&name, AddFrameEmb, &[pick(&fs, a), emb]).unwrap()),
            _ => ps.push(g.push(&name, AddCond(d), &[pick(&ps, a), cond]).unwrap()),
        }
    }
    let mut outputs = vec![*fs.last().unwrap()];
    outputs.extend(ps.last());
    g.set_outputs(&outputs);
    g
}

/// Whether nodes `nodes` form a valid group along `axis` (`None`: unsliced).
fn joinable(g: &Graph, nodes: std::ops::Range<usize>, axis: Option<Axis>) -> Option<usize> {
    let group = Group {
        nodes,
        axis,
        chunks: 1,
        workspace_limit: None,
    };
    check_group(g, &group).ok()
}

/// A random valid plan: groups grow while the next node can join on the same axis; chunk
/// counts anywhere from 1 to the axis length (so mostly counts that do not divide it).
pub fn random_plan(g: &Graph, choices: &[u32]) -> Plan {
    let mut it = choices.iter().cycle();
    let mut next = || *it.next().unwrap() as usize;
    let n = g.nodes().len();
    let mut groups = Vec::new();
    let mut i = 0;
    while i < n {
        let axes: Vec<Option<Axis>> = [
            None,
            Some(Axis::Frames),
            Some(Axis::Positions),
            Some(Axis::Rows),
        ]
        .into_iter()
        .filter(|&a| joinable(g, i..i + 1, a).is_some())
        .collect();
        let axis = axes[next() % axes.len()];
        let mut end = i + 1;
        if axis.is_some() {
            while end < n && next() % 4 != 0 && joinable(g, i..end + 1, axis).is_some() {
                end += 1;
            }
        }
        let len = joinable(g, i..end, axis).expect("grown only while valid");
        let chunks = if axis.is_some() { 1 + next() % len } else { 1 };
        groups.push(Group {
            nodes: i..end,
            axis,
            chunks,
            workspace_limit: None,
        });
        i = end;
    }
    Plan::new(groups)
}

/// Small video dimensions: 1-2 videos, 1-4 frames, 1-3 channels, 1-7 positions.
pub fn dims() -> impl Strategy<Value = Dims> {
    (1usize..=2, 1usize..=4, 1usize..=3, 1usize..=7).prop_map(|(b, t, c, s)| Dims { b, t, c, s })
}

/// The steps of a [`random_graph`] of 1 to `max` nodes.
pub fn steps(max: usize) -> impl Strategy<Value = Vec<(u8, u16, u16)>> {
    prop::collection::vec((any::<u8>(), any::<u16>(), any::<u16>()), 1..max)
}

/// The largest relative L2 error of `plan`'s outputs against the trivial plan's on the same
/// seeded inputs (a graph made with [`toy_inputs`]); also checks that the measured peak stays
/// within the planned one and that both count the same FLOPs.
pub fn error_vs_trivial(g: &Graph, d: Dims, plan: &Plan, seed: u64) -> Result<f64> {
    error_on(g, toy_tensors(d, seed), plan)
}

/// [`error_vs_trivial`] on the given inputs.
pub fn error_on(g: &Graph, inputs: Vec<Tensor>, plan: &Plan) -> Result<f64> {
    let dev = Device::Cpu;
    let trivial = Plan::trivial(g);
    let reference = Executor::new(g, &trivial, &dev)?.run(inputs.clone(), &Request::default())?;
    let exec = Executor::new(g, plan, &dev)?;
    let got = exec.run(inputs, &Request::default())?;
    let planned = exec.dry_run(&[], &[])?;
    if got.stats.peak_bytes > planned.peak_bytes || got.stats.flops != planned.flops {
        return Err(IrError::Plan(format!(
            "measured peak {} and {} FLOPs, planned {} and {}",
            got.stats.peak_bytes, got.stats.flops, planned.peak_bytes, planned.flops
        )));
    }
    Ok(got
        .outputs
        .iter()
        .zip(&reference.outputs)
        .map(|(a, b)| rel_l2(a, b))
        .fold(0.0, f64::max))
}

/// Re-cost group `pick` (modulo the group count) of `plan` alone under another chunk count
/// (`1 + rechunk` modulo its axis length, when sliced) and workspace `limit`, and check that
/// [`PlanCost`] gives what dry runs of the whole plan and of the whole changed plan give; and
/// that merging it with the next group ([`PlanCost::merged`]) costs what a whole dry run does.
pub fn check_recost(g: &Graph, plan: &Plan, pick: usize, rechunk: usize, limit: Option<usize>) {
    let mut cost = PlanCost::new(g, plan.clone()).unwrap();
    assert_eq!(
        cost.peak(),
        Executor::plan_stats(g, plan).unwrap().peak_bytes
    );
    let gi = pick % plan.groups.len();
    let mut setting = plan.groups[gi].clone();
    let len = check_group(g, &setting).unwrap();
    if setting.axis.is_some() {
        setting.chunks = 1 + rechunk % len;
    }
    setting.workspace_limit = limit;
    let trial = cost.trial(gi, setting.clone()).unwrap();
    let mut changed = plan.clone();
    changed.groups[gi] = setting;
    let whole = Executor::plan_stats(g, &changed).unwrap();
    assert_eq!(trial.peak, whole.group_peaks.get(gi).copied().unwrap_or(0));
    cost.accept(trial);
    assert_eq!(cost.peak(), whole.peak_bytes);
    assert_eq!(cost.plan(), &changed);
    // Merged with the next group into one unsliced group, costed alone and in full.
    if let Some(next) = changed.groups.get(gi + 1) {
        let whole_group = Group::whole(changed.groups[gi].nodes.start..next.nodes.end);
        let (merged, peak) = cost.merged((gi, gi + 1), whole_group.clone()).unwrap();
        let mut fused = changed.clone();
        fused.groups.splice(gi..=gi + 1, [whole_group]);
        let full = PlanCost::new(g, fused.clone()).unwrap();
        assert_eq!(merged.plan(), &fused);
        assert_eq!(merged.group_peaks(), full.group_peaks());
        assert_eq!((peak, merged.peak()), (full.group_peaks()[gi], full.peak()));
    }
}
