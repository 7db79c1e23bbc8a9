//! Scaled dot-product attention with query tiles and an online softmax: the scores of one
//! tile of queries against one block of keys at a time, never tokens x tokens.
//!
//! Queries, keys and values stay in the layout their projections produce, `(rows, tokens,
//! heads * head_dim)`: the kernel reads each head with strides, so heads are never split
//! into copies and merged back. Cross-attention to a per-batch-item context reads the
//! context row of each query row's batch item ([`KvRows::Grouped`]), so keys and values are
//! never gathered per row either.

use candle_core::{CpuStorage, DType, Device, Result, Shape, Tensor};

use crate::cpu_op::{CpuKernel, Input, Kernel};
use crate::linear::product;
use crate::par::{for_each_run, runs, written_by, Out};
use crate::simd::{self, simd_fn};
use crate::storage::{as_f32, Compute};

/// Queries per tile.
const QUERY_TILE: usize = 256;
/// Keys per block of the online softmax.
const KEY_BLOCK: usize = 512;

/// Which row of keys and values a row of queries attends to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvRows {
    /// Row `r` of the queries reads row `r` of the keys and values.
    Own,
    /// Row `r` reads row `(first + r) / per`: `first` is the absolute index of the queries'
    /// first row, and every `per` consecutive rows share one batch item's context.
    Grouped { first: usize, per: usize },
}

impl KvRows {
    pub(crate) fn row(self, r: usize) -> usize {
        match self {
            KvRows::Own => r,
            KvRows::Grouped { first, per } => (first + r) / per,
        }
    }
}

/// `softmax(q k^T * scale) v` per head for `q` `(n, Lq, H*dh)`, `k` and `v` `(nk, Lk, H*dh)`:
/// the kernel on the CPU (f32 inside, half types converted), candle's ops elsewhere.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
    kv: KvRows,
) -> Result<Tensor> {
    match Compute::of(q) {
        Compute::Reference => attention_reference(q, k, v, heads, scale, kv),
        compute => {
            let op = Flash { heads, scale, kv };
            let (q, k, v) = (compute.widen(q)?, compute.widen(k)?, compute.widen(v)?);
            compute.narrow(q.apply_op3_no_bwd(&k, &v, &Kernel(op))?)
        }
    }
}

/// Per-run scratch of [`attention`] on the CPU, in bytes: a tile of queries, its scores
/// against one block of keys, its accumulated values and softmax state, and gemm's packed
/// copy of the key block (strided by the heads, so gemm packs it).
pub fn attention_scratch(queries: usize, keys: usize, head_dim: usize) -> usize {
    let (bq, bk) = (QUERY_TILE.min(queries), KEY_BLOCK.min(keys));
    4 * (2 * bq * head_dim + bq * bk + 2 * bq + head_dim * bk.next_multiple_of(16))
}

/// Runs (threads) [`attention`] uses on `rows` rows of `queries` queries and `heads` heads.
pub fn attention_runs(rows: usize, queries: usize, heads: usize) -> usize {
    runs(rows * heads * queries.div_ceil(QUERY_TILE))
}

/// [`attention`] with candle's ops: heads split, scores, softmax (f32 for half types),
/// values, heads merged. Keys and values of grouped rows are gathered per row.
pub fn attention_reference(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
    kv: KvRows,
) -> Result<Tensor> {
    let (n, lq, c) = q.dims3()?;
    let split = |x: &Tensor| -> Result<Tensor> {
        let (n, l, _) = x.dims3()?;
        x.reshape((n, l, heads, c / heads))?
            .transpose(1, 2)?
            .contiguous()
    };
    let (k, v) = match kv {
        KvRows::Own => (k.clone(), v.clone()),
        KvRows::Grouped { .. } => {
            let ids: Vec<u32> = (0..n).map(|r| kv.row(r) as u32).collect();
            let ids = Tensor::new(ids, q.device())?;
            (k.index_select(&ids, 0)?, v.index_select(&ids, 0)?)
        }
    };
    let q = (split(q)? * scale)?;
    let scores = q.matmul(&split(&k)?.t()?)?;
    let dtype = scores.dtype();
    let wide = match dtype {
        DType::F16 | DType::BF16 => scores.to_dtype(DType::F32)?,
        _ => scores,
    };
    let probs = candle_core::Tensor::exp(&wide.broadcast_sub(&wide.max_keepdim(3)?)?)?;
    let probs = probs
        .broadcast_div(&probs.sum_keepdim(3)?)?
        .to_dtype(dtype)?;
    probs
        .matmul(&split(&v)?)?
        .transpose(1, 2)?
        .reshape((n, lq, c))
}

