//! Layout changes: a strided rank-3 view made contiguous, in blocks and across threads.
//!
//! The video layouts (frames `(N, C, H*W)`, positions `(B*H*W, T, C)`, tokens) turn into
//! each other through transposes, which candle copies element by element on one thread. Here
//! the output's rows are split across threads and copied in small blocks, so the elements one
//! input cache line holds are used while it is still in the L1 cache.

use candle_core::{CpuStorage, Layout, Result, Shape, Storage, Tensor};

use crate::cpu_op::{CpuKernel, Input, Kernel};
use crate::par::{for_each_run, per_task, written_by, Out};
use crate::storage::Compute;

/// Output rows (dim 0) per task (at most) and per block.
const ROW_BLOCK: usize = 16;
/// Innermost elements per block.
const COL_BLOCK: usize = 64;

/// `x` made contiguous: the kernel for rank-3 f32 views on the CPU, candle's copy otherwise.
pub fn contiguous(x: &Tensor) -> Result<Tensor> {
    if x.is_contiguous() || x.rank() != 3 || Compute::of(x) != Compute::F32 {
        return x.contiguous();
    }
    x.apply_op1_no_bwd(&Kernel(Contiguous))
}

struct Contiguous;

impl CpuKernel<1> for Contiguous {
    const NAME: &'static str = "streamline-contiguous";

    fn run(&self, [(s, l)]: [Input; 1]) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(src) = s else {
            candle_core::bail!("contiguous: f32 only")
        };
        let dims = l.shape().dims3()?;
        let len = l.shape().elem_count();
        // SAFETY: the copy writes every element of the view into the output.
        let out = unsafe { written_by(len, |dst| copy_view(src, l, dims, dst)) };
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }
}

/// Rank-3 `parts` (views of any strides, equal trailing dims) concatenated along dim 0 into
/// one new tensor: the kernel for f32 on the CPU, copying each view straight into its rows
/// of the result, and candle's `cat` otherwise.
pub fn cat0(parts: &[Tensor]) -> Result<Tensor> {
    let [first, ..] = parts else {
        candle_core::bail!("cat0: no parts")
    };
    let kernel = parts.iter().all(|p| {
        p.rank() == 3 && Compute::of(p) == Compute::F32 && p.dims()[1..] == first.dims()[1..]
    });
    if !kernel {
        return Tensor::cat(parts, 0);
    }
    let rows: usize = parts.iter().map(|p| p.dims()[0]).sum();
    let (_, d1, d2) = first.dims3()?;
    let mut out = vec![0f32; rows * d1 * d2];
    let mut at = 0;
    for p in parts {
        let (storage, layout) = p.storage_and_layout();
        let Storage::Cpu(CpuStorage::F32(src)) = &*storage else {
            candle_core::bail!("cat0: f32 CPU parts only")
        };
        let len = layout.shape().elem_count();
        copy_view(src, layout, p.dims3()?, Out::new(&mut out[at..at + len]));
        at += len;
    }
    Tensor::from_vec(out, (rows, d1, d2), first.device())
}

/// Copy the rank-3 view `l` (of dims `d0, d1, d2`) of `src` into the dense output `dst`,
/// blocks of output rows per task.
///
/// Blocks are ordered so that the cache lines a block reads are used up before they leave
/// the L1 cache: when the view is dense along dim 1, a block walks `ROW_BLOCK` of dim 1
/// beside each element of dim 2; otherwise `ROW_BLOCK` rows of dim 0.
fn copy_view(src: &[f32], l: &Layout, (d0, d1, d2): (usize, usize, usize), dst: Out<f32>) {
    let st = l.stride();
    let (s0, s1, s2, base) = (st[0], st[1], st[2], l.start_offset());
    let copy = |i: usize, j: usize, k0: usize, k1: usize| {
        // SAFETY: the task running this alone writes row `i` of the output.
        let o = unsafe { dst.slice((i * d1 + j) * d2 + k0, k1 - k0) };
        let at = base + i * s0 + j * s1;
        for (k, o) in (k0..k1).zip(o.iter_mut()) {
            *o = src[at + k * s2];
        }
    };
    let dense_dim1 = s1 == 1 && s2 != 1;
    // A frame-major view of one video has as few rows as frames.
    let per_task = per_task(d0, ROW_BLOCK);
    for_each_run(
        d0.div_ceil(per_task),
        || (),
        |_, task| {
            let rows = task * per_task..d0.min((task + 1) * per_task);
            if dense_dim1 {
                for i in rows {
                    for j0 in (0..d1).step_by(ROW_BLOCK) {
                        for k0 in (0..d2).step_by(COL_BLOCK) {
                            for j in j0..d1.min(j0 + ROW_BLOCK) {
                                copy(i, j, k0, d2.min(k0 + COL_BLOCK));
                            }
                        }
                    }
                }
                return;
            }
            for j in 0..d1 {
                for k0 in (0..d2).step_by(COL_BLOCK) {
                    for i in rows.clone() {
                        copy(i, j, k0, d2.min(k0 + COL_BLOCK));
                    }
                }
            }
        },
    );
}
