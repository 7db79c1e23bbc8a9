//! diffusers' `AutoencoderKL`: SD's VAE. AnimateDiff decodes every frame with it alone, so the
//! decoder is frame-wise throughout and slices along frames exactly.

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use streamline_ir::{Graph, Layout, Result as IrResult, ValueInfo};

use crate::blocks::autoencoder::{KlEncoder, MidBlock2D, VaeConfig};
use crate::blocks::{node, output_head, upsampler, At, ResnetBlock2D};
use crate::load::{load_config, weights_file, ModelError, Result, WeightSource};
use crate::ops::{Conv2d, GroupNormFrames, VideoDims};

#[derive(Debug)]
struct UpDecoderBlock2D {
    resnets: Vec<ResnetBlock2D>,
    upsample: Option<Arc<Conv2d>>,
}

/// diffusers' VAE `Decoder` (group norm, no spatial norm) with `post_quant_conv` in front.
#[derive(Debug)]
struct Decoder {
    post_quant_conv: Option<Arc<Conv2d>>,
    conv_in: Arc<Conv2d>,
    mid_block: MidBlock2D,
    up_blocks: Vec<UpDecoderBlock2D>,
    conv_norm_out: Arc<GroupNormFrames>,
    conv_out: Arc<Conv2d>,
}

impl Decoder {
    /// `vb` at the checkpoint root (`decoder.*`, `post_quant_conv.*`).
    fn new(c: &VaeConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let (post, vb) = (vb.pp("post_quant_conv"), vb.pp("decoder"));
        let ch = &c.block_out_channels;
        let last = ch[ch.len() - 1];
        let up_blocks = (0..ch.len())
            .map(|i| {
                let vb = vb.pp("up_blocks").pp(i);
                let out = ch[ch.len() - 1 - i];
                let prev = if i == 0 { last } else { ch[ch.len() - i] };
                let resnets = (0..c.layers_per_block + 1)
                    .map(|l| {
                        let c_in = if l == 0 { prev } else { out };
                        ResnetBlock2D::new(c_in, out, None, 1e-6, vb.pp("resnets").pp(l))
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
            mid_block: MidBlock2D::new(last, c.mid_block_add_attention, vb.pp("mid_block"))?,
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
        })
    }
}

/// SD's VAE with weights; the encoder and the decoder each lower to an IR graph.
#[derive(Debug)]
pub struct AutoencoderKL {
    config: VaeConfig,
    encoder: KlEncoder,
    decoder: Decoder,
    dtype: DType,
}

impl AutoencoderKL {
    /// Load a diffusers `vae/` folder (`config.json`, `diffusion_pytorch_model[.fp16].safetensors`).
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let config_path = dir.join("config.json");
        let config: VaeConfig = load_config(&config_path)?;
        check(&config, &config_path)?;
        let file = weights_file(dir, "diffusion_pytorch_model")?;
        let vb = WeightSource::open(&file)?.var_builder(dtype, device);
        Self::new(&config, vb).map_err(|source| ModelError::Weights { path: file, source })
    }

    pub fn new(config: &VaeConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        check(config, Path::new("config.json"))
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        Ok(AutoencoderKL {
            config: config.clone(),
            encoder: KlEncoder::new(config, vb.clone())?,
            decoder: Decoder::new(config, vb.clone())?,
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
    /// `(N, 2*latent, H/s, W/s)`.
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
        let mut x = latents;
        if let Some(conv) = &d.post_quant_conv {
            x = node(&mut g, "post_quant_conv", "", conv.clone(), &[x])?;
        }
        x = node(&mut g, "decoder.conv_in", "", d.conv_in.clone(), &[x])?;
        x = d.mid_block.lower(&mut g, "decoder.mid_block", x, at)?;
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
        let out = output_head(&mut g, "decoder", &d.conv_norm_out, &d.conv_out, x)?;
        g.set_outputs(&[out]);
        Ok(g)
    }
}

/// The encoder's checks, plus the decoder's block types.
fn check(config: &VaeConfig, path: &Path) -> Result<()> {
    config.check(path)?;
    let blocks = config.block_out_channels.len();
    if config.up_block_types.len() != blocks {
        return Err(ModelError::Config {
            path: path.to_path_buf(),
            reason: format!(
                "`up_block_types` ({}) must have one entry per block ({blocks})",
                config.up_block_types.len()
            ),
        });
    }
    if let Some((i, t)) = config
        .up_block_types
        .iter()
        .enumerate()
        .find(|(_, t)| *t != "UpDecoderBlock2D")
    {
        return Err(ModelError::Unsupported {
            path: path.to_path_buf(),
            field: format!("up_block_types[{i}]"),
            value: t.clone(),
            reason: "the VAE decoder has only UpDecoderBlock2D".into(),
        });
    }
    Ok(())
}
