//! GroupNorm: per-frame normalization, and the statistics and affine apply of a GroupNorm
//! whose groups span many rows (temporal layers, sliced along positions).
//!
//! candle's GroupNorm is a chain of reductions and broadcasts, each a full-size pass with a
//! buffer of its own. Here one task reads one (frame, group) block, or one run of rows:
//! sums in f32 lanes, the centered second moment in a second pass over the same
//! cache-resident block, and the normalized result written once.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Result, Shape, Tensor, WithDType};
use half::{bf16, f16};

use crate::cpu_op::{CpuKernel, Input, Kernel};
use crate::par::{for_each_run, runs, written_by, Out};
use crate::simd::{self, simd_fn};
use crate::storage::Compute;

/// GroupNorm of each frame `(N, C, ...)` over `(C/groups, ...)`, with per-channel `weight`
/// and `bias` (f32 inside for half types); candle's ops off the CPU.
pub fn group_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    groups: usize,
    eps: f64,
) -> Result<Tensor> {
    if Compute::of(x) == Compute::Reference {
        return group_norm_reference(x, weight, bias, groups, eps);
    }
    let host = |t: &Tensor| t.to_dtype(DType::F32)?.to_vec1::<f32>();
    let op = FrameNorm {
        weight: host(weight)?,
        bias: host(bias)?,
        groups,
        eps: eps as f32,
    };
    x.contiguous()?.apply_op1_no_bwd(&Kernel(op))
}

/// Bytes [`group_norm`] allocates besides its output on the CPU: an f32 block per run for
/// half types.
pub fn group_norm_workspace(dims: &[usize], groups: usize, dtype: DType) -> usize {
    let frames = dims.first().copied().unwrap_or(0);
    let per_frame: usize = dims.iter().skip(1).product();
    match Compute::for_dtype(dtype, &candle_core::Device::Cpu) {
        Compute::Widen(_) => runs(frames * groups) * 4 * per_frame / groups.max(1),
        _ => 0,
    }
}

/// [`group_norm`] with candle's ops, statistics in f32 for half types.
pub fn group_norm_reference(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    groups: usize,
    eps: f64,
) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let dtype = x.dtype();
    let wide = match dtype {
        DType::F16 | DType::BF16 => DType::F32,
        d => d,
    };
    let x32 = x.reshape((dims[0], groups, ()))?.to_dtype(wide)?;
    let mean = x32.mean_keepdim(2)?;
    let centered = x32.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(2)?;
    let normed = centered.broadcast_div(&(var + eps)?.sqrt()?)?;
    let mut w_dims = vec![1; dims.len()];
    w_dims[1] = dims[1];
    normed
        .to_dtype(dtype)?
        .reshape(dims)?
        .broadcast_mul(&weight.reshape(w_dims.as_slice())?)?
        .broadcast_add(&bias.reshape(w_dims)?)
}

struct FrameNorm {
    weight: Vec<f32>,
    bias: Vec<f32>,
    groups: usize,
    eps: f32,
}

impl FrameNorm {
    fn run<T: WithDType>(&self, x: &[T], n: usize) -> Result<Vec<T>> {
        let c = self.weight.len();
        if n == 0 || self.groups == 0 || c % self.groups != 0 || x.len() % (n * c) != 0 {
            candle_core::bail!(
                "group_norm: {} elements in {n} frames of {c} channels, {} groups",
                x.len(),
                self.groups
            )
        }
        let plane = x.len() / (n * c);
        let per_group = c / self.groups;
        let block = per_group * plane;
        let wide = T::DTYPE != DType::F32;
        let fill = |dst: Out<T>| {
            for_each_run(
                n * self.groups,
                || vec![0f32; if wide { block } else { 0 }],
                |scratch, task| {
                    let g = task % self.groups;
                    let src = &x[task * block..(task + 1) * block];
                    // SAFETY: this task alone writes block `task`.
                    let out = unsafe { dst.slice(task * block, block) };
                    let values: &[f32] = if wide {
                        for (s, v) in scratch.iter_mut().zip(src) {
                            *s = v.to_f64() as f32;
                        }
                        scratch
                    } else {
                        // SAFETY: T is f32 when `wide` is false.
                        unsafe { std::slice::from_raw_parts(src.as_ptr() as *const f32, block) }
                    };
                    let (mean, var) = moments(values);
                    let rstd = 1.0 / (var + self.eps).sqrt();
                    for (i, ch) in (g * per_group..(g + 1) * per_group).enumerate() {
                        let (scale, shift) = (self.weight[ch] * rstd, self.bias[ch]);
                        let (v, o) = (
                            &values[i * plane..(i + 1) * plane],
                            &mut out[i * plane..(i + 1) * plane],
                        );
                        affine(v, o, mean, scale, shift);
                    }
                },
            );
        };
        // SAFETY: the frames' groups cover the output, and each task writes all its block.
        let out = unsafe { written_by(x.len(), fill) };
        Ok(out)
    }
}

