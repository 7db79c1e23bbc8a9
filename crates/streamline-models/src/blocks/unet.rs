//! The blocks and skip stack of a UNet, shared by SVD's `UNetSpatioTemporalConditionModel` and
//! AnimateDiff's `UNetMotionModel`: the down path pushes `conv_in`'s output, every layer's
//! output and every downsampler's; each up layer pops one and concatenates it to its input.

use std::sync::Arc;

use candle_nn::VarBuilder;
use streamline_ir::{up_block_mark, Graph, Result, ValueId, SHALLOW_MARK};

use super::{node, upsampler, At};
use crate::ops::{ConcatChannels, Conv2d};

/// Where one layer of a block is lowered.
pub(crate) struct LayerAt<'a> {
    /// The block's name, `down_blocks.{i}` or `up_blocks.{i}`.
    pub block: &'a str,
    /// The layer's index in its block.
    pub index: usize,
    /// `encoder_hidden_states`, for cross-attention.
    pub context: ValueId,
    pub at: At,
}

impl LayerAt<'_> {
    /// The name of the layer's part in a checkpoint list: `{block}.{list}.{index}`.
    pub fn name(&self, list: &str) -> String {
        format!("{}.{list}.{}", self.block, self.index)
    }
}

/// One layer of a down or up block: a resnet and whatever follows it (a transformer, a motion
/// module), on the running value.
pub(crate) trait UNetLayer {
    fn lower(&self, g: &mut Graph, x: ValueId, layer: &LayerAt) -> Result<ValueId>;
}

/// A down or up block: its layers, then an optional resampling conv.
#[derive(Debug)]
pub(crate) struct UNetBlock<L> {
    pub layers: Vec<L>,
    /// The stride-2 conv of a down block, or the conv after the nearest resize of an up block.
    pub resample: Option<Arc<Conv2d>>,
}

/// Which half of a UNet a block is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Direction {
    Down,
    Up,
}

impl Direction {
    /// The checkpoint's list of blocks.
    pub fn list(self) -> &'static str {
        match self {
            Direction::Down => "down_blocks",
            Direction::Up => "up_blocks",
        }
    }
}

impl<L> UNetBlock<L> {
    /// Block `i` of a UNet of `channels` (`block_out_channels`) on its way `direction` (up
    /// blocks the deepest first), `vb` at the block, as diffusers wires them:
    /// `layer(l, in_channels, out_channels)` builds its layers. A down layer takes the previous
    /// block's or layer's output; an up layer that, concatenated with a skip. Every block but
    /// the last ends in a stride-2 conv (down) or the conv after a nearest resize (up).
    pub fn new(
        direction: Direction,
        channels: &[usize],
        i: usize,
        layers: usize,
        vb: &VarBuilder,
        mut layer: impl FnMut(usize, usize, usize) -> candle_core::Result<L>,
    ) -> candle_core::Result<Self> {
        let n = channels.len();
        let (c, stride, conv) = match direction {
            Direction::Down => (channels[i], 2, "downsamplers.0.conv"),
            Direction::Up => (channels[n - 1 - i], 1, "upsamplers.0.conv"),
        };
        let in_channels = |l: usize| match direction {
            Direction::Down if l == 0 => channels[i.saturating_sub(1)],
            Direction::Down => c,
            Direction::Up => {
                let running = if l == 0 {
                    channels[(n - i).min(n - 1)]
                } else {
                    c
                };
                let last_skip = channels[(n - 1 - i).saturating_sub(1)];
                running + if l + 1 == layers { last_skip } else { c }
            }
        };
        let layers = (0..layers)
            .map(|l| layer(l, in_channels(l), c))
            .collect::<candle_core::Result<_>>()?;
        let resample = (i + 1 < n)
            .then(|| Conv2d::new(c, c, 3, stride, 1, vb.pp(conv)).map(Arc::new))
            .transpose()?;
        Ok(UNetBlock { layers, resample })
    }
}

/// A UNet's blocks, lowered around its mid block.
pub(crate) struct SkipStack<'a, L> {
    pub down: &'a [UNetBlock<L>],
    pub up: &'a [UNetBlock<L>],
    /// `encoder_hidden_states`, handed to every layer.
    pub context: ValueId,
}

impl<L: UNetLayer> SkipStack<'_, L> {
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
            let p = up_block_mark(i);
            for (index, layer) in block.layers.iter().enumerate() {
                let skip = skips.pop().expect("one skip per up layer");
                let cat = node(
                    g,
                    &format!("{p}.resnets.{index}.concat"),
                    "",
                    Arc::new(ConcatChannels),
                    &[x, skip],
                )?;
                x = layer.lower(g, cat, &self.layer_at(&p, index, at))?;
            }
            if let Some(conv) = &block.resample {
                let next = *skips.last().expect("a skip after every upsampler");
                let dims = g.info(next).shape.dims();
                let (height, width) = (dims[2], dims[3]);
                x = upsampler(g, &p, conv, x, (height, width))?;
                at = at.with_size(height, width);
            }
            g.mark(&up_block_mark(i), x)?;
        }
        Ok(x)
    }

    /// The down path: its output, its size, and the skips it leaves.
    fn lower_down(&self, g: &mut Graph, x: ValueId, at: At) -> Result<(ValueId, At, Vec<ValueId>)> {
        let (mut x, mut at) = (x, at);
        let mut skips = vec![x];
        for (i, block) in self.down.iter().enumerate() {
            let p = format!("down_blocks.{i}");
            for (index, layer) in block.layers.iter().enumerate() {
                x = layer.lower(g, x, &self.layer_at(&p, index, at))?;
                if (i, index) == (0, 0) {
                    g.mark(SHALLOW_MARK, x)?;
                }
                skips.push(x);
            }
            if let Some(conv) = &block.resample {
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

    fn layer_at<'p>(&self, block: &'p str, index: usize, at: At) -> LayerAt<'p> {
        LayerAt {
            block,
            index,
            context: self.context,
            at,
        }
    }
}
