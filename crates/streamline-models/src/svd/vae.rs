//! diffusers' `AutoencoderKLTemporalDecoder`: SD's image encoder and SVD's temporal decoder.

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;
use streamline_ir::{Graph, Layout, Result as IrResult, ValueId, ValueInfo};

use super::resnet::{At, ResBlockSettings, ResnetBlock2D, SpatioTemporalResBlock};
use super::{node, output_head, upsampler};
use crate::load::{load_config, weights_file, ModelError, Result, WeightSource};
use crate::ops::{
    Add, Attention, Context, Conv2d, FrameLayout, FramesToPositions, GroupNormFrames, PadEnd,
    PositionsToFrames, TemporalConv, Tokens, VideoDims,
};

/// Fields of the VAE's config.json; unknown fields are ignored.
#[derive(Clone, Debug, Deserialize)]
pub struct VaeConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub down_block_types: Vec<String>,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub latent_channels: usize,
    #[serde(default = "default_scaling")]
    pub scaling_factor: f64,
}

fn default_scaling() -> f64 {
    0.18215
}

impl VaeConfig {
    /// Stable Video Diffusion's VAE (`stabilityai/stable-video-diffusion-img2vid`'s vae/).
    pub fn svd() -> Self {
        VaeConfig {
            in_channels: 3,
            out_channels: 3,
            down_block_types: vec!["DownEncoderBlock2D".to_string(); 4],
            block_out_channels: vec![128, 256, 512, 512],
            layers_per_block: 2,
            latent_channels: 4,
            scaling_factor: 0.18215,
        }
    }

    fn check(&self, path: &Path) -> Result<()> {
        if self.block_out_channels.is_empty()
            || self.down_block_types.len() != self.block_out_channels.len()
        {
            return Err(ModelError::Config {
                path: path.to_path_buf(),
                reason: format!(
                    "`down_block_types` ({}) and `block_out_channels` ({}) must have one entry per block",
                    self.down_block_types.len(),
                    self.block_out_channels.len()
                ),
            });
        }
        if let Some((i, t)) = self
            .down_block_types
            .iter()
            .enumerate()
            .find(|(_, t)| *t != "DownEncoderBlock2D")
        {
            return Err(ModelError::Unsupported {
                path: path.to_path_buf(),
                field: format!("down_block_types[{i}]"),
                value: t.clone(),
                reason: "the temporal VAE's encoder has only DownEncoderBlock2D".into(),
            });
        }
        Ok(())
    }
}

/// Single-head self-attention over each frame's pixels with a GroupNorm in front and a
/// residual, as the VAE mid blocks use it.
#[derive(Debug)]
struct VaeAttention {
    group_norm: Arc<GroupNormFrames>,
    attn: Arc<Attention>,
}

impl VaeAttention {
    fn new(c: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(VaeAttention {
            group_norm: Arc::new(GroupNormFrames::new(32, c, 1e-6, vb.pp("group_norm"))?),
            attn: Arc::new(Attention::new(c, 1, c, Context::SelfAttention, true, vb)?),
        })
    }

    fn lower(&self, g: &mut Graph, p: &str, x: ValueId, dims: VideoDims) -> IrResult<ValueId> {
        let (height, width) = (dims.height, dims.width);
        let h = node(g, p, "group_norm", self.group_norm.clone(), &[x])?;
        let h = node(
            g,
            p,
            "to_tokens",
            Arc::new(Tokens {
                height,
                width,
                to_tokens: true,
            }),
            &[h],
        )?;
        let h = node(g, p, "", self.attn.clone(), &[h])?;
        let h = node(
            g,
            p,
            "from_tokens",
            Arc::new(Tokens {
                height,
                width,
                to_tokens: false,
            }),
            &[h],
        )?;
        node(g, p, "residual", Arc::new(Add), &[h, x])
    }
}

#[derive(Debug)]
struct EncoderBlock {
    resnets: Vec<ResnetBlock2D>,
    downsample: Option<Arc<Conv2d>>,
}

#[derive(Debug)]
struct Encoder {
    conv_in: Arc<Conv2d>,
    down_blocks: Vec<EncoderBlock>,
    mid_resnets: Vec<ResnetBlock2D>,
    mid_attention: VaeAttention,
    conv_norm_out: Arc<GroupNormFrames>,
    conv_out: Arc<Conv2d>,
}

impl Encoder {
    fn new(c: &VaeConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let ch = &c.block_out_channels;
        let last = ch[ch.len() - 1];
        let down_blocks = ch
            .iter()
            .enumerate()
            .map(|(i, &out)| {
                let vb = vb.pp("down_blocks").pp(i);
                let resnets = (0..c.layers_per_block)
                    .map(|l| {
                        let c_in = if l > 0 {
                            out
                        } else if i == 0 {
                            ch[0]
                        } else {
                            ch[i - 1]
                        };
                        ResnetBlock2D::new(c_in, out, None, 1e-6, vb.pp("resnets").pp(l))
                    })
                    .collect::<candle_core::Result<_>>()?;
                let downsample = (i + 1 < ch.len())
                    .then(|| {
                        Conv2d::new(out, out, 3, 2, 0, vb.pp("downsamplers.0.conv")).map(Arc::new)
                    })
                    .transpose()?;
                Ok(EncoderBlock {
                    resnets,
                    downsample,
                })
            })
            .collect::<candle_core::Result<_>>()?;
        let mid = vb.pp("mid_block");
        Ok(Encoder {
            conv_in: Arc::new(Conv2d::new(
                c.in_channels,
                ch[0],
                3,
                1,
                1,
                vb.pp("conv_in"),
            )?),
            down_blocks,
            mid_resnets: (0..2)
                .map(|l| ResnetBlock2D::new(last, last, None, 1e-6, mid.pp("resnets").pp(l)))
                .collect::<candle_core::Result<_>>()?,
            mid_attention: VaeAttention::new(last, mid.pp("attentions.0"))?,
            conv_norm_out: Arc::new(GroupNormFrames::new(
                32,
                last,
                1e-6,
                vb.pp("conv_norm_out"),
            )?),
            conv_out: Arc::new(Conv2d::new(
                last,
                2 * c.latent_channels,
                3,
                1,
                1,
                vb.pp("conv_out"),
            )?),
        })
    }
}

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

