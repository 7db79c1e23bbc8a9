//! Row-wise and frame-wise layers with weights: linear, layer norm, GEGLU, 2D convolution.
//!
//! "Row-wise" ops (linear, layer norm, activations) act on the last dim of every row; they
//! declare independence along both axes, and the values' layout tags decide which axis a
//! plan may slice (rows are frames in frame-major values, positions in position-major ones).
//!
//! Each op declares the heap its forward really allocates on the CPU (candle's temporaries,
//! gemm's packing), and the ones whose workspace grows with the rows run in chunks under a
//! [`SliceCtx::workspace_limit`], writing each chunk into the output.

use std::ops::Range;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use streamline_ir::op_contract;
use streamline_ir::{
    chunk_ranges, IrError, Kernels, Op, Result, RowRule, SliceCtx, ValueInfo, Workspace,
};
use streamline_kernels::{
    linear_geglu_workspace, linear_workspace, portable, Compute, ConvGeometry, WeightOrder,
};

use super::kernels;
use super::layout::{by_row_chunks, info_of, row_chunk, tiles, Tiles};

// Per-frame GroupNorm and the resampling ops live beside their kin; `ops` exports them here.
pub use super::group_norm::GroupNormFrames;
pub use super::layout::{PadEnd, UpsampleNearest};

fn elems(v: &ValueInfo) -> u64 {
    v.shape.elem_count() as u64
}

fn bytes_of(t: &Tensor) -> usize {
    t.elem_count() * t.dtype().size_in_bytes()
}

fn last_dim(v: &ValueInfo) -> usize {
    *v.shape.dims().last().unwrap_or(&0)
}

fn with_last_dim(v: &ValueInfo, d: usize) -> ValueInfo {
    let mut dims = v.shape.dims().to_vec();
    if let Some(l) = dims.last_mut() {
        *l = d;
    }
    ValueInfo::new(dims, v.dtype, v.layout)
}

fn expect_last_dim(v: &ValueInfo, d: usize, what: &str) -> Result<()> {
    if last_dim(v) != d {
        return Err(IrError::Plan(format!(
            "{what} expects a last dim of {d}, got shape {:?}",
            v.shape.dims()
        )));
    }
    Ok(())
}

/// Heap gemm allocates inside one CPU product of a row-major `(m, k)` matrix with a
/// `(k, n)` one: the left side packed into panels of depth `kc` (the depth split into blocks
/// of at most 512). Half-precision products always pack it, and one depth block of the
/// right side, widened to f32. f32 products
/// pack it only for wide products, `n` above 128 times the x86 FMA kernel's 16 rows; other
/// packing goes to gemm's per-thread buffers, made once per thread. Packing is capped near
/// the L3 cache size in gemm, which is not modelled.
pub(crate) fn gemm_scratch(m: usize, n: usize, k: usize, size: usize) -> usize {
    let kc = k.div_ceil(k.div_ceil(512).max(1));
    match size {
        2 => 4 * kc * (m + n),
        _ if n > 128 * 16 => size * kc * m,
        _ => 0,
    }
}

/// How every [`Linear`] keeps its weight, and what its workspace is planned for: the same
/// whether the weights are real or stand-ins for their shapes, so a plan made from a config
/// alone counts what a run with the checkpoint allocates.
const WEIGHT_ORDER: WeightOrder = WeightOrder::InOut;

/// `x @ W^T + b` on the last dim.
#[derive(Debug, Clone)]
pub struct Linear {
    /// `W` `(out, in)`, its storage transposed ([`WEIGHT_ORDER`]): the CPU kernel's products
    /// read it without gathering it element by element on every call.
    weight: Tensor,
    bias: Option<Tensor>,
    in_dim: usize,
    out_dim: usize,
}

impl Linear {
    pub fn new(
        in_dim: usize,
        out_dim: usize,
        bias: bool,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        let inner = if bias {
            candle_nn::linear(in_dim, out_dim, vb)?
        } else {
            candle_nn::linear_no_bias(in_dim, out_dim, vb)?
        };
        Linear::from_parts(inner.weight(), inner.bias().cloned())
    }

