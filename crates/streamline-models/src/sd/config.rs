//! The two config.json files a motion UNet is assembled from: SD 1.5's `UNet2DConditionModel`
//! and AnimateDiff's `MotionAdapter`, combined as diffusers' `UNetMotionModel.from_unet2d` does.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::load::{check_block_lists, check_groups, ModelError, PerBlock, Result};

fn one() -> PerBlock {
    PerBlock::One(1)
}

fn groups() -> usize {
    32
}

fn eps() -> f64 {
    1e-5
}

fn padding() -> usize {
    1
}

fn yes() -> bool {
    true
}

fn silu() -> String {
    "silu".into()
}

fn mid_block() -> Option<String> {
    Some("UNetMidBlock2DCrossAttn".into())
}

fn default_shift() -> String {
    "default".into()
}

fn max_frames() -> usize {
    32
}

fn motion_heads() -> PerBlock {
    PerBlock::One(8)
}

fn two() -> PerBlock {
    PerBlock::One(2)
}

/// Fields of SD 1.5's `unet/config.json` (`UNet2DConditionModel`); unknown fields are ignored,
/// fields that would change the network and are not supported are rejected by
/// [`MotionUNetConfig::new`].
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct UNet2DConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: PerBlock,
    pub cross_attention_dim: PerBlock,
    /// SD 1.5 names the number of heads `attention_head_dim` (diffusers keeps the name for
    /// compatibility); `num_attention_heads`, when present, wins.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention_head_dim: Option<PerBlock>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_attention_heads: Option<PerBlock>,
    #[serde(default = "one")]
    pub transformer_layers_per_block: PerBlock,
    /// Every GroupNorm of the motion UNet, its motion modules' included: diffusers'
    /// `from_unet2d` builds them all with this.
    #[serde(default = "groups")]
    pub norm_num_groups: usize,
    #[serde(default = "eps")]
    pub norm_eps: f64,
    #[serde(default = "padding")]
    pub downsample_padding: usize,
    #[serde(default)]
    pub use_linear_projection: bool,
    /// Read but not used, like `freq_shift` and `center_input_sample`:
    /// `UNetMotionModel.from_unet2d` drops them (its `time_proj` is always
    /// `Timesteps(c, True, 0)` and it never centers the sample).
    #[serde(default = "yes")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: f64,
    #[serde(default = "silu")]
    pub act_fn: String,
    #[serde(default = "mid_block")]
    pub mid_block_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mid_block_scale_factor: Option<f64>,
    #[serde(default = "default_shift")]
    pub resnet_time_scale_shift: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class_embed_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addition_embed_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoder_hid_dim_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_cond_proj_dim: Option<usize>,
    #[serde(default)]
    pub only_cross_attention: bool,
    #[serde(default)]
    pub dual_cross_attention: bool,
    #[serde(default)]
    pub center_input_sample: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sample_size: Option<usize>,
}

