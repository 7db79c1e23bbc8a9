//! Transformer pieces shared by SVD's spatio-temporal transformers and AnimateDiff's spatial
//! transformers and motion modules.

use std::sync::Arc;

use candle_core::Tensor;
use candle_nn::VarBuilder;
use streamline_ir::{Graph, Result, ValueId};

use super::node;
use crate::ops::{
    Add, AddBroadcast, Attention, Context, Geglu, GroupNormApply, GroupNormStats, LayerNorm,
    Linear, VideoDims,
};

/// `net.2(net.0(x))` with a GEGLU `net.0` of inner width `4 * dim`.
#[derive(Debug)]
pub(crate) struct FeedForward {
    geglu: Arc<Geglu>,
    out: Arc<Linear>,
}

impl FeedForward {
    pub fn new(dim: usize, dim_out: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        let net = vb.pp("net");
        Ok(FeedForward {
            geglu: Arc::new(Geglu::new(dim, 4 * dim, net.pp("0"))?),
            out: Arc::new(Linear::new(4 * dim, dim_out, true, net.pp("2"))?),
        })
    }

    pub fn lower(&self, g: &mut Graph, p: &str, x: ValueId) -> Result<ValueId> {
        let h = node(g, p, "net.0", self.geglu.clone(), &[x])?;
        node(g, p, "net.2", self.out.clone(), &[h])
    }
}

/// Pre-norm attention or feed-forward with a residual: `x + f(norm(x))`.
pub(crate) fn residual_branch(
    g: &mut Graph,
    p: &str,
    norm: (&str, &Arc<LayerNorm>),
    x: ValueId,
    f: impl FnOnce(&mut Graph, ValueId) -> Result<ValueId>,
) -> Result<ValueId> {
    let n = node(g, p, norm.0, norm.1.clone(), &[x])?;
    let h = f(g, n)?;
    node(
        g,
        p,
        &format!("{}.residual", norm.0),
        Arc::new(Add),
        &[h, x],
    )
}

/// diffusers' `BasicTransformerBlock` (layer norms, GEGLU feed-forward): self-attention, then
/// cross-attention to a per-batch context or a second self-attention, then the feed-forward.
/// Rows are token sequences: the pixels of a frame (spatial) or the frames of a position
/// (temporal).
#[derive(Debug)]
pub(crate) struct BasicTransformerBlock {
    norm1: Arc<LayerNorm>,
    attn1: Arc<Attention>,
    norm2: Arc<LayerNorm>,
    attn2: Arc<Attention>,
    norm3: Arc<LayerNorm>,
    ff: FeedForward,
}

impl BasicTransformerBlock {
    /// `second`: the second attention's context (`Context::SelfAttention` for a second
    /// self-attention).
    pub fn new(
        dim: usize,
        heads: usize,
        second: Context,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        let head_dim = dim / heads;
        Ok(BasicTransformerBlock {
            norm1: Arc::new(LayerNorm::new(dim, 1e-5, vb.pp("norm1"))?),
            attn1: Arc::new(Attention::new(
                dim,
                heads,
                head_dim,
                Context::SelfAttention,
                false,
                vb.pp("attn1"),
            )?),
            norm2: Arc::new(LayerNorm::new(dim, 1e-5, vb.pp("norm2"))?),
            attn2: Arc::new(Attention::new(
                dim,
                heads,
                head_dim,
                second,
                false,
                vb.pp("attn2"),
            )?),
            norm3: Arc::new(LayerNorm::new(dim, 1e-5, vb.pp("norm3"))?),
            ff: FeedForward::new(dim, dim, vb.pp("ff"))?,
        })
    }

    /// `context`: the cross-attention context `(B, L, D)` and the rows of `x` per batch item
    /// (`None` when the second attention is self-attention). `pos`: a positional embedding
    /// `(T, C)` added to the normed rows before each attention, as diffusers'
    /// `positional_embeddings="sinusoidal"` does.
    pub fn lower(
        &self,
        g: &mut Graph,
        p: &str,
        x: ValueId,
        context: Option<(ValueId, usize)>,
        pos: Option<ValueId>,
    ) -> Result<ValueId> {
        let with_pos = |g: &mut Graph, n: ValueId, name: &str| match pos {
            Some(pe) => node(g, p, name, Arc::new(AddBroadcast), &[n, pe]),
            None => Ok(n),
        };
        let h = residual_branch(g, p, ("norm1", &self.norm1), x, |g, n| {
            let n = with_pos(g, n, "attn1.pos_embed")?;
            node(g, p, "attn1", self.attn1.clone(), &[n])
        })?;
        let h = residual_branch(g, p, ("norm2", &self.norm2), h, |g, n| {
            let n = with_pos(g, n, "attn2.pos_embed")?;
            match context {
                Some((c, rows)) => {
                    node(g, p, "attn2", Arc::new(self.attn2.for_rows(rows)), &[n, c])
                }
                None => node(g, p, "attn2", self.attn2.clone(), &[n]),
            }
        })?;
        residual_branch(g, p, ("norm3", &self.norm3), h, |g, n| {
            self.ff.lower(g, &format!("{p}.ff"), n)
        })
    }
}

/// A GroupNorm over (C/G, T, H, W): lowered as a statistics reduction plus a pointwise apply.
#[derive(Debug)]
pub(crate) struct TemporalGroupNorm {
    weight: Tensor,
    bias: Tensor,
    channels: usize,
    groups: usize,
    eps: f64,
}

impl TemporalGroupNorm {
    pub fn new(
        channels: usize,
        groups: usize,
        eps: f64,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        Ok(TemporalGroupNorm {
            weight: vb.get(channels, "weight")?,
            bias: vb.get(channels, "bias")?,
            channels,
            groups,
            eps,
        })
    }

    pub fn lower(&self, g: &mut Graph, p: &str, x: ValueId, dims: VideoDims) -> Result<ValueId> {
        let stats = GroupNormStats::new(dims, self.channels, self.groups)?;
        let s = node(g, p, "stats", Arc::new(stats), &[x])?;
        let apply = GroupNormApply::new(dims, self.groups, self.eps, &self.weight, &self.bias)?;
        node(g, p, "", Arc::new(apply), &[x, s])
    }
}
