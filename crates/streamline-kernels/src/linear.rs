//! Row-wise products with the bias fused: `x @ w^T + b` on the last dim, and the `(k, 1, 1)`
//! temporal convolution of position-major features as one product per tile of positions.
//!
//! candle's matmul writes the product, then `broadcast_add` makes a biased copy: two
//! full-size buffers and a pass. Here each task fills its tile of the output with the bias and
//! one GEMM accumulates onto it. The temporal convolution builds, per tile of positions, the
//! rows `[x(t - k/2) .. x(t + k/2)]` (zeros past either end) in its own scratch, so neither a
//! padded copy of the input nor a product per tap exists.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Layout, Result, Shape, Tensor, WithDType};
use gemm::{gemm, Parallelism};
use half::{bf16, f16};

use crate::cpu_op::{CpuKernel, Input, Kernel};
use crate::par::{for_each_run, per_task, runs, written_by, Out};
use crate::storage::{as_f32, Compute};

/// Output rows a temporal convolution task aims at.
const TILE_ROWS: usize = 256;

/// Most rows in one product's tile: gemm packs its weight once per call, so large depths
/// want tall tiles, while the tile's share of the threads' work must stay even.
pub(crate) const MAX_PRODUCT_ROWS: usize = 1024;

/// Rows per tile of a product over `rows` rows: at most `max_rows`, with a count of tiles
/// that the threads share evenly.
pub(crate) fn product_tile(rows: usize, max_rows: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    let tiles = rows.div_ceil(max_rows.max(1)).next_multiple_of(threads);
    rows.div_ceil(tiles.min(rows).max(1)).max(1)
}

/// How an `(out, in)` weight lies in memory: dense as a checkpoint stores it, or dense as its
/// transpose `(in, out)`, the way the models keep theirs.
///
/// gemm solves our row-major products transposed, so the weight is the side it packs into
/// panels of the kernel's rows. An `InOut` weight is read for that in whole vectors, or not
/// packed at all; an `OutIn` one is gathered element by element, on every call and every
/// tile, which costs most where slicing makes the calls small.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightOrder {
    OutIn,
    InOut,
}

impl WeightOrder {
    /// The order of `w`'s storage, `None` for any other strides.
    pub fn of(w: &Tensor) -> Option<WeightOrder> {
        if w.is_contiguous() {
            Some(WeightOrder::OutIn)
        } else {
            w.t().ok()?.is_contiguous().then_some(WeightOrder::InOut)
        }
    }

    /// `w` as the kernels take it: as it is in either order, else a dense copy.
    pub fn dense(w: &Tensor) -> Result<Tensor> {
        match WeightOrder::of(w) {
            Some(_) => Ok(w.clone()),
            None => w.contiguous(),
        }
    }

    /// `w` `(out, in)` with its storage in this order. A broadcast view (the zeros that stand
    /// for weights when only shapes matter, as in planning) holds no elements to arrange and
    /// stays as it is: copying it would make gigabytes of zeros.
    pub fn arrange(self, w: &Tensor) -> Result<Tensor> {
        let broadcast = w
            .layout()
            .stride()
            .iter()
            .zip(w.dims())
            .any(|(&stride, &dim)| stride == 0 && dim > 1);
        if broadcast {
            return Ok(w.clone());
        }
        match self {
            WeightOrder::OutIn => w.contiguous(),
            WeightOrder::InOut => w.t()?.contiguous()?.t(),
        }
    }
}

/// The `(in, out)` right side `w^T` of a product with an `(out, in)` weight, read in place in
/// either [`WeightOrder`]: its elements, column stride and row stride.
pub(crate) struct WeightRhs<'a>(&'a [f32], isize, isize);

