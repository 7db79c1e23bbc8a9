//! `UNetSpatioTemporalConditionModel`'s config.json.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::load::{check_block_lists, check_groups, ModelError, PerBlock, Result};

/// GroupNorm groups of every norm in SVD's UNet and temporal VAE decoder: diffusers'
/// `UNetSpatioTemporalConditionModel` and `AutoencoderKLTemporalDecoder` fix them at 32 (neither
/// takes a `norm_num_groups`).
pub(crate) const SVD_GROUPS: usize = 32;

/// Where [`SVD_GROUPS`] comes from, for errors.
pub(crate) const SVD_GROUPS_SOURCE: &str = "fixed in diffusers' SVD UNet and temporal VAE";

/// Fields of diffusers' `UNetSpatioTemporalConditionModel` config; unknown fields are ignored.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct UNetConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    pub block_out_channels: Vec<usize>,
    pub addition_time_embed_dim: usize,
    pub projection_class_embeddings_input_dim: usize,
    pub layers_per_block: PerBlock,
    pub cross_attention_dim: PerBlock,
    pub transformer_layers_per_block: PerBlock,
    pub num_attention_heads: PerBlock,
    #[serde(default = "default_frames")]
    pub num_frames: usize,
    /// Latent size the model was trained at (diffusers' `sample_size`); absent in some configs.
    #[serde(default)]
    pub sample_size: Option<SampleSize>,
}

/// diffusers' `sample_size`: one side, or `[height, width]`.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum SampleSize {
    Square(usize),
    Sized([usize; 2]),
}

impl SampleSize {
    /// `(height, width)` in latent pixels.
    pub fn dims(self) -> (usize, usize) {
        match self {
            SampleSize::Square(s) => (s, s),
            SampleSize::Sized([h, w]) => (h, w),
        }
    }
}

fn default_frames() -> usize {
    25
}

/// Whether a block has cross-attention transformers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BlockKind {
    Plain,
    CrossAttn,
}

/// One down or up block's settings, expanded from the config.
#[derive(Clone, Debug)]
pub(crate) struct BlockSpec {
    pub kind: BlockKind,
    pub layers: usize,
    pub transformer_layers: usize,
    pub heads: usize,
    pub cross_attention_dim: usize,
}

impl UNetConfig {
    /// Stable Video Diffusion's UNet (diffusers' defaults; SVD ships `num_frames` 14, SVD-XT
    /// 25, the only difference between the two).
    pub fn svd(num_frames: usize) -> Self {
        let s = |v: &[&str]| v.iter().map(|t| t.to_string()).collect();
        UNetConfig {
            in_channels: 8,
            out_channels: 4,
            down_block_types: s(&[
                "CrossAttnDownBlockSpatioTemporal",
                "CrossAttnDownBlockSpatioTemporal",
                "CrossAttnDownBlockSpatioTemporal",
                "DownBlockSpatioTemporal",
            ]),
            up_block_types: s(&[
                "UpBlockSpatioTemporal",
                "CrossAttnUpBlockSpatioTemporal",
                "CrossAttnUpBlockSpatioTemporal",
                "CrossAttnUpBlockSpatioTemporal",
            ]),
            block_out_channels: vec![320, 640, 1280, 1280],
            addition_time_embed_dim: 256,
            projection_class_embeddings_input_dim: 768,
            layers_per_block: PerBlock::One(2),
            cross_attention_dim: PerBlock::One(1024),
            transformer_layers_per_block: PerBlock::One(1),
            num_attention_heads: PerBlock::Each(vec![5, 10, 20, 20]),
            num_frames,
            sample_size: None,
        }
    }

    /// "svd-small": SVD's architecture at a fifth of the width (channels 64/128/256/256,
    /// heads 1/2/4/4, cross-attention 256), for memory tests and benchmarks on a CPU.
    pub fn svd_small(num_frames: usize) -> Self {
        UNetConfig {
            block_out_channels: vec![64, 128, 256, 256],
            cross_attention_dim: PerBlock::One(256),
            num_attention_heads: PerBlock::Each(vec![1, 2, 4, 4]),
            ..Self::svd(num_frames)
        }
    }

    /// Check the config and expand per-block settings, down path order. Errors name the
    /// file and the field.
    pub(crate) fn blocks(&self, path: &Path) -> Result<(Vec<BlockSpec>, Vec<BlockSpec>)> {
        let n = self.block_out_channels.len();
        let config_err = |reason: String| ModelError::Config {
            path: path.to_path_buf(),
            reason,
        };
        let lists = [
            ("down_block_types", self.down_block_types.len()),
            ("up_block_types", self.up_block_types.len()),
        ];
        check_block_lists(path, n, &lists)?;
        check_groups(
            path,
            &self.block_out_channels,
            SVD_GROUPS,
            SVD_GROUPS_SOURCE,
        )?;
        let layers = self.layers_per_block.expand(n, "layers_per_block", path)?;
        let cross = self
            .cross_attention_dim
            .expand(n, "cross_attention_dim", path)?;
        let tlayers =
            self.transformer_layers_per_block
                .expand(n, "transformer_layers_per_block", path)?;
        let heads = self
            .num_attention_heads
            .expand(n, "num_attention_heads", path)?;
        for (i, (&c, &h)) in self.block_out_channels.iter().zip(&heads).enumerate() {
            if h == 0 || c % h != 0 {
                return Err(config_err(format!(
                    "`num_attention_heads`[{i}] = {h} does not divide {c} channels"
                )));
            }
        }
        let kind = |field: &str, i: usize, ty: &str, plain: &str, attn: &str| match ty {
            t if t == plain => Ok(BlockKind::Plain),
            t if t == attn => Ok(BlockKind::CrossAttn),
            other => Err(ModelError::Unsupported {
                path: path.to_path_buf(),
                field: format!("{field}[{i}]"),
                value: other.to_string(),
                reason: format!("SVD's UNet has only {plain} and {attn}"),
            }),
        };
        let spec = |i: usize, kind: BlockKind, layers: usize| BlockSpec {
            kind,
            layers,
            transformer_layers: tlayers[i],
            heads: heads[i],
            cross_attention_dim: cross[i],
        };
        let down = (0..n)
            .map(|i| {
                let k = kind(
                    "down_block_types",
                    i,
                    &self.down_block_types[i],
                    "DownBlockSpatioTemporal",
                    "CrossAttnDownBlockSpatioTemporal",
                )?;
                Ok(spec(i, k, layers[i]))
            })
            .collect::<Result<Vec<_>>>()?;
        let up = (0..n)
            .map(|i| {
                let r = n - 1 - i;
                let k = kind(
                    "up_block_types",
                    i,
                    &self.up_block_types[i],
                    "UpBlockSpatioTemporal",
                    "CrossAttnUpBlockSpatioTemporal",
                )?;
                Ok(spec(r, k, layers[r] + 1))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok((down, up))
    }

    /// The time embedding width, `4 * block_out_channels[0]`.
    pub fn time_embed_dim(&self) -> usize {
        4 * self.block_out_channels[0]
    }
}