/// Errors unless queries `(n, Lq, C)`, keys and values `(nk, Lk, C)` with `Lk > 0` split into
/// `heads` heads and every query row has a row of keys to read.
pub(crate) fn check_shapes(
    q: &Shape,
    k: &Shape,
    v: &Shape,
    heads: usize,
    kv: KvRows,
) -> Result<()> {
    let (n, _, c) = q.dims3()?;
    let (nk, lk, ck) = k.dims3()?;
    if v != k || ck != c || lk == 0 || heads == 0 || c % heads != 0 {
        candle_core::bail!("attention: queries {q:?}, keys {k:?}, values {v:?} with {heads} heads")
    }
    if matches!(kv, KvRows::Grouped { per: 0, .. }) || (n > 0 && kv.row(n - 1) >= nk) {
        candle_core::bail!("attention: query rows {n} have no key rows in {nk} by {kv:?}")
    }
    Ok(())
}

struct Flash {
    heads: usize,
    scale: f64,
    kv: KvRows,
}

impl CpuKernel<3> for Flash {
    const NAME: &'static str = "streamline-attention";

    fn run(&self, [(s1, l1), (s2, l2), (s3, l3)]: [Input; 3]) -> Result<(CpuStorage, Shape)> {
        check_shapes(l1.shape(), l2.shape(), l3.shape(), self.heads, self.kv)?;
        let (n, lq, c) = l1.shape().dims3()?;
        let lk = l2.shape().dims3()?.1;
        let (q, k, v) = (as_f32(s1, l1)?, as_f32(s2, l2)?, as_f32(s3, l3)?);
        let dims = Dims {
            lq,
            lk,
            c,
            dh: c / self.heads,
            heads: self.heads,
        };
        let fill = |out: Out<f32>| flash(q, k, v, out, n, dims, self.scale as f32, self.kv);
        // SAFETY: every (row, head, query) of the output is written by one task.
        let out = unsafe { written_by(n * lq * c, fill) };
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

#[derive(Clone, Copy)]
struct Dims {
    lq: usize,
    lk: usize,
    c: usize,
    dh: usize,
    heads: usize,
}

/// One run's buffers: the scaled query tile, scores, accumulated values, running max and sum.
struct Scratch {
    q: Vec<f32>,
    s: Vec<f32>,
    acc: Vec<f32>,
    max: Vec<f32>,
    sum: Vec<f32>,
}

#[allow(clippy::too_many_arguments)]
fn flash(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: Out<f32>,
    n: usize,
    d: Dims,
    scale: f32,
    kv: KvRows,
) {
    let tiles = d.lq.div_ceil(QUERY_TILE);
    let (bq, bk) = (QUERY_TILE.min(d.lq), KEY_BLOCK.min(d.lk));
    for_each_run(
        n * d.heads * tiles,
        || Scratch {
            q: vec![0.0; bq * d.dh],
            s: vec![0.0; bq * bk],
            acc: vec![0.0; bq * d.dh],
            max: vec![0.0; bq],
            sum: vec![0.0; bq],
        },
        |sc, task| {
            let (row, head, tile) = (
                task / (d.heads * tiles),
                task / tiles % d.heads,
                task % tiles,
            );
            let q0 = tile * QUERY_TILE;
            let nq = QUERY_TILE.min(d.lq - q0);
            let col = head * d.dh;
            for i in 0..nq {
                let src = (row * d.lq + q0 + i) * d.c + col;
                scaled_copy(
                    &q[src..src + d.dh],
                    &mut sc.q[i * d.dh..(i + 1) * d.dh],
                    scale,
                );
            }
            let kv_base = kv.row(row) * d.lk * d.c + col;
            for k0 in (0..d.lk).step_by(KEY_BLOCK) {
                let nk = KEY_BLOCK.min(d.lk - k0);
                let first = k0 == 0;
                // SAFETY: the tile, block and head lie inside q, k, v and the scratch, as
                // the strides below describe.
                unsafe {
                    product(
                        (nq, nk, d.dh),
                        (sc.s.as_mut_ptr(), 1, nk as isize),
                        false,
                        (sc.q.as_ptr(), 1, d.dh as isize),
                        (k.as_ptr().add(kv_base + k0 * d.c), d.c as isize, 1),
                    );
                }
                online_softmax(sc, nq, nk, d.dh, first);
                // SAFETY: as above.
                unsafe {
                    product(
                        (nq, d.dh, nk),
                        (sc.acc.as_mut_ptr(), 1, d.dh as isize),
                        !first,
                        (sc.s.as_ptr(), 1, nk as isize),
                        (v.as_ptr().add(kv_base + k0 * d.c), 1, d.c as isize),
                    );
                }
            }
            for i in 0..nq {
                // SAFETY: this task alone writes head `head` of queries q0..q0+nq of `row`.
                let dst = unsafe { out.slice((row * d.lq + q0 + i) * d.c + col, d.dh) };
                scaled_copy(&sc.acc[i * d.dh..(i + 1) * d.dh], dst, 1.0 / sc.sum[i]);
            }
        },
    );
}

simd_fn! {
    fn scaled_copy(src: &[f32], dst: &mut [f32], scale: f32) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = s * scale;
        }
    }
}

