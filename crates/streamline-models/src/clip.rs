//! SVD's image encoder: transformers' `CLIPVisionModelWithProjection` (CLIP ViT-H/14 in SVD).
//!
//! It runs once per video on the conditioning image, so it stays an eager candle model rather
//! than being lowered to the IR. SVD's encoder uses the exact erf GELU, which
//! candle-transformers' CLIP cannot express, so the encoder layers are this crate's own,
//! shared with [`crate::clip_text`] and following the config. Module and tensor names match
//! transformers 4.44.2, so Hugging Face checkpoints load as is.

use std::path::Path;

use candle_core::{DType, Device, IndexOp, Module, Result, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, LayerNorm, Linear, VarBuilder};
use serde::Deserialize;

pub use crate::clip_encoder::HiddenAct;
use crate::clip_encoder::{load_checkpoint, ClipEncoder, EncoderConfig, Unsupported};
use crate::load::load_config;

/// `image_encoder/config.json` as transformers' `CLIPVisionConfig.save_pretrained` writes it.
/// A missing field takes transformers' default, as `from_pretrained` would.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(default)]
pub struct ClipVisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub projection_dim: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_channels: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub hidden_act: String,
    pub layer_norm_eps: f64,
}

impl Default for ClipVisionConfig {
    fn default() -> Self {
        Self {
            hidden_size: 768,
            intermediate_size: 3072,
            projection_dim: 512,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            num_channels: 3,
            image_size: 224,
            patch_size: 32,
            hidden_act: "quick_gelu".to_string(),
            layer_norm_eps: 1e-5,
        }
    }
}

impl ClipVisionConfig {
    /// SVD's image encoder: CLIP ViT-H/14 (`stabilityai/stable-video-diffusion-img2vid`'s
    /// image_encoder/).
    pub fn vit_h14() -> Self {
        ClipVisionConfig {
            hidden_size: 1280,
            intermediate_size: 5120,
            projection_dim: 1024,
            num_hidden_layers: 32,
            num_attention_heads: 16,
            num_channels: 3,
            image_size: 224,
            patch_size: 14,
            hidden_act: "gelu".to_string(),
            layer_norm_eps: 1e-5,
        }
    }

    /// Read a config.json, rejecting up front (naming the file and field) what `new` could
    /// not build.
    pub fn load(path: &Path) -> crate::load::Result<Self> {
        let config: Self = load_config(path)?;
        config.check().map_err(|u| u.in_file(path))?;
        Ok(config)
    }

    /// Tokens per image: one per patch plus the class token.
    pub fn num_positions(&self) -> usize {
        (self.image_size / self.patch_size).pow(2) + 1
    }

    pub(crate) fn check(&self) -> std::result::Result<EncoderConfig, Unsupported> {
        if self.patch_size == 0 || self.patch_size > self.image_size {
            return Err(Unsupported {
                field: "patch_size",
                value: self.patch_size.to_string(),
                reason: "it must be between 1 and image_size",
            });
        }
        EncoderConfig::new(
            self.hidden_size,
            self.intermediate_size,
            self.num_attention_heads,
            self.num_hidden_layers,
            self.layer_norm_eps,
            &self.hidden_act,
        )
    }
}

#[derive(Clone, Debug)]
struct ClipVisionEmbeddings {
    class_embedding: Tensor,
    patch_embedding: Conv2d,
    /// `position_ids` is `arange(num_positions)`, so the lookup is the whole table.
    position_embedding: Tensor,
    num_channels: usize,
    image_size: usize,
}

impl ClipVisionEmbeddings {
    fn new(cfg: &ClipVisionConfig, vb: VarBuilder) -> Result<Self> {
        let e = cfg.hidden_size;
        let conv = Conv2dConfig {
            stride: cfg.patch_size,
            ..Default::default()
        };
        Ok(Self {
            class_embedding: vb.get(e, "class_embedding")?,
            patch_embedding: candle_nn::conv2d_no_bias(
                cfg.num_channels,
                e,
                cfg.patch_size,
                conv,
                vb.pp("patch_embedding"),
            )?,
            position_embedding: vb
                .pp("position_embedding")
                .get((cfg.num_positions(), e), "weight")?,
            num_channels: cfg.num_channels,
            image_size: cfg.image_size,
        })
    }
}