impl UNet2DConfig {
    /// Refuse what `UNetMotionModel.from_unet2d` cannot assemble or streamline does not build,
    /// naming `path`, the field and the value. Fields `from_unet2d` drops are not checked.
    fn check(&self, path: &Path) -> Result<()> {
        let lists = [
            ("down_block_types", self.down_block_types.len()),
            ("up_block_types", self.up_block_types.len()),
        ];
        check_block_lists(path, self.block_out_channels.len(), &lists)?;
        let debug = |v: &dyn std::fmt::Debug| format!("{v:?}");
        let checks: [(&str, bool, String, &str); 10] = [
            (
                "downsample_padding",
                self.downsample_padding != 1,
                self.downsample_padding.to_string(),
                "only 1, SD 1.5's, is supported",
            ),
            (
                "act_fn",
                !matches!(self.act_fn.as_str(), "silu" | "swish"),
                self.act_fn.clone(),
                "only silu (or its alias swish) is supported",
            ),
            (
                "mid_block_type",
                self.mid_block_type.as_deref() != Some("UNetMidBlock2DCrossAttn"),
                debug(&self.mid_block_type),
                "diffusers' UNetMotionModel takes the mid block's resnets and attentions from a UNetMidBlock2DCrossAttn",
            ),
            (
                "mid_block_scale_factor",
                self.mid_block_scale_factor.is_some_and(|s| s != 1.0),
                debug(&self.mid_block_scale_factor),
                "only 1, SD 1.5's, is supported",
            ),
            (
                "resnet_time_scale_shift",
                self.resnet_time_scale_shift != "default",
                self.resnet_time_scale_shift.clone(),
                "diffusers' UNetMotionModel builds \"default\" resnets only",
            ),
            (
                "class_embed_type",
                self.class_embed_type.is_some(),
                debug(&self.class_embed_type),
                "class embeddings are not supported (diffusers' UNetMotionModel drops them)",
            ),
            (
                "addition_embed_type",
                self.addition_embed_type.is_some(),
                debug(&self.addition_embed_type),
                "added embeddings (SDXL) are not supported",
            ),
            (
                "encoder_hid_dim_type",
                self.encoder_hid_dim_type.is_some(),
                debug(&self.encoder_hid_dim_type),
                "encoder projections are not supported",
            ),
            (
                "time_cond_proj_dim",
                self.time_cond_proj_dim.is_some(),
                debug(&self.time_cond_proj_dim),
                "time conditioning projections (LCM-distilled UNets) are not supported",
            ),
            (
                "only_cross_attention",
                self.only_cross_attention || self.dual_cross_attention,
                self.only_cross_attention.to_string(),
                "only_cross_attention / dual_cross_attention are not supported",
            ),
        ];
        if let Some((field, _, value, reason)) = checks.into_iter().find(|c| c.1) {
            return Err(ModelError::Unsupported {
                path: path.to_path_buf(),
                field: field.into(),
                value,
                reason: reason.into(),
            });
        }
        check_groups(
            path,
            &self.block_out_channels,
            self.norm_num_groups,
            "`norm_num_groups`",
        )
    }

    /// Stable Diffusion 1.5's `unet/config.json`.
    pub fn sd15() -> Self {
        let s = |v: &[&str]| v.iter().map(|t| t.to_string()).collect();
        UNet2DConfig {
            in_channels: 4,
            out_channels: 4,
            down_block_types: s(&[
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "DownBlock2D",
            ]),
            up_block_types: s(&[
                "UpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
            ]),
            block_out_channels: vec![320, 640, 1280, 1280],
            layers_per_block: PerBlock::One(2),
            cross_attention_dim: PerBlock::One(768),
            attention_head_dim: Some(PerBlock::One(8)),
            num_attention_heads: None,
            transformer_layers_per_block: one(),
            norm_num_groups: 32,
            norm_eps: 1e-5,
            downsample_padding: 1,
            use_linear_projection: false,
            flip_sin_to_cos: true,
            freq_shift: 0.0,
            act_fn: silu(),
            mid_block_type: mid_block(),
            mid_block_scale_factor: Some(1.0),
            resnet_time_scale_shift: default_shift(),
            class_embed_type: None,
            addition_embed_type: None,
            encoder_hid_dim_type: None,
            time_cond_proj_dim: None,
            only_cross_attention: false,
            dual_cross_attention: false,
            center_input_sample: false,
            sample_size: Some(64),
        }
    }
}

/// Fields of a motion adapter's `config.json` (`MotionAdapter`).
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct MotionAdapterConfig {
    pub block_out_channels: Vec<usize>,
    #[serde(default = "two")]
    pub motion_layers_per_block: PerBlock,
    #[serde(default = "one")]
    pub motion_transformer_layers_per_block: PerBlock,
    #[serde(default = "one_usize")]
    pub motion_mid_block_layers_per_block: usize,
    #[serde(default = "one")]
    pub motion_transformer_layers_per_mid_block: PerBlock,
    #[serde(default = "motion_heads")]
    pub motion_num_attention_heads: PerBlock,
    /// The adapter's own modules' groups; not those of a motion UNet built with the adapter
    /// (see `UNet2DConfig::norm_num_groups`).
    #[serde(default = "groups")]
    pub motion_norm_num_groups: usize,
    #[serde(default = "max_frames")]
    pub motion_max_seq_length: usize,
    #[serde(default = "yes")]
    pub use_motion_mid_block: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conv_in_channels: Option<usize>,
}

