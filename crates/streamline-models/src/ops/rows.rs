//! What running on bands of rows ([`Axis::Rows`]) needs beyond the row rules of the ops: the
//! per-frame GroupNorm split into statistics (a reduction over the bands) and their
//! application, and the view of a band as a shorter video.
//!
//! A GroupNorm over (C/G, H, W) cannot normalize a band before every band of its frame has
//! been seen. [`GroupNormFrameStats`] yields each band's per-(frame, group) count, mean and
//! centered sum of squares, which merge exactly (Chan et al.'s update, as the temporal
//! GroupNorm's statistics do); [`GroupNormFrameApply`] is then pointwise. Unbanded, the two
//! compute what one GroupNorm computes, so a decoder lowered with them is still original
//! inference under the trivial plan.

use candle_core::{DType, Tensor};
use streamline_ir::op_contract;
use streamline_ir::{
    IrError, Layout, Op, Result, RowBand, RowRule, SliceCtx, ValueInfo, Workspace,
};
use streamline_kernels::portable;

use super::layout::{by_row_chunks, info_of, row_chunk};
use super::nn::At;
use super::{Conv2d, VideoDims};

/// The video a call sees: on a band of rows, a video as tall as the band (every batch item
/// and frame, all channels, those rows); otherwise `dims`.
pub(crate) fn band_dims(dims: VideoDims, ctx: &SliceCtx) -> VideoDims {
    match &ctx.band {
        Some(band) => VideoDims {
            height: band.out.len(),
            ..dims
        },
        None => dims,
    }
}

/// The unsliced context of a call on a band, which ops that see the band as a shorter video
/// run under.
pub(crate) fn unbanded(ctx: &SliceCtx) -> SliceCtx {
    SliceCtx {
        workspace_limit: ctx.workspace_limit,
        kernels: ctx.kernels,
        ..SliceCtx::whole()
    }
}

/// Position-major positions of `rows` positions of a video `dims`: a band's shapes give its
/// height (`rows / (B * W)`) when the call runs on rows, which is all a workspace formula
/// knows of the band.
pub(crate) fn band_dims_of(dims: VideoDims, positions: usize, ws: Workspace) -> VideoDims {
    if ws.on_rows {
        VideoDims {
            height: positions / (dims.batch * dims.width).max(1),
            ..dims
        }
    } else {
        dims
    }
}

/// Per-(frame, group) moments of images `(N, C, H, W)`: a `(N, G, 3)` f32 tensor of count,
/// mean and centered sum of squares over (C/G, H, W), or over the rows of one band.
#[derive(Debug, Clone, Copy)]
pub struct GroupNormFrameStats {
    pub channels: usize,
    pub groups: usize,
}

/// The most bytes the GroupNorm ops' temporaries take at once when no limit asks for less:
/// they work a few (frame, group) runs at a time, so a whole-frame GroupNorm costs about what
/// a fused one does, not several f32 copies of the feature.
const RUN_CHUNK_BYTES: usize = 64 << 20;

/// The limit the GroupNorm ops tile under: the group's, capped at [`RUN_CHUNK_BYTES`].
fn run_limit(ws: Workspace) -> Option<usize> {
    Some(ws.limit.map_or(RUN_CHUNK_BYTES, |l| l.min(RUN_CHUNK_BYTES)))
}

/// Images `(N, C, H, W)` as their (frame, group) runs `(N*G, C/G, H, W)`: each run is
/// contiguous, so this is a view.
fn as_runs(x: &Tensor, groups: usize) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    Ok(x.reshape((n * groups, c / groups, h, w))?)
}

impl GroupNormFrameStats {
    /// The moments `(r, 3)` of runs `(r, C/G, H, W)`, in f32: summed along W first and then
    /// along the rest (shorter f32 sums), centered by each run's own mean.
    fn moments(runs: &Tensor) -> Result<Tensor> {
        let (r, a, h, w) = runs.dims4()?;
        let runs = runs.reshape((r, a * h, w))?.to_dtype(DType::F32)?;
        let count = (a * h * w) as f64;
        let sum = |t: &Tensor| -> Result<Tensor> { Ok(t.sum_keepdim(2)?.sum_keepdim(1)?) };
        let mean = (sum(&runs)? / count)?;
        let centered = runs.broadcast_sub(&mean)?;
        drop(runs);
        let m2 = sum(&centered.sqr()?)?;
        drop(centered);
        let counts = Tensor::full(count as f32, (r, 1, 1), mean.device())?;
        Ok(Tensor::cat(&[counts, mean, m2], 2)?.reshape((r, 3))?)
    }

    /// Runs per call and the workspace: the f32 runs (a copy for half types), then their
    /// centered copy and its square, and the chunks' moments.
    fn tiling(&self, x: &ValueInfo, ws: Workspace) -> (usize, usize) {
        let runs = x.shape.dims()[0] * self.groups;
        let per = x.shape.elem_count() / runs.max(1);
        let copy = if x.dtype == DType::F32 { 0 } else { 4 };
        row_chunk(runs, 0, run_limit(ws), |r| r * per * (copy + 8) + r * 12)
    }
}