impl<'a> WeightRhs<'a> {
    pub(crate) fn new(s: &'a CpuStorage, l: &Layout) -> Result<Self> {
        let dense = l
            .contiguous_offsets()
            .or_else(|| l.transpose(0, 1).ok()?.contiguous_offsets());
        let (CpuStorage::F32(v), Some((start, end))) = (s, dense) else {
            candle_core::bail!(
                "linear: weight {:?} must be f32 in (out, in) or (in, out) order",
                l.shape()
            )
        };
        let stride = l.stride();
        Ok(WeightRhs(
            &v[start..end],
            stride[0] as isize,
            stride[1] as isize,
        ))
    }

    pub(crate) fn operand(&self) -> Strided<*const f32> {
        (self.0.as_ptr(), self.1, self.2)
    }
}

/// `x @ w^T + b` over the last dim of `x` (any rank, contiguous), `w` `(out, in)` in either
/// [`WeightOrder`]: the kernel for f32 on the CPU, candle's matmul and add otherwise.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let (out_dim, in_dim) = w.dims2()?;
    if Compute::of(x) != Compute::F32 || !x.is_contiguous() {
        return linear_reference(x, w, b);
    }
    let op = Linear {
        bias: match b {
            Some(b) => b.to_dtype(DType::F32)?.to_vec1::<f32>()?,
            None => vec![0.0; out_dim],
        },
    };
    let mut dims = x.dims().to_vec();
    let rows = x.elem_count() / in_dim.max(1);
    let y = x
        .reshape((rows, in_dim))?
        .apply_op2_no_bwd(&WeightOrder::dense(w)?, &Kernel(op))?;
    if let Some(last) = dims.last_mut() {
        *last = out_dim;
    }
    y.reshape(dims)
}

/// [`linear`] with candle's ops.
pub fn linear_reference(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let (out_dim, in_dim) = w.dims2()?;
    let mut dims = x.dims().to_vec();
    let product = x.reshape(((), in_dim))?.matmul(&w.t()?)?;
    if let Some(last) = dims.last_mut() {
        *last = out_dim;
    }
    let y = product.reshape(dims)?;
    match b {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

/// Bytes a CPU [`linear`] allocates besides its output, `None` where candle's ops run
/// (half types): per run, gemm's packed copy of the weight when it makes one.
pub fn linear_workspace(
    rows: usize,
    (in_dim, out_dim): (usize, usize),
    order: WeightOrder,
    dtype: DType,
) -> Option<usize> {
    (Compute::for_dtype(dtype, &candle_core::Device::Cpu) == Compute::F32).then(|| {
        let tile = product_tile(rows, MAX_PRODUCT_ROWS);
        runs(rows.div_ceil(tile)) * weight_packing(out_dim, tile.min(rows), in_dim, order)
    })
}

/// Heap gemm allocates for one tile: it solves the transposed product (our output is
/// row-major), whose left side is the `(out, in)` weight, and packs that side into panels of
/// the f32 kernel's rows (one depth block `kc` deep) when it spans at most two row blocks
/// `mc`, unless the side already has unit row stride (an `InOut` weight) and its rows fill
/// whole vectors. Both sizes come from gemm's own cache model, so the figure follows the
/// machine.
pub(crate) fn weight_packing(
    out_dim: usize,
    tile_rows: usize,
    in_dim: usize,
    order: WeightOrder,
) -> usize {
    let (mr, nr, lanes) = gemm_f32_kernel();
    if order == WeightOrder::InOut && out_dim % lanes == 0 {
        return 0;
    }
    let params = if out_dim <= 64 && tile_rows <= 64 {
        let kc = in_dim.min(512);
        let l2 = gemm_common::cache::CACHE_INFO[1].cache_bytes;
        gemm_common::cache::KernelParams {
            kc,
            mc: l2 / 4 / kc.max(1) / mr * mr,
            nc: 0,
        }
    } else {
        gemm_common::cache::kernel_params(out_dim, tile_rows, in_dim, mr, nr, 4)
    };
    if out_dim <= 2 * params.mc {
        4 * params.kc * out_dim.next_multiple_of(mr)
    } else {
        0
    }
}

/// Rows, columns and SIMD lanes of the f32 micro-kernel gemm dispatches to on this CPU.
pub(crate) fn gemm_f32_kernel() -> (usize, usize, usize) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        return (64, 6, 16);
    }
    (16, 6, 8)
}

