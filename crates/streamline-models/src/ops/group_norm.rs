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
use streamline_ir::{chunk_ranges, Independence, IrError, Layout, Op, Result, SliceCtx, ValueInfo};

use super::layout::{batch_ids, batch_pieces, by_row_chunks, info_of, row_chunk};
use super::nn::internal_dtype;
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

fn moments_to_tensor(m: &[Moments], batch: usize, groups: usize) -> Result<Tensor> {
    let flat: Vec<f64> = m.iter().flat_map(|m| [m.count, m.mean, m.m2]).collect();
    Ok(Tensor::from_vec(flat, (batch, groups, 3), &Device::Cpu)?)
}

fn moments_from_tensor(t: &Tensor) -> Result<Vec<Moments>> {
    let flat = t.flatten_all()?.to_vec1::<f64>()?;
    Ok(flat
        .chunks_exact(3)
        .map(|c| Moments {
            count: c[0],
            mean: c[1],
            m2: c[2],
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
/// f64 tensor of count, mean and centered sum of squares.
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
    /// the rows of each batch item. Each batch item's rows are centered by their own mean
    /// (gathered per row, so the full-size buffers are the same wherever the rows meet batch
    /// boundaries) and their moments merged in.
    fn add_moments(&self, x: &Tensor, rows: Range<usize>, moments: &mut [Moments]) -> Result<()> {
        let d = self.dims;
        let per_group = self.channels / self.groups;
        let (n, t, _) = x.dims3()?;
        let pieces = batch_pieces(rows.clone(), d.hw());
        // Per batch item of `rows`: the f64 sums per group of f32 sums `(n, T, G)`.
        let piece_sums = |sums: Tensor| -> Result<Vec<Vec<f64>>> {
            let wide = sums.to_dtype(DType::F64)?;
            drop(sums);
            pieces
                .iter()
                .map(|(b, within)| {
                    let offset = b * d.hw() + within.start - rows.start;
                    Ok(wide
                        .narrow(0, offset, within.len())?
                        .reshape((within.len() * t, self.groups))?
                        .sum(0)?
                        .to_vec1::<f64>()?)
                })
                .collect()
        };
        let x32 = x
            .to_dtype(DType::F32)?
            .reshape((n, t, self.groups, per_group))?;
        let sums = piece_sums(x32.sum(3)?)?;
        let mut mean_table = vec![0f32; d.batch * self.groups];
        let mut means = Vec::new();
        for ((b, within), sums) in pieces.iter().zip(&sums) {
            let count = (within.len() * t * per_group) as f64;
            let m: Vec<f64> = sums.iter().map(|s| s / count).collect();
            for (g, &mean) in m.iter().enumerate() {
                mean_table[b * self.groups + g] = mean as f32;
            }
            means.push((count, m));
        }
        let centered = {
            let table = Tensor::from_vec(mean_table, (d.batch, self.groups), x.device())?;
            let ids = batch_ids(rows.clone(), d.hw(), x.device())?;
            let per_row = table
                .index_select(&ids, 0)?
                .reshape((n, 1, self.groups, 1))?;
            x32.broadcast_sub(&per_row)?
        };
        drop(x32);
        let squares = centered.sqr()?;
        drop(centered);
        let square_sums = squares.sum(3)?;
        drop(squares);
        let m2s = piece_sums(square_sums)?;
        for (((b, _), (count, means)), m2) in pieces.iter().zip(means).zip(m2s) {
            for (g, (mean, m2)) in means.into_iter().zip(m2).enumerate() {
                // The f32 mean differs from the f64 one by rounding; correct M2 for the shift.
                let shift = mean - f64::from(mean as f32);
                let m = Moments {
                    count,
                    mean,
                    m2: (m2 - count * shift * shift).max(0.0),
                };
                let slot = &mut moments[b * self.groups + g];
                *slot = slot.merge(m);
            }
        }
        Ok(())
    }

    /// Peak transient bytes on `rows` positions of `t` frames of `size`-byte elements: an f32
    /// copy of a non-f32 input with its group sums (f32, then f64), the copy with the centered
    /// input, the centered input with its squares, then the squares' sums.
    fn peak(&self, rows: usize, t: usize, size: usize) -> usize {
        let elems = rows * t * self.channels;
        let copy = if size == 4 { 0 } else { 4 * elems };
        let sums = rows * t * self.groups;
        let gathered = rows * (std::mem::size_of::<u32>() + 4 * self.groups);
        [
            copy + 12 * sums,
            copy + 4 * elems + gathered,
            8 * elems,
            4 * elems + 4 * sums,
            12 * sums,
        ]
        .into_iter()
        .max()
        .unwrap_or(0)
    }

    fn tiling(&self, x: &ValueInfo, limit: Option<usize>) -> (usize, usize) {
        let d = x.shape.dims();
        let size = x.dtype.size_in_bytes();
        row_chunk(d[0], 0, limit, |r| self.peak(r, d[1], size))
    }
}

impl Op for GroupNormStats {
    fn kind(&self) -> &'static str {
        "group_norm_stats"
    }

    fn describe(&self) -> String {
        format!("g{}", self.groups)
    }

    fn independence(&self) -> Independence {
        Independence::Positions
    }

    fn is_reduction(&self) -> bool {
        true
    }

    fn merge(&self, acc: &Tensor, partial: &Tensor) -> Result<Tensor> {
        let merged: Vec<Moments> = moments_from_tensor(acc)?
            .into_iter()
            .zip(moments_from_tensor(partial)?)
            .map(|(a, b)| a.merge(b))
            .collect();
        moments_to_tensor(&merged, self.dims.batch, self.groups)?
            .to_device(acc.device())
            .map_err(IrError::from)
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
            DType::F64,
            Layout::WHOLE,
        ))
    }

    fn workspace_bytes(&self, inputs: &[&ValueInfo], _: &ValueInfo, limit: Option<usize>) -> usize {
        self.tiling(inputs[0], limit).1
    }

    fn flops(&self, inputs: &[&ValueInfo], _: &ValueInfo) -> u64 {
        4 * inputs[0].shape.elem_count() as u64
    }

    fn forward(&self, inputs: &[&Tensor], ctx: &SliceCtx) -> Result<Tensor> {
        let d = self.dims;
        let x = inputs[0];
        let rows = ctx.rows(d.positions_len());
        let (chunk, _) = self.tiling(&info_of(x), ctx.workspace_limit);
        let mut moments = vec![Moments::default(); d.batch * self.groups];
        for r in chunk_ranges(rows.len(), rows.len().div_ceil(chunk.max(1))) {
            let abs = rows.start + r.start..rows.start + r.end;
            self.add_moments(&x.narrow(0, r.start, r.len())?, abs, &mut moments)?;
        }
        moments_to_tensor(&moments, d.batch, self.groups)?
            .to_device(x.device())
            .map_err(IrError::from)
    }
}

