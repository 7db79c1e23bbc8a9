//! What SD's `AutoencoderKL` and SVD's `AutoencoderKLTemporalDecoder` share: the config, the
//! image encoder (with `quant_conv`), the mid block and the latent distribution.

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;
use streamline_ir::{Graph, Layout, Result as IrResult, ValueId, ValueInfo};

use super::{node, output_head, At, ResnetBlock2D};
use crate::load::{
    check_block_lists, check_block_types, check_groups, load_config, weights_file, ModelError,
    Result, WeightSource,
};
use crate::ops::{Add, Attention, Context, Conv2d, GroupNormFrames, PadEnd, Tokens, VideoDims};

/// Fields of a VAE's config.json (both classes); unknown fields are ignored.
#[derive(Clone, Debug, Deserialize)]
pub struct VaeConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub down_block_types: Vec<String>,
    /// `AutoencoderKL` only (the temporal decoder has fixed blocks).
    #[serde(default)]
    pub up_block_types: Vec<String>,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub latent_channels: usize,
    #[serde(default = "default_scaling")]
    pub scaling_factor: f64,
    /// `AutoencoderKL` only: the temporal VAE's GroupNorms have 32 groups whatever the config
    /// says, as diffusers builds them.
    #[serde(default = "default_groups")]
    pub norm_num_groups: usize,
    /// `AutoencoderKL` only, like `norm_num_groups` (the temporal VAE's is SiLU).
    #[serde(default = "default_act")]
    pub act_fn: String,
    #[serde(default = "yes")]
    pub mid_block_add_attention: bool,
    /// `AutoencoderKL` only; the temporal VAE always has `quant_conv` and no `post_quant_conv`.
    #[serde(default = "yes")]
    pub use_quant_conv: bool,
    #[serde(default = "yes")]
    pub use_post_quant_conv: bool,
}

fn default_scaling() -> f64 {
    0.18215
}

fn default_groups() -> usize {
    32
}

fn default_act() -> String {
    "silu".into()
}

fn yes() -> bool {
    true
}

impl VaeConfig {
    /// Stable Video Diffusion's VAE (`stabilityai/stable-video-diffusion-img2vid`'s vae/).
    pub fn svd() -> Self {
        VaeConfig {
            in_channels: 3,
            out_channels: 3,
            down_block_types: vec!["DownEncoderBlock2D".to_string(); 4],
            up_block_types: Vec::new(),
            block_out_channels: vec![128, 256, 512, 512],
            layers_per_block: 2,
            latent_channels: 4,
            scaling_factor: 0.18215,
            norm_num_groups: 32,
            act_fn: default_act(),
            mid_block_add_attention: true,
            use_quant_conv: true,
            use_post_quant_conv: true,
        }
    }

    /// Stable Diffusion 1.5's VAE (`AutoencoderKL`; AnimateDiff decodes with it).
    pub fn sd() -> Self {
        VaeConfig {
            up_block_types: vec!["UpDecoderBlock2D".to_string(); 4],
            ..Self::svd()
        }
    }

    /// Pixels per latent along each side: `2^(blocks - 1)`.
    pub fn scale_factor(&self) -> usize {
        1 << (self.block_out_channels.len().max(1) - 1)
    }

    /// Reject what the encoder cannot build with `groups` GroupNorm groups (from `source`),
    /// and a `scaling_factor` the latents cannot be divided by, naming the file and the field.
    pub(crate) fn check(&self, path: &Path, (groups, source): (usize, &str)) -> Result<()> {
        let scaling = self.scaling_factor;
        if !(scaling.is_finite() && scaling > 0.0) {
            return Err(ModelError::Unsupported {
                path: path.to_path_buf(),
                field: "scaling_factor".into(),
                value: scaling.to_string(),
                reason: "latents are divided by it before decoding, so it must be positive and \
                         finite"
                    .into(),
            });
        }
        let blocks = self.block_out_channels.len();
        check_block_lists(
            path,
            blocks,
            &[("down_block_types", self.down_block_types.len())],
        )?;
        check_block_types(
            path,
            "down_block_types",
            &self.down_block_types,
            "DownEncoderBlock2D",
            "the VAE encoder has only DownEncoderBlock2D",
        )?;
        check_groups(path, &self.block_out_channels, groups, source)
    }
}

/// Single-head self-attention over each frame's pixels with a GroupNorm in front and a
/// residual, as the VAE mid blocks use it.
#[derive(Debug)]
pub(crate) struct VaeAttention {
    group_norm: Arc<GroupNormFrames>,
    attn: Arc<Attention>,
}