    /// A layer from its `(out, in)` weight and its bias.
    fn from_parts(weight: &Tensor, bias: Option<Tensor>) -> candle_core::Result<Self> {
        let (out_dim, in_dim) = weight.dims2()?;
        Ok(Linear {
            weight: WEIGHT_ORDER.arrange(weight)?,
            bias,
            in_dim,
            out_dim,
        })
    }

    pub(crate) fn forward(&self, x: &Tensor, kernels: Kernels) -> candle_core::Result<Tensor> {
        kernels::linear(kernels, x, &self.weight, self.bias.as_ref())
    }

    /// [`Linear::forward`] that frees `x` once the result exists.
    pub(crate) fn forward_owned(&self, x: Tensor, kernels: Kernels) -> candle_core::Result<Tensor> {
        self.forward(&x, kernels)
    }

    /// Peak transient bytes of [`Linear::forward`] on `rows` rows of `dtype`, the result
    /// included, with the bias (`biased`) or without: streamline's kernel writes the biased
    /// result once (f32 on the CPU); candle's product is followed by a biased copy; the
    /// portable path works in bounded tiles of rows.
    pub(crate) fn peak(&self, rows: usize, dtype: DType, biased: bool, kernels: Kernels) -> usize {
        let size = dtype.size_in_bytes();
        let out = rows * self.out_dim * size;
        if kernels != Kernels::Cpu {
            let biased = biased && self.bias.is_some();
            let (i, o, cpu) = (self.in_dim, self.out_dim, kernels.on_cpu());
            return out + portable::linear::linear_workspace(rows, i, o, biased, dtype, cpu);
        }
        let dims = (self.in_dim, self.out_dim);
        if let Some(ws) = linear_workspace(rows, dims, WEIGHT_ORDER, dtype) {
            return out + ws;
        }
        let product = out + gemm_scratch(rows, self.out_dim, self.in_dim, size);
        if biased && self.bias.is_some() {
            product.max(2 * out)
        } else {
            product
        }
    }

    pub(crate) fn param_bytes(&self) -> usize {
        bytes_of(&self.weight) + self.bias.as_ref().map_or(0, bytes_of)
    }

    pub(crate) fn flops(&self, rows: u64) -> u64 {
        rows.saturating_mul(2 * (self.in_dim * self.out_dim) as u64)
    }

    /// Rows of the last dim per dim-0 row of `x`.
    fn rows_per_dim0(&self, x: &ValueInfo) -> usize {
        let d0 = x.shape.dims().first().copied().unwrap_or(1).max(1);
        x.shape.elem_count() / d0 / self.in_dim.max(1)
    }

    fn tiling(&self, x: &ValueInfo, output: &ValueInfo, ws: Workspace) -> (usize, usize) {
        let per = self.rows_per_dim0(x);
        row_chunk(x.shape.dims()[0], output.bytes(), ws.limit, |r| {
            self.peak(r * per, x.dtype, true, ws.kernels)
        })
    }
}

impl Op for Linear {
    op_contract!("linear", Both);
    fn describe(&self) -> String {
        format!("{}->{}", self.in_dim, self.out_dim)
    }
    fn infer(&self, inputs: &[&ValueInfo]) -> Result<ValueInfo> {
        expect_last_dim(inputs[0], self.in_dim, "linear")?;
        Ok(with_last_dim(inputs[0], self.out_dim))
    }
    fn workspace_bytes(&self, inputs: &[&ValueInfo], output: &ValueInfo, ws: Workspace) -> usize {
        self.tiling(inputs[0], output, ws).1
    }
    fn flops(&self, inputs: &[&ValueInfo], _: &ValueInfo) -> u64 {
        self.flops(elems(inputs[0]) / self.in_dim.max(1) as u64)
    }
    fn param_bytes(&self) -> usize {
        Linear::param_bytes(self)
    }
    fn forward(&self, x: &[&Tensor], ctx: &SliceCtx) -> Result<Tensor> {
        let x = x[0];
        let out = self.infer(&[&info_of(x)])?;
        let (chunk, _) = self.tiling(&info_of(x), &out, ctx.workspace());
        by_row_chunks(out.shape.dims(), x.dtype(), x.device(), chunk, |r| {
            Ok(Linear::forward(
                self,
                &x.narrow(0, r.start, r.len())?,
                ctx.kernels,
            )?)
        })
    }
}

