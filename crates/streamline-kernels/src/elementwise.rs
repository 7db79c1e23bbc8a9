//! Pointwise sums of two f32 tensors of one shape (residual adds, AlphaBlender's blends) and
//! per-channel affine maps with a table per batch item (GroupNorm's scale and shift, time and
//! frame embeddings), split across rayon's threads.
//!
//! candle runs these on one thread below 64k elements, and above on a thread pool of its own
//! whose workers spin for some 25,000 pauses after every op. With as many threads as cores,
//! the first leaves a core idle while the op runs and the second takes a core from rayon's
//! workers while the next op does: in a sliced plan's many small calls, both show.

use candle_core::{CpuStorage, Result, Shape, Tensor};

use crate::cpu_op::{CpuKernel, Input, Kernel};
use crate::par::{for_each_run, written_by, Out};
use crate::portable::norm::BatchRows;
use crate::simd::simd_fn;
use crate::storage::{as_f32, Compute};

/// Elements per task.
const CHUNK: usize = 16 * 1024;

/// `a + b`: the kernel for contiguous f32 on the CPU, candle's op otherwise.
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    pointwise(a, b, Pointwise::Add, |a, b| a + b)
}

/// `alpha * (a - b) + b`, rounded as candle rounds `(a - b) * alpha + b` (the difference,
/// its scaled copy, then the sum, none fused): the kernel for contiguous f32 on the CPU,
/// candle's ops otherwise.
pub fn blend(a: &Tensor, b: &Tensor, alpha: f64) -> Result<Tensor> {
    pointwise(a, b, Pointwise::Blend(alpha as f32), |a, b| {
        (a - b)? * alpha + b
    })
}

