//! diffusers' `ResnetBlock2D`: the frame-wise residual block every UNet and VAE here uses.

use std::sync::Arc;

use candle_nn::VarBuilder;
use streamline_ir::{Graph, Result, ValueId};

use super::{frame_norm, node};
use crate::ops::{Add, AddBatchEmb, Conv2d, GroupNormFrames, Linear, Silu, VideoDims};

/// Where a block runs: its video extent and, when it has one, the per-batch-item time
/// embedding `silu(emb)` of shape `(B, temb)` that every resnet projects.
#[derive(Clone, Copy, Debug)]
pub(crate) struct At {
    pub dims: VideoDims,
    pub emb: Option<ValueId>,
    /// Per-frame GroupNorms lowered as statistics and their application, so that the
    /// layers can run on bands of rows (the VAE decoders, whose full-resolution layers
    /// hold more than one whole feature may).
    pub split_norms: bool,
}

impl At {
    pub fn with_size(self, height: usize, width: usize) -> At {
        At {
            dims: VideoDims {
                height,
                width,
                ..self.dims
            },
            ..self
        }
    }
}

/// Frame-wise residual block: GroupNorm, SiLU, 3x3 conv, + time embedding, twice.
#[derive(Debug)]
pub(crate) struct ResnetBlock2D {
    norm1: Arc<GroupNormFrames>,
    conv1: Arc<Conv2d>,
    time_emb_proj: Option<Arc<Linear>>,
    norm2: Arc<GroupNormFrames>,
    conv2: Arc<Conv2d>,
    conv_shortcut: Option<Arc<Conv2d>>,
}

impl ResnetBlock2D {
    pub fn new(
        in_c: usize,
        out_c: usize,
        temb: Option<usize>,
        groups: usize,
        eps: f64,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        Ok(ResnetBlock2D {
            norm1: Arc::new(GroupNormFrames::new(groups, in_c, eps, vb.pp("norm1"))?),
            conv1: Arc::new(Conv2d::new(in_c, out_c, 3, 1, 1, vb.pp("conv1"))?),
            time_emb_proj: temb
                .map(|t| Linear::new(t, out_c, true, vb.pp("time_emb_proj")).map(Arc::new))
                .transpose()?,
            norm2: Arc::new(GroupNormFrames::new(groups, out_c, eps, vb.pp("norm2"))?),
            conv2: Arc::new(Conv2d::new(out_c, out_c, 3, 1, 1, vb.pp("conv2"))?),
            conv_shortcut: (in_c != out_c)
                .then(|| Conv2d::new(in_c, out_c, 1, 1, 0, vb.pp("conv_shortcut")).map(Arc::new))
                .transpose()?,
        })
    }

    pub fn lower(&self, g: &mut Graph, p: &str, x: ValueId, at: At) -> Result<ValueId> {
        let h = frame_norm(g, &format!("{p}.norm1"), &self.norm1, x, at.split_norms)?;
        let h = node(g, p, "act1", Arc::new(Silu), &[h])?;
        let mut h = node(g, p, "conv1", self.conv1.clone(), &[h])?;
        if let (Some(proj), Some(emb)) = (&self.time_emb_proj, at.emb) {
            let e = node(g, p, "time_emb_proj", proj.clone(), &[emb])?;
            let add = AddBatchEmb {
                rows_per_batch: at.dims.frames,
                channel_dim: 1,
            };
            h = node(g, p, "add_temb", Arc::new(add), &[h, e])?;
        }
        let h = frame_norm(g, &format!("{p}.norm2"), &self.norm2, h, at.split_norms)?;
        let h = node(g, p, "act2", Arc::new(Silu), &[h])?;
        let h = node(g, p, "conv2", self.conv2.clone(), &[h])?;
        let shortcut = match &self.conv_shortcut {
            Some(c) => node(g, p, "conv_shortcut", c.clone(), &[x])?,
            None => x,
        };
        node(g, p, "residual", Arc::new(Add), &[shortcut, h])
    }
}
