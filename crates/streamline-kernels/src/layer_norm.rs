//! LayerNorm over the last dim, rows split across the threads.
//!
//! candle-nn's fused LayerNorm hands rayon one row at a time and reduces each row with scalar
//! sums; the transformer rows here are short (64 to 1280 channels) and many (every token of
//! every frame), so the task overhead and the scalar passes dominate. Here a task takes a run
//! of rows and reduces each in f32 lanes: the mean, the centered second moment over the
//! cache-resident row, then the affine result written once.

use candle_core::{CpuStorage, DType, Result, Shape, Tensor};

use crate::cpu_op::{CpuKernel, Input, Kernel};
use crate::par::{for_each_row, written_by, Out};
use crate::simd::{self, simd_fn};
use crate::storage::{as_f32, Compute};

/// Elements per task, in whole rows.
const TASK_ELEMS: usize = 1 << 14;

/// LayerNorm of `x` over its last dim with `weight` and `bias`: the kernel for f32 on the
/// CPU, [`layer_norm_reference`] otherwise.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    if Compute::of(x) != Compute::F32 {
        return layer_norm_reference(x, weight, bias, eps);
    }
    let host = |t: &Tensor| t.to_dtype(DType::F32)?.to_vec1::<f32>();
    let op = LayerNorm {
        weight: host(weight)?,
        bias: host(bias)?,
        eps: eps as f32,
    };
    x.contiguous()?.apply_op1_no_bwd(&Kernel(op))
}

/// [`layer_norm`] with candle's ops, statistics in f32 for half types.
pub fn layer_norm_reference(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    let dtype = x.dtype();
    let wide = x.to_dtype(DType::F32)?;
    let centered = wide.broadcast_sub(&wide.mean_keepdim(candle_core::D::Minus1)?)?;
    let var = centered.sqr()?.mean_keepdim(candle_core::D::Minus1)?;
    let normed = centered.broadcast_div(&(var + eps)?.sqrt()?)?;
    normed
        .broadcast_mul(&weight.to_dtype(DType::F32)?)?
        .broadcast_add(&bias.to_dtype(DType::F32)?)?
        .to_dtype(dtype)
}

struct LayerNorm {
    weight: Vec<f32>,
    bias: Vec<f32>,
    eps: f32,
}

simd_fn! {
    fn norm_row(x: &[f32], out: &mut [f32], weight: &[f32], bias: &[f32], eps: f32) {
        let n = x.len() as f32;
        let mean = simd::sum(x) / n;
        let inv = 1.0 / (simd::centered_squares(x, mean) / n + eps).sqrt();
        for ((o, v), (w, b)) in out.iter_mut().zip(x).zip(weight.iter().zip(bias)) {
            *o = ((v - mean) * inv).mul_add(*w, *b);
        }
    }
}

impl CpuKernel<1> for LayerNorm {
    const NAME: &'static str = "streamline-layer-norm";

    fn run(&self, [(s, l)]: [Input; 1]) -> Result<(CpuStorage, Shape)> {
        let x = as_f32(s, l)?;
        let dim = self.weight.len();
        if dim == 0 || l.dims().last() != Some(&dim) || self.bias.len() != dim {
            candle_core::bail!(
                "layer_norm: input {:?} with {dim} weights and {} biases",
                l.shape(),
                self.bias.len()
            )
        }
        let fill = |dst: Out<f32>| {
            // SAFETY: the whole output, which only the row calls below touch.
            let out = unsafe { dst.slice(0, x.len()) };
            for_each_row(
                out,
                dim,
                TASK_ELEMS / dim,
                || (),
                |_, r, o| {
                    let row = &x[r * dim..(r + 1) * dim];
                    norm_row(row, o, &self.weight, &self.bias, self.eps);
                },
            );
        };
        // SAFETY: every row is normalized into its output row.
        let out = unsafe { written_by(x.len(), fill) };
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }
}
