//! Row-wise and frame-wise layers wrapping candle-nn modules.
//!
//! "Row-wise" ops (linear, layer norm, activations) act on the last dim of every row; they
//! declare independence along both axes, and the values' layout tags decide which axis a
//! plan may slice (rows are frames in frame-major values, positions in position-major ones).

use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;
use streamline_ir::{Independence, IrError, Op, Result, SliceCtx, ValueInfo};

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

/// `x @ W^T + b` on the last dim.
#[derive(Debug, Clone)]
pub struct Linear {
    inner: candle_nn::Linear,
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
        Ok(Linear {
            inner,
            in_dim,
            out_dim,
        })
    }

    pub(crate) fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.inner.forward(x)
    }

    pub(crate) fn param_bytes(&self) -> usize {
        bytes_of(self.inner.weight()) + self.inner.bias().map_or(0, bytes_of)
    }

    pub(crate) fn flops(&self, rows: u64) -> u64 {
        2 * rows * (self.in_dim * self.out_dim) as u64
    }
}

impl Op for Linear {
    fn kind(&self) -> &'static str {
        "linear"
    }
    fn describe(&self) -> String {
        format!("{}->{}", self.in_dim, self.out_dim)
    }
    fn independence(&self) -> Independence {
        Independence::Both
    }
    fn infer(&self, inputs: &[&ValueInfo]) -> Result<ValueInfo> {
        expect_last_dim(inputs[0], self.in_dim, "linear")?;
        Ok(with_last_dim(inputs[0], self.out_dim))
    }
    fn flops(&self, inputs: &[&ValueInfo], _: &ValueInfo) -> u64 {
        self.flops(elems(inputs[0]) / self.in_dim.max(1) as u64)
    }
    fn param_bytes(&self) -> usize {
        Linear::param_bytes(self)
    }
    fn forward(&self, x: &[&Tensor], _: &SliceCtx) -> Result<Tensor> {
        Ok(Linear::forward(self, x[0])?)
    }
}

/// LayerNorm over the last dim.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    inner: candle_nn::LayerNorm,
    dim: usize,
}

impl LayerNorm {
    pub fn new(dim: usize, eps: f64, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(LayerNorm {
            inner: candle_nn::layer_norm(dim, eps, vb)?,
            dim,
        })
    }
}

impl Op for LayerNorm {
    fn kind(&self) -> &'static str {
        "layer_norm"
    }
    fn independence(&self) -> Independence {
        Independence::Both
    }
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
    fn forward(&self, x: &[&Tensor], _: &SliceCtx) -> Result<Tensor> {
        Ok(self.inner.forward(x[0])?)
    }
}

/// SiLU, pointwise.
#[derive(Debug, Clone, Copy)]
pub struct Silu;

impl Op for Silu {
    fn kind(&self) -> &'static str {
        "silu"
    }
    fn independence(&self) -> Independence {
        Independence::Both
    }
    fn infer(&self, inputs: &[&ValueInfo]) -> Result<ValueInfo> {
        Ok(inputs[0].clone())
    }
    fn flops(&self, inputs: &[&ValueInfo], _: &ValueInfo) -> u64 {
        4 * elems(inputs[0])
    }
    fn forward(&self, x: &[&Tensor], _: &SliceCtx) -> Result<Tensor> {
        Ok(candle_nn::ops::silu(x[0])?)
    }
}

/// diffusers' GEGLU: `proj` to twice the inner dim, then `h * gelu(gate)` (exact erf GELU).
#[derive(Debug, Clone)]
pub struct Geglu {
    proj: Linear,
    inner: usize,
}

impl Geglu {
    pub fn new(dim: usize, inner: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Geglu {
            proj: Linear::new(dim, 2 * inner, true, vb.pp("proj"))?,
            inner,
        })
    }
}

impl Op for Geglu {
    fn kind(&self) -> &'static str {
        "geglu"
    }
    fn describe(&self) -> String {
        format!("{}->{}", self.proj.in_dim, self.inner)
    }
    fn independence(&self) -> Independence {
        Independence::Both
    }
    fn infer(&self, inputs: &[&ValueInfo]) -> Result<ValueInfo> {
        expect_last_dim(inputs[0], self.proj.in_dim, "geglu")?;
        Ok(with_last_dim(inputs[0], self.inner))
    }
    fn workspace_bytes(&self, _: &[&ValueInfo], output: &ValueInfo) -> usize {
        // The doubled projection, and the GELU of its gate half.
        3 * output.bytes()
    }
    fn flops(&self, inputs: &[&ValueInfo], _: &ValueInfo) -> u64 {
        let rows = elems(inputs[0]) / self.proj.in_dim.max(1) as u64;
        self.proj.flops(rows) + 10 * rows * self.inner as u64
    }
    fn param_bytes(&self) -> usize {
        self.proj.param_bytes()
    }
    fn forward(&self, x: &[&Tensor], _: &SliceCtx) -> Result<Tensor> {
        let h = self.proj.forward(x[0])?;
        let last = h.rank() - 1;
        let (a, gate) = (
            h.narrow(last, 0, self.inner)?,
            h.narrow(last, self.inner, self.inner)?,
        );
        Ok((a * gate.gelu_erf()?)?)
    }
}

