//! Activations: GEGLU (its projection and gate, `(x W_h + b_h) * gelu(x W_g + b_g)`), and
//! SiLU.
//!
//! candle's exact GELU calls libm's scalar `erf` per element, and the biases, the GELU and the
//! product are three more full-size passes with a buffer each. On f32 the CPU kernel computes
//! both products a tile of rows at a time, the gate into a tile-sized scratch, and gates the
//! hidden tile where it lies in the output: neither full-size half is ever written. Half types
//! take both products from candle and one vectorized pass gates the hidden half in place.
//! candle's SiLU runs libm's `exp` per element on one thread; here it is vectorized and split
//! across the threads.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, InplaceOp2, Layout, Result, Shape, Tensor, WithDType};
use half::{bf16, f16};

use crate::cpu_op::{CpuKernel, Input, Kernel};
use crate::linear::{
    fill_rows, gemm_rows, linear, product_tile, weight_packing, WeightOrder, WeightRhs,
    MAX_PRODUCT_ROWS,
};
use crate::par::{for_each_row, for_each_run, runs, written_by, Out};
use crate::simd::{exp, gelu_erf, simd_fn};
use crate::storage::{as_f32, Compute};

/// Rows per task of the CPU pass.
const ROWS_PER_TASK: usize = 64;

/// diffusers' GEGLU over the last dim of `x` (any rank): `(x @ w_h^T + b_h) * gelu_erf(x @
/// w_g^T + b_g)`, `w_h` and `w_g` `(inner, in)`. The fused kernel for contiguous f32 on the
/// CPU; otherwise the two products, then [`geglu`].
pub fn linear_geglu(
    x: &Tensor,
    [w_h, w_g]: [&Tensor; 2],
    [b_h, b_g]: [Option<&Tensor>; 2],
) -> Result<Tensor> {
    let (inner, in_dim) = w_h.dims2()?;
    if Compute::of(x) != Compute::F32 || !x.is_contiguous() {
        let (h, gate) = (linear(x, w_h, None)?, linear(x, w_g, None)?);
        return geglu(h, &gate, b_h, b_g);
    }
    let host = |b: Option<&Tensor>| -> Result<Vec<f32>> {
        match b {
            Some(b) => b.to_dtype(DType::F32)?.to_vec1::<f32>(),
            None => Ok(vec![0.0; inner]),
        }
    };
    let op = LinearGeglu {
        h_bias: host(b_h)?,
        gate_bias: host(b_g)?,
    };
    let mut dims = x.dims().to_vec();
    let rows = x.elem_count() / in_dim.max(1);
    let y = x.reshape((rows, in_dim))?.apply_op3_no_bwd(
        &WeightOrder::dense(w_h)?,
        &WeightOrder::dense(w_g)?,
        &Kernel(op),
    )?;
    if let Some(last) = dims.last_mut() {
        *last = inner;
    }
    y.reshape(dims)
}

/// Bytes a CPU [`linear_geglu`] on f32 allocates besides its output (`None` for other
/// dtypes): per run, the gate of one tile of rows and gemm's packed weight (both weights in
/// `order`).
pub fn linear_geglu_workspace(
    rows: usize,
    (in_dim, inner): (usize, usize),
    order: WeightOrder,
    dtype: DType,
) -> Option<usize> {
    let tile = product_tile(rows, MAX_PRODUCT_ROWS).min(rows);
    (Compute::for_dtype(dtype, &candle_core::Device::Cpu) == Compute::F32).then(|| {
        let packing = weight_packing(inner, tile, in_dim, order);
        runs(rows.div_ceil(tile.max(1))) * (4 * tile * inner + packing)
    })
}

struct LinearGeglu {
    h_bias: Vec<f32>,
    gate_bias: Vec<f32>,
}

simd_fn! {
    fn gate_in_place(h: &mut [f32], g: &[f32]) {
        for (h, g) in h.iter_mut().zip(g) {
            *h *= gelu_erf(*g);
        }
    }
}

