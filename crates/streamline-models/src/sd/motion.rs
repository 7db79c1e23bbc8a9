//! AnimateDiff's motion module, diffusers' `AnimateDiffTransformer3D`.
//!
//! It mixes only along time: every spatial position of every video is a sequence of frames.
//! Its GroupNorm, though, reduces over (C/G, T, H, W) per video, across positions; it is lowered
//! as a mergeable statistics reduction plus a pointwise apply so that slicing along positions
//! stays exact (the paper's code slices it and changes the statistics).

use std::sync::Arc;

use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;
use streamline_ir::{Graph, Layout, Result as IrResult, ValueId, ValueInfo};

use crate::blocks::node;
use crate::blocks::transformer::{BasicTransformerBlock, TemporalGroupNorm};
use crate::ops::{
    Add, Const, Context, FrameLayout, FramesToPositions, Linear, PositionsToFrames, VideoDims,
};

/// One motion module with weights: GroupNorm, `proj_in`, transformer blocks of two
/// self-attentions over frames with a sinusoidal frame embedding, `proj_out`, residual.
#[derive(Debug)]
pub struct MotionModule {
    norm: TemporalGroupNorm,
    proj_in: Arc<Linear>,
    blocks: Vec<(BasicTransformerBlock, Tensor)>,
    proj_out: Arc<Linear>,
    channels: usize,
    max_frames: usize,
    dtype: DType,
}

impl MotionModule {
    /// A module with GroupNorm's 32 groups, `AnimateDiffTransformer3D`'s default; see
    /// [`MotionModule::with_groups`].
    pub fn new(
        channels: usize,
        heads: usize,
        layers: usize,
        max_frames: usize,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        Self::with_groups(channels, heads, layers, max_frames, 32, vb)
    }

    /// `vb` at the module (`norm`, `proj_in`, `transformer_blocks.N`, `proj_out`); each block's
    /// `pos_embed.pe` `(1, max_frames, channels)` is read from the checkpoint. The GroupNorm's
    /// `groups` are the UNet's `norm_num_groups` in a motion UNet (diffusers builds the
    /// modules with them, whatever the adapter's `motion_norm_num_groups`).
    pub fn with_groups(
        channels: usize,
        heads: usize,
        layers: usize,
        max_frames: usize,
        groups: usize,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        let blocks = (0..layers)
            .map(|i| {
                let vb = vb.pp("transformer_blocks").pp(i);
                let pe = vb
                    .get((1, max_frames, channels), "pos_embed.pe")?
                    .squeeze(0)?;
                let block =
                    BasicTransformerBlock::new(channels, heads, Context::SelfAttention, vb)?;
                Ok((block, pe))
            })
            .collect::<candle_core::Result<_>>()?;
        Ok(MotionModule {
            norm: TemporalGroupNorm::new(channels, groups, 1e-6, vb.pp("norm"))?,
            proj_in: Arc::new(Linear::new(channels, channels, true, vb.pp("proj_in"))?),
            blocks,
            proj_out: Arc::new(Linear::new(channels, channels, true, vb.pp("proj_out"))?),
            channels,
            max_frames,
            dtype: vb.dtype(),
        })
    }

    /// Lower on frame-major `x` `(B*T, C, H, W)`; the output has the same shape.
    pub(crate) fn lower(
        &self,
        g: &mut Graph,
        p: &str,
        x: ValueId,
        dims: VideoDims,
    ) -> IrResult<ValueId> {
        if dims.frames > self.max_frames {
            return Err(streamline_ir::IrError::Plan(format!(
                "{p}: {} frames, but the motion module has positional embeddings for {} (motion_max_seq_length)",
                dims.frames, self.max_frames
            )));
        }
        let c = self.channels;
        let to_positions = FramesToPositions {
            dims,
            channels: c,
            from: FrameLayout::ChannelsFirst,
        };
        let h = node(g, p, "to_positions", Arc::new(to_positions), &[x])?;
        let h = self.norm.lower(g, &format!("{p}.norm"), h, dims)?;
        let mut h = node(g, p, "proj_in", self.proj_in.clone(), &[h])?;
        for (i, (block, pe)) in self.blocks.iter().enumerate() {
            let bp = format!("{p}.transformer_blocks.{i}");
            let pe = pe.narrow(0, 0, dims.frames)?;
            let pos = node(g, &bp, "pos_embed", Arc::new(Const::new(pe)), &[])?;
            h = block.lower(g, &bp, h, None, Some(pos))?;
        }
        let h = node(g, p, "proj_out", self.proj_out.clone(), &[h])?;
        let to_frames = PositionsToFrames {
            dims,
            channels: c,
            to: FrameLayout::ChannelsFirst,
        };
        let h = node(g, p, "to_frames", Arc::new(to_frames), &[h])?;
        node(g, p, "residual", Arc::new(Add), &[h, x])
    }

    /// A graph of this module alone on `batch` videos of `frames` frames: input
    /// `hidden_states` `(B*T, C, H, W)`, output the same shape (tests of the module and of
    /// slicing plans over it).
    pub fn lower_alone(
        &self,
        batch: usize,
        frames: usize,
        height: usize,
        width: usize,
    ) -> IrResult<Graph> {
        let mut g = Graph::new();
        let x = g.input(
            "hidden_states",
            ValueInfo::new(
                (batch * frames, self.channels, height, width),
                self.dtype,
                Layout::IMAGES,
            ),
        )?;
        let dims = VideoDims {
            batch,
            frames,
            height,
            width,
        };
        let out = self.lower(&mut g, "motion_module", x, dims)?;
        g.set_outputs(&[out]);
        Ok(g)
    }
}
