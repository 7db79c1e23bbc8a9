//! 2D convolution of NCHW frames as GEMMs over bands of output rows.
//!
//! candle's CPU conv2d copies the whole input to NHWC, runs im2col tiles whose product is
//! NHWC, copies the result back to NCHW and adds the bias in another pass. Here each task
//! takes one band of output rows of one frame: it writes the band's im2col columns
//! `(C_in*k*k, rows*W_out)` into its own scratch, fills the output band with the bias, and
//! one GEMM accumulates `weight (C_out, C_in*k*k) x columns` straight into the NCHW output.
//! A 1x1 stride-1 convolution needs no columns: the GEMM reads the input band itself. No
//! buffer of the input's size is ever made.

use candle_core::{CpuStorage, Result, Shape, Tensor};

use crate::cpu_op::{CpuKernel, Input, Kernel};
use crate::linear::product;
use crate::par::{for_each_run, runs, written_by, Out};
use crate::simd::simd_fn;
use crate::storage::{as_f32, Compute};

/// Output pixels a band aims at: enough columns for the GEMM to run at full speed, few
/// enough for them to stay in the L2 cache.
const BAND_PIXELS: usize = 256;

/// A convolution's geometry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvGeometry {
    pub in_channels: usize,
    pub out_channels: usize,
    pub kernel: usize,
    pub stride: usize,
    pub padding: usize,
}

impl ConvGeometry {
    pub fn out_size(&self, x: usize) -> usize {
        (x + 2 * self.padding - self.kernel) / self.stride + 1
    }

    fn direct(&self) -> bool {
        self.kernel == 1 && self.stride == 1 && self.padding == 0
    }

    /// Output rows per band for an output `out_w` wide, at most `out_h`.
    fn band_rows(&self, out_h: usize, out_w: usize) -> usize {
        BAND_PIXELS.div_ceil(out_w.max(1)).clamp(1, out_h.max(1))
    }

    /// Bytes of a CPU [`conv2d`] on `frames` frames `h x w` beyond its output: each run's
    /// columns, and for half types f32 copies of the weight and of one frame's input and
    /// result.
    pub fn workspace(&self, frames: usize, h: usize, w: usize, compute: Compute) -> usize {
        let (oh, ow) = (self.out_size(h), self.out_size(w));
        let rows = self.band_rows(oh, ow);
        let columns = if self.direct() {
            0
        } else {
            4 * self.in_channels * self.kernel * self.kernel * rows * ow
        };
        let weight = self.out_channels * self.in_channels * self.kernel * self.kernel;
        match compute {
            Compute::Widen(dtype) => {
                // One frame at a time: its f32 input, f32 result, then its narrowed copy.
                let frame_out = self.out_channels * oh * ow;
                runs(oh.div_ceil(rows)) * columns
                    + compute.widened_bytes(weight + self.in_channels * h * w + frame_out)
                    + frame_out * dtype.size_in_bytes()
            }
            _ => runs(frames * oh.div_ceil(rows)) * columns,
        }
    }
}

/// `conv2d(x, weight) + bias` of `x` `(N, C_in, H, W)` and `weight` `(C_out, C_in, k, k)`:
/// the kernel on the CPU (f32 inside for half types), candle's conv2d elsewhere.
pub fn conv2d(x: &Tensor, weight: &Tensor, bias: &Tensor, g: ConvGeometry) -> Result<Tensor> {
    let compute = Compute::of(x);
    if compute == Compute::Reference {
        return conv2d_reference(x, weight, bias, g);
    }
    let op = Kernel(Conv {
        g,
        bias: bias.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()?,
    });
    let weight = compute.widen(weight)?;
    if compute == Compute::F32 {
        return x.contiguous()?.apply_op2_no_bwd(&weight, &op);
    }
    // Half types widen one frame at a time, so no f32 copy of the whole input or output.
    let (n, _, h, w) = x.dims4()?;
    let out = Tensor::zeros(
        (n, g.out_channels, g.out_size(h), g.out_size(w)),
        x.dtype(),
        x.device(),
    )?;
    for f in 0..n {
        let frame = compute.widen(&x.narrow(0, f, 1)?)?;
        let y = compute.narrow(frame.apply_op2_no_bwd(&weight, &op)?)?;
        out.slice_set(&y, 0, f)?;
    }
    Ok(out)
}

/// [`conv2d`] with candle's ops.
pub fn conv2d_reference(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    g: ConvGeometry,
) -> Result<Tensor> {
    x.conv2d(weight, g.padding, g.stride, 1, 1)?
        .broadcast_add(&bias.reshape((1, g.out_channels, 1, 1))?)
}

struct Conv {
    g: ConvGeometry,
    bias: Vec<f32>,
}

impl CpuKernel<2> for Conv {
    const NAME: &'static str = "streamline-conv2d";