fn one_usize() -> usize {
    1
}

impl MotionAdapterConfig {
    /// Refuse PIA adapters and groups that do not split the channels, naming `path`.
    fn check(&self, path: &Path) -> Result<()> {
        if let Some(c) = self.conv_in_channels {
            return Err(ModelError::Unsupported {
                path: path.to_path_buf(),
                field: "conv_in_channels".into(),
                value: c.to_string(),
                reason: "PIA adapters are not supported (AnimateDiffPipeline feeds the UNet 4 latent channels)".into(),
            });
        }
        // diffusers builds the adapter's own modules with these groups and so refuses ones that
        // do not split the channels, but a motion UNet's with the UNet's `norm_num_groups`.
        check_groups(
            path,
            &self.block_out_channels,
            self.motion_norm_num_groups,
            "`motion_norm_num_groups`",
        )
    }

    /// `guoyww/animatediff-motion-adapter-v1-5-2`: diffusers' `MotionAdapter` defaults.
    pub fn v1_5_2() -> Self {
        MotionAdapterConfig {
            block_out_channels: vec![320, 640, 1280, 1280],
            motion_layers_per_block: two(),
            motion_transformer_layers_per_block: one(),
            motion_mid_block_layers_per_block: 1,
            motion_transformer_layers_per_mid_block: one(),
            motion_num_attention_heads: motion_heads(),
            motion_norm_num_groups: 32,
            motion_max_seq_length: max_frames(),
            use_motion_mid_block: true,
            conv_in_channels: None,
        }
    }
}

/// Whether a block has spatial cross-attention transformers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Plain,
    CrossAttn,
}

/// One block of the motion UNet, expanded from both configs.
#[derive(Clone, Debug)]
pub(crate) struct Block {
    pub kind: Kind,
    pub channels: usize,
    /// Resnets (and transformers, motion modules): `layers_per_block`, plus one going up.
    pub layers: usize,
    pub heads: usize,
    pub transformer_layers: usize,
    pub cross_attention_dim: usize,
    pub motion_heads: usize,
    pub motion_layers: usize,
}

/// The motion UNet's settings: both configs checked against each other.
#[derive(Clone, Debug)]
pub struct MotionUNetConfig {
    pub unet: UNet2DConfig,
    pub adapter: MotionAdapterConfig,
    pub(crate) down: Vec<Block>,
    pub(crate) up: Vec<Block>,
    /// The mid block's (attention, motion module, resnet) triples' motion layers; `None`
    /// without a motion mid block.
    pub(crate) mid_motion_layers: Option<Vec<usize>>,
}

