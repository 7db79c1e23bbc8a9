//! diffusers' `Attention` (to_q, to_k, to_v, to_out.0) over the tokens of each row.
//!
//! A row is a frame in spatial attention `(B*T, H*W, C)` and a position in temporal attention
//! `(B*H*W, T, C)`; rows never mix, so the op is independent along whichever axis the layout
//! puts on dim 0. Cross-attention context is per batch item `(B, L, D)` and read whole: SVD
//! gives every frame of a batch item, and every position in temporal blocks, the same context
//! (diffusers repeats it per frame, and takes the first frame's for temporal blocks).
//!
//! Memory: every buffer is freed once the next exists, and the workspace declared is the peak
//! of that sequence as candle allocates it on the CPU. A per-batch context is projected once
//! per call and its keys and values gathered per row, so the cost is the same wherever a
//! slice meets batch boundaries. Under a workspace limit, rows run in chunks (their keys and
//! values made once), and a row too big on its own runs in chunks of queries against all its
//! keys: the same exact softmax, written chunk by chunk into the output.

use std::ops::Range;

use candle_core::Tensor;
use candle_nn::VarBuilder;
use streamline_ir::{chunk_ranges, Independence, IrError, Op, Result, SliceCtx, ValueInfo};

use super::layout::{batch_ids, info_of, tiles, Tiles};
use super::nn::{gemm_scratch, internal_dtype, Linear};

/// Where keys and values come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Context {
    /// Self-attention over the row's own tokens.
    SelfAttention,
    /// Cross-attention to a per-batch-item context `(B, L, context_dim)`; row `r` belongs to
    /// batch item `r / rows_per_batch`.
    PerBatch {
        rows_per_batch: usize,
        context_dim: usize,
    },
}

#[derive(Debug, Clone)]
pub struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
    head_dim: usize,
    query_dim: usize,
    context: Context,
}

impl Attention {
    /// `qkv_bias`: whether `to_q`, `to_k`, `to_v` have biases (VAE attention does, UNet
    /// attention does not).
    pub fn new(
        query_dim: usize,
        heads: usize,
        head_dim: usize,
        context: Context,
        qkv_bias: bool,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        let inner = heads * head_dim;
        let kv_dim = match context {
            Context::SelfAttention => query_dim,
            Context::PerBatch { context_dim, .. } => context_dim,
        };
        Ok(Attention {
            to_q: Linear::new(query_dim, inner, qkv_bias, vb.pp("to_q"))?,
            to_k: Linear::new(kv_dim, inner, qkv_bias, vb.pp("to_k"))?,
            to_v: Linear::new(kv_dim, inner, qkv_bias, vb.pp("to_v"))?,
            to_out: Linear::new(inner, query_dim, true, vb.pp("to_out").pp("0"))?,
            heads,
            head_dim,
            query_dim,
            context,
        })
    }

    /// The same attention with `rows_per_batch` rows per batch item, known only when a block
    /// is lowered at a given size (weights are shared, not copied).
    pub fn for_rows(&self, rows_per_batch: usize) -> Attention {
        let mut a = self.clone();
        if let Context::PerBatch { context_dim, .. } = self.context {
            a.context = Context::PerBatch {
                rows_per_batch,
                context_dim,
            };
        }
        a
    }

    /// `(N, L, H*dh)` -> `(N, H, L, dh)`.
    fn split_heads(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (n, l, _) = x.dims3()?;
        x.reshape((n, l, self.heads, self.head_dim))?
            .transpose(1, 2)?
            .contiguous()
    }

    fn shapes(&self, inputs: &[&ValueInfo]) -> Shapes {
        let d = inputs[0].shape.dims();
        let (batch, lk, kv_dim) = match self.context {
            Context::SelfAttention => (0, d[1], self.query_dim),
            Context::PerBatch { context_dim, .. } => {
                let c = inputs[1].shape.dims();
                (c[0], c[1], context_dim)
            }
        };
        Shapes {
            rows: d[0],
            queries: d[1],
            keys: lk,
            batch,
            kv_dim,
            size: inputs[0].dtype.size_in_bytes(),
            softmax_size: internal_dtype(inputs[0].dtype).size_in_bytes(),
        }
    }