/// LayerNorm over the last dim.
///
/// streamline's kernel on the CPU allocates only its result, so that path has no workspace
/// and nothing to tile; the portable path (centered statistics in f32, in bounded tiles of
/// rows) declares its tiles. candle-nn's fused GPU op is not used: it takes the variance as
/// E[x^2] - E[x]^2, which cancels.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    inner: candle_nn::LayerNorm,
    dim: usize,
    eps: f64,
}

impl LayerNorm {
    pub fn new(dim: usize, eps: f64, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(LayerNorm {
            inner: candle_nn::layer_norm(dim, eps, vb)?,
            dim,
            eps,
        })
    }
}

impl Op for LayerNorm {
    op_contract!("layer_norm", Both);
    fn infer(&self, inputs: &[&ValueInfo]) -> Result<ValueInfo> {
        expect_last_dim(inputs[0], self.dim, "layer_norm")?;
        Ok(inputs[0].clone())
    }
    fn flops(&self, inputs: &[&ValueInfo], _: &ValueInfo) -> u64 {
        8 * elems(inputs[0])
    }
    fn param_bytes(&self) -> usize {
        2 * self.dim * self.inner.weight().dtype().size_in_bytes()
    }
    fn workspace_bytes(&self, inputs: &[&ValueInfo], _: &ValueInfo, ws: Workspace) -> usize {
        match ws.kernels {
            Kernels::Cpu => 0,
            _ => {
                let rows = inputs[0].shape.elem_count() / self.dim.max(1);
                portable::norm::layer_norm_workspace(rows, self.dim, inputs[0].dtype)
            }
        }
    }
    fn forward(&self, x: &[&Tensor], ctx: &SliceCtx) -> Result<Tensor> {
        let weight = self.inner.weight();
        if ctx.kernels != Kernels::Cpu {
            let zeros;
            let bias = match self.inner.bias() {
                Some(b) => b,
                None => {
                    zeros = weight.zeros_like()?;
                    &zeros
                }
            };
            return Ok(portable::norm::layer_norm(x[0], weight, bias, self.eps)?);
        }
        let x = x[0].contiguous()?;
        Ok(match (Compute::of(&x), self.inner.bias()) {
            (Compute::F32, Some(bias)) => {
                streamline_kernels::layer_norm(&x, weight, bias, self.eps)?
            }
            _ => self.inner.forward(&x)?,
        })
    }
}

/// SiLU, pointwise: streamline's vectorized kernel on the CPU, no workspace.
#[derive(Debug, Clone, Copy)]
pub struct Silu;

impl Op for Silu {
    op_contract!("silu", Both, rows RowRule::Same);
    fn infer(&self, inputs: &[&ValueInfo]) -> Result<ValueInfo> {
        Ok(inputs[0].clone())
    }
    fn flops(&self, inputs: &[&ValueInfo], _: &ValueInfo) -> u64 {
        4 * elems(inputs[0])
    }
    fn forward(&self, x: &[&Tensor], ctx: &SliceCtx) -> Result<Tensor> {
        Ok(kernels::silu(ctx.kernels, x[0])?)
    }
}

/// diffusers' GEGLU: `proj` to twice the inner dim, then `h * gelu(gate)` (exact erf GELU).
///
/// The two halves of `proj` are separate products, so the doubled projection never exists;
/// on f32 CPU tensors streamline's kernel computes both a tile of rows at a time and gates
/// the hidden tile in place, so neither full-size half exists either.
#[derive(Debug, Clone)]
pub struct Geglu {
    /// `proj` cut into its hidden half and its gate half, each in storage of its own: a
    /// product with a weight that starts inside a bigger one gets that weight copied.
    halves: [Linear; 2],
    inner: usize,
}