/// GroupNorm of each frame `(N, C, H, W)` alone: statistics over (C/G, H, W).
#[derive(Debug, Clone)]
pub struct GroupNormFrames {
    inner: candle_nn::GroupNorm,
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
        Ok(GroupNormFrames {
            inner: candle_nn::group_norm(groups, channels, eps, vb)?,
            channels,
            groups,
        })
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
    fn workspace_bytes(&self, inputs: &[&ValueInfo], _: &ValueInfo) -> usize {
        // candle-nn computes in f32 and keeps the centered input and its square alive.
        3 * inputs[0].shape.elem_count() * 4
    }
    fn flops(&self, inputs: &[&ValueInfo], _: &ValueInfo) -> u64 {
        8 * elems(inputs[0])
    }
    fn param_bytes(&self) -> usize {
        2 * self.channels * 4
    }
    fn forward(&self, x: &[&Tensor], _: &SliceCtx) -> Result<Tensor> {
        Ok(self.inner.forward(x[0])?)
    }
}

/// 2D convolution of each frame `(N, C, H, W)`, with bias.
#[derive(Debug, Clone)]
pub struct Conv2d {
    weight: Tensor,
    bias: Tensor,
    in_channels: usize,
    out_channels: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
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
            in_channels,
            out_channels,
            kernel,
            stride,
            padding,
        })
    }

    fn out_size(&self, x: usize) -> usize {
        (x + 2 * self.padding - self.kernel) / self.stride + 1
    }
}

impl Op for Conv2d {
    fn kind(&self) -> &'static str {
        "conv2d"
    }
    fn describe(&self) -> String {
        format!(
            "{}->{} k{} s{} p{}",
            self.in_channels, self.out_channels, self.kernel, self.stride, self.padding
        )
    }
    fn independence(&self) -> Independence {
        Independence::Frames
    }
    fn infer(&self, inputs: &[&ValueInfo]) -> Result<ValueInfo> {
        let x = inputs[0];
        match x.shape.dims() {
            &[n, c, h, w]
                if c == self.in_channels
                    && h + 2 * self.padding >= self.kernel
                    && w + 2 * self.padding >= self.kernel =>
            {
                Ok(ValueInfo::new(
                    (n, self.out_channels, self.out_size(h), self.out_size(w)),
                    x.dtype,
                    x.layout,
                ))
            }
            d => Err(IrError::Plan(format!(
                "conv2d expects (N, {}, H, W), got {d:?}",
                self.in_channels
            ))),
        }
    }
    fn workspace_bytes(&self, inputs: &[&ValueInfo], output: &ValueInfo) -> usize {
        // candle lowers to im2col: one column per output pixel, then a matmul result that is
        // transposed into the output layout.
        let dims = output.shape.dims();
        let cols = dims[0] * dims[2] * dims[3] * self.in_channels * self.kernel * self.kernel;
        let padded = if self.padding > 0 {
            inputs[0].bytes()
        } else {
            0
        };
        cols * output.dtype.size_in_bytes() + output.bytes() + padded
    }
    fn flops(&self, _: &[&ValueInfo], output: &ValueInfo) -> u64 {
        2 * elems(output) * (self.in_channels * self.kernel * self.kernel) as u64
    }
    fn param_bytes(&self) -> usize {
        bytes_of(&self.weight) + bytes_of(&self.bias)
    }
    fn forward(&self, x: &[&Tensor], _: &SliceCtx) -> Result<Tensor> {
        let y = x[0].conv2d(&self.weight, self.padding, self.stride, 1, 1)?;
        Ok(y.broadcast_add(&self.bias.reshape((1, self.out_channels, 1, 1))?)?)
    }
}

/// Nearest-neighbour 2x upsampling of each frame.
#[derive(Debug, Clone, Copy)]
pub struct Upsample2x;

impl Op for Upsample2x {
    fn kind(&self) -> &'static str {
        "upsample2x"
    }
    fn independence(&self) -> Independence {
        Independence::Frames
    }
    fn infer(&self, inputs: &[&ValueInfo]) -> Result<ValueInfo> {
        match inputs[0].shape.dims() {
            &[n, c, h, w] => Ok(ValueInfo::new(
                (n, c, 2 * h, 2 * w),
                inputs[0].dtype,
                inputs[0].layout,
            )),
            d => Err(IrError::Plan(format!(
                "upsample2x expects (N, C, H, W), got {d:?}"
            ))),
        }
    }
    fn flops(&self, _: &[&ValueInfo], _: &ValueInfo) -> u64 {
        0
    }
    fn forward(&self, x: &[&Tensor], _: &SliceCtx) -> Result<Tensor> {
        let (_, _, h, w) = x[0].dims4()?;
        Ok(x[0].upsample_nearest2d(2 * h, 2 * w)?)
    }
}

/// Zero padding of one pixel on the right and bottom of each frame, before a stride-2 conv
/// with no padding (diffusers' `Downsample2D` with `padding=0`).
#[derive(Debug, Clone, Copy)]
pub struct PadEnd;

impl Op for PadEnd {
    fn kind(&self) -> &'static str {
        "pad_end"
    }
    fn independence(&self) -> Independence {
        Independence::Frames
    }
    fn infer(&self, inputs: &[&ValueInfo]) -> Result<ValueInfo> {
        match inputs[0].shape.dims() {
            &[n, c, h, w] => Ok(ValueInfo::new(
                (n, c, h + 1, w + 1),
                inputs[0].dtype,
                inputs[0].layout,
            )),
            d => Err(IrError::Plan(format!(
                "pad_end expects (N, C, H, W), got {d:?}"
            ))),
        }
    }
    fn workspace_bytes(&self, inputs: &[&ValueInfo], _: &ValueInfo) -> usize {
        inputs[0].bytes()
    }
    fn flops(&self, _: &[&ValueInfo], _: &ValueInfo) -> u64 {
        0
    }
    fn forward(&self, x: &[&Tensor], _: &SliceCtx) -> Result<Tensor> {
        Ok(x[0].pad_with_zeros(3, 0, 1)?.pad_with_zeros(2, 0, 1)?)
    }
}