fn pointwise(
    a: &Tensor,
    b: &Tensor,
    op: Pointwise,
    reference: impl FnOnce(&Tensor, &Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let kernel = [a, b]
        .iter()
        .all(|t| Compute::of(t) == Compute::F32 && t.is_contiguous());
    if !kernel || a.shape() != b.shape() {
        return reference(a, b);
    }
    a.apply_op2_no_bwd(b, &Kernel(op))
}

#[derive(Clone, Copy)]
enum Pointwise {
    Add,
    Blend(f32),
}

simd_fn! {
    fn add_into(a: &[f32], b: &[f32], out: &mut [f32]) {
        for ((o, x), y) in out.iter_mut().zip(a).zip(b) {
            *o = x + y;
        }
    }
}

simd_fn! {
    fn blend_into(a: &[f32], b: &[f32], out: &mut [f32], alpha: f32) {
        for ((o, x), y) in out.iter_mut().zip(a).zip(b) {
            *o = (x - y) * alpha + y;
        }
    }
}

impl CpuKernel<2> for Pointwise {
    const NAME: &'static str = "streamline-pointwise";

    fn run(&self, [(s1, l1), (s2, l2)]: [Input; 2]) -> Result<(CpuStorage, Shape)> {
        let (a, b) = (as_f32(s1, l1)?, as_f32(s2, l2)?);
        if a.len() != b.len() {
            candle_core::bail!("pointwise: shapes {:?} and {:?}", l1.shape(), l2.shape())
        }
        let fill = |dst: Out<f32>| {
            for_each_run(
                a.len().div_ceil(CHUNK),
                || (),
                |_, task| {
                    let r = task * CHUNK..a.len().min((task + 1) * CHUNK);
                    // SAFETY: this task alone writes the elements in `r`.
                    let out = unsafe { dst.slice(r.start, r.len()) };
                    let (a, b) = (&a[r.clone()], &b[r]);
                    match *self {
                        Pointwise::Add => add_into(a, b, out),
                        Pointwise::Blend(alpha) => blend_into(a, b, out, alpha),
                    }
                },
            )
        };
        // SAFETY: the chunks cover the output, and each task writes all of its chunk.
        let out = unsafe { written_by(a.len(), fill) };
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// Per-channel tables of an affine map, one row of `channels` values per batch item.
#[derive(Clone, Copy)]
pub struct ChannelTables<'a> {
    /// Multiplies each element first; `None` for a plain add.
    pub scale: Option<&'a [f32]>,
    pub shift: &'a [f32],
    pub channels: usize,
}

/// `x * scale[b, c] + shift[b, c]` (two roundings, as candle's broadcast multiply then add),
/// where dim-0 row `r` of `x` belongs to batch item `b = rows.batch_of(r)` and an element's
/// channel `c` is its index inside the row divided by `inner` (the elements after the
/// channel dim), modulo the channels. For contiguous f32 on the CPU; `None` otherwise, where
/// the caller uses candle's broadcasts.
pub fn batch_affine(
    x: &Tensor,
    tables: ChannelTables,
    inner: usize,
    rows: BatchRows,
) -> Option<Result<Tensor>> {
    if Compute::of(x) != Compute::F32 || !x.is_contiguous() || x.rank() == 0 {
        return None;
    }
    let op = BatchAffine {
        scale: tables.scale.map(<[f32]>::to_vec),
        shift: tables.shift.to_vec(),
        channels: tables.channels,
        inner: inner.max(1),
        rows,
    };
    Some(x.apply_op1_no_bwd(&Kernel(op)))
}

struct BatchAffine {
    scale: Option<Vec<f32>>,
    shift: Vec<f32>,
    channels: usize,
    inner: usize,
    rows: BatchRows,
}

simd_fn! {
    fn scale_shift(x: &[f32], out: &mut [f32], scale: &[f32], shift: &[f32]) {
        for (((o, v), s), t) in out.iter_mut().zip(x).zip(scale).zip(shift) {
            *o = v * s + t;
        }
    }
}

simd_fn! {
    fn shift_by(x: &[f32], out: &mut [f32], shift: &[f32]) {
        for ((o, v), t) in out.iter_mut().zip(x).zip(shift) {
            *o = v + t;
        }
    }
}

impl BatchAffine {
    /// One row of the output from its row of `x` and its batch item's tables.
    fn row(&self, x: &[f32], out: &mut [f32], batch: usize) {
        let c = self.channels;
        let shift = &self.shift[batch * c..(batch + 1) * c];
        let scale = self.scale.as_ref().map(|s| &s[batch * c..(batch + 1) * c]);
        let segments = x.chunks(self.inner).zip(out.chunks_mut(self.inner));
        if self.inner == 1 {
            for (x, out) in x.chunks(c).zip(out.chunks_mut(c)) {
                match scale {
                    Some(s) => scale_shift(x, out, s, shift),
                    None => shift_by(x, out, shift),
                }
            }
            return;
        }
        for (k, (x, out)) in segments.enumerate() {
            let ch = k % c;
            for (o, v) in out.iter_mut().zip(x) {
                *o = match scale {
                    Some(s) => v * s[ch] + shift[ch],
                    None => v + shift[ch],
                };
            }
        }
    }
}

impl CpuKernel<1> for BatchAffine {
    const NAME: &'static str = "streamline-batch-affine";

    fn run(&self, [(s, l)]: [Input; 1]) -> Result<(CpuStorage, Shape)> {
        let x = as_f32(s, l)?;
        let rows = l.dims()[0];
        let width = x.len().checked_div(rows).unwrap_or(0);
        let batches = self.rows.batch_of(rows.saturating_sub(1)) + 1;
        let c = self.channels;
        let tables_fit = self.shift.len() >= batches * c
            && self
                .scale
                .as_ref()
                .is_none_or(|s| s.len() == self.shift.len());
        if c == 0 || width % (c * self.inner) != 0 || !tables_fit {
            candle_core::bail!(
                "batch_affine: input {:?}, {c} channels of {} elements, tables of {}",
                l.shape(),
                self.inner,
                self.shift.len()
            )
        }
        let per_task = CHUNK.div_ceil(width.max(1));
        let fill = |dst: Out<f32>| {
            for_each_run(
                rows.div_ceil(per_task),
                || (),
                |_, task| {
                    for r in task * per_task..rows.min((task + 1) * per_task) {
                        // SAFETY: this task alone writes row r.
                        let out = unsafe { dst.slice(r * width, width) };
                        self.row(&x[r * width..(r + 1) * width], out, self.rows.batch_of(r));
                    }
                },
            )
        };
        // SAFETY: the tasks cover every row, and each row is written in full.
        let out = unsafe { written_by(x.len(), fill) };
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }
}
