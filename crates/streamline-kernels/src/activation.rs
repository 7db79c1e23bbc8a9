//! Activations: GEGLU's gate, `(h + b_h) * gelu(g + b_g)`, in one pass written over `h`, and
//! SiLU.
//!
//! candle's exact GELU calls libm's scalar `erf` per element, and the biases, the GELU and the
//! product are three more full-size passes with a buffer each. Here one vectorized pass
//! reads both halves, adds the biases and writes the result where the hidden half was.
//! candle's SiLU runs libm's `exp` per element on one thread; here it is vectorized and split
//! across the threads.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, InplaceOp2, Layout, Result, Shape, Tensor, WithDType};
use half::{bf16, f16};

use crate::par::{for_each_run, Out};
use crate::simd::{exp, gelu_erf, simd_fn};
use crate::storage::Compute;

/// Rows per task of the CPU pass.
const ROWS_PER_TASK: usize = 64;

/// `(h + h_bias) * gelu_erf(gate + gate_bias)` over the last dim, computed in place of `h`
/// on the CPU (f32 inside for half types) and with candle's ops elsewhere. `h` is consumed:
/// pass a tensor nothing else shares.
pub fn geglu(
    h: Tensor,
    gate: &Tensor,
    h_bias: Option<&Tensor>,
    gate_bias: Option<&Tensor>,
) -> Result<Tensor> {
    if Compute::of(&h) == Compute::Reference || !h.is_contiguous() {
        let add = |x: &Tensor, b: Option<&Tensor>| match b {
            Some(b) => x.broadcast_add(b),
            None => Ok(x.clone()),
        };
        return add(&h, h_bias)? * add(gate, gate_bias)?.gelu_erf()?;
    }
    let width = *h.dims().last().unwrap_or(&0);
    let host = |b: Option<&Tensor>| -> Result<Vec<f32>> {
        match b {
            Some(b) => b.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>(),
            None => Ok(vec![0.0; width]),
        }
    };
    let op = Geglu {
        h_bias: host(h_bias)?,
        gate_bias: host(gate_bias)?,
    };
    h.inplace_op2(&gate.contiguous()?, &op)?;
    Ok(h)
}

struct Geglu {
    h_bias: Vec<f32>,
    gate_bias: Vec<f32>,
}

impl Geglu {
    fn run<T: WithDType>(&self, h: &mut [T], gate: &[T]) -> Result<()> {
        let width = self.h_bias.len();
        if width == 0 || h.len() != gate.len() || h.len() % width != 0 {
            candle_core::bail!(
                "geglu: {} and {} elements with biases of {width}",
                h.len(),
                gate.len()
            )
        }
        let rows = h.len() / width;
        let out = Out::new(h);
        for_each_run(
            rows.div_ceil(ROWS_PER_TASK),
            || (vec![0f32; width], vec![0f32; width]),
            |(hb, gb), task| {
                let start = task * ROWS_PER_TASK;
                for r in start..rows.min(start + ROWS_PER_TASK) {
                    // SAFETY: this task alone owns rows start..start + ROWS_PER_TASK.
                    let dst = unsafe { out.slice(r * width, width) };
                    let g = &gate[r * width..(r + 1) * width];
                    for ((a, b), (x, y)) in hb.iter_mut().zip(gb.iter_mut()).zip(dst.iter().zip(g))
                    {
                        *a = x.to_f64() as f32;
                        *b = y.to_f64() as f32;
                    }
                    gate_row(hb, gb, &self.h_bias, &self.gate_bias);
                    for (d, v) in dst.iter_mut().zip(hb.iter()) {
                        *d = T::from_f64(f64::from(*v));
                    }
                }
            },
        );
        Ok(())
    }

    fn run_f32(&self, h: &mut [f32], gate: &[f32]) -> Result<()> {
        let width = self.h_bias.len();
        if width == 0 || h.len() != gate.len() || h.len() % width != 0 {
            return self.run(h, gate);
        }
        let rows = h.len() / width;
        let out = Out::new(h);
        for_each_run(
            rows.div_ceil(ROWS_PER_TASK),
            || (),
            |_, task| {
                let start = task * ROWS_PER_TASK;
                for r in start..rows.min(start + ROWS_PER_TASK) {
                    // SAFETY: this task alone owns rows start..start + ROWS_PER_TASK.
                    let dst = unsafe { out.slice(r * width, width) };
                    let g = &gate[r * width..(r + 1) * width];
                    gate_row(dst, g, &self.h_bias, &self.gate_bias);
                }
            },
        );
        Ok(())
    }
}

simd_fn! {
    fn gate_row(h: &mut [f32], g: &[f32], hb: &[f32], gb: &[f32]) {
        for ((h, g), (hb, gb)) in h.iter_mut().zip(g).zip(hb.iter().zip(gb)) {
            *h = (*h + hb) * gelu_erf(g + gb);
        }
    }
}

impl InplaceOp2 for Geglu {
    fn name(&self) -> &'static str {
        "streamline-geglu"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        let (Some((a1, b1)), Some((a2, b2))) = (l1.contiguous_offsets(), l2.contiguous_offsets())
        else {
            candle_core::bail!("geglu: inputs must be contiguous")
        };
        match (s1, s2) {
            (CpuStorage::F32(h), CpuStorage::F32(g)) => self.run_f32(&mut h[a1..b1], &g[a2..b2]),
            (CpuStorage::F16(h), CpuStorage::F16(g)) => self.run::<f16>(&mut h[a1..b1], &g[a2..b2]),
            (CpuStorage::BF16(h), CpuStorage::BF16(g)) => {
                self.run::<bf16>(&mut h[a1..b1], &g[a2..b2])
            }
            (h, g) => candle_core::bail!("geglu: {:?} and {:?} inputs", h.dtype(), g.dtype()),
        }
    }
}

/// Elements per task of the CPU SiLU.
const SILU_CHUNK: usize = 1 << 14;

/// `x * sigmoid(x)`: the kernel for f32 on the CPU, candle's op otherwise.
pub fn silu(x: &Tensor) -> Result<Tensor> {
    if Compute::of(x) != Compute::F32 {
        return x.silu();
    }
    x.contiguous()?.apply_op1_no_bwd(&Silu)
}

struct Silu;

simd_fn! {
    fn silu_into(x: &[f32], out: &mut [f32]) {
        for (o, &v) in out.iter_mut().zip(x) {
            *o = v / (1.0 + exp(-v));
        }
    }
}

impl CustomOp1 for Silu {
    fn name(&self) -> &'static str {
        "streamline-silu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = crate::storage::as_f32(s, l)?;
        let mut out = vec![0f32; x.len()];
        let dst = Out::new(&mut out);
        for_each_run(
            x.len().div_ceil(SILU_CHUNK),
            || (),
            |_, task| {
                let start = task * SILU_CHUNK;
                let len = SILU_CHUNK.min(x.len() - start);
                // SAFETY: this task alone writes start..start + len.
                silu_into(&x[start..start + len], unsafe { dst.slice(start, len) });
            },
        );
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }
}
