//! Convolution along time at each position: diffusers' `Conv3d` with kernel `(k, 1, 1)`.

use candle_core::Tensor;
use candle_nn::VarBuilder;
use streamline_ir::{Independence, IrError, Op, Result, SliceCtx, ValueInfo};

/// A `(k, 1, 1)` Conv3d on position-major `(P, T, C)` features, zero-padded by `k / 2` frames
/// as diffusers pads it. One matmul against all `k` taps at once, then shifted sums: no im2col.
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
    fn workspace_bytes(&self, inputs: &[&ValueInfo], output: &ValueInfo) -> usize {
        let d = inputs[0].shape.dims();
        let padded_rows = d[0] * (d[1] + self.kernel - 1);
        let size = output.dtype.size_in_bytes();
        // The padded input, the all-taps product, and one shifted tap being summed.
        padded_rows * (self.in_channels + self.kernel * self.out_channels) * size + output.bytes()
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
    fn forward(&self, x: &[&Tensor], _: &SliceCtx) -> Result<Tensor> {
        let (p, t, _) = x[0].dims3()?;
        let pad = self.kernel / 2;
        let padded = x[0].pad_with_zeros(1, pad, self.kernel - 1 - pad)?;
        let tp = t + self.kernel - 1;
        let all = padded
            .reshape((p * tp, self.in_channels))?
            .matmul(&self.taps)?
            .reshape((p, tp, self.kernel * self.out_channels))?;
        let mut out = self
            .bias
            .reshape((1, 1, self.out_channels))?
            .broadcast_as((p, t, self.out_channels))?
            .contiguous()?;
        for j in 0..self.kernel {
            out = (out
                + all
                    .narrow(1, j, t)?
                    .narrow(2, j * self.out_channels, self.out_channels)?)?;
        }
        Ok(out)
    }
}
