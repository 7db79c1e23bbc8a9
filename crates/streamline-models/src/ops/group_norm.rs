//! GroupNorm over (C/G, T, H, W), split so that slicing along positions stays exact.
//!
//! The statistics of a temporal GroupNorm span every position and frame of a batch item, so
//! they cannot be computed per slice. [`GroupNormStats`] is a reduction: each slice yields
//! per-(batch item, group) counts, means and centered sums of squares that merge exactly
//! (Chan et al.'s parallel update), in f64. [`GroupNormApply`] is then pointwise per position.
//! The paper's official code instead normalizes each slice with its own statistics.
//!
//! [`GroupNormFrames`] is the per-frame GroupNorm of spatial layers, over (C/G, H, W).

use std::ops::Range;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use streamline_ir::op_contract;
use streamline_ir::{
    chunk_ranges, IrError, Kernels, Layout, Op, Result, RowRule, SliceCtx, ValueInfo, Workspace,
};

use streamline_kernels::portable::{self, norm::BatchRows};
use streamline_kernels::{group_norm_workspace, group_sums, group_sums_runs, ChannelTables};

use super::kernels;
use super::layout::{batch_ids, batch_pieces, by_row_chunks, info_of, row_chunk};
use super::rows::{band_dims, band_dims_of, unbanded, GroupNormFrameApply, GroupNormFrameStats};
use super::VideoDims;

/// Count, mean and centered sum of squares of one (batch item, group).
#[derive(Copy, Clone, Debug, Default, PartialEq)]
struct Moments {
    count: f64,
    mean: f64,
    m2: f64,
}

impl Moments {
    fn merge(self, o: Moments) -> Moments {
        let count = self.count + o.count;
        if count == 0.0 {
            return Moments::default();
        }
        let delta = o.mean - self.mean;
        Moments {
            count,
            mean: self.mean + delta * o.count / count,
            m2: self.m2 + o.m2 + delta * delta * self.count * o.count / count,
        }
    }
}

/// The moments as the graph carries them: f32, which every device has (Metal has no f64).
fn moments_to_tensor(m: &[Moments], batch: usize, groups: usize) -> Result<Tensor> {
    let flat: Vec<f32> = m
        .iter()
        .flat_map(|m| [m.count, m.mean, m.m2])
        .map(|v| v as f32)
        .collect();
    Ok(Tensor::from_vec(flat, (batch, groups, 3), &Device::Cpu)?)
}

fn moments_from_tensor(t: &Tensor) -> Result<Vec<Moments>> {
    let flat = t.flatten_all()?.to_vec1::<f32>()?;
    Ok(flat
        .chunks_exact(3)
        .map(|c| Moments {
            count: c[0].into(),
            mean: c[1].into(),
            m2: c[2].into(),
        })
        .collect())
}

fn check_groups(channels: usize, groups: usize) -> Result<usize> {
    if groups == 0 || channels % groups != 0 {
        return Err(IrError::Plan(format!(
            "GroupNorm with {groups} groups cannot split {channels} channels"
        )));
    }
    Ok(channels / groups)
}

/// Per-(batch item, group) moments of a position-major `(B*H*W, T, C)` feature: a `(B, G, 3)`
/// f32 tensor of count, mean and centered sum of squares (accumulated in f64 on the CPU).
#[derive(Debug, Clone)]
pub struct GroupNormStats {
    pub dims: VideoDims,
    pub channels: usize,
    pub groups: usize,
}

impl GroupNormStats {
    pub fn new(dims: VideoDims, channels: usize, groups: usize) -> Result<Self> {
        check_groups(channels, groups)?;
        Ok(GroupNormStats {
            dims,
            channels,
            groups,
        })
    }

