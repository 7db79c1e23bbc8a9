//! diffusers' `AutoencoderKL`: SD's VAE. AnimateDiff decodes every frame with it alone, so the
//! decoder is frame-wise throughout and slices along frames exactly.

use std::path::Path;
use std::sync::Arc;

use candle_nn::VarBuilder;
use streamline_ir::{Graph, Result as IrResult, ValueId};

use crate::blocks::autoencoder::{Autoencoder, MidBlock2D, VaeConfig, VaeDecoder};
use crate::blocks::{node, output_head, upsampler, At, ResnetBlock2D};
use crate::load::{check_block_lists, check_block_types, ModelError, Result};
use crate::ops::{Conv2d, GroupNormFrames, VideoDims};

#[derive(Debug)]
struct UpDecoderBlock2D {
    resnets: Vec<ResnetBlock2D>,
    upsample: Option<Arc<Conv2d>>,
}

/// diffusers' VAE `Decoder` (group norm, no spatial norm) with `post_quant_conv` in front.
#[derive(Debug)]
pub struct Decoder {
    post_quant_conv: Option<Arc<Conv2d>>,
    conv_in: Arc<Conv2d>,
    mid_block: MidBlock2D,
    up_blocks: Vec<UpDecoderBlock2D>,
    conv_norm_out: Arc<GroupNormFrames>,
    conv_out: Arc<Conv2d>,
}

impl Decoder {
    /// `vb` at the checkpoint root (`decoder.*`, `post_quant_conv.*`).
    fn build(c: &VaeConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let (post, vb) = (vb.pp("post_quant_conv"), vb.pp("decoder"));
        let ch = &c.block_out_channels;
        let (last, groups) = (ch[ch.len() - 1], c.norm_num_groups);
        let up_blocks = (0..ch.len())
            .map(|i| {
                let vb = vb.pp("up_blocks").pp(i);
                let out = ch[ch.len() - 1 - i];
                let prev = if i == 0 { last } else { ch[ch.len() - i] };
                let resnets = (0..c.layers_per_block + 1)
                    .map(|l| {
                        let c_in = if l == 0 { prev } else { out };
                        ResnetBlock2D::new(c_in, out, None, groups, 1e-6, vb.pp("resnets").pp(l))
                    })
                    .collect::<candle_core::Result<_>>()?;
                let upsample = (i + 1 < ch.len())
                    .then(|| {
                        Conv2d::new(out, out, 3, 1, 1, vb.pp("upsamplers.0.conv")).map(Arc::new)
                    })
                    .transpose()?;
                Ok(UpDecoderBlock2D { resnets, upsample })
            })
            .collect::<candle_core::Result<_>>()?;
        let l = c.latent_channels;
        Ok(Decoder {
            post_quant_conv: c
                .use_post_quant_conv
                .then(|| Conv2d::new(l, l, 1, 1, 0, post).map(Arc::new))
                .transpose()?,
            conv_in: Arc::new(Conv2d::new(l, last, 3, 1, 1, vb.pp("conv_in"))?),
            mid_block: MidBlock2D::new(c, groups, vb.pp("mid_block"))?,
            up_blocks,
            conv_norm_out: Arc::new(GroupNormFrames::new(
                groups,
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
        })
    }
}

/// SD's VAE: the image encoder and the 2D decoder.
pub type AutoencoderKL = Autoencoder<Decoder>;

impl VaeDecoder for Decoder {
    fn groups(config: &VaeConfig) -> (usize, &'static str) {
        (config.norm_num_groups, "`norm_num_groups`")
    }

    fn check(config: &VaeConfig, path: &Path) -> Result<()> {
        check(config, path)
    }

    fn new(config: &VaeConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        Decoder::build(config, vb)
    }

    fn lower(&self, g: &mut Graph, latents: ValueId, dims: VideoDims) -> IrResult<ValueId> {
        let at = At {
            dims,
            emb: None,
            split_norms: true,
        };
        let (d, mut at) = (self, at);
        let mut x = latents;
        if let Some(conv) = &d.post_quant_conv {
            x = node(g, "post_quant_conv", "", conv.clone(), &[x])?;
        }
        x = node(g, "decoder.conv_in", "", d.conv_in.clone(), &[x])?;
        x = d.mid_block.lower(g, "decoder.mid_block", x, at)?;
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
        output_head(g, "decoder", (&d.conv_norm_out, true), &d.conv_out, x)
    }
}

/// The decoder's block types and the activation (the encoder checks the rest).
fn check(config: &VaeConfig, path: &Path) -> Result<()> {
    // diffusers' `get_activation` makes "swish" a SiLU too.
    if !matches!(config.act_fn.as_str(), "silu" | "swish") {
        return Err(ModelError::Unsupported {
            path: path.to_path_buf(),
            field: "act_fn".into(),
            value: config.act_fn.clone(),
            reason: "only silu (or its alias swish) is supported".into(),
        });
    }
    let lists = [("up_block_types", config.up_block_types.len())];
    check_block_lists(path, config.block_out_channels.len(), &lists)?;
    check_block_types(
        path,
        "up_block_types",
        &config.up_block_types,
        "UpDecoderBlock2D",
        "the VAE decoder has only UpDecoderBlock2D",
    )
}
