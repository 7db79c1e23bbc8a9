//! diffusers' `UNetMotionModel`: SD 1.5's `UNet2DConditionModel` with AnimateDiff motion
//! modules after every resnet/transformer pair (and in the mid block when the adapter has
//! one), assembled from an SD folder's `unet/` and a motion adapter folder as
//! `UNetMotionModel.from_unet2d` does. Spatial layers are frame-wise; motion modules are
//! position-wise.

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use streamline_ir::{Graph, Layout, Result as IrResult, ValueId, ValueInfo};

use super::config::{Block, Kind, MotionAdapterConfig, MotionUNetConfig, UNet2DConfig};
use super::motion::MotionModule;
use super::transformer::Transformer2DModel;
use crate::blocks::embedding::{sinusoid, TimestepEmbedding};
use crate::blocks::{node, output_head, At, ResnetBlock2D, SkipStack, UNetBlock};
use crate::load::{load_config, weights_file, ModelError, Result, WeightSource};
use crate::ops::{Conv2d, GroupNormFrames, Silu, VideoDims};
use crate::svd::UNetShape;

/// A down or up block: resnets, a transformer and a motion module after each, and an
/// optional resampling conv.
#[derive(Debug)]
struct MotionBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    motion_modules: Vec<MotionModule>,
    /// Downsampling conv (stride 2) or upsampling conv (after the nearest resize).
    resample: Option<Arc<Conv2d>>,
}

impl MotionBlock {
    /// `resnet_in(l)`: input channels of resnet `l`; `vb` / `adapter` at the block.
    fn new(
        spec: &Block,
        config: &MotionUNetConfig,
        resnet_in: impl Fn(usize) -> usize,
        resample: Option<Arc<Conv2d>>,
        vb: &VarBuilder,
        adapter: &VarBuilder,
    ) -> candle_core::Result<Self> {
        let c = spec.channels;
        let u = &config.unet;
        let resnets = (0..spec.layers)
            .map(|l| {
                ResnetBlock2D::new(
                    resnet_in(l),
                    c,
                    Some(config.time_embed_dim()),
                    u.norm_num_groups,
                    u.norm_eps,
                    vb.pp("resnets").pp(l),
                )
            })
            .collect::<candle_core::Result<_>>()?;
        let attentions = match spec.kind {
            Kind::Plain => Vec::new(),
            Kind::CrossAttn => (0..spec.layers)
                .map(|l| {
                    Transformer2DModel::new(
                        c,
                        spec.heads,
                        spec.transformer_layers,
                        spec.cross_attention_dim,
                        u.use_linear_projection,
                        u.norm_num_groups,
                        vb.pp("attentions").pp(l),
                    )
                })
                .collect::<candle_core::Result<_>>()?,
        };
        let motion_modules = (0..spec.layers)
            .map(|l| {
                MotionModule::with_groups(
                    c,
                    spec.motion_heads,
                    spec.motion_layers,
                    config.adapter.motion_max_seq_length,
                    u.norm_num_groups,
                    adapter.pp("motion_modules").pp(l),
                )
            })
            .collect::<candle_core::Result<_>>()?;
        Ok(MotionBlock {
            resnets,
            attentions,
            motion_modules,
            resample,
        })
    }
}

impl UNetBlock for MotionBlock {
    fn layers(&self) -> usize {
        self.resnets.len()
    }

    /// Resnet `l`, then its transformer (cross-attention blocks) and its motion module.
    fn lower_layer(
        &self,
        g: &mut Graph,
        p: &str,
        l: usize,
        x: ValueId,
        context: ValueId,
        at: At,
    ) -> IrResult<ValueId> {
        let mut x = self.resnets[l].lower(g, &format!("{p}.resnets.{l}"), x, at)?;
        if let Some(attn) = self.attentions.get(l) {
            x = attn.lower(g, &format!("{p}.attentions.{l}"), x, context, at)?;
        }
        self.motion_modules[l].lower(g, &format!("{p}.motion_modules.{l}"), x, at.dims)
    }

    fn resample(&self) -> Option<&Arc<Conv2d>> {
        self.resample.as_ref()
    }
}

/// `UNetMidBlockCrossAttnMotion` (or `UNetMidBlock2DCrossAttn` without a motion mid block):
/// resnet, transformer, motion module, resnet.
#[derive(Debug)]
struct MidBlock {
    resnets: [ResnetBlock2D; 2],
    attention: Transformer2DModel,
    motion_module: Option<MotionModule>,
}