    /// Add the moments of rows `rows` (absolute positions) of `x` `(n, T, C)` into `moments`.
    ///
    /// Sums run in f32 over each group's channels of every (position, frame), then in f64 over
    /// the rows of each batch item (the kernel's [`group_sums`]). Each batch item's rows are
    /// centered by their own mean in a second pass, and their moments merged in.
    fn add_moments(&self, x: &Tensor, rows: Range<usize>, moments: &mut [Moments]) -> Result<()> {
        let d = self.dims;
        let per_group = self.channels / self.groups;
        let t = x.dim(1)?;
        let pieces = batch_pieces(rows.clone(), d.hw());
        let local: Vec<Range<usize>> = pieces
            .iter()
            .map(|(b, within)| {
                let offset = b * d.hw() + within.start - rows.start;
                offset..offset + within.len()
            })
            .collect();
        let host = |t: Tensor| -> Result<Vec<f64>> { Ok(t.flatten_all()?.to_vec1::<f64>()?) };
        let sums = host(group_sums(x, self.groups, &local, None)?)?;
        let counts: Vec<f64> = local
            .iter()
            .map(|r| (r.len() * t * per_group) as f64)
            .collect();
        let means: Vec<f64> = sums
            .iter()
            .enumerate()
            .map(|(i, s)| s / counts[i / self.groups])
            .collect();
        let centers: Vec<f32> = means.iter().map(|&m| m as f32).collect();
        let m2s = host(group_sums(x, self.groups, &local, Some(&centers))?)?;
        for (i, ((mean, m2), center)) in means.iter().zip(m2s).zip(centers).enumerate() {
            let (piece, g) = (i / self.groups, i % self.groups);
            let count = counts[piece];
            // The f32 center differs from the f64 mean by rounding; correct M2 for the shift.
            let shift = mean - f64::from(center);
            let m = Moments {
                count,
                mean: *mean,
                m2: (m2 - count * shift * shift).max(0.0),
            };
            let slot = &mut moments[pieces[piece].0 * self.groups + g];
            *slot = slot.merge(m);
        }
        Ok(())
    }

    /// Peak transient bytes on `rows` positions of `t` frames of `size`-byte elements: the
    /// kernel's f32 copy of one row per run for half types.
    fn peak(&self, rows: usize, t: usize, size: usize) -> usize {
        if size == 4 {
            0
        } else {
            streamline_kernels::Compute::for_dtype(DType::F16, &Device::Cpu)
                .widened_bytes(group_sums_runs(rows) * t * self.channels)
        }
    }

    fn tiling(&self, x: &ValueInfo, ws: Workspace) -> (usize, usize) {
        let d = x.shape.dims();
        let size = x.dtype.size_in_bytes();
        row_chunk(d[0], 0, ws.limit, |r| match ws.kernels {
            Kernels::Cpu => self.peak(r, d[1], size),
            _ => {
                // Where a slice starts is not known here; the pieces of one from row 0 cost
                // the same as any other's, up to one more batch boundary (a few values).
                let pieces = self.rows(0).pieces(r);
                portable::norm::moments_workspace(
                    &pieces,
                    d[1],
                    self.channels,
                    self.groups,
                    x.dtype,
                )
            }
        })
    }

    fn rows(&self, first: usize) -> BatchRows {
        BatchRows {
            per_batch: self.dims.hw(),
            first,
        }
    }
}

impl Op for GroupNormStats {
    // A row band holds every frame of its positions: its moments merge with the other bands'.
    op_contract!("group_norm_stats", Positions, rows RowRule::Reduce);

    fn describe(&self) -> String {
        format!("g{}", self.groups)
    }

    fn is_reduction(&self) -> bool {
        true
    }

    /// Chan et al.'s update as tensor ops, on the moments' device (whichever kernels made
    /// them): no host round trip between slices.
    fn merge(&self, acc: &Tensor, partial: &Tensor) -> Result<Tensor> {
        Ok(portable::norm::merge_moments(acc, partial)?)
    }

