//! diffusers' `AutoencoderKLTemporalDecoder`: SD's image encoder and SVD's temporal decoder.

use std::path::Path;
use std::sync::Arc;

use candle_nn::VarBuilder;
use streamline_ir::{Graph, Result as IrResult, ValueId};

use super::config::{SVD_GROUPS, SVD_GROUPS_SOURCE};
use super::resnet::{ResBlockSettings, SpatioTemporalResBlock};
use crate::blocks::autoencoder::{Autoencoder, VaeAttention, VaeConfig, VaeDecoder};
use crate::blocks::{node, output_head, upsampler, At};
use crate::load::Result;
use crate::ops::{
    Conv2d, FrameLayout, FramesToPositions, GroupNormFrames, PositionsToFrames, TemporalConv,
    VideoDims,
};

#[derive(Debug)]
struct DecoderBlock {
    resnets: Vec<SpatioTemporalResBlock>,
    upsample: Option<Arc<Conv2d>>,
}

/// SVD's temporal decoder: spatio-temporal res-blocks and a final (3, 1, 1) temporal conv.
#[derive(Debug)]
pub struct TemporalDecoder {
    conv_in: Arc<Conv2d>,
    mid_resnets: Vec<SpatioTemporalResBlock>,
    mid_attention: VaeAttention,
    up_blocks: Vec<DecoderBlock>,
    conv_norm_out: Arc<GroupNormFrames>,
    conv_out: Arc<Conv2d>,
    time_conv_out: Arc<TemporalConv>,
    out_channels: usize,
}

const DECODER_RES: ResBlockSettings = ResBlockSettings {
    temb: None,
    eps: 1e-6,
    temporal_eps: 1e-5,
    switch_spatial_to_temporal_mix: true,
};

impl TemporalDecoder {
    /// `vb` at `decoder`.
    fn build(c: &VaeConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let ch = &c.block_out_channels;
        let last = ch[ch.len() - 1];
        let mid = vb.pp("mid_block");
        let up_blocks = (0..ch.len())
            .map(|i| {
                let vb = vb.pp("up_blocks").pp(i);
                let out = ch[ch.len() - 1 - i];
                let prev = if i == 0 { last } else { ch[ch.len() - i] };
                let resnets = (0..c.layers_per_block + 1)
                    .map(|l| {
                        let c_in = if l == 0 { prev } else { out };
                        SpatioTemporalResBlock::new(c_in, out, DECODER_RES, vb.pp("resnets").pp(l))
                    })
                    .collect::<candle_core::Result<_>>()?;
                let upsample = (i + 1 < ch.len())
                    .then(|| {
                        Conv2d::new(out, out, 3, 1, 1, vb.pp("upsamplers.0.conv")).map(Arc::new)
                    })
                    .transpose()?;
                Ok(DecoderBlock { resnets, upsample })
            })
            .collect::<candle_core::Result<_>>()?;
        Ok(TemporalDecoder {
            conv_in: Arc::new(Conv2d::new(
                c.latent_channels,
                last,
                3,
                1,
                1,
                vb.pp("conv_in"),
            )?),
            mid_resnets: (0..c.layers_per_block)
                .map(|l| {
                    SpatioTemporalResBlock::new(last, last, DECODER_RES, mid.pp("resnets").pp(l))
                })
                .collect::<candle_core::Result<_>>()?,
            mid_attention: VaeAttention::new(last, SVD_GROUPS, mid.pp("attentions.0"))?,
            up_blocks,
            conv_norm_out: Arc::new(GroupNormFrames::new(
                SVD_GROUPS,
                ch[0],
                1e-6,
                vb.pp("conv_norm_out"),
            )?),
            conv_out: Arc::new(Conv2d::new(
                ch[0],
                c.out_channels,
                3,
                1,
                1,
                vb.pp("conv_out"),
            )?),
            time_conv_out: Arc::new(TemporalConv::new(
                c.out_channels,
                c.out_channels,
                3,
                vb.pp("time_conv_out"),
            )?),
            out_channels: c.out_channels,
        })
    }
}

/// SVD's VAE: SD's image encoder and the temporal decoder.
pub type AutoencoderKLTemporalDecoder = Autoencoder<TemporalDecoder>;

impl VaeDecoder for TemporalDecoder {
    fn groups(_: &VaeConfig) -> (usize, &'static str) {
        (SVD_GROUPS, SVD_GROUPS_SOURCE)
    }

    /// The temporal decoder's blocks are fixed by `block_out_channels`; nothing more to check.
    fn check(_: &VaeConfig, _: &Path) -> Result<()> {
        Ok(())
    }

    fn new(config: &VaeConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        TemporalDecoder::build(config, vb.pp("decoder"))
    }

    fn lower(&self, g: &mut Graph, latents: ValueId, dims: VideoDims) -> IrResult<ValueId> {
        let at = At {
            dims,
            emb: None,
            split_norms: true,
        };
        let (d, mut at) = (self, at);
        let mut x = node(g, "decoder.conv_in", "", d.conv_in.clone(), &[latents])?;
        x = d.mid_resnets[0].lower(g, "decoder.mid_block.resnets.0", x, at)?;
        // diffusers zips the remaining resnets with its single attention.
        if let Some(r) = d.mid_resnets.get(1) {
            x = d
                .mid_attention
                .lower(g, "decoder.mid_block.attentions.0", x, at.dims)?;
            x = r.lower(g, "decoder.mid_block.resnets.1", x, at)?;
        }
        for (i, block) in d.up_blocks.iter().enumerate() {
            let p = format!("decoder.up_blocks.{i}");
            for (l, r) in block.resnets.iter().enumerate() {
                x = r.lower(g, &format!("{p}.resnets.{l}"), x, at)?;
            }
            if let Some(conv) = &block.upsample {
                at = at.with_size(2 * at.dims.height, 2 * at.dims.width);
                x = upsampler(g, &p, conv, x, (at.dims.height, at.dims.width))?;
            }
        }
        let h = output_head(g, "decoder", (&d.conv_norm_out, true), &d.conv_out, x)?;
        let c = d.out_channels;
        let to_positions = FramesToPositions {
            dims: at.dims,
            channels: c,
            from: FrameLayout::ChannelsFirst,
        };
        let p = node(
            g,
            "decoder.time_conv_out.to_positions",
            "",
            Arc::new(to_positions),
            &[h],
        )?;
        let p = node(
            g,
            "decoder.time_conv_out",
            "",
            d.time_conv_out.clone(),
            &[p],
        )?;
        let to_frames = PositionsToFrames {
            dims: at.dims,
            channels: c,
            to: FrameLayout::ChannelsFirst,
        };
        let out = node(
            g,
            "decoder.time_conv_out.to_frames",
            "",
            Arc::new(to_frames),
            &[p],
        )?;
        Ok(out)
    }
}