impl Geglu {
    pub fn new(dim: usize, inner: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        // The checkpoint's projection as it is stored; each half gets storage of its own
        // (`from_parts` rearranges it): a view into the whole would hold all of it in each.
        let proj = candle_nn::linear(dim, 2 * inner, vb.pp("proj"))?;
        let half = |i: usize| -> candle_core::Result<Linear> {
            let bias = match proj.bias() {
                Some(b) => Some(b.narrow(0, i * inner, inner)?.force_contiguous()?),
                None => None,
            };
            Linear::from_parts(&proj.weight().narrow(0, i * inner, inner)?, bias)
        };
        Ok(Geglu {
            halves: [half(0)?, half(1)?],
            inner,
        })
    }

    fn run(&self, x: &Tensor, kernels: Kernels) -> candle_core::Result<Tensor> {
        let [h, g] = &self.halves;
        kernels::linear_geglu(
            kernels,
            x,
            [&h.weight, &g.weight],
            [h.bias.as_ref(), g.bias.as_ref()],
        )
    }

    /// Peak transient bytes on `rows` rows, result included. The f32 CPU kernel: the result
    /// and its per-thread tile scratch. Otherwise on the CPU the hidden half's product, then
    /// the gate's beside it, the result written over the hidden half; the portable path in
    /// bounded tiles of rows.
    fn peak(&self, rows: usize, dtype: DType, kernels: Kernels) -> usize {
        let out = rows * self.inner * dtype.size_in_bytes();
        let [_, gate] = &self.halves;
        if kernels != Kernels::Cpu {
            let biased = gate.bias.is_some();
            return out
                + portable::linear::linear_geglu_workspace(
                    rows,
                    gate.in_dim,
                    self.inner,
                    biased,
                    dtype,
                    kernels.on_cpu(),
                );
        }
        match linear_geglu_workspace(rows, (gate.in_dim, self.inner), WEIGHT_ORDER, dtype) {
            Some(ws) => out + ws,
            None => out + gate.peak(rows, dtype, false, kernels),
        }
    }

    fn tiling(&self, x: &ValueInfo, output: &ValueInfo, ws: Workspace) -> (usize, usize) {
        let per = self.halves[0].rows_per_dim0(x);
        row_chunk(x.shape.dims()[0], output.bytes(), ws.limit, |r| {
            self.peak(r * per, x.dtype, ws.kernels)
        })
    }
}

impl Op for Geglu {
    op_contract!("geglu", Both);
    fn describe(&self) -> String {
        format!("{}->{}", self.halves[0].in_dim, self.inner)
    }
    fn infer(&self, inputs: &[&ValueInfo]) -> Result<ValueInfo> {
        expect_last_dim(inputs[0], self.halves[0].in_dim, "geglu")?;
        Ok(with_last_dim(inputs[0], self.inner))
    }
    fn workspace_bytes(&self, inputs: &[&ValueInfo], output: &ValueInfo, ws: Workspace) -> usize {
        self.tiling(inputs[0], output, ws).1
    }
    fn flops(&self, inputs: &[&ValueInfo], _: &ValueInfo) -> u64 {
        let rows = elems(inputs[0]) / self.halves[0].in_dim.max(1) as u64;
        2 * self.halves[0].flops(rows) + 10 * rows * self.inner as u64
    }
    fn param_bytes(&self) -> usize {
        2 * self.halves[0].param_bytes()
    }
    fn forward(&self, x: &[&Tensor], ctx: &SliceCtx) -> Result<Tensor> {
        let x = x[0];
        let out = self.infer(&[&info_of(x)])?;
        let (chunk, _) = self.tiling(&info_of(x), &out, ctx.workspace());
        by_row_chunks(out.shape.dims(), x.dtype(), x.device(), chunk, |r| {
            Ok(self.run(&x.narrow(0, r.start, r.len())?, ctx.kernels)?)
        })
    }
}

/// What a convolution's cost depends on besides its sizes.
#[derive(Clone, Copy)]
pub(super) struct At {
    pub dtype: DType,
    pub kernels: Kernels,
}