/// `(x - mean) / sqrt(var + eps) * weight + bias` on a position-major `(B*H*W, T, C)` feature,
/// with the statistics of [`GroupNormStats`]; pointwise per position.
#[derive(Debug, Clone)]
pub struct GroupNormApply {
    pub dims: VideoDims,
    pub groups: usize,
    pub eps: f64,
    weight: Vec<f64>,
    bias: Vec<f64>,
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
            Ok(t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?)
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
            param_dtype: weight.dtype(),
        })
    }

    fn channels(&self) -> usize {
        self.weight.len()
    }

    /// Per batch item `(B, C)` scale `weight * rstd` and shift `bias - mean * scale`, from
    /// the statistics in f64, in the dtype of `x`.
    fn tables(&self, stats: &[Moments], x: &Tensor) -> Result<(Tensor, Tensor)> {
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
        let table = |v: Vec<f64>| -> Result<Tensor> {
            Ok(Tensor::from_vec(v, (batch, c), x.device())?.to_dtype(x.dtype())?)
        };
        Ok((table(scale)?, table(shift)?))
    }

    /// Per chunk of rows, with the tables alive: their batch ids, per-row scale and shift,
    /// the scaled rows, then (scale freed) the result.
    fn tiling(&self, x: &ValueInfo, output: &ValueInfo, limit: Option<usize>) -> (usize, usize) {
        let (rows, size) = (x.shape.dims()[0], x.dtype.size_in_bytes());
        let c = self.channels();
        let tables = self.dims.batch * c * (2 * 8 + 2 * size);
        let row = x.bytes() / rows.max(1);
        row_chunk(rows, output.bytes(), limit, |r| {
            let gathered = r * (std::mem::size_of::<u32>() + c * size);
            tables + (gathered + r * c * size + r * row).max(gathered + 2 * r * row)
        })
    }
}