struct Linear {
    bias: Vec<f32>,
}

impl CpuKernel<2> for Linear {
    const NAME: &'static str = "streamline-linear";

    fn run(&self, [(s1, l1), (s2, l2)]: [Input; 2]) -> Result<(CpuStorage, Shape)> {
        let (rows, in_dim) = l1.shape().dims2()?;
        let (out_dim, w_in) = l2.shape().dims2()?;
        if w_in != in_dim || self.bias.len() != out_dim {
            candle_core::bail!(
                "linear: input {:?}, weight {:?}, {} biases",
                l1.shape(),
                l2.shape(),
                self.bias.len()
            )
        }
        let (x, w) = (as_f32(s1, l1)?, WeightRhs::new(s2, l2)?);
        let tile = product_tile(rows, MAX_PRODUCT_ROWS);
        // Each task starts its tile as the bias rows the GEMM accumulates onto: one pass over
        // the output, in parallel, where a zeroed buffer then a fill would take two.
        let fill = |dst: Out<f32>| {
            for_each_run(
                rows.div_ceil(tile),
                || (),
                |_, task| {
                    let r0 = task * tile;
                    let m = tile.min(rows - r0);
                    // SAFETY: rows r0..r0 + m of x and of the output, and all of w.
                    unsafe {
                        let tile_out = dst.ptr().add(r0 * out_dim);
                        fill_rows(tile_out, &self.bias, m);
                        let x = x.as_ptr().add(r0 * in_dim);
                        gemm_rows(tile_out, x, w.operand(), (m, in_dim, out_dim));
                    }
                },
            )
        };
        // SAFETY: the tiles cover all rows, and each task writes all of its tile's rows.
        let out = unsafe { written_by(rows * out_dim, fill) };
        Ok((CpuStorage::F32(out), Shape::from((rows, out_dim))))
    }
}

/// Write `row` into each of the `m` rows that follow `dst`.
///
/// # Safety
/// `dst` must have room for `m * row.len()` elements that nothing else touches meanwhile.
pub(crate) unsafe fn fill_rows(dst: *mut f32, row: &[f32], m: usize) {
    for r in 0..m {
        // SAFETY: row r lies in the caller's extent.
        unsafe { std::ptr::copy_nonoverlapping(row.as_ptr(), dst.add(r * row.len()), row.len()) };
    }
}

/// A strided f32 operand of [`product`]: its first element, column stride, row stride.
pub(crate) type Strided<P> = (P, isize, isize);

/// `dst = lhs @ rhs` (`dst += lhs @ rhs` when `accumulate`) for `(m, n, k)` =
/// (rows of `dst`, its columns, the inner dim): gemm's f32 product with unit scales and no
/// conjugation, on the calling thread (the kernels split the work themselves), as every
/// kernel here calls it.
///
/// # Safety
/// The pointers and strides must describe operands inside their buffers, and nothing else
/// may touch `dst` meanwhile.
pub(crate) unsafe fn product(
    (m, n, k): (usize, usize, usize),
    (dst, dst_cs, dst_rs): Strided<*mut f32>,
    accumulate: bool,
    (lhs, lhs_cs, lhs_rs): Strided<*const f32>,
    (rhs, rhs_cs, rhs_rs): Strided<*const f32>,
) {
    gemm(
        m,
        n,
        k,
        dst,
        dst_cs,
        dst_rs,
        accumulate,
        lhs,
        lhs_cs,
        lhs_rs,
        rhs,
        rhs_cs,
        rhs_rs,
        1.0,
        1.0,
        false,
        false,
        false,
        Parallelism::None,
    );
}

