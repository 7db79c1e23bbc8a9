//! diffusers' `Attention` (to_q, to_k, to_v, to_out.0) over the tokens of each row.
//!
//! A row is a frame in spatial attention `(B*T, H*W, C)` and a position in temporal attention
//! `(B*H*W, T, C)`; rows never mix, so the op is independent along whichever axis the layout
//! puts on dim 0. Cross-attention context is per batch item `(B, L, D)` and read whole: SVD
//! gives every frame of a batch item, and every position in temporal blocks, the same context
//! (diffusers repeats it per frame, and takes the first frame's for temporal blocks).
//!
//! The attention itself is streamline's kernel (query tiles, online softmax: no tokens x
//! tokens scores), reading heads in place from the projections' `(n, L, H*dh)` layout. A
//! per-batch context is projected once per call and read per row by the kernel, so the cost
//! is the same wherever a slice meets batch boundaries. Memory: every buffer is freed once the
//! next exists, and the workspace declared is the peak of that sequence on the CPU. Under a
//! workspace limit, rows run in chunks (their keys and values made once), and a row too big on
//! its own runs in chunks of queries against all its keys, written chunk by chunk.

use std::ops::Range;

use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;
use streamline_ir::{
    chunk_ranges, Independence, IrError, Kernels, Op, Result, SliceCtx, ValueInfo, Workspace,
};

use streamline_kernels::{AttentionSizes, KvRows};

use super::kernels;
use super::layout::{info_of, tiles, Tiles};
use super::nn::Linear;

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

    fn shapes(&self, inputs: &[&ValueInfo]) -> Shapes {
        let d = inputs[0].shape.dims();
        let (batch, lk) = match self.context {
            Context::SelfAttention => (0, d[1]),
            Context::PerBatch { .. } => {
                let c = inputs[1].shape.dims();
                (c[0], c[1])
            }
        };
        Shapes {
            rows: d[0],
            queries: d[1],
            keys: lk,
            batch,
            size: inputs[0].dtype.size_in_bytes(),
            dtype: inputs[0].dtype,
        }
    }

    /// Peak transient bytes of a chunk of `rows` rows and `queries` queries per row, its
    /// result included (see [`Attention::attend`] for the order things live and die).
    fn peak(&self, s: &Shapes, rows: usize, queries: usize, kernels: Kernels) -> usize {
        let (size, inner) = (s.size, self.heads * self.head_dim);
        // Keys and values of the chunk's rows, or tables of every batch item's (made once
        // per call, read per row by the kernel).
        let (kv_rows, kv_making, kv) = match self.context {
            Context::SelfAttention => {
                let one = rows * s.keys * inner * size;
                (
                    rows,
                    one + self.to_v.peak(rows * s.keys, s.dtype, true, kernels),
                    2 * one,
                )
            }
            Context::PerBatch { .. } => {
                let table = s.batch * s.keys * inner * size;
                let make = table + self.to_v.peak(s.batch * s.keys, s.dtype, true, kernels);
                (s.batch, make, 2 * table)
            }
        };
        let q = rows * queries * inner * size;
        let sizes = AttentionSizes {
            rows,
            queries,
            kv_rows,
            keys: s.keys,
            channels: inner,
            heads: self.heads,
        };
        let kernel = kernels::attention_workspace(kernels, sizes, s.dtype);
        let attend = [
            self.to_q.peak(rows * queries, s.dtype, true, kernels),
            2 * q + kernel,
            q + self.to_out.peak(rows * queries, s.dtype, true, kernels),
        ]
        .into_iter()
        .max()
        .unwrap_or(0);
        kv_making.max(kv + attend)
    }

    /// How a call is cut into chunks of rows (`outer`) and queries (`inner`), and the
    /// workspace that costs: whole rows first, keys and values of a row chunk made once;
    /// when one row does not fit, query chunks of one row, which still see all its keys, so
    /// the softmax is exact.
    fn tiling(&self, s: &Shapes, out_bytes: usize, ws: Workspace) -> (Tiles, usize) {
        tiles(s.rows, s.queries, out_bytes, ws.limit, |r, q| {
            self.peak(s, r, q, ws.kernels)
        })
    }

    /// Keys and values `(n, Lk, H*dh)` of rows `x`, and the rows of them each row reads:
    /// projected from the rows themselves, or the per-batch-item `tables`, read from row
    /// `rows.start` on.
    fn keys_values(
        &self,
        x: &Tensor,
        rows: Range<usize>,
        tables: Option<&(Tensor, Tensor)>,
        kernels: Kernels,
    ) -> Result<(Tensor, Tensor, KvRows)> {
        match (self.context, tables) {
            (Context::PerBatch { rows_per_batch, .. }, Some((k, v))) => Ok((
                k.clone(),
                v.clone(),
                KvRows::Grouped {
                    first: rows.start,
                    per: rows_per_batch,
                },
            )),
            _ => Ok((
                self.to_k.forward(x, kernels)?,
                self.to_v.forward(x, kernels)?,
                KvRows::Own,
            )),
        }
    }

    /// Scaled dot-product attention of queries `x` `(n, L, C)` to keys and values
    /// `(nk, Lk, H*dh)`: the queries, the attended values (the kernel's scratch alive
    /// meanwhile), then, queries freed, the output projection.
    fn attend(
        &self,
        x: &Tensor,
        (k, v, kv): (&Tensor, &Tensor, KvRows),
        kernels: Kernels,
    ) -> candle_core::Result<Tensor> {
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let q = self.to_q.forward(&x.contiguous()?, kernels)?;
        let attended = kernels::attention(kernels, [&q, k, v], self.heads, scale, kv)?;
        drop(q);
        self.to_out.forward_owned(attended, kernels)
    }
}