/// 2D convolution of each frame `(N, C, H, W)`, with bias.
///
/// On the CPU, streamline's kernel: bands of output rows as GEMMs over per-thread im2col
/// columns, the bias written first. Under a workspace limit, frames run in chunks, or bands
/// of output rows of one frame when a frame is too much, each written into the output.
#[derive(Debug, Clone)]
pub struct Conv2d {
    weight: Tensor,
    bias: Tensor,
    pub(super) geometry: ConvGeometry,
}

impl Conv2d {
    pub fn new(
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        let weight = vb.get((out_channels, in_channels, kernel, kernel), "weight")?;
        let bias = vb.get(out_channels, "bias")?;
        Ok(Conv2d {
            weight,
            bias,
            geometry: ConvGeometry {
                in_channels,
                out_channels,
                kernel,
                stride,
                padding,
            },
        })
    }

    fn out_size(&self, x: usize) -> usize {
        self.geometry.out_size(x)
    }

    fn run(&self, x: &Tensor, kernels: Kernels) -> candle_core::Result<Tensor> {
        kernels::conv2d(kernels, x, &self.weight, &self.bias, self.geometry)
    }

    pub(super) fn run_unpadded(&self, x: &Tensor, kernels: Kernels) -> candle_core::Result<Tensor> {
        let geometry = ConvGeometry {
            padding: 0,
            ..self.geometry
        };
        kernels::conv2d(kernels, x, &self.weight, &self.bias, geometry)
    }

    /// Output rows `rows` of one frame `(1, C, H, W)`: the input rows they read, copied and
    /// zero-padded explicitly (the frame's edges only), then convolved with no padding. The
    /// same products as the whole frame's, so the same numbers.
    fn run_band(
        &self,
        frame: &Tensor,
        rows: Range<usize>,
        kernels: Kernels,
    ) -> candle_core::Result<Tensor> {
        let g = self.geometry;
        let (k, s, p) = (g.kernel as isize, g.stride as isize, g.padding as isize);
        let h = frame.dim(2)? as isize;
        let start = rows.start as isize * s - p;
        let end = (rows.end as isize - 1) * s + k - p;
        let (lo, hi) = (start.max(0), end.min(h).max(start.max(0)));
        let band = frame
            .narrow(2, lo as usize, (hi - lo) as usize)?
            .contiguous()?;
        let wide = band.pad_with_zeros(3, g.padding, g.padding)?;
        drop(band);
        let padded = wide.pad_with_zeros(2, (lo - start) as usize, (end - hi) as usize)?;
        drop(wide);
        self.run_unpadded(&padded, kernels)
    }

    /// One convolution of `frames` frames of `h x w` padded by `pad`, of `dtype`, by
    /// `kernels`: its peak transient bytes (its result included), and the result's bytes.
    pub(super) fn call_peak(
        &self,
        (frames, h, w): (usize, usize, usize),
        pad: usize,
        at: At,
    ) -> (usize, usize) {
        let g = ConvGeometry {
            padding: pad,
            ..self.geometry
        };
        let out =
            frames * g.out_channels * g.out_size(h) * g.out_size(w) * at.dtype.size_in_bytes();
        let ws = match at.kernels {
            Kernels::Cpu => g.workspace(frames, h, w, Compute::for_dtype(at.dtype, &Device::Cpu)),
            k => portable::conv::conv2d_workspace(&g, frames, h, w, at.dtype, k.on_cpu()),
        };
        (out + ws, out)
    }

    /// Peak transient bytes of a chunk, its result included: `frames` whole frames of
    /// `h x w`, or (`rows` below the output height) a band of `rows` output rows of one
    /// frame, with its copied input rows, their width-padded copy, then the fully padded one
    /// alive through the convolution.
    fn peak(&self, (h, w): (usize, usize), at: At, frames: usize, rows: usize) -> usize {
        let g = self.geometry;
        if rows >= self.out_size(h) {
            return self.call_peak((frames, h, w), g.padding, at).0;
        }
        let (padded_h, padded_w) = ((rows - 1) * g.stride + g.kernel, w + 2 * g.padding);
        let plane = g.in_channels * at.dtype.size_in_bytes();
        let copy = plane * padded_h.min(h) * w;
        let wide = plane * padded_h.min(h) * padded_w;
        let padded = plane * padded_h * padded_w;
        let (conv, _) = self.call_peak((1, padded_h, padded_w), 0, at);
        (2 * copy + wide).max(2 * padded).max(padded + conv)
    }