    /// Peak transient bytes of a chunk of `rows` rows and `queries` queries per row, its
    /// result included (see [`Attention::attend`] for the order things live and die).
    fn peak(&self, s: &Shapes, rows: usize, queries: usize) -> usize {
        let (size, heads, dh) = (s.size, self.heads, self.head_dim);
        let inner = heads * dh;
        // A projection to heads: the product (biased, then split, when there is a bias or
        // several heads), so two copies at once.
        let to_heads = |n: usize, bias: bool, in_dim: usize| {
            let one = n * inner * size;
            let product = one + gemm_scratch(n, inner, in_dim, size);
            if bias || heads > 1 {
                product.max(2 * one)
            } else {
                product
            }
        };
        let qkv_bias = self.to_k.has_bias();
        // Keys and values of the chunk's rows: made from the rows themselves, or gathered
        // per row from tables of every batch item's (made once per call).
        let (tables, kv_making, kv) = match self.context {
            Context::SelfAttention => {
                let one = rows * s.keys * inner * size;
                let make = one + to_heads(rows * s.keys, qkv_bias, s.kv_dim);
                (0, make, 2 * one)
            }
            Context::PerBatch { .. } => {
                let table = s.batch * s.keys * inner * size;
                let ids = rows * std::mem::size_of::<u32>();
                let gathered = 2 * rows * s.keys * inner * size;
                let make = (table + to_heads(s.batch * s.keys, qkv_bias, s.kv_dim))
                    .max(2 * table + ids + gathered);
                (2 * table, make, ids + gathered)
            }
        };
        let q = rows * queries * inner * size;
        let scores = rows * heads * queries * s.keys;
        let out = rows * queries * self.query_dim * size;
        let softmax = if s.softmax_size == size {
            2 * scores * size
        } else {
            scores * (size + s.softmax_size).max(2 * s.softmax_size)
        };
        let phases = [
            // q: projected (and biased), then scaled into heads.
            (q + gemm_scratch(rows * queries, inner, self.query_dim, size)).max(2 * q),
            q + scores * size + gemm_scratch(queries, s.keys, dh, size),
            softmax,
            scores * size + q + gemm_scratch(queries, dh, s.keys, size),
            if heads > 1 { 2 * q } else { q },
            (q + out + gemm_scratch(rows * queries, self.query_dim, inner, size)).max(2 * out),
        ];
        let attend = phases.into_iter().max().unwrap_or(0);
        (tables + kv_making).max(tables + kv + attend)
    }

    /// How a call is cut into chunks of rows (`outer`) and queries (`inner`), and the
    /// workspace that costs: whole rows first, keys and values of a row chunk made once;
    /// when one row does not fit, query chunks of one row, which still see all its keys, so
    /// the softmax is exact.
    fn tiling(&self, s: &Shapes, out_bytes: usize, limit: Option<usize>) -> (Tiles, usize) {
        tiles(s.rows, s.queries, out_bytes, limit, |r, q| {
            self.peak(s, r, q)
        })
    }

    /// Keys and values `(n, H, Lk, dh)` of rows `rows` (absolute indices): projected from the
    /// rows `x` themselves, or gathered from the per-batch-item `tables`.
    fn keys_values(
        &self,
        x: &Tensor,
        rows: Range<usize>,
        tables: Option<&(Tensor, Tensor)>,
    ) -> Result<(Tensor, Tensor)> {
        match (self.context, tables) {
            (Context::PerBatch { rows_per_batch, .. }, Some((k, v))) => {
                let ids = batch_ids(rows, rows_per_batch, x.device())?;
                Ok((k.index_select(&ids, 0)?, v.index_select(&ids, 0)?))
            }
            _ => Ok((
                self.split_heads(&self.to_k.forward(x)?)?,
                self.split_heads(&self.to_v.forward(x)?)?,
            )),
        }
    }

    /// Scaled dot-product attention of queries `x` `(n, L, C)` to keys and values
    /// `(n, H, Lk, dh)`. The scale goes into the queries, and each buffer is freed once the
    /// next exists: queries, scores, probabilities, attended values, merged heads, result.
    fn attend(&self, x: &Tensor, k: &Tensor, v: &Tensor) -> candle_core::Result<Tensor> {
        let (n, l, _) = x.dims3()?;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let q = {
            let projected = self.to_q.forward(&x.contiguous()?)?;
            projected
                .reshape((n, l, self.heads, self.head_dim))?
                .transpose(1, 2)?
                .affine(scale, 0.)?
        };
        let scores = q.matmul(&k.t()?)?;
        drop(q);
        let probs = softmax(scores)?;
        let attended = probs.matmul(v)?;
        drop(probs);
        let merged = attended
            .transpose(1, 2)?
            .reshape((n, l, self.heads * self.head_dim))?;
        drop(attended);
        self.to_out.forward_owned(merged)
    }
}

/// The sizes attention's cost depends on.
struct Shapes {
    rows: usize,
    queries: usize,
    keys: usize,
    /// Batch items of a per-batch context (0 for self-attention).
    batch: usize,
    kv_dim: usize,
    size: usize,
    softmax_size: usize,
}