impl Op for GroupNormFrameStats {
    op_contract!("group_norm_frame_stats", Frames, rows RowRule::Reduce);
    fn describe(&self) -> String {
        format!("g{}", self.groups)
    }
    fn merge(&self, acc: &Tensor, partial: &Tensor) -> Result<Tensor> {
        Ok(portable::norm::merge_moments(acc, partial)?)
    }
    fn infer(&self, inputs: &[&ValueInfo]) -> Result<ValueInfo> {
        match inputs[0].shape.dims() {
            &[n, c, _, _] if c == self.channels && c % self.groups.max(1) == 0 => Ok(
                ValueInfo::new((n, self.groups, 3), DType::F32, Layout::PER_FRAME),
            ),
            d => Err(IrError::Plan(format!(
                "group_norm_frame_stats in {} groups expects (N, {}, H, W), got {d:?}",
                self.groups, self.channels
            ))),
        }
    }
    fn workspace_bytes(&self, inputs: &[&ValueInfo], _: &ValueInfo, ws: Workspace) -> usize {
        self.tiling(inputs[0], ws).1
    }
    fn flops(&self, inputs: &[&ValueInfo], _: &ValueInfo) -> u64 {
        4 * inputs[0].shape.elem_count() as u64
    }
    fn forward(&self, x: &[&Tensor], ctx: &SliceCtx) -> Result<Tensor> {
        let x = x[0];
        let (chunk, _) = self.tiling(&info_of(x), ctx.workspace());
        let runs = as_runs(x, self.groups)?;
        let dims = [runs.dim(0)?, 3];
        let moments = by_row_chunks(&dims, DType::F32, x.device(), chunk, |r| {
            Self::moments(&runs.narrow(0, r.start, r.len())?)
        })?;
        Ok(moments.reshape((x.dim(0)?, self.groups, 3))?)
    }
}

/// `(x - mean) / sqrt(var + eps) * weight + bias` on images `(N, C, H, W)` with the
/// per-frame moments of [`GroupNormFrameStats`]: pointwise, row for row.
#[derive(Debug, Clone)]
pub struct GroupNormFrameApply {
    pub groups: usize,
    pub eps: f64,
    weight: Tensor,
    bias: Tensor,
}

impl GroupNormFrameApply {
    pub fn new(groups: usize, eps: f64, weight: &Tensor, bias: &Tensor) -> Self {
        GroupNormFrameApply {
            groups,
            eps,
            weight: weight.clone(),
            bias: bias.clone(),
        }
    }

    fn channels(&self) -> usize {
        self.weight.elem_count()
    }

    /// Per run `(n*G, C/G, 1, 1)` scale `weight * rstd` and shift `bias - mean * scale`,
    /// from the moments in f32, in `dtype`.
    fn tables(&self, moments: &Tensor, dtype: DType) -> Result<(Tensor, Tensor)> {
        let n = moments.dim(0)?;
        let (g, c) = (self.groups, self.channels());
        let part = |i| moments.narrow(2, i, 1);
        let (count, mean, m2) = (part(0)?, part(1)?, part(2)?);
        let rstd = ((m2 / count)? + self.eps)?.sqrt()?.recip()?;
        let per_group =
            |t: &Tensor| -> Result<Tensor> { Ok(t.to_dtype(DType::F32)?.reshape((1, g, c / g))?) };
        let scale = rstd.broadcast_mul(&per_group(&self.weight)?)?;
        let shift = per_group(&self.bias)?.broadcast_sub(&mean.broadcast_mul(&scale)?)?;
        let table =
            |t: Tensor| -> Result<Tensor> { Ok(t.reshape((n * g, c / g, 1, 1))?.to_dtype(dtype)?) };
        Ok((table(scale)?, table(shift)?))
    }

    /// Runs per call and the workspace: the tables of every run, then a chunk's scaled runs
    /// and its result beside them.
    fn tiling(&self, x: &ValueInfo, output: &ValueInfo, ws: Workspace) -> (usize, usize) {
        let n = x.shape.dims()[0];
        let runs = n * self.groups;
        let per = x.bytes() / runs.max(1);
        let tables = n * self.channels() * (2 * 4 + 2 * x.dtype.size_in_bytes());
        row_chunk(runs, output.bytes(), run_limit(ws), |r| {
            tables + 2 * r * per
        })
    }
}

