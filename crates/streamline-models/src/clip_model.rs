//! transformers' `CLIPModel`: CLIP's text and vision towers with their projections into one
//! embedding space, for scoring frames against prompts (CLIP-SIM).
//!
//! The towers are [`crate::clip_text`]'s and [`crate::clip`]'s (the same encoder layers);
//! this adds the text tower's pooled output, the two projections and the folder layout of a
//! Hub CLIP model: `config.json` with `text_config`, `vision_config` and `projection_dim`, and
//! `text_model.*`, `vision_model.*`, `text_projection.weight`, `visual_projection.weight`.
//! Names are transformers 4.44.2's, so `openai/clip-vit-*` folders load as they are.

use std::path::Path;

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{Linear, VarBuilder};
use serde::Deserialize;

use crate::clip::{ClipVisionConfig, ClipVisionTransformer};
use crate::clip_encoder::{load_checkpoint, Unsupported};
use crate::clip_text::{ClipTextConfig, ClipTextTransformer};
use crate::load::load_config;

/// `config.json` as transformers' `CLIPConfig.save_pretrained` writes it; a missing field
/// takes transformers' default.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct ClipConfig {
    #[serde(default)]
    pub text_config: ClipTextConfig,
    #[serde(default)]
    pub vision_config: ClipVisionConfig,
    /// The shared embedding size (the vision config's own `projection_dim` is not used).
    #[serde(default = "default_projection_dim")]
    pub projection_dim: usize,
}

fn default_projection_dim() -> usize {
    512
}

impl ClipConfig {
    /// Reads a config.json, refusing up front (naming the file and field) what the towers
    /// could not build.
    pub fn load(path: &Path) -> crate::load::Result<Self> {
        let config: Self = load_config(path)?;
        config.text_config.check().map_err(|u| u.in_file(path))?;
        config.vision_config.check().map_err(|u| u.in_file(path))?;
        Ok(config)
    }
}

/// Both towers and their projections: token ids to text embeddings, pixel values to image
/// embeddings, in one space of `projection_dim` (not normalized, as transformers'
/// `get_text_features` / `get_image_features` return them).
#[derive(Clone, Debug)]
pub struct ClipModel {
    text_model: ClipTextTransformer,
    vision_model: ClipVisionTransformer,
    text_projection: Linear,
    visual_projection: Linear,
    config: ClipConfig,
}

impl ClipModel {
    /// Builds from any `VarBuilder`; the weights' dtype and device are the `VarBuilder`'s.
    pub fn new(cfg: &ClipConfig, vb: VarBuilder) -> Result<Self> {
        let text = cfg.text_config.check().map_err(Unsupported::into_candle)?;
        let vision = cfg
            .vision_config
            .check()
            .map_err(Unsupported::into_candle)?;
        let (t, v, p) = (
            cfg.text_config.hidden_size,
            cfg.vision_config.hidden_size,
            cfg.projection_dim,
        );
        Ok(Self {
            text_model: ClipTextTransformer::new(&cfg.text_config, &text, vb.pp("text_model"))?,
            vision_model: ClipVisionTransformer::new(
                &cfg.vision_config,
                &vision,
                vb.pp("vision_model"),
            )?,
            text_projection: candle_nn::linear_no_bias(t, p, vb.pp("text_projection"))?,
            visual_projection: candle_nn::linear_no_bias(v, p, vb.pp("visual_projection"))?,
            config: cfg.clone(),
        })
    }

    /// Loads a Hub CLIP folder: `config.json` and `model.safetensors` (or its
    /// `model.fp16.safetensors` variant), converted to `dtype`.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> crate::load::Result<Self> {
        let config = ClipConfig::load(&dir.join("config.json"))?;
        // The temperature of CLIP's contrastive loss, and the position ids older files hold
        // (always `arange`): not read.
        let extra = [
            "logit_scale",
            "text_model.embeddings.position_ids",
            "vision_model.embeddings.position_ids",
        ];
        load_checkpoint(dir, dtype, device, &extra, |vb| Self::new(&config, vb))
    }

    pub fn config(&self) -> &ClipConfig {
        &self.config
    }

    /// Token ids `(B, L)` (as [`crate::clip_text::ClipTokenizer::encode`] gives them) to text
    /// embeddings `(B, projection_dim)`: `get_text_features`.
    pub fn text_features(&self, input_ids: &Tensor) -> Result<Tensor> {
        let eos = self.config.text_config.eos_token_id;
        self.text_model
            .pooled(input_ids, eos)?
            .apply(&self.text_projection)
    }

    /// Pixel values `(N, C, S, S)`, resized and normalized as CLIP's image processor does, to
    /// image embeddings `(N, projection_dim)`: `get_image_features`.
    pub fn image_features(&self, pixel_values: &Tensor) -> Result<Tensor> {
        self.vision_model
            .forward(pixel_values)?
            .apply(&self.visual_projection)
    }
}
