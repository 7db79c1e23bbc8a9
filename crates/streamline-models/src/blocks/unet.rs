//! The skip stack of a UNet, shared by SVD's `UNetSpatioTemporalConditionModel` and
//! AnimateDiff's `UNetMotionModel`: the down path pushes `conv_in`'s output, every layer's
//! output and every downsampler's; each up layer pops one and concatenates it to its input.

use std::sync::Arc;

use streamline_ir::{Graph, Result, ValueId};

use super::{node, upsampler, At};
use crate::ops::{ConcatChannels, Conv2d};

/// A down or up block as the skip stack sees it: layers (a resnet and whatever follows it)
/// that each take the running value, then an optional resampling conv.
pub(crate) trait UNetBlock {
    fn layers(&self) -> usize;
    /// Layer `l` on `x`, named under the block's prefix `p`; `context` is the encoder state.
    fn lower_layer(
        &self,
        g: &mut Graph,
        p: &str,
        l: usize,
        x: ValueId,
        context: ValueId,
        at: At,
    ) -> Result<ValueId>;
    /// The stride-2 conv of a down block, or the conv after the nearest resize of an up block.
    fn resample(&self) -> Option<&Arc<Conv2d>>;
}

/// A UNet's blocks, lowered around its mid block.
pub(crate) struct SkipStack<'a, B> {
    pub down: &'a [B],
    pub up: &'a [B],
    /// `encoder_hidden_states`, handed to every layer.
    pub context: ValueId,
}

impl<B: UNetBlock> SkipStack<'_, B> {
    /// `down_blocks.*`, then `mid` at the smallest size, then `up_blocks.*`, from `conv_in`'s
    /// output `x` at `at`; returns the last up block's output, at `at`'s size again.
    ///
    /// A stride-2 conv halves odd sizes rounding up, and each upsampler resizes to the size
    /// of the skip its block's successor pops first, as diffusers' `UNetMotionModel` does
    /// when it forwards upsample sizes (latents that are not multiples of `2^levels`); at
    /// other sizes that is twice the input. SVD's UNet does not forward them: its lowering
    /// refuses such latents before it gets here.
    pub fn lower(
        &self,
        g: &mut Graph,
        x: ValueId,
        at: At,
        mid: impl FnOnce(&mut Graph, ValueId, At) -> Result<ValueId>,
    ) -> Result<ValueId> {
        let (x, at, mut skips) = self.lower_down(g, x, at)?;
        let mut x = mid(g, x, at)?;
        let mut at = at;
        for (i, block) in self.up.iter().enumerate() {
            let p = format!("up_blocks.{i}");
            for l in 0..block.layers() {
                let skip = skips.pop().expect("one skip per up layer");
                let cat = node(
                    g,
                    &format!("{p}.resnets.{l}.concat"),
                    "",
                    Arc::new(ConcatChannels),
                    &[x, skip],
                )?;
                x = block.lower_layer(g, &p, l, cat, self.context, at)?;
            }
            if let Some(conv) = block.resample() {
                let next = *skips.last().expect("a skip after every upsampler");
                let dims = g.info(next).shape.dims();
                let (height, width) = (dims[2], dims[3]);
                x = upsampler(g, &p, conv, x, (height, width))?;
                at = at.with_size(height, width);
            }
        }
        Ok(x)
    }

    /// The down path: its output, its size, and the skips it leaves.
    fn lower_down(&self, g: &mut Graph, x: ValueId, at: At) -> Result<(ValueId, At, Vec<ValueId>)> {
        let (mut x, mut at) = (x, at);
        let mut skips = vec![x];
        for (i, block) in self.down.iter().enumerate() {
            let p = format!("down_blocks.{i}");
            for l in 0..block.layers() {
                x = block.lower_layer(g, &p, l, x, self.context, at)?;
                skips.push(x);
            }
            if let Some(conv) = block.resample() {
                x = node(
                    g,
                    &format!("{p}.downsamplers.0.conv"),
                    "",
                    conv.clone(),
                    &[x],
                )?;
                at = at.with_size(at.dims.height.div_ceil(2), at.dims.width.div_ceil(2));
                skips.push(x);
            }
        }
        Ok((x, at, skips))
    }
}