    fn infer(&self, inputs: &[&ValueInfo]) -> Result<ValueInfo> {
        let d = self.dims;
        let x = inputs[0];
        if x.shape.dims() != [d.positions_len(), d.frames, self.channels] {
            return Err(IrError::Plan(format!(
                "group_norm_stats expects ({}, {}, {}), got {:?}",
                d.positions_len(),
                d.frames,
                self.channels,
                x.shape.dims()
            )));
        }
        Ok(ValueInfo::new(
            (d.batch, self.groups, 3),
            DType::F32,
            Layout::WHOLE,
        ))
    }

    fn workspace_bytes(&self, inputs: &[&ValueInfo], _: &ValueInfo, ws: Workspace) -> usize {
        let dims = band_dims_of(self.dims, inputs[0].shape.dims()[0], ws);
        GroupNormStats {
            dims,
            ..self.clone()
        }
        .tiling(inputs[0], ws)
        .1
    }

    fn flops(&self, inputs: &[&ValueInfo], _: &ValueInfo) -> u64 {
        4 * inputs[0].shape.elem_count() as u64
    }

    fn forward(&self, inputs: &[&Tensor], ctx: &SliceCtx) -> Result<Tensor> {
        if ctx.band.is_some() {
            let dims = band_dims(self.dims, ctx);
            return GroupNormStats {
                dims,
                ..self.clone()
            }
            .forward(inputs, &unbanded(ctx));
        }
        let d = self.dims;
        let x = inputs[0];
        let rows = ctx.rows(d.positions_len());
        let (chunk, _) = self.tiling(&info_of(x), ctx.workspace());
        let chunks = chunk_ranges(rows.len(), rows.len().div_ceil(chunk.max(1)));
        if ctx.kernels != Kernels::Cpu {
            let mut acc: Option<Tensor> = None;
            for r in chunks {
                let part = x.narrow(0, r.start, r.len())?;
                let pieces = self.rows(rows.start + r.start).pieces(r.len());
                let m = portable::norm::group_moments(&part, self.groups, &pieces, d.batch)?;
                acc = Some(match acc {
                    Some(a) => portable::norm::merge_moments(&a, &m)?,
                    None => m,
                });
            }
            return acc.ok_or_else(|| IrError::Plan("group_norm_stats of no rows".into()));
        }
        let mut moments = vec![Moments::default(); d.batch * self.groups];
        for r in chunks {
            let abs = rows.start + r.start..rows.start + r.end;
            self.add_moments(&x.narrow(0, r.start, r.len())?, abs, &mut moments)?;
        }
        moments_to_tensor(&moments, d.batch, self.groups)?
            .to_device(x.device())
            .map_err(IrError::from)
    }
}

/// `(x - mean) / sqrt(var + eps) * weight + bias` on a position-major `(B*H*W, T, C)` feature,
/// with the statistics of [`GroupNormStats`]; pointwise per position. On f32 on the CPU, one
/// kernel pass (`streamline_kernels::batch_affine`) with a scale and shift per batch item and
/// channel.
#[derive(Debug, Clone)]
pub struct GroupNormApply {
    pub dims: VideoDims,
    pub groups: usize,
    pub eps: f64,
    /// Host copies for the CPU kernels' tables, and the checkpoint's tensors for the
    /// portable path, which builds its tables on the device.
    weight: Vec<f64>,
    bias: Vec<f64>,
    tensors: [Tensor; 2],
    param_dtype: DType,
}

impl GroupNormApply {
    pub fn new(
        dims: VideoDims,
        groups: usize,
        eps: f64,
        weight: &Tensor,
        bias: &Tensor,
    ) -> Result<Self> {
        let host = |t: &Tensor| -> Result<Vec<f64>> {
            let values = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            Ok(values.into_iter().map(f64::from).collect())
        };
        let (w, b) = (host(weight)?, host(bias)?);
        if w.len() != b.len() {
            return Err(IrError::Plan(format!(
                "GroupNorm weight has {} channels, bias {}",
                w.len(),
                b.len()
            )));
        }
        check_groups(w.len(), groups)?;
        Ok(GroupNormApply {
            dims,
            groups,
            eps,
            weight: w,
            bias: b,
            tensors: [weight.clone(), bias.clone()],
            param_dtype: weight.dtype(),
        })
    }

