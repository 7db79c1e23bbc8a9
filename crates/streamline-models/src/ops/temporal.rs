//! Convolution along time at each position: diffusers' `Conv3d` with kernel `(k, 1, 1)`.

use candle_core::Tensor;
use candle_nn::VarBuilder;
use streamline_ir::{Independence, IrError, Op, Result, SliceCtx, ValueInfo};

use super::layout::{by_row_chunks, info_of, row_chunk};
use super::nn::gemm_scratch;

/// A `(k, 1, 1)` Conv3d on position-major `(P, T, C)` features, zero-padded by `k / 2` frames
/// as diffusers pads it. One matmul against all `k` taps at once, then shifted sums: no im2col.
/// Under a workspace limit, positions run in chunks, each written into the output.
#[derive(Debug, Clone)]
pub struct TemporalConv {
    /// `(C_in, k * C_out)`: tap `j` in columns `j*C_out .. (j+1)*C_out`.
    taps: Tensor,
    bias: Tensor,
    in_channels: usize,
    out_channels: usize,
    kernel: usize,
}

impl TemporalConv {
    pub fn new(
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        let w = vb.get((out_channels, in_channels, kernel, 1, 1), "weight")?;
        let bias = vb.get(out_channels, "bias")?;
        // (Cout, Cin, k) -> (Cin, k, Cout) -> (Cin, k*Cout)
        let taps = w
            .squeeze(4)?
            .squeeze(3)?
            .permute((1, 2, 0))?
            .reshape((in_channels, kernel * out_channels))?
            .contiguous()?;
        Ok(TemporalConv {
            taps,
            bias,
            in_channels,
            out_channels,
            kernel,
        })
    }
}

impl TemporalConv {
    fn run(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (p, t, _) = x.dims3()?;
        let pad = self.kernel / 2;
        let tp = t + self.kernel - 1;
        let all = {
            let padded = x.pad_with_zeros(1, pad, self.kernel - 1 - pad)?;
            padded
                .reshape((p * tp, self.in_channels))?
                .matmul(&self.taps)?
                .reshape((p, tp, self.kernel * self.out_channels))?
        };
        let tap = |j: usize| {
            all.narrow(1, j, t)?
                .narrow(2, j * self.out_channels, self.out_channels)
        };
        // bias + tap 0 + tap 1 + ..., each sum freeing the previous one.
        let mut out = tap(0)?.broadcast_add(&self.bias)?;
        for j in 1..self.kernel {
            out = (out + tap(j)?)?;
        }
        Ok(out)
    }

    /// Peak transient bytes on `rows` positions of `t` frames, result included: the zero
    /// frames and the padded input, then the padded input and the all-taps product (with
    /// gemm's packing), then the product with the running sum and the next.
    fn peak(&self, rows: usize, t: usize, size: usize) -> usize {
        let (cin, cout, k) = (self.in_channels, self.out_channels, self.kernel);
        let tp = t + k - 1;
        let zeros = rows * (k - 1) * cin * size;
        let padded = if k > 1 { rows * tp * cin * size } else { 0 };
        let all = rows * tp * k * cout * size;
        let out = rows * t * cout * size;
        let sums = all + out * if k > 1 { 2 } else { 1 };
        let product = padded + all + gemm_scratch(rows * tp, k * cout, cin, size);
        (zeros + padded).max(product).max(sums)
    }

    fn tiling(&self, x: &ValueInfo, output: &ValueInfo, limit: Option<usize>) -> (usize, usize) {
        let d = x.shape.dims();
        let size = x.dtype.size_in_bytes();
        row_chunk(d[0], output.bytes(), limit, |r| self.peak(r, d[1], size))
    }
}

impl Op for TemporalConv {
    fn kind(&self) -> &'static str {
        "temporal_conv"
    }
    fn describe(&self) -> String {
        format!(
            "{}->{} k{}",
            self.in_channels, self.out_channels, self.kernel
        )
    }
    fn independence(&self) -> Independence {
        Independence::Positions
    }
    fn infer(&self, inputs: &[&ValueInfo]) -> Result<ValueInfo> {
        match inputs[0].shape.dims() {
            &[p, t, c] if c == self.in_channels => Ok(ValueInfo::new(
                (p, t, self.out_channels),
                inputs[0].dtype,
                inputs[0].layout,
            )),
            d => Err(IrError::Plan(format!(
                "temporal_conv expects (P, T, {}), got {d:?}",
                self.in_channels
            ))),
        }
    }
    fn workspace_bytes(
        &self,
        inputs: &[&ValueInfo],
        output: &ValueInfo,
        limit: Option<usize>,
    ) -> usize {
        self.tiling(inputs[0], output, limit).1
    }
    fn flops(&self, inputs: &[&ValueInfo], output: &ValueInfo) -> u64 {
        let d = inputs[0].shape.dims();
        let padded_rows = (d[0] * (d[1] + self.kernel - 1)) as u64;
        2 * padded_rows * (self.in_channels * self.kernel * self.out_channels) as u64
            + (self.kernel as u64) * output.shape.elem_count() as u64
    }
    fn param_bytes(&self) -> usize {
        (self.taps.elem_count() + self.bias.elem_count()) * self.taps.dtype().size_in_bytes()
    }
    fn forward(&self, x: &[&Tensor], ctx: &SliceCtx) -> Result<Tensor> {
        let x = x[0];
        let out = self.infer(&[&info_of(x)])?;
        let (chunk, _) = self.tiling(&info_of(x), &out, ctx.workspace_limit);
        by_row_chunks(out.shape.dims(), x.dtype(), x.device(), chunk, |r| {
            Ok(self.run(&x.narrow(0, r.start, r.len())?)?)
        })
    }
}
