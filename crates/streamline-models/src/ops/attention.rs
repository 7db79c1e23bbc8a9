//! diffusers' `Attention` (to_q, to_k, to_v, to_out.0) over the tokens of each row.
//!
//! A row is a frame in spatial attention `(B*T, H*W, C)` and a position in temporal attention
//! `(B*H*W, T, C)`; rows never mix, so the op is independent along whichever axis the layout
//! puts on dim 0. Cross-attention context is per batch item `(B, L, D)` and read whole: SVD
//! gives every frame of a batch item, and every position in temporal blocks, the same context
//! (diffusers repeats it per frame, and takes the first frame's for temporal blocks).

use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;
use streamline_ir::{Independence, IrError, Op, Result, SliceCtx, ValueInfo};

use super::layout::{batch_pieces, cat0};
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

    /// `(N, L, H*dh)` -> `(N, H, L, dh)`.
    fn split_heads(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (n, l, _) = x.dims3()?;
        x.reshape((n, l, self.heads, self.head_dim))?
            .transpose(1, 2)?
            .contiguous()
    }

    /// Scaled dot-product attention of `x` rows `(n, L, C)` to keys/values `(m, Lk, D)`,
    /// `m` being `n` or 1 (shared by all rows). Softmax runs in f32.
    fn attend(&self, x: &Tensor, kv: &Tensor) -> candle_core::Result<Tensor> {
        let (n, l, _) = x.dims3()?;
        let q = self.split_heads(&self.to_q.forward(x)?)?;
        let k = self.split_heads(&self.to_k.forward(kv)?)?;
        let v = self.split_heads(&self.to_v.forward(kv)?)?;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let scores = (q.broadcast_matmul(&k.t()?)? * scale)?;
        let dtype = scores.dtype();
        let probs =
            candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?.to_dtype(dtype)?;
        let out = probs.broadcast_matmul(&v)?;
        let out = out
            .transpose(1, 2)?
            .reshape((n, l, self.heads * self.head_dim))?;
        self.to_out.forward(&out)
    }
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
    fn workspace_bytes(&self, inputs: &[&ValueInfo], output: &ValueInfo) -> usize {
        let d = inputs[0].shape.dims();
        let (n, l) = (d[0], d[1]);
        let (kv_rows, lk) = match self.context {
            Context::SelfAttention => (n, l),
            Context::PerBatch { .. } => (1, inputs[1].shape.dims()[1]),
        };
        let size = output.dtype.size_in_bytes();
        let inner = self.heads * self.head_dim;
        // q and k/v, each projected then split into heads; scores, their f32 softmax and the
        // cast back; the attended values before and after merging heads.
        let qkv = 2 * (n * l + 2 * kv_rows * lk) * inner * size;
        let scores = n * self.heads * l * lk;
        qkv + scores * (2 * size + 2 * 4) + 2 * n * l * inner * size
    }
    fn flops(&self, inputs: &[&ValueInfo], _: &ValueInfo) -> u64 {
        let d = inputs[0].shape.dims();
        let (n, l) = (d[0] as u64, d[1] as u64);
        let (kv_rows, lk) = match self.context {
            Context::SelfAttention => (n, l),
            Context::PerBatch { .. } => (1, inputs[1].shape.dims()[1] as u64),
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
        match self.context {
            Context::SelfAttention => Ok(self.attend(h, h)?),
            Context::PerBatch { rows_per_batch, .. } => {
                let rows = ctx.rows(h.dim(0)?);
                let parts = batch_pieces(rows.clone(), rows_per_batch)
                    .into_iter()
                    .map(|(b, within)| {
                        let offset = b * rows_per_batch + within.start - rows.start;
                        let kv = x[1].narrow(0, b, 1)?;
                        Ok(self.attend(&h.narrow(0, offset, within.len())?, &kv)?)
                    })
                    .collect::<Result<Vec<_>>>()?;
                cat0(parts)
            }
        }
    }
}
