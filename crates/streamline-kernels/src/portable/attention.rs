//! Attention from candle's tensor ops alone, in tiles: `softmax(q k^T * scale) v` per head
//! with no tokens x tokens buffer, on every device candle has.
//!
//! [`crate::attention_reference`] holds every row's scores at once plus f32 copies for the
//! softmax: SVD's first spatial attention at 576x1024 is (28 rows x 5 heads, 9216, 9216), 44
//! GiB in f32. Here a call is cut into pieces of rows and queries, and a piece's keys into
//! blocks, so that no block of f32 scores, and no head-split copy of a piece's queries, keys,
//! values or output, holds more than [`BLOCK_BYTES`]. Bigger tiles are preferred: whole rows
//! (several batched into one product), else query tiles of one row against all its keys (the
//! reference's arithmetic, nothing merged), and key blocks only where even
//! [`MIN_QUERY_TILE`] queries against every key would exceed the bound.
//!
//! Key blocks merge by an online softmax: each block gives its softmax-weighted values
//! (normalized within the block, so half-precision products stay in range) with its rows'
//! max and sum of exponentials in f32, and the softmax over all keys is the mean of the
//! blocks' results weighted by `sum_b * e^(max_b - max)`: exact up to rounding.
//!
//! Per-batch context ([`KvRows::Grouped`]): a piece never spans two kv rows, and its rows,
//! which share one, are folded into one longer sequence of queries against that row, so the
//! row is read for its whole run of rows without being copied per row.
//!
//! Each piece's result is written into one preallocated output (`slice_set`), never
//! concatenated. No f64 and no host reads: the same code runs on CUDA and Metal.

use std::ops::Range;

use candle_core::{DType, Layout, Result, Tensor, D};

use crate::attention::{check_shapes, AttentionSizes, KvRows};

#[cfg(feature = "flash-attn")]
mod flash;
#[cfg(feature = "flash-attn")]
pub use flash::{flash_attention, flash_attention_workspace};

/// Most bytes of one block of f32 scores, and of one tile's head-split copies: 32 MiB. The
/// softmax holds two blocks at once (candle has no in-place ops) and the online state up to
/// two more, so a call's workspace stays within about 130 MiB at any size, small beside a
/// video UNet's activations, while a block of 8 Mi scores keeps a GPU's products large (SVD's
/// 9216-token attention: 5 heads x 181 queries x 9216 keys a product, no key blocks).
pub const BLOCK_BYTES: usize = 32 << 20;

/// Fewest queries a tile of all keys may have before keys are cut into blocks instead:
/// thinner products underfill a GPU's matrix units, and every query tile re-reads its keys.
pub const MIN_QUERY_TILE: usize = 128;

/// `softmax(q k^T * scale) v` per head for `q` `(n, Lq, H*dh)`, `k` and `v` `(nk, Lk, H*dh)`
/// (the contract of [`crate::attention`]), in tiles within [`BLOCK_BYTES`].
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
    kv: KvRows,
) -> Result<Tensor> {
    attention_tiled(q, k, v, heads, scale, kv, BLOCK_BYTES)
}

/// [`attention`] with tiles bounded by `block_bytes` instead of [`BLOCK_BYTES`] (a planner's
/// tighter budget; tests use tiny ones to cross many tile boundaries).
pub fn attention_tiled(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
    kv: KvRows,
    block_bytes: usize,
) -> Result<Tensor> {
    let s = sizes(q, k, v, heads, kv)?;
    let tiles = Tiles::new(&s, block_bytes);
    let product = product_dtype(q.dtype(), q.device().is_cpu());
    let dtype = q.dtype();
    tile_by_tile(q, k, v, heads, kv, tiles, |q, k, v| {
        let q = scaled(&q.transpose(1, 2)?, scale, product)?;
        let k = k.transpose(1, 2)?;
        let v = v.transpose(1, 2)?;
        let attended = attend(q, &k, &v, tiles.keys, product)?;
        dense(&attended.transpose(1, 2)?, dtype)
    })
}

/// Bytes [`attention`] allocates beyond its inputs and its output for these sizes and
/// dtype, inputs contiguous (as projections make them): `cpu` for candle's CPU backend, where
/// bf16 products run in f32, else a GPU (where cuBLAS's workspace, made once per handle, is
/// not the call's).
pub fn attention_workspace(s: AttentionSizes, dtype: DType, cpu: bool) -> usize {
    attention_tiled_workspace(s, dtype, cpu, BLOCK_BYTES)
}

