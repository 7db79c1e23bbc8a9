//! diffusers' `AutoencoderKLTemporalDecoder`: SD's image encoder and SVD's temporal decoder.

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use streamline_ir::{Graph, Layout, Result as IrResult, ValueInfo};

use super::resnet::{ResBlockSettings, SpatioTemporalResBlock};
use crate::blocks::autoencoder::{KlEncoder, VaeAttention, VaeConfig};
use crate::blocks::{node, output_head, upsampler, At};
use crate::load::{load_config, weights_file, ModelError, Result, WeightSource};
use crate::ops::{
    Conv2d, FrameLayout, FramesToPositions, GroupNormFrames, PositionsToFrames, TemporalConv,
    VideoDims,
};

#[derive(Debug)]
struct DecoderBlock {
    resnets: Vec<SpatioTemporalResBlock>,
    upsample: Option<Arc<Conv2d>>,
}

#[derive(Debug)]
struct TemporalDecoder {
    conv_in: Arc<Conv2d>,
    mid_resnets: Vec<SpatioTemporalResBlock>,
    mid_attention: VaeAttention,
    up_blocks: Vec<DecoderBlock>,
    conv_norm_out: Arc<GroupNormFrames>,
    conv_out: Arc<Conv2d>,
    time_conv_out: Arc<TemporalConv>,
}

const DECODER_RES: ResBlockSettings = ResBlockSettings {
    temb: None,
    eps: 1e-6,
    temporal_eps: 1e-5,
    switch_spatial_to_temporal_mix: true,
};

impl TemporalDecoder {
    fn new(c: &VaeConfig, vb: VarBuilder) -> candle_core::Result<Self> {
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
            mid_attention: VaeAttention::new(last, mid.pp("attentions.0"))?,
            up_blocks,
            conv_norm_out: Arc::new(GroupNormFrames::new(
                32,
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
        })
    }
}

/// SVD's VAE with weights; the encoder and the temporal decoder each lower to an IR graph.
#[derive(Debug)]
pub struct AutoencoderKLTemporalDecoder {
    config: VaeConfig,
    encoder: KlEncoder,
    decoder: TemporalDecoder,
    dtype: DType,
}

impl AutoencoderKLTemporalDecoder {
    /// Load a diffusers `vae/` folder (`config.json`, `diffusion_pytorch_model[.fp16].safetensors`).
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let config_path = dir.join("config.json");
        let config: VaeConfig = load_config(&config_path)?;
        config.check(&config_path)?;
        let file = weights_file(dir, "diffusion_pytorch_model")?;
        let vb = WeightSource::open(&file)?.var_builder(dtype, device);
        Self::new(&config, vb).map_err(|source| ModelError::Weights { path: file, source })
    }

    pub fn new(config: &VaeConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        config
            .check(Path::new("config.json"))
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        Ok(AutoencoderKLTemporalDecoder {
            config: config.clone(),
            encoder: KlEncoder::new(config, vb.clone())?,
            decoder: TemporalDecoder::new(config, vb.pp("decoder"))?,
            dtype: vb.dtype(),
        })
    }

    pub fn config(&self) -> &VaeConfig {
        &self.config
    }

    /// Pixels per latent along each side: `2^(blocks - 1)`.
    pub fn scale_factor(&self) -> usize {
        self.config.scale_factor()
    }

    /// Encoder graph: input `image` `(N, in_channels, H, W)` in [-1, 1]; output the moments
    /// `(N, 2*latent, H/s, W/s)` (see [`crate::blocks::autoencoder::LatentDist::from_moments`]).
    pub fn lower_encoder(&self, n: usize, height: usize, width: usize) -> IrResult<Graph> {
        self.encoder.lower(n, height, width)
    }

    /// Decoder graph for `batch` videos of `frames` frames: input `latents`
    /// `(B*T, latent, h, w)` (already divided by the scaling factor); output frames
    /// `(B*T, out_channels, h*s, w*s)` in about [-1, 1].
    pub fn lower_decoder(
        &self,
        batch: usize,
        frames: usize,
        height: usize,
        width: usize,
    ) -> IrResult<Graph> {
        let d = &self.decoder;
        let mut g = Graph::new();
        let latents = g.input(
            "latents",
            ValueInfo::new(
                (batch * frames, self.config.latent_channels, height, width),
                self.dtype,
                Layout::FRAME_MAJOR,
            ),
        )?;
        let mut at = At {
            dims: VideoDims {
                batch,
                frames,
                height,
                width,
            },
            emb: None,
        };
        let mut x = node(&mut g, "decoder.conv_in", "", d.conv_in.clone(), &[latents])?;
        x = d.mid_resnets[0].lower(&mut g, "decoder.mid_block.resnets.0", x, at)?;
        // diffusers zips the remaining resnets with its single attention.
        if let Some(r) = d.mid_resnets.get(1) {
            x = d
                .mid_attention
                .lower(&mut g, "decoder.mid_block.attentions.0", x, at.dims)?;
            x = r.lower(&mut g, "decoder.mid_block.resnets.1", x, at)?;
        }
        for (i, block) in d.up_blocks.iter().enumerate() {
            let p = format!("decoder.up_blocks.{i}");
            for (l, r) in block.resnets.iter().enumerate() {
                x = r.lower(&mut g, &format!("{p}.resnets.{l}"), x, at)?;
            }
            if let Some(conv) = &block.upsample {
                x = upsampler(&mut g, &p, conv, x)?;
                at = at.with_size(2 * at.dims.height, 2 * at.dims.width);
            }
        }
        let h = output_head(&mut g, "decoder", &d.conv_norm_out, &d.conv_out, x)?;
        let c = self.config.out_channels;
        let to_positions = FramesToPositions {
            dims: at.dims,
            channels: c,
            from: FrameLayout::ChannelsFirst,
        };
        let p = node(
            &mut g,
            "decoder.time_conv_out.to_positions",
            "",
            Arc::new(to_positions),
            &[h],
        )?;
        let p = node(
            &mut g,
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
            &mut g,
            "decoder.time_conv_out.to_frames",
            "",
            Arc::new(to_frames),
            &[p],
        )?;
        g.set_outputs(&[out]);
        Ok(g)
    }
}