impl VaeAttention {
    pub fn new(c: usize, groups: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(VaeAttention {
            group_norm: Arc::new(GroupNormFrames::new(groups, c, 1e-6, vb.pp("group_norm"))?),
            attn: Arc::new(Attention::new(c, 1, c, Context::SelfAttention, true, vb)?),
        })
    }

    pub fn lower(&self, g: &mut Graph, p: &str, x: ValueId, dims: VideoDims) -> IrResult<ValueId> {
        let (height, width) = (dims.height, dims.width);
        let tokens = |to_tokens| {
            Arc::new(Tokens {
                height,
                width,
                to_tokens,
            })
        };
        let h = node(g, p, "group_norm", self.group_norm.clone(), &[x])?;
        let h = node(g, p, "to_tokens", tokens(true), &[h])?;
        let h = node(g, p, "", self.attn.clone(), &[h])?;
        let h = node(g, p, "from_tokens", tokens(false), &[h])?;
        node(g, p, "residual", Arc::new(Add), &[h, x])
    }
}

/// diffusers' `UNetMidBlock2D` as VAEs use it, on the deepest block's channels: resnet,
/// attention (unless the config drops it), resnet.
#[derive(Debug)]
pub(crate) struct MidBlock2D {
    resnets: [ResnetBlock2D; 2],
    attention: Option<VaeAttention>,
}

impl MidBlock2D {
    pub fn new(config: &VaeConfig, groups: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        let c = config.block_out_channels[config.block_out_channels.len() - 1];
        let resnet =
            |l: usize| ResnetBlock2D::new(c, c, None, groups, 1e-6, vb.pp("resnets").pp(l));
        Ok(MidBlock2D {
            resnets: [resnet(0)?, resnet(1)?],
            attention: config
                .mid_block_add_attention
                .then(|| VaeAttention::new(c, groups, vb.pp("attentions.0")))
                .transpose()?,
        })
    }

    pub fn lower(&self, g: &mut Graph, p: &str, x: ValueId, at: At) -> IrResult<ValueId> {
        let mut x = self.resnets[0].lower(g, &format!("{p}.resnets.0"), x, at)?;
        if let Some(attn) = &self.attention {
            x = attn.lower(g, &format!("{p}.attentions.0"), x, at.dims)?;
        }
        self.resnets[1].lower(g, &format!("{p}.resnets.1"), x, at)
    }
}

#[derive(Debug)]
struct EncoderBlock {
    resnets: Vec<ResnetBlock2D>,
    downsample: Option<Arc<Conv2d>>,
}

/// diffusers' VAE `Encoder` plus `quant_conv`: image to latent moments.
#[derive(Debug)]
pub(crate) struct KlEncoder {
    in_channels: usize,
    conv_in: Arc<Conv2d>,
    down_blocks: Vec<EncoderBlock>,
    mid_block: MidBlock2D,
    conv_norm_out: Arc<GroupNormFrames>,
    conv_out: Arc<Conv2d>,
    quant_conv: Option<Arc<Conv2d>>,
    dtype: DType,
}