impl Op for GroupNormApply {
    fn kind(&self) -> &'static str {
        "group_norm_apply"
    }

    fn describe(&self) -> String {
        format!("g{}", self.groups)
    }

    fn independence(&self) -> Independence {
        Independence::Positions
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

    fn workspace_bytes(
        &self,
        inputs: &[&ValueInfo],
        output: &ValueInfo,
        limit: Option<usize>,
    ) -> usize {
        self.tiling(inputs[0], output, limit).1
    }

    fn flops(&self, inputs: &[&ValueInfo], _: &ValueInfo) -> u64 {
        2 * inputs[0].shape.elem_count() as u64
    }

    fn param_bytes(&self) -> usize {
        2 * self.channels() * self.param_dtype.size_in_bytes()
    }

    fn forward(&self, inputs: &[&Tensor], ctx: &SliceCtx) -> Result<Tensor> {
        let d = self.dims;
        let x = inputs[0];
        let (scale, shift) = self.tables(&moments_from_tensor(inputs[1])?, x)?;
        let rows = ctx.rows(d.positions_len());
        let (chunk, _) = self.tiling(&info_of(x), &info_of(x), ctx.workspace_limit);
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
/// candle-nn's arithmetic (f32 inside for half types), with every intermediate freed as soon
/// as the next exists: at most two full-size f32 buffers live at once.
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

    fn run(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dims = x.dims().to_vec();
        let n = dims[0];
        let hidden = x.elem_count() / n.max(1) / self.groups;
        let dtype = x.dtype();
        let x32 = x
            .reshape((n, self.groups, hidden))?
            .to_dtype(internal_dtype(dtype))?;
        let mean = (x32.sum_keepdim(2)? / hidden as f64)?;
        let centered = x32.broadcast_sub(&mean)?;
        drop(x32);
        let var = (centered.sqr()?.sum_keepdim(2)? / hidden as f64)?;
        let normed = centered.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        drop(centered);
        let normed_x = normed.to_dtype(dtype)?.reshape(dims.as_slice())?;
        drop(normed);
        let mut w_dims = vec![1; dims.len()];
        w_dims[1] = self.channels;
        let scaled = normed_x.broadcast_mul(&self.weight.reshape(w_dims.as_slice())?)?;
        drop(normed_x);
        scaled.broadcast_add(&self.bias.reshape(w_dims)?)
    }

    /// Peak transient bytes on `elems` elements, result included: two f32 (internal dtype)
    /// buffers (centered input with its square, or with the normalized copy), or an f32 copy
    /// of a half input with the centered one; then two buffers of the input dtype.
    fn peak(&self, elems: usize, dtype: DType) -> usize {
        let internal = internal_dtype(dtype).size_in_bytes();
        elems * (2 * internal).max(2 * dtype.size_in_bytes())
    }

    fn tiling(&self, x: &ValueInfo, limit: Option<usize>) -> (usize, usize) {
        let frames = x.shape.dims()[0];
        let per = x.shape.elem_count() / frames.max(1);
        row_chunk(frames, x.bytes(), limit, |r| self.peak(r * per, x.dtype))
    }
}

impl Op for GroupNormFrames {
    fn kind(&self) -> &'static str {
        "group_norm"
    }
    fn describe(&self) -> String {
        format!("g{}", self.groups)
    }
    fn independence(&self) -> Independence {
        Independence::Frames
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
    fn workspace_bytes(&self, inputs: &[&ValueInfo], _: &ValueInfo, limit: Option<usize>) -> usize {
        self.tiling(inputs[0], limit).1
    }
    fn flops(&self, inputs: &[&ValueInfo], _: &ValueInfo) -> u64 {
        8 * inputs[0].shape.elem_count() as u64
    }
    fn param_bytes(&self) -> usize {
        (self.weight.elem_count() + self.bias.elem_count()) * self.weight.dtype().size_in_bytes()
    }
    fn forward(&self, x: &[&Tensor], ctx: &SliceCtx) -> Result<Tensor> {
        let x = x[0];
        let (chunk, _) = self.tiling(&info_of(x), ctx.workspace_limit);
        by_row_chunks(x.dims(), x.dtype(), x.device(), chunk, |r| {
            Ok(self.run(&x.narrow(0, r.start, r.len())?)?)
        })
    }
}
