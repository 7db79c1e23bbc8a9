//! Building blocks shared by the SVD and Stable Diffusion (AnimateDiff) models: graph helpers,
//! the 2D residual block, the UNets' skip stack, and what SD's VAE and SVD's temporal VAE have
//! in common.

pub(crate) mod autoencoder;
pub(crate) mod embedding;
mod resnet;
pub(crate) mod transformer;
mod unet;

pub(crate) use resnet::{At, ResnetBlock2D};
pub(crate) use unet::{Direction, LayerAt, SkipStack, UNetBlock, UNetLayer};

use std::sync::Arc;

use streamline_ir::{Graph, Op, ValueId};

use crate::ops::{Conv2d, GroupNormFrames, Silu, UpsampleNearest};

/// Push a node named `prefix.name` (or `prefix` alone when `name` is empty).
pub(crate) fn node(
    g: &mut Graph,
    prefix: &str,
    name: &str,
    op: Arc<dyn Op>,
    inputs: &[ValueId],
) -> streamline_ir::Result<ValueId> {
    let full = match (prefix.is_empty(), name.is_empty()) {
        (_, true) => prefix.to_string(),
        (true, false) => name.to_string(),
        (false, false) => format!("{prefix}.{name}"),
    };
    g.push_arc(&full, op, inputs)
}

/// A per-frame GroupNorm named `name`: one op, or (`split`) its statistics `name.stats` and
/// their application `name`, which can run on bands of rows.
pub(crate) fn frame_norm(
    g: &mut Graph,
    name: &str,
    norm: &Arc<GroupNormFrames>,
    x: ValueId,
    split: bool,
) -> streamline_ir::Result<ValueId> {
    if !split {
        return node(g, name, "", norm.clone(), &[x]);
    }
    let (stats, apply) = norm.split();
    let s = node(g, name, "stats", Arc::new(stats), &[x])?;
    node(g, name, "", Arc::new(apply), &[x, s])
}

/// The output head of the UNet, the encoder and the decoder: GroupNorm (split as
/// [`frame_norm`] does), SiLU, 3x3 conv, named `prefix.conv_norm_out`, `prefix.conv_act`,
/// `prefix.conv_out`.
pub(crate) fn output_head(
    g: &mut Graph,
    prefix: &str,
    (norm, split): (&Arc<GroupNormFrames>, bool),
    conv: &Arc<Conv2d>,
    x: ValueId,
) -> streamline_ir::Result<ValueId> {
    let name = if prefix.is_empty() {
        "conv_norm_out".to_string()
    } else {
        format!("{prefix}.conv_norm_out")
    };
    let h = frame_norm(g, &name, norm, x, split)?;
    let h = node(g, prefix, "conv_act", Arc::new(Silu), &[h])?;
    node(g, prefix, "conv_out", conv.clone(), &[h])
}

/// diffusers' `Upsample2D` with a conv: nearest resize to `(height, width)` (twice the input,
/// or the size a UNet forwards), then the 3x3 `prefix.upsamplers.0.conv`.
pub(crate) fn upsampler(
    g: &mut Graph,
    prefix: &str,
    conv: &Arc<Conv2d>,
    x: ValueId,
    (height, width): (usize, usize),
) -> streamline_ir::Result<ValueId> {
    let p = format!("{prefix}.upsamplers.0");
    let d = g.info(x).shape.dims();
    let resize = UpsampleNearest::new((d[2], d[3]), height, width);
    let up = node(g, &p, "upsample", Arc::new(resize), &[x])?;
    node(g, &p, "conv", conv.clone(), &[up])
}
