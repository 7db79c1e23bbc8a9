//! diffusers' `Transformer2DModel` as SD 1.5 uses it: spatial self-attention over each frame's
//! pixels and cross-attention to the prompt, frame-wise throughout.

use std::sync::Arc;

use candle_nn::VarBuilder;
use streamline_ir::{Graph, Result, ValueId};

use crate::blocks::transformer::BasicTransformerBlock;
use crate::blocks::{node, At};
use streamline_ir::Op;

use crate::ops::{Add, Context, Conv2d, GroupNormFrames, Linear, Tokens};

/// `proj_in` / `proj_out`: a 1x1 conv on frames (SD 1.5) or a linear on tokens
/// (`use_linear_projection`).
#[derive(Debug)]
enum Projection {
    Conv(Arc<Conv2d>),
    Linear(Arc<Linear>),
}

impl Projection {
    fn new(c: usize, linear: bool, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(if linear {
            Projection::Linear(Arc::new(Linear::new(c, c, true, vb)?))
        } else {
            Projection::Conv(Arc::new(Conv2d::new(c, c, 1, 1, 0, vb)?))
        })
    }

    fn op(&self) -> Arc<dyn Op> {
        match self {
            Projection::Conv(c) => c.clone(),
            Projection::Linear(l) => l.clone(),
        }
    }
}

#[derive(Debug)]
pub(crate) struct Transformer2DModel {
    norm: Arc<GroupNormFrames>,
    proj_in: Projection,
    blocks: Vec<BasicTransformerBlock>,
    proj_out: Projection,
}

impl Transformer2DModel {
    pub fn new(
        channels: usize,
        heads: usize,
        layers: usize,
        context_dim: usize,
        linear_projection: bool,
        groups: usize,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        // Rows per batch item are set when lowered at a size.
        let cross = Context::PerBatch {
            rows_per_batch: 1,
            context_dim,
        };
        let blocks = (0..layers)
            .map(|i| {
                BasicTransformerBlock::new(
                    channels,
                    heads,
                    cross,
                    vb.pp("transformer_blocks").pp(i),
                )
            })
            .collect::<candle_core::Result<_>>()?;
        Ok(Transformer2DModel {
            norm: Arc::new(GroupNormFrames::new(groups, channels, 1e-6, vb.pp("norm"))?),
            proj_in: Projection::new(channels, linear_projection, vb.pp("proj_in"))?,
            blocks,
            proj_out: Projection::new(channels, linear_projection, vb.pp("proj_out"))?,
        })
    }

    /// On frame-major `x` `(B*T, C, H, W)`; `context` is the prompt's encoder state
    /// `(B, L, D)`, one per video.
    pub fn lower(
        &self,
        g: &mut Graph,
        p: &str,
        x: ValueId,
        context: ValueId,
        at: At,
    ) -> Result<ValueId> {
        let (height, width) = (at.dims.height, at.dims.width);
        let tokens = |to_tokens| {
            Arc::new(Tokens {
                height,
                width,
                to_tokens,
            })
        };
        let mut h = node(g, p, "norm", self.norm.clone(), &[x])?;
        let conv = matches!(self.proj_in, Projection::Conv(_));
        if conv {
            h = node(g, p, "proj_in", self.proj_in.op(), &[h])?;
            h = node(g, p, "to_tokens", tokens(true), &[h])?;
        } else {
            h = node(g, p, "to_tokens", tokens(true), &[h])?;
            h = node(g, p, "proj_in", self.proj_in.op(), &[h])?;
        }
        for (i, block) in self.blocks.iter().enumerate() {
            let bp = format!("{p}.transformer_blocks.{i}");
            h = block.lower(g, &bp, h, Some((context, at.dims.frames)), None)?;
        }
        if conv {
            h = node(g, p, "from_tokens", tokens(false), &[h])?;
            h = node(g, p, "proj_out", self.proj_out.op(), &[h])?;
        } else {
            h = node(g, p, "proj_out", self.proj_out.op(), &[h])?;
            h = node(g, p, "from_tokens", tokens(false), &[h])?;
        }
        node(g, p, "residual", Arc::new(Add), &[h, x])
    }
}