    fn channels(&self) -> usize {
        self.weight.len()
    }

    /// The same normalization of a video of extent `dims` (a band's).
    fn on(&self, dims: VideoDims) -> Self {
        GroupNormApply {
            dims,
            ..self.clone()
        }
    }

    /// Per batch item `(B, C)` scale `weight * rstd` and shift `bias - mean * scale`, from
    /// the statistics in f64, in the dtype of `x`.
    /// Per batch item and channel: the scale and shift the normalized output is.
    fn table_values(&self, stats: &[Moments]) -> (Vec<f64>, Vec<f64>) {
        let (batch, c) = (self.dims.batch, self.channels());
        let per_group = c / self.groups;
        let (mut scale, mut shift) = (Vec::new(), Vec::new());
        for b in 0..batch {
            for ch in 0..c {
                let m = stats[b * self.groups + ch / per_group];
                let rstd = 1.0 / (m.m2 / m.count + self.eps).sqrt();
                let s = self.weight[ch] * rstd;
                scale.push(s);
                shift.push(self.bias[ch] - m.mean * s);
            }
        }
        (scale, shift)
    }

    fn tables(&self, stats: &[Moments], x: &Tensor) -> Result<(Tensor, Tensor)> {
        let (batch, c) = (self.dims.batch, self.channels());
        let (scale, shift) = self.table_values(stats);
        let table = |v: Vec<f64>| -> Result<Tensor> {
            Ok(Tensor::from_vec(v, (batch, c), x.device())?.to_dtype(x.dtype())?)
        };
        Ok((table(scale)?, table(shift)?))
    }

    /// The f32 CPU kernel's workspace (the tables in f64, their f32 copies and the kernel's
    /// own), `None` where it does not run: other dtypes, or a limit it would not fit.
    fn kernel_workspace(&self, x: &ValueInfo, ws: Workspace) -> Option<usize> {
        let bytes = self.dims.batch * self.channels() * (2 * 8 + 4 * 4);
        let fits = ws.limit.is_none_or(|l| bytes <= l);
        (ws.kernels == Kernels::Cpu && x.dtype == DType::F32 && fits).then_some(bytes)
    }

    /// The f32 CPU kernel's output, `None` where it does not run.
    fn apply_kernel(&self, x: &Tensor, stats: &Tensor, ctx: &SliceCtx) -> Option<Result<Tensor>> {
        self.kernel_workspace(&info_of(x), ctx.workspace())?;
        let first = ctx.rows(self.dims.positions_len()).start;
        let moments = match moments_from_tensor(stats) {
            Ok(m) => m,
            Err(e) => return Some(Err(e)),
        };
        let (scale, shift) = self.table_values(&moments);
        let narrow = |v: Vec<f64>| v.into_iter().map(|v| v as f32).collect::<Vec<f32>>();
        let (scale, shift) = (narrow(scale), narrow(shift));
        let tables = ChannelTables {
            scale: Some(&scale),
            shift: &shift,
            channels: self.channels(),
        };
        let rows = BatchRows {
            per_batch: self.dims.hw(),
            first,
        };
        streamline_kernels::batch_affine(x, tables, 1, rows).map(|r| Ok(r?))
    }