impl MidBlock {
    fn lower(&self, g: &mut Graph, x: ValueId, context: ValueId, at: At) -> IrResult<ValueId> {
        let mut x = self.resnets[0].lower(g, "mid_block.resnets.0", x, at)?;
        x = self
            .attention
            .lower(g, "mid_block.attentions.0", x, context, at)?;
        if let Some(m) = &self.motion_module {
            x = m.lower(g, "mid_block.motion_modules.0", x, at.dims)?;
        }
        self.resnets[1].lower(g, "mid_block.resnets.1", x, at)
    }
}

/// The AnimateDiff UNet with weights; [`UNetMotionModel::lower`] turns it into an IR graph for
/// one video size.
#[derive(Debug)]
pub struct UNetMotionModel {
    config: MotionUNetConfig,
    conv_in: Arc<Conv2d>,
    time_embedding: TimestepEmbedding,
    down_blocks: Vec<MotionBlock>,
    mid_block: MidBlock,
    up_blocks: Vec<MotionBlock>,
    conv_norm_out: Arc<GroupNormFrames>,
    conv_out: Arc<Conv2d>,
    dtype: DType,
}

impl UNetMotionModel {
    /// Load SD 1.5's `unet/` folder and a motion adapter folder (each `config.json` and
    /// `diffusion_pytorch_model[.fp16].safetensors`).
    pub fn load(
        unet_dir: &Path,
        adapter_dir: &Path,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let (unet_config, adapter_config) = (
            unet_dir.join("config.json"),
            adapter_dir.join("config.json"),
        );
        let unet: UNet2DConfig = load_config(&unet_config)?;
        let adapter: MotionAdapterConfig = load_config(&adapter_config)?;
        let config = MotionUNetConfig::new(unet, &unet_config, adapter, &adapter_config)?;
        let unet_file = weights_file(unet_dir, "diffusion_pytorch_model")?;
        let adapter_file = weights_file(adapter_dir, "diffusion_pytorch_model")?;
        let vb = WeightSource::open(&unet_file)?.var_builder(dtype, device);
        let adapter = WeightSource::open(&adapter_file)?.var_builder(dtype, device);
        // A missing tensor names itself; say which of the two files lacked it.
        Self::new(&config, vb, adapter).map_err(|source| {
            let path = if source.to_string().contains("motion_modules") {
                adapter_file.clone()
            } else {
                unet_file.clone()
            };
            ModelError::Weights { path, source }
        })
    }