    fn run(&self, [(s1, l1), (s2, l2)]: [Input; 2]) -> Result<(CpuStorage, Shape)> {
        let g = self.g;
        let (n, c, h, w) = l1.shape().dims4()?;
        let k = g.kernel;
        if c != g.in_channels
            || l2.shape().dims() != [g.out_channels, c, k, k]
            || self.bias.len() != g.out_channels
            || h + 2 * g.padding < k
            || w + 2 * g.padding < k
            || g.stride == 0
        {
            candle_core::bail!(
                "conv2d {g:?}: input {:?}, weight {:?}, {} biases",
                l1.shape(),
                l2.shape(),
                self.bias.len()
            )
        }
        let (x, weight) = (as_f32(s1, l1)?, as_f32(s2, l2)?);
        let (oh, ow) = (g.out_size(h), g.out_size(w));
        let fill = |out: Out<f32>| self.run(x, weight, out, (n, h, w));
        // SAFETY: every band of every frame is a task's, which writes all its channels.
        let out = unsafe { written_by(n * g.out_channels * oh * ow, fill) };
        let shape = Shape::from((n, g.out_channels, oh, ow));
        Ok((CpuStorage::F32(out), shape))
    }
}

impl Conv {
    fn run(&self, x: &[f32], weight: &[f32], out: Out<f32>, (n, h, w): (usize, usize, usize)) {
        let g = self.g;
        let (oh, ow) = (g.out_size(h), g.out_size(w));
        let rows = g.band_rows(oh, ow);
        let bands = oh.div_ceil(rows);
        let depth = g.in_channels * g.kernel * g.kernel;
        let columns = if g.direct() { 0 } else { depth * rows * ow };
        for_each_run(
            n * bands,
            || vec![0f32; columns],
            |cols, task| {
                let (frame, band) = (task / bands, task % bands);
                let y0 = band * rows;
                let pixels = rows.min(oh - y0) * ow;
                let input = &x[frame * g.in_channels * h * w..(frame + 1) * g.in_channels * h * w];
                let (rhs, rhs_rs) = if g.direct() {
                    (input[y0 * w..].as_ptr(), (h * w) as isize)
                } else {
                    im2col(input, cols, g, (h, w), y0..y0 + rows.min(oh - y0), ow);
                    (cols.as_ptr(), pixels as isize)
                };
                let plane = oh * ow;
                let base = frame * g.out_channels * plane + y0 * ow;
                for (co, &b) in self.bias.iter().enumerate() {
                    // SAFETY: this task alone writes band `band` of frame `frame`.
                    unsafe { out.slice(base + co * plane, pixels) }.fill(b);
                }
                // SAFETY: the GEMM's operands lie in the weight, the columns (or the input
                // band) and this task's band of the output, as the strides describe.
                unsafe {
                    product(
                        (g.out_channels, pixels, depth),
                        (out.ptr().add(base), 1, plane as isize),
                        true,
                        (weight.as_ptr(), 1, depth as isize),
                        (rhs, 1, rhs_rs),
                    );
                }
            },
        );
    }
}

simd_fn! {
    /// The im2col columns of output rows `rows` of one frame: row `(ci, ky, kx)` of `cols`
    /// holds, for each output pixel of the band, the input it multiplies (0 in the padding).
    fn im2col(
        input: &[f32],
        cols: &mut [f32],
        g: ConvGeometry,
        hw: (usize, usize),
        rows: std::ops::Range<usize>,
        ow: usize,
    ) {
        let ((h, w), k, s, p) = (hw, g.kernel, g.stride, g.padding);
        let pixels = rows.len() * ow;
        for ci in 0..g.in_channels {
            let plane = &input[ci * h * w..(ci + 1) * h * w];
            for ky in 0..k {
                for kx in 0..k {
                    let row = ((ci * k + ky) * k + kx) * pixels;
                    // Output columns whose input column `ox*s + kx - p` lies in 0..w.
                    let lo = p.saturating_sub(kx).div_ceil(s).min(ow);
                    let hi = ((w + p).saturating_sub(kx)).div_ceil(s).clamp(lo, ow);
                    for (i, oy) in rows.clone().enumerate() {
                        let dst = &mut cols[row + i * ow..row + (i + 1) * ow];
                        let iy = (oy * s + ky) as isize - p as isize;
                        if iy < 0 || iy >= h as isize {
                            dst.fill(0.0);
                            continue;
                        }
                        let src = &plane[iy as usize * w..(iy as usize + 1) * w];
                        dst[..lo].fill(0.0);
                        dst[hi..].fill(0.0);
                        let first = lo * s + kx - p;
                        if s == 1 {
                            dst[lo..hi].copy_from_slice(&src[first..first + hi - lo]);
                        } else {
                            for (j, d) in dst[lo..hi].iter_mut().enumerate() {
                                *d = src[first + j * s];
                            }
                        }
                    }
                }
            }
        }
    }
}
