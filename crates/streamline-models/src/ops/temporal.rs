//! Convolution along time at each position: diffusers' `Conv3d` with kernel `(k, 1, 1)`.

use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;
use streamline_ir::op_contract;
use streamline_ir::{IrError, Kernels, Op, Result, RowRule, SliceCtx, ValueInfo, Workspace};
use streamline_kernels::{portable, temporal_conv_workspace};

use super::kernels;
use super::layout::{by_row_chunks, info_of, row_chunk};

/// A `(k, 1, 1)` Conv3d on position-major `(P, T, C)` features, zero-padded by `k / 2` frames
/// as diffusers pads it. On the CPU, streamline's kernel: per tile of positions, the shifted
/// frames side by side in scratch and one product onto the bias. Under a workspace limit,
/// positions run in chunks, each written into the output.
#[derive(Debug, Clone)]
pub struct TemporalConv {
    /// `(k * C_in, C_out)`: tap `j` in rows `j*C_in .. (j+1)*C_in`.
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
        // (Cout, Cin, k) -> (k, Cin, Cout) -> (k*Cin, Cout)
        let taps = w
            .squeeze(4)?
            .squeeze(3)?
            .permute((2, 1, 0))?
            .contiguous()?
            .reshape((kernel * in_channels, out_channels))?;
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
    fn run(&self, x: &Tensor, kernels: Kernels) -> candle_core::Result<Tensor> {
        kernels::temporal_conv(kernels, x, &self.taps, &self.bias, self.kernel)
    }

    /// Peak transient bytes on `rows` positions of `t` frames, result included.
    fn peak(&self, rows: usize, t: usize, dtype: DType, kernels: Kernels) -> usize {
        let (cin, cout, k) = (self.in_channels, self.out_channels, self.kernel);
        let ws = match kernels {
            Kernels::Cpu => temporal_conv_workspace(rows, t, cin, cout, k, dtype),
            _ => portable::linear::temporal_conv_workspace(
                rows,
                t,
                cin,
                cout,
                k,
                dtype,
                kernels.on_cpu(),
            ),
        };
        rows * t * cout * dtype.size_in_bytes() + ws
    }

    fn tiling(&self, x: &ValueInfo, output: &ValueInfo, ws: Workspace) -> (usize, usize) {
        let d = x.shape.dims();
        row_chunk(d[0], output.bytes(), ws.limit, |r| {
            self.peak(r, d[1], x.dtype, ws.kernels)
        })
    }
}

impl Op for TemporalConv {
    // Every row band holds all frames of its positions.
    op_contract!("temporal_conv", Positions, rows RowRule::Same);
    fn describe(&self) -> String {
        format!(
            "{}->{} k{}",
            self.in_channels, self.out_channels, self.kernel
        )
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
    fn workspace_bytes(&self, inputs: &[&ValueInfo], output: &ValueInfo, ws: Workspace) -> usize {
        self.tiling(inputs[0], output, ws).1
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
        let (chunk, _) = self.tiling(&info_of(x), &out, ctx.workspace());
        by_row_chunks(out.shape.dims(), x.dtype(), x.device(), chunk, |r| {
            Ok(self.run(&x.narrow(0, r.start, r.len())?, ctx.kernels)?)
        })
    }
}