/// Softmax over the last dim, in f32 for half types, freeing each input once its successor
/// exists.
fn softmax(scores: Tensor) -> candle_core::Result<Tensor> {
    let dtype = scores.dtype();
    let internal = internal_dtype(dtype);
    if internal == dtype {
        return candle_nn::ops::softmax_last_dim(&scores);
    }
    let wide = scores.to_dtype(internal)?;
    drop(scores);
    let probs = candle_nn::ops::softmax_last_dim(&wide)?;
    drop(wide);
    probs.to_dtype(dtype)
}

impl Op for Attention {
    fn kind(&self) -> &'static str {
        match self.context {
            Context::SelfAttention => "self_attention",
            Context::PerBatch { .. } => "cross_attention",
        }
    }
    fn describe(&self) -> String {
        format!("h{}x{}", self.heads, self.head_dim)
    }
    fn independence(&self) -> Independence {
        Independence::Both
    }
    fn infer(&self, inputs: &[&ValueInfo]) -> Result<ValueInfo> {
        let x = inputs[0];
        let ok = match (x.shape.dims(), self.context) {
            (&[_, _, c], Context::SelfAttention) => c == self.query_dim && inputs.len() == 1,
            (
                &[n, _, c],
                Context::PerBatch {
                    rows_per_batch,
                    context_dim,
                },
            ) => {
                c == self.query_dim
                    && inputs.len() == 2
                    && matches!(inputs[1].shape.dims(), &[b, _, d] if d == context_dim && b * rows_per_batch == n)
            }
            _ => false,
        };
        if !ok {
            let shapes: Vec<String> = inputs.iter().map(|i| i.to_string()).collect();
            return Err(IrError::Plan(format!(
                "{} with query dim {} cannot take {}",
                self.kind(),
                self.query_dim,
                shapes.join(" and ")
            )));
        }
        Ok(x.clone())
    }
    fn workspace_bytes(
        &self,
        inputs: &[&ValueInfo],
        output: &ValueInfo,
        limit: Option<usize>,
    ) -> usize {
        self.tiling(&self.shapes(inputs), output.bytes(), limit).1
    }
    fn flops(&self, inputs: &[&ValueInfo], _: &ValueInfo) -> u64 {
        let d = inputs[0].shape.dims();
        let (n, l) = (d[0] as u64, d[1] as u64);
        let (kv_rows, lk) = match self.context {
            Context::SelfAttention => (n, l),
            Context::PerBatch { .. } => {
                let c = inputs[1].shape.dims();
                (c[0] as u64, c[1] as u64)
            }
        };
        let inner = (self.heads * self.head_dim) as u64;
        self.to_q.flops(n * l)
            + 2 * self.to_k.flops(kv_rows * lk)
            + self.to_out.flops(n * l)
            + 4 * n * l * lk * inner
    }
    fn param_bytes(&self) -> usize {
        [&self.to_q, &self.to_k, &self.to_v, &self.to_out]
            .iter()
            .map(|l| l.param_bytes())
            .sum()
    }
    fn forward(&self, x: &[&Tensor], ctx: &SliceCtx) -> Result<Tensor> {
        let h = x[0];
        let infos: Vec<ValueInfo> = x.iter().map(|t| info_of(t)).collect();
        let refs: Vec<&ValueInfo> = infos.iter().collect();
        let s = self.shapes(&refs);
        let (t, _) = self.tiling(&s, infos[0].bytes(), ctx.workspace_limit);
        let tables = match self.context {
            Context::SelfAttention => None,
            Context::PerBatch { .. } => Some((
                self.split_heads(&self.to_k.forward(x[1])?)?,
                self.split_heads(&self.to_v.forward(x[1])?)?,
            )),
        };
        let rows = ctx.rows(s.rows);
        let abs = |r: &Range<usize>| rows.start + r.start..rows.start + r.end;
        if t.outer == s.rows && t.inner == s.queries {
            let (k, v) = self.keys_values(h, abs(&(0..s.rows)), tables.as_ref())?;
            return Ok(self.attend(h, &k, &v)?);
        }
        let out = Tensor::zeros(h.dims(), h.dtype(), h.device())?;
        for r in chunk_ranges(s.rows, s.rows.div_ceil(t.outer)) {
            let xr = h.narrow(0, r.start, r.len())?;
            let (k, v) = self.keys_values(&xr, abs(&r), tables.as_ref())?;
            let target = out.narrow(0, r.start, r.len())?;
            for q in chunk_ranges(s.queries, s.queries.div_ceil(t.inner)) {
                let y = self.attend(&xr.narrow(1, q.start, q.len())?, &k, &v)?;
                target.slice_set(&y, 1, q.start)?;
            }
        }
        Ok(out)
    }
}