    /// Per chunk of rows, with the tables alive: their batch ids, per-row scale and shift,
    /// the scaled rows, then (scale freed) the result.
    fn tiling(&self, x: &ValueInfo, output: &ValueInfo, ws: Workspace) -> (usize, usize) {
        let (rows, size) = (x.shape.dims()[0], x.dtype.size_in_bytes());
        let c = self.channels();
        if ws.kernels != Kernels::Cpu {
            // The portable apply tiles itself; chunks here only obey a group's limit.
            let (t, batch) = (x.shape.dims()[1], self.dims.batch);
            let at = BatchRows {
                per_batch: self.dims.hw(),
                first: 0,
            };
            return row_chunk(rows, output.bytes(), ws.limit, |r| {
                r * (output.bytes() / rows.max(1))
                    + portable::norm::group_norm_apply_workspace(r, at, t, c, batch, x.dtype)
            });
        }
        if let Some(bytes) = self.kernel_workspace(x, ws) {
            return (rows, bytes);
        }
        let tables = self.dims.batch * c * (2 * 8 + 2 * size);
        let row = x.bytes() / rows.max(1);
        row_chunk(rows, output.bytes(), ws.limit, |r| {
            let gathered = r * (std::mem::size_of::<u32>() + c * size);
            tables + (gathered + r * c * size + r * row).max(gathered + 2 * r * row)
        })
    }
}

impl Op for GroupNormApply {
    op_contract!("group_norm_apply", Positions, rows RowRule::Same);

    fn describe(&self) -> String {
        format!("g{}", self.groups)
    }

    fn infer(&self, inputs: &[&ValueInfo]) -> Result<ValueInfo> {
        let d = self.dims;
        let (x, stats) = (inputs[0], inputs[1]);
        if x.shape.dims() != [d.positions_len(), d.frames, self.channels()]
            || stats.shape.dims() != [d.batch, self.groups, 3]
        {
            return Err(IrError::Plan(format!(
                "group_norm_apply expects ({}, {}, {}) and its statistics ({}, {}, 3), got {:?} and {:?}",
                d.positions_len(),
                d.frames,
                self.channels(),
                d.batch,
                self.groups,
                x.shape.dims(),
                stats.shape.dims()
            )));
        }
        Ok(x.clone())
    }

    fn workspace_bytes(&self, inputs: &[&ValueInfo], output: &ValueInfo, ws: Workspace) -> usize {
        let dims = band_dims_of(self.dims, inputs[0].shape.dims()[0], ws);
        self.on(dims).tiling(inputs[0], output, ws).1
    }

    fn flops(&self, inputs: &[&ValueInfo], _: &ValueInfo) -> u64 {
        2 * inputs[0].shape.elem_count() as u64
    }

    fn param_bytes(&self) -> usize {
        2 * self.channels() * self.param_dtype.size_in_bytes()
    }

    fn forward(&self, inputs: &[&Tensor], ctx: &SliceCtx) -> Result<Tensor> {
        if ctx.band.is_some() {
            return self
                .on(band_dims(self.dims, ctx))
                .forward(inputs, &unbanded(ctx));
        }
        let d = self.dims;
        let x = inputs[0];
        let rows = ctx.rows(d.positions_len());
        let (chunk, _) = self.tiling(&info_of(x), &info_of(x), ctx.workspace());
        if ctx.kernels != Kernels::Cpu {
            let [w, b] = &self.tensors;
            return by_row_chunks(x.dims(), x.dtype(), x.device(), chunk, |r| {
                let at = BatchRows {
                    per_batch: d.hw(),
                    first: rows.start + r.start,
                };
                let part = x.narrow(0, r.start, r.len())?;
                Ok(portable::norm::group_norm_apply(
                    &part, inputs[1], w, b, self.eps, at,
                )?)
            });
        }
        if let Some(out) = self.apply_kernel(x, inputs[1], ctx) {
            return out;
        }
        let (scale, shift) = self.tables(&moments_from_tensor(inputs[1])?, x)?;
        by_row_chunks(x.dims(), x.dtype(), x.device(), chunk, |r| {
            let ids = batch_ids(rows.start + r.start..rows.start + r.end, d.hw(), x.device())?;
            let per_row = |table: &Tensor| -> Result<Tensor> {
                Ok(table
                    .index_select(&ids, 0)?
                    .reshape((r.len(), 1, self.channels()))?)
            };
            let (scale, shift) = (per_row(&scale)?, per_row(&shift)?);
            let scaled = x.narrow(0, r.start, r.len())?.broadcast_mul(&scale)?;
            drop(scale);
            Ok(scaled.broadcast_add(&shift)?)
        })
    }
}

