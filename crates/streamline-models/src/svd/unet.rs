//! diffusers' `UNetSpatioTemporalConditionModel` (SVD, SVD-XT).

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use streamline_ir::{Graph, IrError, Layout, Result as IrResult, ValueId, ValueInfo};

use super::config::{BlockKind, BlockSpec, UNetConfig, SVD_GROUPS};
use super::resnet::{ResBlockSettings, SpatioTemporalResBlock};
use super::transformer::TransformerSpatioTemporalModel;
use crate::blocks::embedding::{sinusoid, TimestepEmbedding};
use crate::blocks::{node, output_head, At, Direction, LayerAt, SkipStack, UNetBlock, UNetLayer};
use crate::load::{load_config, weights_file, ModelError, PerBlock, Result, WeightSource};
use crate::ops::{Add, Conv2d, GroupNormFrames, Silu, VideoDims};
use crate::size::SizeRule;

fn settings(temb: usize, eps: f64) -> ResBlockSettings {
    ResBlockSettings {
        temb: Some(temb),
        eps,
        temporal_eps: eps,
        switch_spatial_to_temporal_mix: false,
    }
}

/// One layer of a down or up block: a spatio-temporal resnet, and a spatio-temporal
/// transformer in cross-attention blocks.
#[derive(Debug)]
struct Layer {
    resnet: SpatioTemporalResBlock,
    attention: Option<TransformerSpatioTemporalModel>,
}

impl Layer {
    /// Layer `l` of block `spec`: `in_c` -> `c` channels, resnet settings `s`, `vb` at the
    /// block.
    fn new(
        spec: &BlockSpec,
        (l, in_c, c): (usize, usize, usize),
        s: ResBlockSettings,
        vb: &VarBuilder,
    ) -> candle_core::Result<Self> {
        let attention = (spec.kind == BlockKind::CrossAttn)
            .then(|| transformer(spec, c, vb.pp("attentions").pp(l)))
            .transpose()?;
        Ok(Layer {
            resnet: SpatioTemporalResBlock::new(in_c, c, s, vb.pp("resnets").pp(l))?,
            attention,
        })
    }
}

fn transformer(
    spec: &BlockSpec,
    c: usize,
    vb: VarBuilder,
) -> candle_core::Result<TransformerSpatioTemporalModel> {
    TransformerSpatioTemporalModel::new(
        c,
        spec.heads,
        spec.transformer_layers,
        spec.cross_attention_dim,
        vb,
    )
}

impl UNetLayer for Layer {
    fn lower(&self, g: &mut Graph, x: ValueId, layer: &LayerAt) -> IrResult<ValueId> {
        let x = self.resnet.lower(g, &layer.name("resnets"), x, layer.at)?;
        match &self.attention {
            Some(attn) => attn.lower(g, &layer.name("attentions"), x, layer.context, layer.at),
            None => Ok(x),
        }
    }
}

/// The size of one UNet evaluation: `batch` videos (2 under classifier-free guidance) of
/// `frames` latent frames of `height` x `width` latents, with `context_len` encoder tokens (1
/// for SVD's image embedding).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UNetShape {
    pub batch: usize,
    pub frames: usize,
    pub height: usize,
    pub width: usize,
    pub context_len: usize,
}

/// The SVD UNet, with weights; [`UNetSpatioTemporalConditionModel::lower`] turns it into an
/// IR graph for one video size.
#[derive(Debug)]
pub struct UNetSpatioTemporalConditionModel {
    config: UNetConfig,
    conv_in: Arc<Conv2d>,
    time_embedding: TimestepEmbedding,
    add_embedding: TimestepEmbedding,
    down_blocks: Vec<UNetBlock<Layer>>,
    mid_resnets: Vec<SpatioTemporalResBlock>,
    mid_attentions: Vec<TransformerSpatioTemporalModel>,
    up_blocks: Vec<UNetBlock<Layer>>,
    conv_norm_out: Arc<GroupNormFrames>,
    conv_out: Arc<Conv2d>,
    dtype: DType,
}

