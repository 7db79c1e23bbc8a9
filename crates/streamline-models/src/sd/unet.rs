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
use crate::blocks::{
    node, output_head, At, Direction, LayerAt, ResnetBlock2D, SkipStack, UNetBlock, UNetLayer,
};
use crate::load::{load_config, weights_file, ModelError, Result, WeightSource};
use crate::ops::{Conv2d, GroupNormFrames, Silu, VideoDims};
use crate::svd::UNetShape;

/// One layer of a down or up block: a resnet, a transformer (cross-attention blocks) and a
/// motion module.
#[derive(Debug)]
struct MotionLayer {
    resnet: ResnetBlock2D,
    attention: Option<Transformer2DModel>,
    motion_module: MotionModule,
}

impl MotionLayer {
    /// Layer `l` of the block `spec`, with `in_c` input channels; `vb` / `adapter` at the
    /// block.
    fn new(
        spec: &Block,
        config: &MotionUNetConfig,
        (l, in_c): (usize, usize),
        vb: &VarBuilder,
        adapter: &VarBuilder,
    ) -> candle_core::Result<Self> {
        let (c, u) = (spec.channels, &config.unet);
        let temb = Some(config.time_embed_dim());
        let resnet = ResnetBlock2D::new(
            in_c,
            c,
            temb,
            u.norm_num_groups,
            u.norm_eps,
            vb.pp("resnets").pp(l),
        )?;
        let attention = (spec.kind == Kind::CrossAttn)
            .then(|| {
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
            .transpose()?;
        let motion_module = MotionModule::with_groups(
            c,
            spec.motion_heads,
            spec.motion_layers,
            config.adapter.motion_max_seq_length,
            u.norm_num_groups,
            adapter.pp("motion_modules").pp(l),
        )?;
        Ok(MotionLayer {
            resnet,
            attention,
            motion_module,
        })
    }
}

impl UNetLayer for MotionLayer {
    fn lower(&self, g: &mut Graph, x: ValueId, layer: &LayerAt) -> IrResult<ValueId> {
        let at = layer.at;
        let mut x = self.resnet.lower(g, &layer.name("resnets"), x, at)?;
        if let Some(attn) = &self.attention {
            x = attn.lower(g, &layer.name("attentions"), x, layer.context, at)?;
        }
        let name = layer.name("motion_modules");
        self.motion_module.lower(g, &name, x, at.dims)
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
    /// `vb` / `adapter` at `mid_block`.
    fn new(
        config: &MotionUNetConfig,
        vb: VarBuilder,
        adapter: VarBuilder,
    ) -> candle_core::Result<Self> {
        let u = &config.unet;
        let last = &config.down[config.down.len() - 1];
        let c = last.channels;
        let resnet = |l: usize| {
            let temb = Some(config.time_embed_dim());
            let groups = u.norm_num_groups;
            ResnetBlock2D::new(c, c, temb, groups, u.norm_eps, vb.pp("resnets").pp(l))
        };
        let attention = Transformer2DModel::new(
            c,
            last.heads,
            last.transformer_layers,
            last.cross_attention_dim,
            u.use_linear_projection,
            u.norm_num_groups,
            vb.pp("attentions.0"),
        )?;
        let motion_module = config
            .mid_motion_layers
            .as_ref()
            .map(|layers| {
                MotionModule::with_groups(
                    c,
                    last.motion_heads,
                    layers[0],
                    config.adapter.motion_max_seq_length,
                    u.norm_num_groups,
                    adapter.pp("motion_modules.0"),
                )
            })
            .transpose()?;
        Ok(MidBlock {
            resnets: [resnet(0)?, resnet(1)?],
            attention,
            motion_module,
        })
    }

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
    down_blocks: Vec<UNetBlock<MotionLayer>>,
    mid_block: MidBlock,
    up_blocks: Vec<UNetBlock<MotionLayer>>,
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
            ModelError::Weights {
                path,
                error: source,
            }
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
        let temb = config.time_embed_dim();
        let blocks = |direction: Direction, specs: &[Block]| {
            let list = direction.list();
            specs
                .iter()
                .enumerate()
                .map(|(i, spec)| {
                    let (vb, ad) = (vb.pp(list).pp(i), adapter.pp(list).pp(i));
                    UNetBlock::new(direction, ch, i, spec.layers, &vb, |l, in_c, _| {
                        MotionLayer::new(spec, config, (l, in_c), &vb, &ad)
                    })
                })
                .collect::<candle_core::Result<Vec<_>>>()
        };
        let down_blocks = blocks(Direction::Down, &config.down)?;
        let up_blocks = blocks(Direction::Up, &config.up)?;
        let mid_block = MidBlock::new(config, vb.pp("mid_block"), adapter.pp("mid_block"))?;
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
                Layout::IMAGES,
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
            split_norms: false,
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
        let out = output_head(&mut g, "", (&self.conv_norm_out, false), &self.conv_out, x)?;
        g.set_outputs(&[out]);
        Ok(g)
    }
}