impl Module for ClipVisionEmbeddings {
    fn forward(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = pixel_values.dims4()?;
        let (want_c, s) = (self.num_channels, self.image_size);
        if (c, h, w) != (want_c, s, s) {
            candle_core::bail!(
                "pixel_values must be (N, {want_c}, {s}, {s}), got {:?}",
                pixel_values.dims()
            );
        }
        // Like transformers, the image is cast to the weights' dtype before the patch conv.
        let dtype = self.class_embedding.dtype();
        let patches = self
            .patch_embedding
            .forward(&pixel_values.to_dtype(dtype)?)?
            .flatten_from(2)?
            .transpose(1, 2)?;
        let e = self.class_embedding.dim(0)?;
        let class = self
            .class_embedding
            .reshape((1, 1, e))?
            .broadcast_as((b, 1, e))?;
        Tensor::cat(&[&class, &patches], 1)?.broadcast_add(&self.position_embedding)
    }
}

/// transformers' `CLIPVisionTransformer`; its forward gives the pooled output (the final
/// class token after `post_layernorm`), all SVD and CLIP-SIM ([`crate::clip_model`]) read.
#[derive(Clone, Debug)]
pub(crate) struct ClipVisionTransformer {
    embeddings: ClipVisionEmbeddings,
    pre_layrnorm: LayerNorm,
    encoder: ClipEncoder,
    post_layernorm: LayerNorm,
}

impl ClipVisionTransformer {
    pub(crate) fn new(cfg: &ClipVisionConfig, enc: &EncoderConfig, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            embeddings: ClipVisionEmbeddings::new(cfg, vb.pp("embeddings"))?,
            // [sic]: the checkpoint's name.
            pre_layrnorm: enc.layer_norm(vb.pp("pre_layrnorm"))?,
            encoder: ClipEncoder::new(enc, vb.pp("encoder"))?,
            post_layernorm: enc.layer_norm(vb.pp("post_layernorm"))?,
        })
    }
}

impl Module for ClipVisionTransformer {
    fn forward(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let embeddings = pixel_values
            .apply(&self.embeddings)?
            .apply(&self.pre_layrnorm)?;
        let last_hidden_state =
            self.encoder
                .forward(&embeddings, None, self.encoder.num_layers())?;
        last_hidden_state.i((.., 0))?.apply(&self.post_layernorm)
    }
}

/// The image encoder: pixel values `(N, C, S, S)`, already resized and normalized with CLIP's
/// mean and std, to image embeddings `(N, projection_dim)` in the model's dtype.
#[derive(Clone, Debug)]
pub struct ClipVisionModelWithProjection {
    vision_model: ClipVisionTransformer,
    visual_projection: Linear,
    config: ClipVisionConfig,
}

impl ClipVisionModelWithProjection {
    /// Build from any `VarBuilder` (a checkpoint, or a manifest for shape-only checks). The
    /// weights' dtype and device are the `VarBuilder`'s; so is the compute dtype.
    pub fn new(cfg: &ClipVisionConfig, vb: VarBuilder) -> Result<Self> {
        let enc = cfg.check().map_err(Unsupported::into_candle)?;
        Ok(Self {
            vision_model: ClipVisionTransformer::new(cfg, &enc, vb.pp("vision_model"))?,
            visual_projection: candle_nn::linear_no_bias(
                cfg.hidden_size,
                cfg.projection_dim,
                vb.pp("visual_projection"),
            )?,
            config: cfg.clone(),
        })
    }

    /// Load a transformers `save_pretrained` folder (SVD's `image_encoder/`): `config.json`
    /// and `model.safetensors` or its `model.fp16.safetensors` variant, converted to `dtype`.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> crate::load::Result<Self> {
        let config = ClipVisionConfig::load(&dir.join("config.json"))?;
        load_checkpoint(dir, dtype, device, &[], |vb| Self::new(&config, vb))
    }

    pub fn config(&self) -> &ClipVisionConfig {
        &self.config
    }
}

impl Module for ClipVisionModelWithProjection {
    fn forward(&self, pixel_values: &Tensor) -> Result<Tensor> {
        pixel_values
            .apply(&self.vision_model)?
            .apply(&self.visual_projection)
    }
}