/// [`attention_tiled`]'s workspace: the peak of the buffers it makes, in the order it makes
/// and frees them. Exact for [`KvRows::Own`]. For grouped rows an upper bound (the sizes do
/// not say how long their runs are): a piece there copies one kv row instead of one per row,
/// and is as long as the pieces of own rows only where a run is at least that long.
///
/// gemm's packing buffers in candle's CPU products are left out: they live during the
/// products, below the softmax's two f32 blocks, and moved no measured peak by 64 KiB.
pub fn attention_tiled_workspace(
    s: AttentionSizes,
    dtype: DType,
    cpu: bool,
    block_bytes: usize,
) -> usize {
    if s.rows == 0 || s.queries == 0 || s.keys == 0 || s.heads == 0 {
        return 0;
    }
    let t = Tiles::new(&s, block_bytes);
    let piece = Piece::sizes(&s, t, product_dtype(dtype, cpu), dtype);
    let blocks = chunk_count(s.keys, t.keys);
    if blocks == 1 {
        let block = piece.block(0, false);
        return piece.q_making().max(block).max(piece.finish(piece.p));
    }
    // The online state: merged values in f32, max and sum.
    let state = 4 * piece.q + 2 * piece.st;
    let queries = piece.q * piece.p;
    // Blocks between the first and the last run (and merge) with the queries still held.
    let (middle, merge) = if blocks > 2 {
        (piece.block(state, true), queries + piece.merge())
    } else {
        (0, piece.merge())
    };
    [
        piece.q_making(),
        piece.block(0, true),
        queries + piece.first_state(),
        middle,
        merge,
        piece.block(state, false),
        piece.finish(4),
    ]
    .into_iter()
    .max()
    .unwrap_or(0)
}

/// How far each dimension is cut: at most `rows` rows a piece (more than one only with all
/// queries), `queries` queries a piece, `keys` keys a block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Tiles {
    rows: usize,
    queries: usize,
    keys: usize,
}

impl Tiles {
    fn new(s: &AttentionSizes, block_bytes: usize) -> Tiles {
        let budget = (block_bytes / 4).max(1);
        let (h, lq, lk) = (s.heads.max(1), s.queries.max(1), s.keys.max(1));
        let c = s.channels.max(1);
        let row = (h * lq * lk).max(lq.max(lk) * c);
        if row <= budget {
            return Tiles {
                rows: budget / row,
                queries: lq,
                keys: lk,
            };
        }
        let copies = (budget / c).max(1);
        let (queries, keys) = if h * lk * lq.min(MIN_QUERY_TILE) <= budget && lk <= copies {
            ((budget / (h * lk)).min(copies), lk)
        } else {
            let queries = (budget / h).isqrt().min(copies).clamp(1, lq);
            (queries, (budget / (h * queries)).min(copies))
        };
        Tiles {
            rows: 1,
            queries: queries.clamp(1, lq),
            keys: keys.clamp(1, lk),
        }
    }
}

/// `len` cut into the fewest chunks of at most `max`, their lengths within one of each other.
fn chunks(len: usize, max: usize) -> impl DoubleEndedIterator<Item = Range<usize>> {
    let count = chunk_count(len, max);
    (0..count).map(move |i| i * len / count..(i + 1) * len / count)
}

fn chunk_count(len: usize, max: usize) -> usize {
    len.div_ceil(max.max(1))
}

/// The longest of [`chunks`].
fn longest_chunk(len: usize, max: usize) -> usize {
    len.div_ceil(chunk_count(len, max).max(1))
}

/// Runs of query rows that read the same keys: all rows at once for [`KvRows::Own`] (each
/// its own row, `None`), else each run of rows sharing a kv row, with that row.
fn runs(n: usize, kv: KvRows) -> impl Iterator<Item = (Range<usize>, Option<usize>)> {
    let mut start = 0;
    std::iter::from_fn(move || {
        if start >= n {
            return None;
        }
        let run = match kv {
            KvRows::Own => (start..n, None),
            KvRows::Grouped { first, per } => {
                let end = n.min(start + per - (first + start) % per);
                (start..end, Some((first + start) / per))
            }
        };
        start = run.0.end;
        Some(run)
    })
}