simd_fn! {
    /// Mean and (biased) variance of `xs`, both passes in f32 lanes.
    fn moments(xs: &[f32]) -> (f32, f32) {
        let count = xs.len().max(1) as f32;
        let mean = simd::sum(xs) / count;
        (mean, simd::centered_squares(xs, mean) / count)
    }
}

/// `out = (x - mean) * scale + shift`, converting to the output's element type. (Folding the
/// mean into the shift would cancel catastrophically when the variance is near 0.)
#[inline(always)]
fn affine<T: WithDType>(x: &[f32], out: &mut [T], mean: f32, scale: f32, shift: f32) {
    if T::DTYPE == DType::F32 {
        // SAFETY: T is f32.
        let out =
            unsafe { std::slice::from_raw_parts_mut(out.as_mut_ptr() as *mut f32, out.len()) };
        affine_f32(x, out, mean, scale, shift);
    } else {
        for (o, v) in out.iter_mut().zip(x) {
            *o = T::from_f64(f64::from((v - mean).mul_add(scale, shift)));
        }
    }
}

simd_fn! {
    fn affine_f32(x: &[f32], out: &mut [f32], mean: f32, scale: f32, shift: f32) {
        for (o, v) in out.iter_mut().zip(x) {
            *o = (v - mean).mul_add(scale, shift);
        }
    }
}

impl CpuKernel<1> for FrameNorm {
    const NAME: &'static str = "streamline-group-norm";

    fn run(&self, [(s, l)]: [Input; 1]) -> Result<(CpuStorage, Shape)> {
        let Some((a, b)) = l.contiguous_offsets() else {
            candle_core::bail!("group_norm: input must be contiguous")
        };
        let n = l.shape().dims().first().copied().unwrap_or(0);
        let out = match s {
            CpuStorage::F32(v) => CpuStorage::F32(self.run(&v[a..b], n)?),
            CpuStorage::F16(v) => CpuStorage::F16(self.run::<f16>(&v[a..b], n)?),
            CpuStorage::BF16(v) => CpuStorage::BF16(self.run::<bf16>(&v[a..b], n)?),
            other => candle_core::bail!("group_norm: {:?} input", other.dtype()),
        };
        Ok((out, l.shape().clone()))
    }
}

/// Per-group sums over runs of rows of a position-major `(n, T, C)` feature: for each run
/// `pieces[i]` of rows and each of the `groups` channel groups, the sum over its rows,
/// frames and channels of `x`, or of `(x - centers[i * groups + g])^2` when `centers` is
/// given. Each (row, frame, group) sums in f32 lanes, the rows of a run in f64. Returns a
/// `(pieces, groups)` f64 tensor on the CPU.
pub fn group_sums(
    x: &Tensor,
    groups: usize,
    pieces: &[std::ops::Range<usize>],
    centers: Option<&[f32]>,
) -> Result<Tensor> {
    let op = GroupSums {
        groups,
        pieces: pieces.to_vec(),
        centers: centers.map(<[f32]>::to_vec),
    };
    match Compute::of(x) {
        Compute::Reference => op.reference(x),
        _ => x.contiguous()?.apply_op1_no_bwd(&Kernel(op)),
    }
}

/// Runs (threads) [`group_sums`] uses on `rows` rows; each widens one row of a half input.
pub fn group_sums_runs(rows: usize) -> usize {
    runs(rows)
}

struct GroupSums {
    groups: usize,
    pieces: Vec<std::ops::Range<usize>>,
    centers: Option<Vec<f32>>,
}

impl GroupSums {
    fn check(&self, dims: &[usize]) -> Result<(usize, usize, usize)> {
        let &[n, t, c] = dims else {
            candle_core::bail!("group sums expect (n, T, C), got {dims:?}")
        };
        let centers_ok = self
            .centers
            .as_ref()
            .is_none_or(|m| m.len() == self.pieces.len() * self.groups);
        if self.groups == 0
            || c % self.groups != 0
            || !centers_ok
            || self.pieces.iter().any(|p| p.end > n)
        {
            candle_core::bail!("group sums: {dims:?} with {} groups", self.groups)
        }
        Ok((n, t, c))
    }