impl UNetSpatioTemporalConditionModel {
    /// Load a diffusers `unet/` folder: `config.json` and
    /// `diffusion_pytorch_model[.fp16].safetensors`, converted to `dtype`.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let config_path = dir.join("config.json");
        let config: UNetConfig = load_config(&config_path)?;
        config.blocks(&config_path)?;
        let file = weights_file(dir, "diffusion_pytorch_model")?;
        let vb = WeightSource::open(&file)?.var_builder(dtype, device);
        Self::new(&config, vb).map_err(|error| ModelError::Weights { path: file, error })
    }

    /// Build from a checked config (see [`UNetConfig`]) and a `VarBuilder` at the checkpoint
    /// root.
    pub fn new(config: &UNetConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let (down, up) = config
            .blocks(Path::new("config.json"))
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let ch = &config.block_out_channels;
        let n = ch.len();
        let temb = config.time_embed_dim();
        let blocks = |direction: Direction, specs: &[BlockSpec]| {
            specs
                .iter()
                .enumerate()
                .map(|(i, spec)| {
                    let vb = vb.pp(direction.list()).pp(i);
                    // diffusers' cross-attention down blocks make their resnets with eps 1e-6.
                    let cross_down =
                        direction == Direction::Down && spec.kind == BlockKind::CrossAttn;
                    let s = settings(temb, if cross_down { 1e-6 } else { 1e-5 });
                    UNetBlock::new(direction, ch, i, spec.layers, &vb, |l, in_c, c| {
                        Layer::new(spec, (l, in_c, c), s, &vb)
                    })
                })
                .collect::<candle_core::Result<Vec<_>>>()
        };
        let down_blocks = blocks(Direction::Down, &down)?;
        let up_blocks = blocks(Direction::Up, &up)?;
        let mid = vb.pp("mid_block");
        let mid_resnets = (0..2)
            .map(|l| {
                SpatioTemporalResBlock::new(
                    ch[n - 1],
                    ch[n - 1],
                    settings(temb, 1e-5),
                    mid.pp("resnets").pp(l),
                )
            })
            .collect::<candle_core::Result<_>>()?;
        let mid_attentions = vec![transformer(
            &down[n - 1],
            ch[n - 1],
            mid.pp("attentions.0"),
        )?];
        Ok(UNetSpatioTemporalConditionModel {
            config: config.clone(),
            conv_in: Arc::new(Conv2d::new(
                config.in_channels,
                ch[0],
                3,
                1,
                1,
                vb.pp("conv_in"),
            )?),
            time_embedding: TimestepEmbedding::new(ch[0], temb, temb, vb.pp("time_embedding"))?,
            add_embedding: TimestepEmbedding::new(
                config.projection_class_embeddings_input_dim,
                temb,
                temb,
                vb.pp("add_embedding"),
            )?,
            down_blocks,
            mid_resnets,
            mid_attentions,
            up_blocks,
            conv_norm_out: Arc::new(GroupNormFrames::new(
                SVD_GROUPS,
                ch[0],
                1e-5,
                vb.pp("conv_norm_out"),
            )?),
            conv_out: Arc::new(Conv2d::new(
                ch[0],
                config.out_channels,
                3,
                1,
                1,
                vb.pp("conv_out"),
            )?),
            dtype: vb.dtype(),
        })
    }

    pub fn config(&self) -> &UNetConfig {
        &self.config
    }

    /// Resnet, then (attention, resnet) pairs.
    fn lower_mid(&self, g: &mut Graph, x: ValueId, context: ValueId, at: At) -> IrResult<ValueId> {
        let mut x = self.mid_resnets[0].lower(g, "mid_block.resnets.0", x, at)?;
        let pairs = self.mid_attentions.iter().zip(&self.mid_resnets[1..]);
        for (l, (attn, resnet)) in pairs.enumerate() {
            x = attn.lower(g, &format!("mid_block.attentions.{l}"), x, context, at)?;
            x = resnet.lower(g, &format!("mid_block.resnets.{}", l + 1), x, at)?;
        }
        Ok(x)
    }

    /// The graph of one UNet evaluation at `shape`.
    ///
    /// Inputs, in order: `sample` `(B*T, in_channels, H, W)` (diffusers' `(B, T, C, H, W)`
    /// flattened), `timestep` `(B,)` f32, `encoder_hidden_states` `(B, L, cross_attention_dim)`,
    /// `added_time_ids` `(B, 3)` f32. Output: `(B*T, out_channels, H, W)`. The value `emb`
    /// is the time + time-id embedding `(B, 4 * block_out_channels[0])`. Latents that are not
    /// multiples of `2^(levels - 1)` are refused, stating the rule (see [`SizeRule::svd`]).
    pub fn lower(&self, shape: UNetShape) -> IrResult<Graph> {
        let UNetShape {
            batch,
            frames,
            height,
            width,
            context_len,
        } = shape;
        let c = &self.config;
        SizeRule::svd_latents(c)
            .check(height, width)
            .map_err(|e| IrError::value("sample", e.to_string()))?;
        let dt = self.dtype;
        let mut g = Graph::new();
        let bt = batch * frames;
        let sample = g.input(
            "sample",
            ValueInfo::new((bt, c.in_channels, height, width), dt, Layout::IMAGES),
        )?;
        let timestep = g.input("timestep", ValueInfo::new(batch, DType::F32, Layout::WHOLE))?;
        // One encoder state feeds every block, so every block's cross-attention width is the
        // same in any usable config; the first block's names it.
        let ehs_dim = match &c.cross_attention_dim {
            PerBlock::One(d) => *d,
            PerBlock::Each(d) => d[0],
        };
        let ehs = g.input(
            "encoder_hidden_states",
            ValueInfo::new((batch, context_len, ehs_dim), dt, Layout::WHOLE),
        )?;
        let time_ids = g.input(
            "added_time_ids",
            ValueInfo::new((batch, 3), DType::F32, Layout::WHOLE),
        )?;

        let t = node(
            &mut g,
            "time_proj",
            "",
            sinusoid(c.block_out_channels[0], dt),
            &[timestep],
        )?;
        let temb = self.time_embedding.lower(&mut g, "time_embedding", t)?;
        let ids = node(
            &mut g,
            "add_time_proj",
            "",
            sinusoid(c.addition_time_embed_dim, dt),
            &[time_ids],
        )?;
        let aug = self.add_embedding.lower(&mut g, "add_embedding", ids)?;
        let emb = node(&mut g, "emb", "", Arc::new(Add), &[temb, aug])?;
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
        let x = stack.lower(&mut g, x, at, |g, x, at| self.lower_mid(g, x, ehs, at))?;
        let out = output_head(&mut g, "", (&self.conv_norm_out, false), &self.conv_out, x)?;
        g.set_outputs(&[out]);
        Ok(g)
    }
}
