//! Layout changes: a strided rank-3 view made contiguous, in blocks and across threads.
//!
//! The video layouts (frames `(N, C, H*W)`, positions `(B*H*W, T, C)`, tokens) turn into
//! each other through transposes, which candle copies element by element on one thread. Here
//! the output's rows are split across threads and copied in small blocks, so the elements one
//! input cache line holds are used while it is still in the L1 cache.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

use crate::par::{for_each_run, Out};
use crate::storage::Compute;

/// Output rows (dim 0) per task and per block.
const ROW_BLOCK: usize = 16;
/// Innermost elements per block.
const COL_BLOCK: usize = 64;

/// `x` made contiguous: the kernel for rank-3 f32 views on the CPU, candle's copy otherwise.
pub fn contiguous(x: &Tensor) -> Result<Tensor> {
    if x.is_contiguous() || x.rank() != 3 || Compute::of(x) != Compute::F32 {
        return x.contiguous();
    }
    x.apply_op1_no_bwd(&Contiguous)
}

struct Contiguous;

impl CustomOp1 for Contiguous {
    fn name(&self) -> &'static str {
        "streamline-contiguous"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(src) = s else {
            candle_core::bail!("contiguous: f32 only")
        };
        let (d0, d1, d2) = l.shape().dims3()?;
        let st = l.stride();
        let (s0, s1, s2, base) = (st[0], st[1], st[2], l.start_offset());
        let mut out = vec![0f32; d0 * d1 * d2];
        let dst = Out::new(&mut out);
        for_each_run(
            d0.div_ceil(ROW_BLOCK),
            || (),
            |_, task| {
                let rows = task * ROW_BLOCK..d0.min((task + 1) * ROW_BLOCK);
                for j in 0..d1 {
                    for k0 in (0..d2).step_by(COL_BLOCK) {
                        let k1 = d2.min(k0 + COL_BLOCK);
                        for i in rows.clone() {
                            // SAFETY: this task alone writes rows `rows` of the output.
                            let o = unsafe { dst.slice((i * d1 + j) * d2 + k0, k1 - k0) };
                            let at = base + i * s0 + j * s1;
                            for (k, o) in (k0..k1).zip(o.iter_mut()) {
                                *o = src[at + k * s2];
                            }
                        }
                    }
                }
            },
        );
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }
}
