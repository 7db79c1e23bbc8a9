//! diffusers' `TransformerSpatioTemporalModel` with its spatial `BasicTransformerBlock`s and
//! `TemporalBasicTransformerBlock`s.

use std::sync::Arc;

use candle_core::DType;
use candle_nn::VarBuilder;
use streamline_ir::{Graph, Result, ValueId};

use super::config::SVD_GROUPS;
use crate::blocks::embedding::{sinusoid, TimestepEmbedding};
use crate::blocks::transformer::{residual_branch, BasicTransformerBlock, FeedForward};
use crate::blocks::{node, At};
use crate::ops::{
    Add, AddBroadcast, Blend, Const, Context, FrameLayout, FramesToPositions, GroupNormFrames,
    LayerNorm, Linear, PositionsToFrames, Tokens,
};

/// Temporal block over the frames of each position `(B*H*W, T, C)`.
#[derive(Debug)]
struct TemporalBasicTransformerBlock {
    norm_in: Arc<LayerNorm>,
    ff_in: FeedForward,
    block: BasicTransformerBlock,
}

impl TemporalBasicTransformerBlock {
    fn new(dim: usize, heads: usize, cross: Context, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(TemporalBasicTransformerBlock {
            norm_in: Arc::new(LayerNorm::new(dim, 1e-5, vb.pp("norm_in"))?),
            ff_in: FeedForward::new(dim, dim, vb.pp("ff_in"))?,
            // norm1/attn1/norm2/attn2/norm3/ff have the same names and math as the spatial
            // block's; only the rows they run over differ.
            block: BasicTransformerBlock::new(dim, heads, cross, vb)?,
        })
    }

    fn lower(
        &self,
        g: &mut Graph,
        p: &str,
        x: ValueId,
        context: ValueId,
        rows_per_batch: usize,
    ) -> Result<ValueId> {
        let h = residual_branch(g, p, ("norm_in", &self.norm_in), x, |g, n| {
            self.ff_in.lower(g, &format!("{p}.ff_in"), n)
        })?;
        self.block
            .lower(g, p, h, Some((context, rows_per_batch)), None)
    }
}

/// diffusers' `TransformerSpatioTemporalModel` on frame-major `(B*T, C, H, W)` features.
#[derive(Debug)]
pub(crate) struct TransformerSpatioTemporalModel {
    norm: Arc<GroupNormFrames>,
    proj_in: Arc<Linear>,
    transformer_blocks: Vec<BasicTransformerBlock>,
    temporal_transformer_blocks: Vec<TemporalBasicTransformerBlock>,
    time_pos_embed: TimestepEmbedding,
    time_mixer: Arc<Blend>,
    proj_out: Arc<Linear>,
    channels: usize,
    /// Of the frame-index sinusoids made while lowering: the weights'.
    dtype: DType,
    device: candle_core::Device,
}

impl TransformerSpatioTemporalModel {
    pub fn new(
        channels: usize,
        heads: usize,
        layers: usize,
        context_dim: usize,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        // Rows per batch item are set when a block is lowered at a size (`Attention::for_rows`).
        let cross = Context::PerBatch {
            rows_per_batch: 1,
            context_dim,
        };
        let spatial = (0..layers)
            .map(|i| {
                BasicTransformerBlock::new(
                    channels,
                    heads,
                    cross,
                    vb.pp("transformer_blocks").pp(i),
                )
            })
            .collect::<candle_core::Result<_>>()?;
        let temporal = (0..layers)
            .map(|i| {
                TemporalBasicTransformerBlock::new(
                    channels,
                    heads,
                    cross,
                    vb.pp("temporal_transformer_blocks").pp(i),
                )
            })
            .collect::<candle_core::Result<_>>()?;
        Ok(TransformerSpatioTemporalModel {
            norm: Arc::new(GroupNormFrames::new(
                SVD_GROUPS,
                channels,
                1e-6,
                vb.pp("norm"),
            )?),
            proj_in: Arc::new(Linear::new(channels, channels, true, vb.pp("proj_in"))?),
            transformer_blocks: spatial,
            temporal_transformer_blocks: temporal,
            time_pos_embed: TimestepEmbedding::new(
                channels,
                4 * channels,
                channels,
                vb.pp("time_pos_embed"),
            )?,
            time_mixer: Arc::new(Blend::learned(false, vb.pp("time_mixer"))?),
            proj_out: Arc::new(Linear::new(channels, channels, true, vb.pp("proj_out"))?),
            channels,
            dtype: vb.dtype(),
            device: vb.device().clone(),
        })
    }

    /// `context` is the per-batch-item encoder state `(B, L, D)`.
    pub fn lower(
        &self,
        g: &mut Graph,
        p: &str,
        x: ValueId,
        context: ValueId,
        at: At,
    ) -> Result<ValueId> {
        let d = at.dims;
        let (h_, w_) = (d.height, d.width);
        let h = node(g, p, "norm", self.norm.clone(), &[x])?;
        let to_tokens = Tokens {
            height: h_,
            width: w_,
            to_tokens: true,
        };
        let h = node(g, p, "to_tokens", Arc::new(to_tokens), &[h])?;
        let mut h = node(g, p, "proj_in", self.proj_in.clone(), &[h])?;
        let frames = node(
            g,
            p,
            "frame_index",
            Arc::new(Const::arange(d.frames, &self.device)?),
            &[],
        )?;
        let t = node(
            g,
            p,
            "time_proj",
            sinusoid(self.channels, self.dtype),
            &[frames],
        )?;
        let pos = self
            .time_pos_embed
            .lower(g, &format!("{p}.time_pos_embed"), t)?;
        let blocks = self
            .transformer_blocks
            .iter()
            .zip(&self.temporal_transformer_blocks);
        for (i, (spatial, temporal)) in blocks.enumerate() {
            let sp = format!("{p}.transformer_blocks.{i}");
            let tp = format!("{p}.temporal_transformer_blocks.{i}");
            h = spatial.lower(g, &sp, h, Some((context, d.frames)), None)?;
            let to_positions = FramesToPositions {
                dims: d,
                channels: self.channels,
                from: FrameLayout::Tokens,
            };
            let m = node(g, &tp, "to_positions", Arc::new(to_positions), &[h])?;
            let m = node(g, &tp, "add_pos", Arc::new(AddBroadcast), &[m, pos])?;
            let m = temporal.lower(g, &tp, m, context, d.hw())?;
            let to_frames = PositionsToFrames {
                dims: d,
                channels: self.channels,
                to: FrameLayout::Tokens,
            };
            let m = node(g, &tp, "to_frames", Arc::new(to_frames), &[m])?;
            h = node(
                g,
                p,
                &format!("time_mixer.{i}"),
                self.time_mixer.clone(),
                &[h, m],
            )?;
        }
        let h = node(g, p, "proj_out", self.proj_out.clone(), &[h])?;
        let from_tokens = Tokens {
            height: h_,
            width: w_,
            to_tokens: false,
        };
        let h = node(g, p, "from_tokens", Arc::new(from_tokens), &[h])?;
        node(g, p, "residual", Arc::new(Add), &[h, x])
    }
}