    fn center(&self, piece: usize, g: usize) -> f32 {
        self.centers
            .as_ref()
            .map_or(0.0, |m| m[piece * self.groups + g])
    }

    fn run<T: WithDType>(&self, x: &[T], dims: &[usize]) -> Result<Vec<f64>> {
        let (_, t, c) = self.check(dims)?;
        let per_group = c / self.groups;
        let row = t * c;
        let mut sums = vec![0f64; self.pieces.len() * self.groups];
        for (p, rows) in self.pieces.iter().enumerate() {
            let runs = runs(rows.len());
            let partial: Vec<Vec<f64>> = (0..runs).map(|_| vec![0f64; self.groups]).collect();
            let partial = std::sync::Mutex::new(partial);
            for_each_run(
                runs,
                || vec![0f32; if T::DTYPE == DType::F32 { 0 } else { row }],
                |scratch, run| {
                    let mut acc = vec![0f64; self.groups];
                    let mut frame_sums = vec![0f32; self.groups];
                    let (start, end) = (
                        rows.start + run * rows.len() / runs,
                        rows.start + (run + 1) * rows.len() / runs,
                    );
                    for r in start..end {
                        let src = &x[r * row..(r + 1) * row];
                        let values: &[f32] = if T::DTYPE == DType::F32 {
                            // SAFETY: T is f32.
                            unsafe { std::slice::from_raw_parts(src.as_ptr() as *const f32, row) }
                        } else {
                            for (s, v) in scratch.iter_mut().zip(src) {
                                *s = v.to_f64() as f32;
                            }
                            scratch
                        };
                        for frame in values.chunks_exact(c) {
                            for (g, (s, xs)) in frame_sums
                                .iter_mut()
                                .zip(frame.chunks_exact(per_group))
                                .enumerate()
                            {
                                *s = match self.centers {
                                    Some(_) => simd::centered_squares(xs, self.center(p, g)),
                                    None => simd::sum(xs),
                                };
                            }
                            // Apart from the f32 sums: each group's f64 total then takes one
                            // add per frame across all groups at once, not a chain through
                            // memory per group.
                            for (a, s) in acc.iter_mut().zip(&frame_sums) {
                                *a += f64::from(*s);
                            }
                        }
                    }
                    partial.lock().expect("no panics inside")[run] = acc;
                },
            );
            for part in partial.into_inner().expect("no panics inside") {
                for (s, v) in sums[p * self.groups..(p + 1) * self.groups]
                    .iter_mut()
                    .zip(part)
                {
                    *s += v;
                }
            }
        }
        Ok(sums)
    }

    /// The same sums with candle's ops.
    fn reference(&self, x: &Tensor) -> Result<Tensor> {
        let (_, t, c) = self.check(x.dims())?;
        let mut out = Vec::new();
        for (p, rows) in self.pieces.iter().enumerate() {
            let part = x
                .narrow(0, rows.start, rows.len())?
                .to_dtype(DType::F32)?
                .reshape((rows.len() * t, self.groups, c / self.groups))?;
            let part = match &self.centers {
                Some(m) => {
                    let m = Tensor::new(&m[p * self.groups..(p + 1) * self.groups], x.device())?;
                    part.broadcast_sub(&m.reshape((1, self.groups, 1))?)?
                        .sqr()?
                }
                None => part,
            };
            out.push(part.sum(2)?.to_dtype(DType::F64)?.sum(0)?);
        }
        Tensor::stack(&out, 0)?.to_device(&candle_core::Device::Cpu)
    }
}

impl CpuKernel<1> for GroupSums {
    const NAME: &'static str = "streamline-group-sums";

    fn run(&self, [(s, l)]: [Input; 1]) -> Result<(CpuStorage, Shape)> {
        let Some((a, b)) = l.contiguous_offsets() else {
            candle_core::bail!("group sums: input must be contiguous")
        };
        let dims = l.shape().dims();
        let sums = match s {
            CpuStorage::F32(v) => self.run(&v[a..b], dims)?,
            CpuStorage::F16(v) => self.run::<f16>(&v[a..b], dims)?,
            CpuStorage::BF16(v) => self.run::<bf16>(&v[a..b], dims)?,
            other => candle_core::bail!("group sums: {:?} input", other.dtype()),
        };
        let shape = Shape::from((self.pieces.len(), self.groups));
        Ok((CpuStorage::F64(sums), shape))
    }
}