impl Op for GroupNormFrameApply {
    op_contract!("group_norm_frame_apply", Frames, rows RowRule::Same);
    fn describe(&self) -> String {
        format!("g{}", self.groups)
    }
    fn infer(&self, inputs: &[&ValueInfo]) -> Result<ValueInfo> {
        let (x, m) = (inputs[0], inputs[1]);
        match (x.shape.dims(), m.shape.dims()) {
            (&[n, c, _, _], &[mn, g, 3]) if c == self.channels() && mn == n && g == self.groups => {
                Ok(x.clone())
            }
            (d, s) => Err(IrError::Plan(format!(
                "group_norm_frame_apply expects (N, {}, H, W) and moments (N, {}, 3), got {d:?} \
                 and {s:?}",
                self.channels(),
                self.groups
            ))),
        }
    }
    fn workspace_bytes(&self, inputs: &[&ValueInfo], output: &ValueInfo, ws: Workspace) -> usize {
        self.tiling(inputs[0], output, ws).1
    }
    fn flops(&self, inputs: &[&ValueInfo], _: &ValueInfo) -> u64 {
        2 * inputs[0].shape.elem_count() as u64
    }
    fn param_bytes(&self) -> usize {
        2 * self.channels() * self.weight.dtype().size_in_bytes()
    }
    fn forward(&self, x: &[&Tensor], ctx: &SliceCtx) -> Result<Tensor> {
        let (x, moments) = (x[0], x[1]);
        let (chunk, _) = self.tiling(&info_of(x), &info_of(x), ctx.workspace());
        let (scale, shift) = self.tables(moments, x.dtype())?;
        let runs = as_runs(x, self.groups)?;
        let out = by_row_chunks(runs.dims(), x.dtype(), x.device(), chunk, |r| {
            let part = |t: &Tensor| t.narrow(0, r.start, r.len());
            let scaled = part(&runs)?.broadcast_mul(&part(&scale)?)?;
            Ok(scaled.broadcast_add(&part(&shift)?)?)
        })?;
        Ok(out.reshape(x.dims())?)
    }
}

/// A convolution on a band of rows whose window reaches past the band: the band's rows
/// padded explicitly (zeros only where the band meets the frame's edge, the window's padding
/// along W everywhere), then convolved with no padding. Where the band's rows are the whole
/// frame, or the window needs no rows beyond them, the plain convolution computes the same.
impl Conv2d {
    /// The zero rows above and below the band, when it needs the banded path.
    pub(super) fn band_pads(&self, x: &Tensor, band: &RowBand) -> Option<(usize, usize)> {
        let g = self.geometry;
        let plain = g.padding == 0 || g.out_size(band.input.len()) == band.out.len();
        (!plain && x.rank() == 4).then(|| band.padding(g.kernel, g.stride, g.padding))
    }

    /// Whether a call of these shapes takes the banded path (the shapes tell: the plain
    /// convolution of the band's rows would make more rows than asked).
    pub(super) fn banded(&self, x: &ValueInfo, output: &ValueInfo, ws: Workspace) -> bool {
        let g = self.geometry;
        ws.on_rows && g.padding > 0 && g.out_size(x.shape.dims()[2]) != output.shape.dims()[2]
    }

    /// Frames per call and the workspace: a chunk's W-padded copy and its fully padded copy
    /// (when the band meets an edge), then the padded copy through the convolution.
    pub(super) fn band_tiling(
        &self,
        x: &ValueInfo,
        output: &ValueInfo,
        ws: Workspace,
    ) -> (usize, usize) {
        let g = self.geometry;
        let d = x.shape.dims();
        let rows = (output.shape.dims()[2] - 1) * g.stride + g.kernel;
        let wide_w = d[3] + 2 * g.padding;
        let plane = g.in_channels * x.dtype.size_in_bytes() * wide_w;
        let at = At {
            dtype: x.dtype,
            kernels: ws.kernels,
        };
        row_chunk(d[0], output.bytes(), ws.limit, |f| {
            let (wide, padded) = (f * plane * d[2], f * plane * rows);
            let (conv, _) = self.call_peak((f, rows, wide_w), 0, at);
            // With no zero row to add, the W-padded copy is the one convolved.
            if rows == d[2] {
                wide + conv
            } else {
                (wide + padded).max(padded + conv)
            }
        })
    }

    pub(super) fn forward_band(
        &self,
        x: &Tensor,
        band: &RowBand,
        ctx: &SliceCtx,
    ) -> Result<Tensor> {
        let g = self.geometry;
        let (top, bottom) = self.band_pads(x, band).expect("banded call");
        let (n, _, _, w) = x.dims4()?;
        let out = [n, g.out_channels, band.out.len(), g.out_size(w)];
        let out_info = ValueInfo::new(out.to_vec(), x.dtype(), Layout::WHOLE);
        let (chunk, _) = self.band_tiling(&info_of(x), &out_info, ctx.workspace());
        by_row_chunks(&out, x.dtype(), x.device(), chunk, |r| {
            let wide = x
                .narrow(0, r.start, r.len())?
                .pad_with_zeros(3, g.padding, g.padding)?;
            let padded = wide.pad_with_zeros(2, top, bottom)?;
            drop(wide);
            Ok(self.run_unpadded(&padded, ctx.kernels)?)
        })
    }
}