/// `dst += x @ w^T` for `m` rows: `x` `(m, k)` and `dst` `(m, n)` row-major and dense, `w`
/// the `(k, n)` right side from [`WeightRhs`], on the calling thread.
///
/// # Safety
/// The pointers must cover those extents, and nothing else may touch `dst` meanwhile.
pub(crate) unsafe fn gemm_rows(
    dst: *mut f32,
    x: *const f32,
    w: Strided<*const f32>,
    (m, k, n): (usize, usize, usize),
) {
    product((m, n, k), (dst, 1, n as isize), true, (x, 1, k as isize), w);
}

/// The `(k, 1, 1)` convolution over the frames of position-major `x` `(P, T, C_in)`, zero
/// padded by `k / 2` frames, with `taps` `(k * C_in, C_out)` (row `j * C_in + ci` holds tap
/// `j` of input channel `ci`) and `bias` `(C_out)`: the kernel on the CPU (f32 inside for
/// half types), candle's ops elsewhere.
pub fn temporal_conv(x: &Tensor, taps: &Tensor, bias: &Tensor, kernel: usize) -> Result<Tensor> {
    let compute = Compute::of(x);
    if compute == Compute::Reference {
        return temporal_conv_reference(x, taps, bias, kernel);
    }
    let op = TemporalConv {
        kernel,
        bias: bias.to_dtype(DType::F32)?.to_vec1::<f32>()?,
    };
    x.contiguous()?
        .apply_op2_no_bwd(&compute.widen(taps)?, &Kernel(op))
}

/// [`temporal_conv`] with candle's ops: the shifted frames side by side, one product.
pub fn temporal_conv_reference(
    x: &Tensor,
    taps: &Tensor,
    bias: &Tensor,
    kernel: usize,
) -> Result<Tensor> {
    let t = x.dim(1)?;
    let pad = kernel / 2;
    let padded = x.pad_with_zeros(1, pad, kernel - 1 - pad)?;
    let shifted: Vec<Tensor> = (0..kernel)
        .map(|j| padded.narrow(1, j, t))
        .collect::<Result<_>>()?;
    let cols = Tensor::cat(&shifted, 2)?;
    let (p, _, width) = cols.dims3()?;
    let y = cols
        .reshape((p * t, width))?
        .matmul(&taps.to_dtype(x.dtype())?)?;
    y.reshape((p, t, ()))?.broadcast_add(bias)
}

/// Bytes a CPU [`temporal_conv`] on `positions` positions of `t` frames allocates besides its
/// output: per run the im2col rows of one tile (and its f32 result for half types), gemm's
/// packing, and for half types an f32 copy of the taps.
pub fn temporal_conv_workspace(
    positions: usize,
    t: usize,
    in_channels: usize,
    out_channels: usize,
    kernel: usize,
    dtype: DType,
) -> usize {
    let compute = Compute::for_dtype(dtype, &candle_core::Device::Cpu);
    let per_tile = temporal_tile(positions, t);
    let rows = per_tile * t;
    let out = compute.widened_bytes(rows * out_channels);
    runs(positions.div_ceil(per_tile)) * (4 * rows * kernel * in_channels + out)
        + compute.widened_bytes(kernel * in_channels * out_channels)
}

/// Positions per task of a temporal convolution over `positions` positions of `t` frames:
/// about [`TILE_ROWS`] rows, fewer where a thread would be left without a task.
fn temporal_tile(positions: usize, t: usize) -> usize {
    per_task(positions, TILE_ROWS.div_ceil(t.max(1)))
}

struct TemporalConv {
    kernel: usize,
    bias: Vec<f32>,
}