    /// Build from checked configs; `vb` reads the UNet's tensors, `adapter` the motion
    /// modules' (both at the checkpoint root).
    pub fn new(
        config: &MotionUNetConfig,
        vb: VarBuilder,
        adapter: VarBuilder,
    ) -> candle_core::Result<Self> {
        let u = &config.unet;
        let ch = &u.block_out_channels;
        let n = ch.len();
        let temb = config.time_embed_dim();
        let mut down_blocks = Vec::new();
        for (i, spec) in config.down.iter().enumerate() {
            let (vb, ad) = (vb.pp("down_blocks").pp(i), adapter.pp("down_blocks").pp(i));
            let in_c = if i == 0 { ch[0] } else { ch[i - 1] };
            let resample = (i + 1 < n)
                .then(|| {
                    Conv2d::new(ch[i], ch[i], 3, 2, 1, vb.pp("downsamplers.0.conv")).map(Arc::new)
                })
                .transpose()?;
            let resnet_in = |l: usize| if l == 0 { in_c } else { ch[i] };
            down_blocks.push(MotionBlock::new(
                spec, config, resnet_in, resample, &vb, &ad,
            )?);
        }
        let last = &config.down[n - 1];
        let (mid, mid_ad) = (vb.pp("mid_block"), adapter.pp("mid_block"));
        let mid_resnet = |l: usize| {
            ResnetBlock2D::new(
                ch[n - 1],
                ch[n - 1],
                Some(temb),
                u.norm_num_groups,
                u.norm_eps,
                mid.pp("resnets").pp(l),
            )
        };
        let mid_block = MidBlock {
            resnets: [mid_resnet(0)?, mid_resnet(1)?],
            attention: Transformer2DModel::new(
                ch[n - 1],
                last.heads,
                last.transformer_layers,
                last.cross_attention_dim,
                u.use_linear_projection,
                u.norm_num_groups,
                mid.pp("attentions.0"),
            )?,
            motion_module: config
                .mid_motion_layers
                .as_ref()
                .map(|layers| {
                    MotionModule::with_groups(
                        ch[n - 1],
                        last.motion_heads,
                        layers[0],
                        config.adapter.motion_max_seq_length,
                        u.norm_num_groups,
                        mid_ad.pp("motion_modules.0"),
                    )
                })
                .transpose()?,
        };
        let mut up_blocks = Vec::new();
        for (i, spec) in config.up.iter().enumerate() {
            let (vb, ad) = (vb.pp("up_blocks").pp(i), adapter.pp("up_blocks").pp(i));
            let out_c = ch[n - 1 - i];
            let prev_c = if i == 0 { ch[n - 1] } else { ch[n - i] };
            let skip_in = ch[(n - 1 - i).saturating_sub(1)];
            let resnet_in = |l: usize| {
                let skip = if l + 1 == spec.layers { skip_in } else { out_c };
                let res_in = if l == 0 { prev_c } else { out_c };
                res_in + skip
            };
            let resample = (i + 1 < n)
                .then(|| {
                    Conv2d::new(out_c, out_c, 3, 1, 1, vb.pp("upsamplers.0.conv")).map(Arc::new)
                })
                .transpose()?;
            up_blocks.push(MotionBlock::new(
                spec, config, resnet_in, resample, &vb, &ad,
            )?);
        }
        Ok(UNetMotionModel {
            config: config.clone(),
            conv_in: Arc::new(Conv2d::new(
                u.in_channels,
                ch[0],
                3,
                1,
                1,
                vb.pp("conv_in"),
            )?),
            time_embedding: TimestepEmbedding::new(ch[0], temb, temb, vb.pp("time_embedding"))?,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out: Arc::new(GroupNormFrames::new(
                u.norm_num_groups,
                ch[0],
                u.norm_eps,
                vb.pp("conv_norm_out"),
            )?),
            conv_out: Arc::new(Conv2d::new(
                ch[0],
                u.out_channels,
                3,
                1,
                1,
                vb.pp("conv_out"),
            )?),
            dtype: vb.dtype(),
        })
    }

    pub fn config(&self) -> &MotionUNetConfig {
        &self.config
    }

    /// The graph of one UNet evaluation at `shape`.
    ///
    /// Inputs, in order: `sample` `(B*T, in_channels, H, W)` (diffusers' `(B, C, T, H, W)`
    /// with frames moved next to the batch), `timestep` `(B,)` f32, `encoder_hidden_states`
    /// `(B, L, cross_attention_dim)` (one prompt per video). Output: `(B*T, out_channels, H, W)`.
    pub fn lower(&self, shape: UNetShape) -> IrResult<Graph> {
        let UNetShape {
            batch,
            frames,
            height,
            width,
            context_len,
        } = shape;
        let u = &self.config.unet;
        let dt = self.dtype;
        let mut g = Graph::new();
        let sample = g.input(
            "sample",
            ValueInfo::new(
                (batch * frames, u.in_channels, height, width),
                dt,
                Layout::FRAME_MAJOR,
            ),
        )?;
        let timestep = g.input("timestep", ValueInfo::new(batch, DType::F32, Layout::WHOLE))?;
        let context_dim = self.config.down[0].cross_attention_dim;
        let ehs = g.input(
            "encoder_hidden_states",
            ValueInfo::new((batch, context_len, context_dim), dt, Layout::WHOLE),
        )?;
        let t = node(
            &mut g,
            "time_proj",
            "",
            sinusoid(u.block_out_channels[0], dt),
            &[timestep],
        )?;
        let emb = self.time_embedding.lower(&mut g, "time_embedding", t)?;
        let emb = node(&mut g, "emb.act", "", Arc::new(Silu), &[emb])?;
        let at = At {
            dims: VideoDims {
                batch,
                frames,
                height,
                width,
            },
            emb: Some(emb),
        };
        let x = node(&mut g, "conv_in", "", self.conv_in.clone(), &[sample])?;
        let stack = SkipStack {
            down: &self.down_blocks,
            up: &self.up_blocks,
            context: ehs,
        };
        let x = stack.lower(&mut g, x, at, |g, x, at| {
            self.mid_block.lower(g, x, ehs, at)
        })?;
        let out = output_head(&mut g, "", &self.conv_norm_out, &self.conv_out, x)?;
        g.set_outputs(&[out]);
        Ok(g)
    }
}