impl CpuKernel<3> for LinearGeglu {
    const NAME: &'static str = "streamline-linear-geglu";

    fn run(&self, [(s1, l1), (s2, l2), (s3, l3)]: [Input; 3]) -> Result<(CpuStorage, Shape)> {
        let (rows, in_dim) = l1.shape().dims2()?;
        let inner = self.h_bias.len();
        if l2.shape().dims2()? != (inner, in_dim) || l3.shape().dims2()? != (inner, in_dim) {
            candle_core::bail!(
                "geglu: input {:?}, weights {:?} and {:?}, {inner} biases",
                l1.shape(),
                l2.shape(),
                l3.shape()
            )
        }
        let x = as_f32(s1, l1)?;
        let (w_h, w_g) = (WeightRhs::new(s2, l2)?, WeightRhs::new(s3, l3)?);
        let tile = product_tile(rows, MAX_PRODUCT_ROWS);
        let fill = |dst: Out<f32>| {
            for_each_run(
                rows.div_ceil(tile),
                || vec![0f32; tile.min(rows) * inner],
                |gate, task| {
                    let r0 = task * tile;
                    let m = tile.min(rows - r0);
                    let gate = &mut gate[..m * inner];
                    // SAFETY: this task alone writes rows r0..r0 + m; x and the weights
                    // cover what the products read. The hidden half starts as its bias
                    // rows (one pass, not a zeroing and a fill).
                    let hidden = unsafe {
                        let hidden = dst.ptr().add(r0 * inner);
                        fill_rows(hidden, &self.h_bias, m);
                        fill_rows(gate.as_mut_ptr(), &self.gate_bias, m);
                        let x = x.as_ptr().add(r0 * in_dim);
                        gemm_rows(hidden, x, w_h.operand(), (m, in_dim, inner));
                        gemm_rows(gate.as_mut_ptr(), x, w_g.operand(), (m, in_dim, inner));
                        dst.slice(r0 * inner, m * inner)
                    };
                    gate_in_place(hidden, gate);
                },
            )
        };
        // SAFETY: the tiles cover all rows, and each task writes all of its tile's rows.
        let out = unsafe { written_by(rows * inner, fill) };
        Ok((CpuStorage::F32(out), Shape::from((rows, inner))))
    }
}

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
        for_each_row(
            h,
            width,
            ROWS_PER_TASK,
            || (vec![0f32; width], vec![0f32; width]),
            |(hb, gb), r, dst| {
                let g = &gate[r * width..(r + 1) * width];
                for ((a, b), (x, y)) in hb.iter_mut().zip(gb.iter_mut()).zip(dst.iter().zip(g)) {
                    *a = x.to_f64() as f32;
                    *b = y.to_f64() as f32;
                }
                gate_row(hb, gb, &self.h_bias, &self.gate_bias);
                for (d, v) in dst.iter_mut().zip(hb.iter()) {
                    *d = T::from_f64(f64::from(*v));
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
        for_each_row(
            h,
            width,
            ROWS_PER_TASK,
            || (),
            |_, r, dst| {
                let g = &gate[r * width..(r + 1) * width];
                gate_row(dst, g, &self.h_bias, &self.gate_bias);
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
    x.contiguous()?.apply_op1_no_bwd(&Kernel(Silu))
}

struct Silu;

simd_fn! {
    fn silu_into(x: &[f32], out: &mut [f32]) {
        for (o, &v) in out.iter_mut().zip(x) {
            *o = v / (1.0 + exp(-v));
        }
    }
}

impl CpuKernel<1> for Silu {
    const NAME: &'static str = "streamline-silu";

    fn run(&self, [(s, l)]: [Input; 1]) -> Result<(CpuStorage, Shape)> {
        let x = crate::storage::as_f32(s, l)?;
        let fill = |dst: Out<f32>| {
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
        };
        // SAFETY: the chunks cover the output, and each task writes all of its chunk.
        let out = unsafe { written_by(x.len(), fill) };
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }
}