impl TemporalConv {
    fn run<T: WithDType>(
        &self,
        x: &[T],
        taps: &[f32],
        (p, t, cin): (usize, usize, usize),
    ) -> Vec<T> {
        let (k, cout) = (self.kernel, self.bias.len());
        let pad = k / 2;
        let per_tile = temporal_tile(p, t);
        let wide = T::DTYPE != DType::F32;
        let mut out = vec![T::zero(); p * t * cout];
        let dst = Out::new(&mut out);
        for_each_run(
            p.div_ceil(per_tile),
            || {
                let rows = per_tile * t;
                (
                    vec![0f32; rows * k * cin],
                    vec![0f32; if wide { rows * cout } else { 0 }],
                )
            },
            |(cols, tile_out), task| {
                let p0 = task * per_tile;
                let rows = per_tile.min(p - p0) * t;
                for r in 0..rows {
                    let (pos, frame) = (p0 + r / t, r % t);
                    for j in 0..k {
                        let d = &mut cols[(r * k + j) * cin..(r * k + j + 1) * cin];
                        match (frame + j).checked_sub(pad).filter(|&s| s < t) {
                            Some(s) => {
                                let src = &x[(pos * t + s) * cin..(pos * t + s + 1) * cin];
                                for (d, v) in d.iter_mut().zip(src) {
                                    *d = v.to_f64() as f32;
                                }
                            }
                            None => d.fill(0.0),
                        }
                    }
                }
                let target: *mut f32 = if wide {
                    tile_out.as_mut_ptr()
                } else {
                    // SAFETY: T is f32; this task alone writes rows p0*t..p0*t + rows.
                    unsafe { dst.ptr().add(p0 * t * cout) as *mut f32 }
                };
                for r in 0..rows {
                    // SAFETY: row r of the tile's target, inside it.
                    unsafe { std::slice::from_raw_parts_mut(target.add(r * cout), cout) }
                        .copy_from_slice(&self.bias);
                }
                // SAFETY: the tile's columns, the taps and the target, as strided.
                unsafe {
                    product(
                        (rows, cout, k * cin),
                        (target, 1, cout as isize),
                        true,
                        (cols.as_ptr(), 1, (k * cin) as isize),
                        (taps.as_ptr(), 1, cout as isize),
                    );
                }
                if wide {
                    // SAFETY: this task alone writes rows p0*t..p0*t + rows.
                    let o = unsafe { dst.slice(p0 * t * cout, rows * cout) };
                    for (o, v) in o.iter_mut().zip(tile_out.iter()) {
                        *o = T::from_f64(f64::from(*v));
                    }
                }
            },
        );
        out
    }
}

impl CpuKernel<2> for TemporalConv {
    const NAME: &'static str = "streamline-temporal-conv";

    fn run(&self, [(s1, l1), (s2, l2)]: [Input; 2]) -> Result<(CpuStorage, Shape)> {
        let (p, t, cin) = l1.shape().dims3()?;
        let cout = self.bias.len();
        if l2.shape().dims() != [self.kernel * cin, cout] || self.kernel == 0 {
            candle_core::bail!(
                "temporal_conv: input {:?}, taps {:?}, kernel {}, {cout} biases",
                l1.shape(),
                l2.shape(),
                self.kernel
            )
        }
        let taps = as_f32(s2, l2)?;
        let Some((a, b)) = l1.contiguous_offsets() else {
            candle_core::bail!("temporal_conv: input must be contiguous")
        };
        let dims = (p, t, cin);
        let out = match s1 {
            CpuStorage::F32(v) => CpuStorage::F32(self.run(&v[a..b], taps, dims)),
            CpuStorage::F16(v) => CpuStorage::F16(self.run::<f16>(&v[a..b], taps, dims)),
            CpuStorage::BF16(v) => CpuStorage::BF16(self.run::<bf16>(&v[a..b], taps, dims)),
            other => candle_core::bail!("temporal_conv: {:?} input", other.dtype()),
        };
        Ok((out, Shape::from((p, t, cout))))
    }
}