/// Run `f` on each piece's views, queries `(b, L, H, dh)`, keys and values `(b, Lk, H, dh)`
/// (`b` rows each reading its own keys, or one folded sequence of `L` queries reading one
/// shared kv row), and write what it returns, contiguous `(b, L, H, dh)` in the queries'
/// dtype, into one preallocated output `(n, Lq, H*dh)`.
fn tile_by_tile(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    kv: KvRows,
    tiles: Tiles,
    f: impl Fn(Tensor, Tensor, Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let (n, lq, c) = q.dims3()?;
    let (nk, lk, _) = k.dims3()?;
    let dh = c / heads;
    let q4 = q.reshape((n, lq, heads, dh))?;
    let (k4, v4) = (
        k.reshape((nk, lk, heads, dh))?,
        v.reshape((nk, lk, heads, dh))?,
    );
    let out = Tensor::zeros((n, lq, c), q.dtype(), q.device())?;
    // Pieces of the rows of one tile of all rows, so a run no shorter has pieces as long.
    let piece_rows = longest_chunk(n, tiles.rows);
    for (run, shared) in runs(n, kv) {
        for start in run.clone().step_by(piece_rows) {
            let rows = start..run.end.min(start + piece_rows);
            for queries in chunks(lq, tiles.queries) {
                let (m, l) = (rows.len(), queries.len());
                let qv = q4.narrow(0, rows.start, m)?.narrow(1, queries.start, l)?;
                let (qv, kv_rows) = match shared {
                    // Whole rows (tiles of several rows hold all queries): one sequence.
                    Some(j) if m > 1 => (qv.reshape((1, m * l, heads, dh))?, j..j + 1),
                    Some(j) => (qv, j..j + 1),
                    None => (qv, rows.clone()),
                };
                let (b, first) = (kv_rows.len(), kv_rows.start);
                let tile = f(qv, k4.narrow(0, first, b)?, v4.narrow(0, first, b)?)?;
                out.narrow(0, rows.start, m)?.slice_set(
                    &tile.reshape((m, l, c))?,
                    1,
                    queries.start,
                )?;
            }
        }
    }
    Ok(out)
}

/// Softmax-weighted values `(b, H, L, dh)` of scaled queries `q` `(b, H, L, dh)` over keys
/// and values `(b, H, Lk, dh)` (views), in blocks of at most `keys` keys merged online: f32
/// where there are several blocks, else the product dtype. `q` is freed before the last
/// block's softmax.
fn attend(q: Tensor, k: &Tensor, v: &Tensor, keys: usize, product: DType) -> Result<Tensor> {
    let mut blocks = chunks(k.dim(2)?, keys);
    let Some(last) = blocks.next_back() else {
        candle_core::bail!("attention: no keys")
    };
    let mut running: Option<Running> = None;
    for range in blocks {
        let partial = block(q.clone(), k, v, range, product)?;
        running = Some(match running {
            None => Running::first(partial)?,
            Some(r) => r.merge(partial)?,
        });
    }
    let partial = block(q, k, v, last, product)?;
    Ok(match running {
        None => partial.values,
        Some(r) => r.merge(partial)?.values,
    })
}

/// One block's softmax-weighted values, normalized within the block, with its rows' max
/// score and sum of exponentials (f32, `(b, H, L, 1)`).
struct Partial {
    values: Tensor,
    max: Tensor,
    sum: Tensor,
}

/// The softmax over keys `keys` of queries `q`, times their values: the reference's
/// sequence of ops (scores in f32 for the softmax), each buffer freed once the next exists.
fn block(q: Tensor, k: &Tensor, v: &Tensor, keys: Range<usize>, product: DType) -> Result<Partial> {
    let (start, len) = (keys.start, keys.len());
    let kt = dense(&k.narrow(2, start, len)?, product)?;
    let scores = q.matmul(&kt.t()?)?;
    drop((q, kt));
    let scores = into_dtype(scores, DType::F32)?;
    let max = scores.max_keepdim(D::Minus1)?;
    let shifted = scores.broadcast_sub(&max)?;
    drop(scores);
    let exp = shifted.exp()?;
    drop(shifted);
    let sum = exp.sum_keepdim(D::Minus1)?;
    let probs = exp.broadcast_div(&sum)?;
    drop(exp);
    let probs = into_dtype(probs, product)?;
    let vt = dense(&v.narrow(2, start, len)?, product)?;
    let values = probs.matmul(&vt)?;
    Ok(Partial { values, max, sum })
}

/// The online softmax's state after some blocks: their merged result (f32) with the max and
/// sum of exponentials over all their keys.
struct Running {
    values: Tensor,
    max: Tensor,
    sum: Tensor,
}

impl Running {
    fn first(p: Partial) -> Result<Running> {
        Ok(Running {
            values: into_dtype(p.values, DType::F32)?,
            max: p.max,
            sum: p.sum,
        })
    }

    /// Both results weighted by their share of the exponentials over all keys so far,
    /// `sum * e^(max - new max)` over its total.
    fn merge(self, p: Partial) -> Result<Running> {
        let Running { values, max, sum } = self;
        let new_max = max.maximum(&p.max)?;
        let old = ((max - &new_max)?.exp()? * sum)?;
        let new = ((p.max - &new_max)?.exp()? * p.sum)?;
        let sum = (&old + &new)?;
        let added = into_dtype(p.values, DType::F32)?.broadcast_mul(&(new / &sum)?)?;
        let kept = values.broadcast_mul(&(old / &sum)?)?;
        drop(values);
        Ok(Running {
            values: (kept + added)?,
            max: new_max,
            sum,
        })
    }
}

/// The dtype products run in: the input's, except bf16 on the CPU, where candle's gemm has
/// no bf16 kernel (f32 there).
fn product_dtype(dtype: DType, cpu: bool) -> DType {
    match dtype {
        DType::BF16 if cpu => DType::F32,
        _ => dtype,
    }
}

/// `t` contiguous in `dtype`: one copy, none where it already is both.
fn dense(t: &Tensor, dtype: DType) -> Result<Tensor> {
    if t.dtype() == dtype {
        t.contiguous()
    } else {
        t.to_dtype(dtype)
    }
}

/// `t` in `dtype`, `t` freed once the copy exists.
fn into_dtype(t: Tensor, dtype: DType) -> Result<Tensor> {
    t.to_dtype(dtype)
}

/// Queries `(b, H, L, dh)` (a view) times `scale`, contiguous in the product dtype.
fn scaled(q: &Tensor, scale: f64, product: DType) -> Result<Tensor> {
    if q.dtype() == product {
        q * scale
    } else {
        q.to_dtype(product)? * scale
    }
}

fn sizes(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, kv: KvRows) -> Result<AttentionSizes> {
    check_shapes(q.shape(), k.shape(), v.shape(), heads, kv)?;
    let (rows, queries, channels) = q.dims3()?;
    let (kv_rows, keys, _) = k.dims3()?;
    Ok(AttentionSizes {
        rows,
        queries,
        kv_rows,
        keys,
        channels,
        heads,
    })
}

/// Element counts and byte sizes of the largest piece of a call, for its workspace.
struct Piece {
    /// Rows, queries per row, keys per block, heads, head dim, all keys.
    b: usize,
    l: usize,
    kb: usize,
    h: usize,
    dh: usize,
    lk: usize,
    /// Elements of the head-split queries (and of the output tile), keys and scores.
    q: usize,
    kv: usize,
    s: usize,
    /// Bytes of one softmax statistic per query and head, `(b, H, L, 1)` in f32.
    st: usize,
    /// Bytes per element of the product dtype and of the output dtype.
    p: usize,
    o: usize,
}

impl Piece {
    fn sizes(s: &AttentionSizes, t: Tiles, product: DType, dtype: DType) -> Piece {
        let b = longest_chunk(s.rows, t.rows);
        let l = longest_chunk(s.queries, t.queries);
        let kb = longest_chunk(s.keys, t.keys);
        let (h, c) = (s.heads, s.channels);
        Piece {
            b,
            l,
            kb,
            h,
            dh: c / h,
            lk: s.keys,
            q: b * l * c,
            kv: b * kb * c,
            s: b * h * l * kb,
            st: 4 * b * h * l,
            p: product.size_in_bytes(),
            o: dtype.size_in_bytes(),
        }
    }

    /// Peak while the scaled queries are made: a widened copy first where products run in
    /// f32 for a half input.
    fn q_making(&self) -> usize {
        let queries = self.q * self.p;
        if self.p == self.o {
            queries
        } else {
            2 * queries
        }
    }

    /// Bytes of a block's head-split keys (or values): none where candle's view of them is
    /// already contiguous in the product dtype.
    fn kv_copy(&self) -> usize {
        let view = Layout::contiguous((self.b, self.lk, self.h, self.dh))
            .narrow(1, 0, self.kb)
            .and_then(|l| l.transpose(1, 2));
        let contiguous = view.is_ok_and(|l| l.is_contiguous());
        if contiguous && self.p == self.o {
            0
        } else {
            self.kv * self.p
        }
    }

    /// Peak of one [`block`] with `held` bytes alive around it (the online state), and the
    /// queries kept after the scores where the caller holds them.
    fn block(&self, held: usize, queries_kept: bool) -> usize {
        let (kv, sp, s4, st) = (self.kv_copy(), self.s * self.p, 4 * self.s, self.st);
        let queries = self.q * self.p;
        let kept = if queries_kept { queries } else { 0 };
        [
            // Keys and scores made, queries in.
            held + queries + kv + sp,
            // Two f32 blocks of the softmax (scores and their shift, or exponentials and
            // probabilities) and the statistics.
            held + kept + 2 * s4 + 2 * st,
            // Probabilities, values and their product.
            held + kept + sp + kv + queries + 2 * st,
        ]
        .into_iter()
        .max()
        .unwrap_or(0)
    }

    /// Peak of the first block's result widened to f32 as the online state.
    fn first_state(&self) -> usize {
        let widened = if self.p == 4 { 0 } else { 4 * self.q };
        self.q * self.p + widened + 2 * self.st
    }

    /// Peak of [`Running::merge`]: the state, the block's weighted values and the state's
    /// (three f32 results at once), and five statistics.
    fn merge(&self) -> usize {
        3 * 4 * self.q + 5 * self.st
    }

    /// Peak of writing a result of `size` bytes an element into the output dtype's dense
    /// tile (no copy where the result already is one: contiguous, and of the output's size,
    /// which only the output's own dtype has here).
    fn finish(&self, size: usize) -> usize {
        let view = Layout::contiguous((self.b, self.h, self.l, self.dh)).transpose(1, 2);
        let contiguous = view.is_ok_and(|l| l.is_contiguous());
        let copy = if contiguous && size == self.o {
            0
        } else {
            self.q * self.o
        };
        self.q * size + copy
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sizes(rows: usize, queries: usize, keys: usize, heads: usize, dh: usize) -> AttentionSizes {
        AttentionSizes {
            rows,
            queries,
            kv_rows: rows,
            keys,
            channels: heads * dh,
            heads,
        }
    }

    /// SVD's first spatial attention at 576x1024 needs no key blocks: 182 queries against
    /// all 9216 keys fill one block; a row of 64k tokens needs them.
    #[test]
    fn tiles_follow_the_block_bound() {
        let svd = sizes(28, 9216, 9216, 5, 64);
        let t = Tiles::new(&svd, BLOCK_BYTES);
        assert_eq!((t.rows, t.queries, t.keys), (1, 182, 9216));
        let long = sizes(2, 65536, 65536, 5, 64);
        let t = Tiles::new(&long, BLOCK_BYTES);
        assert_eq!((t.rows, t.queries), (1, 1295));
        assert!(t.keys < 65536 && 4 * 5 * t.queries * t.keys <= BLOCK_BYTES);
        let temporal = sizes(18432, 14, 14, 5, 64);
        let t = Tiles::new(&temporal, BLOCK_BYTES);
        assert_eq!((t.queries, t.keys), (14, 14));
        assert!(t.rows > 1 && 4 * t.rows * 14 * 320 <= BLOCK_BYTES);
    }

    /// Chunks cover the length in order, none longer than asked, the longest as reported.
    #[test]
    fn chunks_cover_evenly() {
        for (len, max) in [(10, 4), (9, 3), (1, 5), (100, 7), (7, 1)] {
            let all: Vec<_> = chunks(len, max).collect();
            assert_eq!(all.first().map(|r| r.start), Some(0));
            assert_eq!(all.last().map(|r| r.end), Some(len));
            assert!(all.windows(2).all(|w| w[0].end == w[1].start));
            let longest = all.iter().map(|r| r.len()).max().unwrap_or(0);
            assert!(longest <= max && longest == longest_chunk(len, max));
        }
    }

    /// Grouped rows split where the kv row changes, each run with its row.
    #[test]
    fn runs_follow_kv_rows() {
        let got: Vec<_> = runs(8, KvRows::Grouped { first: 2, per: 3 }).collect();
        let want = [
            (0..1, Some(0)),
            (1..4, Some(1)),
            (4..7, Some(2)),
            (7..8, Some(3)),
        ];
        assert_eq!(got, want);
        assert_eq!(runs(5, KvRows::Own).collect::<Vec<_>>(), [(0..5, None)]);
    }
}