simd_fn! {
    /// Fold the scores `s` `(nq, nk)` of one key block into the running softmax: scores
    /// become `e^(s - max)` with each row's new max, and the sums and accumulated values of
    /// earlier blocks are rescaled to it.
    fn online_softmax(sc: &mut Scratch, nq: usize, nk: usize, dh: usize, first: bool) {
        for i in 0..nq {
            let row = &mut sc.s[i * nk..(i + 1) * nk];
            let block_max = simd::max(row);
            let (old, new) = if first {
                (block_max, block_max)
            } else {
                (sc.max[i], sc.max[i].max(block_max))
            };
            let total = simd::exp_shifted(row, new);
            if first {
                sc.sum[i] = total;
            } else {
                let correction = simd::exp(old - new);
                sc.sum[i] = sc.sum[i].mul_add(correction, total);
                for a in &mut sc.acc[i * dh..(i + 1) * dh] {
                    *a *= correction;
                }
            }
            sc.max[i] = new;
        }
    }
}

/// The sizes of an attention call: `rows` rows of `queries` queries, keys and values of
/// `kv_rows` rows of `keys` keys, `channels` = heads x head dim.
#[derive(Clone, Copy, Debug)]
pub struct AttentionSizes {
    pub rows: usize,
    pub queries: usize,
    pub kv_rows: usize,
    pub keys: usize,
    pub channels: usize,
    pub heads: usize,
}

/// Bytes of a CPU attention call beyond its inputs and output: f32 copies of half inputs
/// and output, and each run's scratch.
pub fn attention_workspace(s: AttentionSizes, dtype: DType, device: &Device) -> usize {
    let compute = Compute::for_dtype(dtype, device);
    let scratch = attention_runs(s.rows, s.queries, s.heads)
        * attention_scratch(s.queries, s.keys, s.channels / s.heads.max(1));
    let q = compute.widened_bytes(s.rows * s.queries * s.channels);
    let kv = compute.widened_bytes(s.kv_rows * s.keys * s.channels);
    2 * q + 2 * kv + scratch
}