impl MotionUNetConfig {
    /// Check both configs (`unet_path`, `adapter_path` name them in errors) and expand them.
    pub fn new(
        unet: UNet2DConfig,
        unet_path: &Path,
        adapter: MotionAdapterConfig,
        adapter_path: &Path,
    ) -> Result<Self> {
        unet.check(unet_path)?;
        adapter.check(adapter_path)?;
        let n = unet.block_out_channels.len();
        let config_err = |path: &Path, reason: String| ModelError::Config {
            path: path.to_path_buf(),
            reason,
        };
        let unsupported =
            |path: &Path, field: &str, value: String, reason: &str| ModelError::Unsupported {
                path: path.to_path_buf(),
                field: field.into(),
                value,
                reason: reason.into(),
            };
        if adapter.block_out_channels.len() != n {
            return Err(config_err(
                adapter_path,
                format!(
                    "the motion adapter has {} blocks (`block_out_channels` {:?}) but the UNet {} has {n} ({:?})",
                    adapter.block_out_channels.len(),
                    adapter.block_out_channels,
                    unet_path.display(),
                    unet.block_out_channels
                ),
            ));
        }
        if adapter.block_out_channels != unet.block_out_channels {
            return Err(config_err(
                adapter_path,
                format!(
                    "the motion adapter's `block_out_channels` {:?} differ from the UNet's {:?} ({})",
                    adapter.block_out_channels,
                    unet.block_out_channels,
                    unet_path.display()
                ),
            ));
        }
        let layers = unet
            .layers_per_block
            .expand(n, "layers_per_block", unet_path)?;
        let motion_layers =
            adapter
                .motion_layers_per_block
                .expand(n, "motion_layers_per_block", adapter_path)?;
        if layers != motion_layers {
            return Err(config_err(
                adapter_path,
                format!(
                    "`motion_layers_per_block` {motion_layers:?} differ from the UNet's `layers_per_block` {layers:?} ({})",
                    unet_path.display()
                ),
            ));
        }
        let heads = match (&unet.num_attention_heads, &unet.attention_head_dim) {
            (Some(h), _) => h.expand(n, "num_attention_heads", unet_path)?,
            (None, Some(h)) => h.expand(n, "attention_head_dim", unet_path)?,
            (None, None) => vec![8; n],
        };
        let cross = unet
            .cross_attention_dim
            .expand(n, "cross_attention_dim", unet_path)?;
        let tlayers = unet.transformer_layers_per_block.expand(
            n,
            "transformer_layers_per_block",
            unet_path,
        )?;
        let mheads = adapter.motion_num_attention_heads.expand(
            n,
            "motion_num_attention_heads",
            adapter_path,
        )?;
        let mlayers = adapter.motion_transformer_layers_per_block.expand(
            n,
            "motion_transformer_layers_per_block",
            adapter_path,
        )?;
        for (i, &c) in unet.block_out_channels.iter().enumerate() {
            if heads[i] == 0 || c % heads[i] != 0 {
                return Err(config_err(
                    unet_path,
                    format!(
                        "{} heads do not divide the {c} channels of block {i}",
                        heads[i]
                    ),
                ));
            }
            if mheads[i] == 0 || c % mheads[i] != 0 {
                return Err(config_err(adapter_path, format!("`motion_num_attention_heads` {} does not divide the {c} channels of block {i}", mheads[i])));
            }
        }
        let kind = |path: &Path, field: &str, i: usize, ty: &str, plain: &str, attn: &str| match ty
        {
            t if t == plain => Ok(Kind::Plain),
            t if t == attn => Ok(Kind::CrossAttn),
            other => Err(unsupported(
                path,
                &format!("{field}[{i}]"),
                other.to_string(),
                &format!("SD's UNet blocks are {plain} and {attn}"),
            )),
        };
        let block = |i: usize, kind: Kind, layers: usize| Block {
            kind,
            channels: unet.block_out_channels[i],
            layers,
            heads: heads[i],
            transformer_layers: tlayers[i],
            cross_attention_dim: cross[i],
            motion_heads: mheads[i],
            motion_layers: mlayers[i],
        };
        let down = (0..n)
            .map(|i| {
                let k = kind(
                    unet_path,
                    "down_block_types",
                    i,
                    &unet.down_block_types[i],
                    "DownBlock2D",
                    "CrossAttnDownBlock2D",
                )?;
                Ok(block(i, k, layers[i]))
            })
            .collect::<Result<Vec<_>>>()?;
        let up = (0..n)
            .map(|i| {
                let r = n - 1 - i;
                let k = kind(
                    unet_path,
                    "up_block_types",
                    i,
                    &unet.up_block_types[i],
                    "UpBlock2D",
                    "CrossAttnUpBlock2D",
                )?;
                Ok(block(r, k, layers[r] + 1))
            })
            .collect::<Result<Vec<_>>>()?;
        let mid_motion_layers = adapter
            .use_motion_mid_block
            .then(|| {
                adapter.motion_transformer_layers_per_mid_block.expand(
                    adapter.motion_mid_block_layers_per_block,
                    "motion_transformer_layers_per_mid_block",
                    adapter_path,
                )
            })
            .transpose()?;
        if mid_motion_layers.as_ref().is_some_and(|m| m.len() != 1) {
            return Err(unsupported(
                adapter_path,
                "motion_mid_block_layers_per_block",
                adapter.motion_mid_block_layers_per_block.to_string(),
                "the UNet's mid block has one attention, so one motion module",
            ));
        }
        Ok(MotionUNetConfig {
            unet,
            adapter,
            down,
            up,
            mid_motion_layers,
        })
    }

    /// The time embedding width, `4 * block_out_channels[0]`.
    pub fn time_embed_dim(&self) -> usize {
        4 * self.unet.block_out_channels[0]
    }
}