/// The latent distribution of an encoded image: diffusers' `DiagonalGaussianDistribution`.
#[derive(Clone, Debug)]
pub struct LatentDist {
    pub mean: Tensor,
    /// Clamped to [-30, 20], as diffusers does.
    pub logvar: Tensor,
}

impl LatentDist {
    /// Split the encoder's `(N, 2*latent, h, w)` moments into mean and log-variance.
    pub fn from_moments(moments: &Tensor) -> candle_core::Result<Self> {
        let c = moments.dim(1)? / 2;
        Ok(LatentDist {
            mean: moments.narrow(1, 0, c)?,
            logvar: moments.narrow(1, c, c)?.clamp(-30f32, 20f32)?,
        })
    }

    pub fn mode(&self) -> &Tensor {
        &self.mean
    }

    pub fn std(&self) -> candle_core::Result<Tensor> {
        (&self.logvar * 0.5)?.exp()
    }

    /// `mean + std * noise`, with the caller's unit noise (so runs are reproducible).
    pub fn sample(&self, noise: &Tensor) -> candle_core::Result<Tensor> {
        &self.mean + (self.std()? * noise)?
    }
}

/// SVD's VAE with weights; the encoder and the temporal decoder each lower to an IR graph.
#[derive(Debug)]
pub struct AutoencoderKLTemporalDecoder {
    config: VaeConfig,
    encoder: Encoder,
    quant_conv: Arc<Conv2d>,
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
        let l = 2 * config.latent_channels;
        Ok(AutoencoderKLTemporalDecoder {
            config: config.clone(),
            encoder: Encoder::new(config, vb.pp("encoder"))?,
            quant_conv: Arc::new(Conv2d::new(l, l, 1, 1, 0, vb.pp("quant_conv"))?),
            decoder: TemporalDecoder::new(config, vb.pp("decoder"))?,
            dtype: vb.dtype(),
        })
    }

    pub fn config(&self) -> &VaeConfig {
        &self.config
    }

    /// Pixels per latent along each side: `2^(blocks - 1)`.
    pub fn scale_factor(&self) -> usize {
        1 << (self.config.block_out_channels.len() - 1)
    }

    /// Encoder graph: input `image` `(N, in_channels, H, W)` in [-1, 1]; output the moments
    /// `(N, 2*latent, H/s, W/s)` (see [`LatentDist::from_moments`]).
    pub fn lower_encoder(&self, n: usize, height: usize, width: usize) -> IrResult<Graph> {
        let e = &self.encoder;
        let mut g = Graph::new();
        let image = g.input(
            "image",
            ValueInfo::new(
                (n, self.config.in_channels, height, width),
                self.dtype,
                Layout::FRAME_MAJOR,
            ),
        )?;
        let mut at = At {
            dims: VideoDims {
                batch: n,
                frames: 1,
                height,
                width,
            },
            emb: None,
        };
        let mut x = node(&mut g, "encoder.conv_in", "", e.conv_in.clone(), &[image])?;
        for (i, block) in e.down_blocks.iter().enumerate() {
            let p = format!("encoder.down_blocks.{i}");
            for (l, r) in block.resnets.iter().enumerate() {
                x = r.lower(&mut g, &format!("{p}.resnets.{l}"), x, at)?;
            }
            if let Some(conv) = &block.downsample {
                let padded = node(
                    &mut g,
                    &format!("{p}.downsamplers.0.pad"),
                    "",
                    Arc::new(PadEnd),
                    &[x],
                )?;
                x = node(
                    &mut g,
                    &format!("{p}.downsamplers.0.conv"),
                    "",
                    conv.clone(),
                    &[padded],
                )?;
                at = at.with_size(at.dims.height / 2, at.dims.width / 2);
            }
        }
        x = e.mid_resnets[0].lower(&mut g, "encoder.mid_block.resnets.0", x, at)?;
        x = e
            .mid_attention
            .lower(&mut g, "encoder.mid_block.attentions.0", x, at.dims)?;
        x = e.mid_resnets[1].lower(&mut g, "encoder.mid_block.resnets.1", x, at)?;
        let h = output_head(&mut g, "encoder", &e.conv_norm_out, &e.conv_out, x)?;
        let moments = node(&mut g, "quant_conv", "", self.quant_conv.clone(), &[h])?;
        g.set_outputs(&[moments]);
        Ok(g)
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