/// The sizes attention's cost depends on.
struct Shapes {
    rows: usize,
    queries: usize,
    keys: usize,
    /// Batch items of a per-batch context (0 for self-attention).
    batch: usize,
    size: usize,
    dtype: DType,
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
    fn workspace_bytes(&self, inputs: &[&ValueInfo], output: &ValueInfo, ws: Workspace) -> usize {
        self.tiling(&self.shapes(inputs), output.bytes(), ws).1
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
        // Saturating: a plan for an absurd size must say so, not overflow.
        let scores = [4, n, l, lk, inner]
            .into_iter()
            .fold(1u64, u64::saturating_mul);
        [
            self.to_q.flops(n.saturating_mul(l)),
            self.to_k
                .flops(kv_rows.saturating_mul(lk))
                .saturating_mul(2),
            self.to_out.flops(n.saturating_mul(l)),
            scores,
        ]
        .into_iter()
        .fold(0, u64::saturating_add)
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
        let (t, _) = self.tiling(&s, infos[0].bytes(), ctx.workspace());
        let tables = match self.context {
            Context::SelfAttention => None,
            Context::PerBatch { .. } => Some((
                self.to_k.forward(x[1], ctx.kernels)?,
                self.to_v.forward(x[1], ctx.kernels)?,
            )),
        };
        let rows = ctx.rows(s.rows);
        let abs = |r: &Range<usize>| rows.start + r.start..rows.start + r.end;
        if t.outer == s.rows && t.inner == s.queries {
            let (k, v, kv) =
                self.keys_values(h, abs(&(0..s.rows)), tables.as_ref(), ctx.kernels)?;
            return Ok(self.attend(h, (&k, &v, kv), ctx.kernels)?);
        }
        let out = Tensor::zeros(h.dims(), h.dtype(), h.device())?;
        for r in chunk_ranges(s.rows, s.rows.div_ceil(t.outer)) {
            let xr = h.narrow(0, r.start, r.len())?;
            let (k, v, kv) = self.keys_values(&xr, abs(&r), tables.as_ref(), ctx.kernels)?;
            let target = out.narrow(0, r.start, r.len())?;
            for q in chunk_ranges(s.queries, s.queries.div_ceil(t.inner)) {
                let y = self.attend(&xr.narrow(1, q.start, q.len())?, (&k, &v, kv), ctx.kernels)?;
                target.slice_set(&y, 1, q.start)?;
            }
        }
        Ok(out)
    }
}