impl KlEncoder {
    /// `vb` at the checkpoint root (`encoder.*`, `quant_conv.*`).
    pub fn new(c: &VaeConfig, groups: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        let dtype = vb.dtype();
        let (quant, vb) = (vb.pp("quant_conv"), vb.pp("encoder"));
        let ch = &c.block_out_channels;
        let last = ch[ch.len() - 1];
        let down_blocks = ch
            .iter()
            .enumerate()
            .map(|(i, &out)| {
                let vb = vb.pp("down_blocks").pp(i);
                let resnets = (0..c.layers_per_block)
                    .map(|l| {
                        let c_in = match (l, i) {
                            (0, 0) => ch[0],
                            (0, _) => ch[i - 1],
                            _ => out,
                        };
                        ResnetBlock2D::new(c_in, out, None, groups, 1e-6, vb.pp("resnets").pp(l))
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
        let l = 2 * c.latent_channels;
        Ok(KlEncoder {
            in_channels: c.in_channels,
            conv_in: Arc::new(Conv2d::new(
                c.in_channels,
                ch[0],
                3,
                1,
                1,
                vb.pp("conv_in"),
            )?),
            down_blocks,
            mid_block: MidBlock2D::new(c, groups, vb.pp("mid_block"))?,
            conv_norm_out: Arc::new(GroupNormFrames::new(
                groups,
                last,
                1e-6,
                vb.pp("conv_norm_out"),
            )?),
            conv_out: Arc::new(Conv2d::new(last, l, 3, 1, 1, vb.pp("conv_out"))?),
            quant_conv: c
                .use_quant_conv
                .then(|| Conv2d::new(l, l, 1, 1, 0, quant).map(Arc::new))
                .transpose()?,
            dtype,
        })
    }

    /// Encoder graph: input `image` `(N, in_channels, H, W)` in [-1, 1]; output the moments
    /// `(N, 2*latent, H/s, W/s)` (see [`LatentDist::from_moments`]).
    pub fn lower(&self, n: usize, height: usize, width: usize) -> IrResult<Graph> {
        let mut g = Graph::new();
        let image = g.input(
            "image",
            ValueInfo::new(
                (n, self.in_channels, height, width),
                self.dtype,
                Layout::IMAGES,
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
            split_norms: false,
        };
        let mut x = node(
            &mut g,
            "encoder.conv_in",
            "",
            self.conv_in.clone(),
            &[image],
        )?;
        for (i, block) in self.down_blocks.iter().enumerate() {
            let p = format!("encoder.down_blocks.{i}");
            for (l, r) in block.resnets.iter().enumerate() {
                x = r.lower(&mut g, &format!("{p}.resnets.{l}"), x, at)?;
            }
            if let Some(conv) = &block.downsample {
                let p = format!("{p}.downsamplers.0");
                let padded = node(&mut g, &p, "pad", Arc::new(PadEnd), &[x])?;
                x = node(&mut g, &p, "conv", conv.clone(), &[padded])?;
                at = at.with_size(at.dims.height / 2, at.dims.width / 2);
            }
        }
        x = self.mid_block.lower(&mut g, "encoder.mid_block", x, at)?;
        let mut h = output_head(
            &mut g,
            "encoder",
            (&self.conv_norm_out, false),
            &self.conv_out,
            x,
        )?;
        if let Some(conv) = &self.quant_conv {
            h = node(&mut g, "quant_conv", "", conv.clone(), &[h])?;
        }
        g.set_outputs(&[h]);
        Ok(g)
    }
}

/// The decoder half of a VAE class: what differs between SD's `AutoencoderKL` and SVD's
/// `AutoencoderKLTemporalDecoder` (the encoder half is the same [`KlEncoder`]).
pub trait VaeDecoder: Sized + std::fmt::Debug {
    /// The GroupNorm groups of the whole VAE, encoder included, and where they come from (for
    /// errors).
    fn groups(config: &VaeConfig) -> (usize, &'static str);
    /// Checks beyond the encoder's, naming `path` and the field.
    fn check(config: &VaeConfig, path: &Path) -> Result<()>;
    /// `vb` at the checkpoint root.
    fn new(config: &VaeConfig, vb: VarBuilder) -> candle_core::Result<Self>;
    /// Lower on `latents` `(B*T, latent, h, w)` of extent `dims`; returns the frames.
    fn lower(&self, g: &mut Graph, latents: ValueId, dims: VideoDims) -> IrResult<ValueId>;
}

/// A VAE with weights; the encoder and the decoder each lower to an IR graph.
#[derive(Debug)]
pub struct Autoencoder<D> {
    config: VaeConfig,
    encoder: KlEncoder,
    decoder: D,
    dtype: DType,
}

impl<D: VaeDecoder> Autoencoder<D> {
    /// Load a diffusers `vae/` folder (`config.json`, `diffusion_pytorch_model[.fp16].safetensors`).
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let config = Self::read_config(dir)?;
        let file = weights_file(dir, "diffusion_pytorch_model")?;
        let vb = WeightSource::open(&file)?.var_builder(dtype, device);
        Self::new(&config, vb).map_err(|error| ModelError::Weights { path: file, error })
    }

    /// The checked `config.json` of a `vae/` folder, without its weights (a pipeline reads
    /// every config before any weights load).
    pub fn read_config(dir: &Path) -> Result<VaeConfig> {
        let config_path = dir.join("config.json");
        let config: VaeConfig = load_config(&config_path)?;
        config.check(&config_path, D::groups(&config))?;
        D::check(&config, &config_path)?;
        Ok(config)
    }

    pub fn new(config: &VaeConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let path = Path::new("config.json");
        config
            .check(path, D::groups(config))
            .and_then(|()| D::check(config, path))
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        Ok(Autoencoder {
            config: config.clone(),
            encoder: KlEncoder::new(config, D::groups(config).0, vb.clone())?,
            decoder: D::new(config, vb.clone())?,
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
    /// `(N, 2*latent, H/s, W/s)` (see [`LatentDist::from_moments`]).
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
        let mut g = Graph::new();
        let latents = g.input(
            "latents",
            ValueInfo::new(
                (batch * frames, self.config.latent_channels, height, width),
                self.dtype,
                Layout::IMAGES,
            ),
        )?;
        let dims = VideoDims {
            batch,
            frames,
            height,
            width,
        };
        let out = self.decoder.lower(&mut g, latents, dims)?;
        g.set_outputs(&[out]);
        Ok(g)
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