    fn tiling(&self, x: &ValueInfo, output: &ValueInfo, ws: Workspace) -> (Tiles, usize) {
        let d = x.shape.dims();
        let oh = output.shape.dims()[2];
        let at = At {
            dtype: x.dtype,
            kernels: ws.kernels,
        };
        tiles(d[0], oh, output.bytes(), ws.limit, |f, r| {
            self.peak((d[2], d[3]), at, f, r)
        })
    }
}

impl Op for Conv2d {
    op_contract!("conv2d", Frames);
    fn describe(&self) -> String {
        format!(
            "{}->{} k{} s{} p{}",
            self.geometry.in_channels,
            self.geometry.out_channels,
            self.geometry.kernel,
            self.geometry.stride,
            self.geometry.padding
        )
    }
    fn rows(&self) -> Option<RowRule> {
        let g = self.geometry;
        Some(RowRule::Window {
            kernel: g.kernel,
            stride: g.stride,
            pad: g.padding,
        })
    }
    fn infer(&self, inputs: &[&ValueInfo]) -> Result<ValueInfo> {
        let x = inputs[0];
        match x.shape.dims() {
            &[n, c, h, w]
                if c == self.geometry.in_channels
                    && h + 2 * self.geometry.padding >= self.geometry.kernel
                    && w + 2 * self.geometry.padding >= self.geometry.kernel =>
            {
                Ok(ValueInfo::new(
                    (
                        n,
                        self.geometry.out_channels,
                        self.out_size(h),
                        self.out_size(w),
                    ),
                    x.dtype,
                    x.layout,
                ))
            }
            d => Err(IrError::Plan(format!(
                "conv2d expects (N, {}, H, W), got {d:?}",
                self.geometry.in_channels
            ))),
        }
    }
    fn workspace_bytes(&self, inputs: &[&ValueInfo], output: &ValueInfo, ws: Workspace) -> usize {
        if self.banded(inputs[0], output, ws) {
            return self.band_tiling(inputs[0], output, ws).1;
        }
        self.tiling(inputs[0], output, ws).1
    }
    fn flops(&self, _: &[&ValueInfo], output: &ValueInfo) -> u64 {
        2 * elems(output)
            * (self.geometry.in_channels * self.geometry.kernel * self.geometry.kernel) as u64
    }
    fn param_bytes(&self) -> usize {
        bytes_of(&self.weight) + bytes_of(&self.bias)
    }
    fn forward(&self, x: &[&Tensor], ctx: &SliceCtx) -> Result<Tensor> {
        let x = x[0];
        if let Some(band) = &ctx.band {
            if self.band_pads(x, band).is_some() {
                return self.forward_band(x, band, ctx);
            }
        }
        let out = self.infer(&[&info_of(x)])?;
        let (t, _) = self.tiling(&info_of(x), &out, ctx.workspace());
        let dims = out.shape.dims();
        if t.inner >= dims[2] {
            return by_row_chunks(dims, x.dtype(), x.device(), t.outer, |r| {
                Ok(self.run(&x.narrow(0, r.start, r.len())?, ctx.kernels)?)
            });
        }
        let y = Tensor::zeros(dims, x.dtype(), x.device())?;
        for f in 0..dims[0] {
            let (frame, target) = (x.narrow(0, f, 1)?, y.narrow(0, f, 1)?);
            for rows in chunk_ranges(dims[2], dims[2].div_ceil(t.inner)) {
                let start = rows.start;
                target.slice_set(&self.run_band(&frame, rows, ctx.kernels)?, 2, start)?;
            }
        }
        Ok(y)
    }
}