/// GroupNorm of each frame `(N, C, H, W)` alone: statistics over (C/G, H, W).
///
/// On the CPU, streamline's kernel: one pass per (frame, group) block for the statistics,
/// one more for the centered moment, and the result written once (f32 inside).
#[derive(Debug, Clone)]
pub struct GroupNormFrames {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
    channels: usize,
    groups: usize,
}

impl GroupNormFrames {
    pub fn new(
        groups: usize,
        channels: usize,
        eps: f64,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        if groups == 0 || channels % groups != 0 {
            candle_core::bail!("GroupNorm with {groups} groups cannot split {channels} channels")
        }
        Ok(GroupNormFrames {
            weight: vb.get_with_hints(channels, "weight", candle_nn::Init::Const(1.))?,
            bias: vb.get_with_hints(channels, "bias", candle_nn::Init::Const(0.))?,
            eps,
            channels,
            groups,
        })
    }

    fn run(&self, x: &Tensor, k: Kernels) -> candle_core::Result<Tensor> {
        kernels::group_norm(k, x, [&self.weight, &self.bias], self.groups, self.eps)
    }

    /// The same GroupNorm as statistics and their application, so that it can run on bands
    /// of rows (see `ops::rows`).
    pub fn split(&self) -> (GroupNormFrameStats, GroupNormFrameApply) {
        let stats = GroupNormFrameStats {
            channels: self.channels,
            groups: self.groups,
        };
        let apply = GroupNormFrameApply::new(self.groups, self.eps, &self.weight, &self.bias);
        (stats, apply)
    }

    fn tiling(&self, x: &ValueInfo, ws: Workspace) -> (usize, usize) {
        let dims = x.shape.dims();
        let per = x.bytes() / dims[0].max(1);
        row_chunk(dims[0], x.bytes(), ws.limit, |r| {
            let mut chunk = dims.to_vec();
            chunk[0] = r;
            let scratch = match ws.kernels {
                Kernels::Cpu => group_norm_workspace(&chunk, self.groups, x.dtype),
                _ => portable::norm::group_norm_workspace(&chunk, self.groups, x.dtype),
            };
            r * per + scratch
        })
    }
}

impl Op for GroupNormFrames {
    op_contract!("group_norm", Frames);
    fn describe(&self) -> String {
        format!("g{}", self.groups)
    }
    fn infer(&self, inputs: &[&ValueInfo]) -> Result<ValueInfo> {
        match inputs[0].shape.dims() {
            [_, c, _, _] if *c == self.channels => Ok(inputs[0].clone()),
            d => Err(IrError::Plan(format!(
                "group_norm expects (N, {}, H, W), got {d:?}",
                self.channels
            ))),
        }
    }
    fn workspace_bytes(&self, inputs: &[&ValueInfo], _: &ValueInfo, ws: Workspace) -> usize {
        self.tiling(inputs[0], ws).1
    }
    fn flops(&self, inputs: &[&ValueInfo], _: &ValueInfo) -> u64 {
        8 * inputs[0].shape.elem_count() as u64
    }
    fn param_bytes(&self) -> usize {
        (self.weight.elem_count() + self.bias.elem_count()) * self.weight.dtype().size_in_bytes()
    }
    fn forward(&self, x: &[&Tensor], ctx: &SliceCtx) -> Result<Tensor> {
        let x = x[0];
        let (chunk, _) = self.tiling(&info_of(x), ctx.workspace());
        by_row_chunks(x.dims(), x.dtype(), x.device(), chunk, |r| {
            Ok(self.run(&x.narrow(0, r.start, r.len())?, ctx.kernels)?)
        })
    }
}
