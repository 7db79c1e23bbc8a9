//! AnimateDiff's text encoder: transformers' `CLIPTextModel` (SD 1.5 uses CLIP ViT-L/14's text
//! tower), and its tokenizer ([`ClipTokenizer`]).
//!
//! Like the image encoder it runs once per video (per prompt), so it stays an eager candle
//! model. candle-transformers' CLIP text model hard-codes the activation and LayerNorm eps and
//! returns the pooled output; this one reads them from `text_encoder/config.json`, returns
//! `last_hidden_state` (what the UNet's cross-attention reads) and shares its encoder layers
//! with [`crate::clip`]. Tensor names are transformers 4.44.2's (`text_model.embeddings.
//! token_embedding.weight`, ...), so Hugging Face checkpoints load as is.

mod tokenizer;

use std::path::Path;

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{Embedding, LayerNorm, VarBuilder};
use serde::Deserialize;

pub use self::tokenizer::{ClipEncoding, ClipTokenizer, Truncation};
pub use crate::clip_encoder::HiddenAct;
use crate::clip_encoder::{load_checkpoint, ClipEncoder, EncoderConfig, Unsupported};
use crate::load::load_config;

/// `text_encoder/config.json` as transformers' `CLIPTextConfig.save_pretrained` writes it.
/// A missing field takes transformers' default, as `from_pretrained` would; unknown fields
/// (the other token ids, `projection_dim`, ...) are ignored.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(default)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    pub hidden_act: String,
    pub layer_norm_eps: f64,
    /// The end token, where the pooled output is read ([`crate::clip_model`]); 2 in configs
    /// from before transformers fixed it, which pool at the highest id instead.
    pub eos_token_id: u32,
}

impl Default for ClipTextConfig {
    fn default() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 512,
            intermediate_size: 2048,
            num_hidden_layers: 12,
            num_attention_heads: 8,
            max_position_embeddings: 77,
            hidden_act: "quick_gelu".to_string(),
            layer_norm_eps: 1e-5,
            eos_token_id: 49407,
        }
    }
}

impl ClipTextConfig {
    /// SD 1.5's (and so AnimateDiff's) text encoder: CLIP ViT-L/14's text tower
    /// (`runwayml/stable-diffusion-v1-5`'s text_encoder/).
    pub fn vit_l14() -> Self {
        Self {
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            ..Self::default()
        }
    }

    /// Read a config.json, rejecting up front (naming the file and field) what the model could
    /// not build.
    pub fn load(path: &Path) -> crate::load::Result<Self> {
        let config: Self = load_config(path)?;
        config.check().map_err(|u| u.in_file(path))?;
        Ok(config)
    }

    pub(crate) fn check(&self) -> std::result::Result<EncoderConfig, Unsupported> {
        for (field, value) in [
            ("vocab_size", self.vocab_size),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if value == 0 {
                return Err(Unsupported {
                    field,
                    value: "0".to_string(),
                    reason: "it must be at least 1",
                });
            }
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

/// transformers' `CLIPTextTransformer`: the hidden state through `final_layer_norm`
/// (diffusers conditions the UNet on the whole sequence) and the pooled output (CLIP-SIM).
#[derive(Clone, Debug)]
pub(crate) struct ClipTextTransformer {
    token_embedding: Embedding,
    /// `position_ids` is `arange(max_position_embeddings)`, so positions are the table's
    /// first rows.
    position_embedding: Tensor,
    encoder: ClipEncoder,
    final_layer_norm: LayerNorm,
}

impl ClipTextTransformer {
    pub(crate) fn new(cfg: &ClipTextConfig, enc: &EncoderConfig, vb: VarBuilder) -> Result<Self> {
        let (e, emb) = (cfg.hidden_size, vb.pp("embeddings"));
        Ok(Self {
            token_embedding: candle_nn::embedding(cfg.vocab_size, e, emb.pp("token_embedding"))?,
            position_embedding: emb
                .pp("position_embedding")
                .get((cfg.max_position_embeddings, e), "weight")?,
            encoder: ClipEncoder::new(enc, vb.pp("encoder"))?,
            final_layer_norm: enc.layer_norm(vb.pp("final_layer_norm"))?,
        })
    }

    /// The hidden state after `num_layers` encoder layers, through `final_layer_norm`.
    fn forward(&self, input_ids: &Tensor, num_layers: usize) -> Result<Tensor> {
        let (_, len) = input_ids.dims2()?;
        let positions = self.position_embedding.dim(0)?;
        if len > positions {
            candle_core::bail!(
                "input_ids has {len} tokens, the text encoder has {positions} positions"
            );
        }
        let embeddings = self
            .token_embedding
            .forward(input_ids)?
            .broadcast_add(&self.position_embedding.narrow(0, 0, len)?)?;
        let mask = causal_mask(len, input_ids.device())?;
        self.encoder
            .forward(&embeddings, Some(&mask), num_layers)?
            .apply(&self.final_layer_norm)
    }

    /// The pooled output `(B, hidden_size)`: each row's final hidden state at its end token
    /// ([`end_positions`]). The causal mask keeps padding after it from changing it.
    pub(crate) fn pooled(&self, input_ids: &Tensor, eos_token_id: u32) -> Result<Tensor> {
        let hidden = self.forward(input_ids, self.encoder.num_layers())?;
        let ids = input_ids.to_dtype(DType::U32)?.to_vec2::<u32>()?;
        let rows = end_positions(&ids, eos_token_id)
            .into_iter()
            .enumerate()
            .map(|(row, at)| hidden.get(row)?.get(at))
            .collect::<Result<Vec<_>>>()?;
        Tensor::stack(&rows, 0)
    }
}

/// Where transformers 4.44 reads each row's pooled output: the first `eos_token_id` (the
/// first position when there is none, as its `argmax` gives), or for the old configs with
/// `eos_token_id == 2` the first highest id, CLIP's end token in its own vocabulary.
fn end_positions(ids: &[Vec<u32>], eos_token_id: u32) -> Vec<usize> {
    let first = |row: &[u32], wanted: u32| row.iter().position(|&t| t == wanted).unwrap_or(0);
    ids.iter()
        .map(|row| match eos_token_id {
            2 => first(row, row.iter().copied().max().unwrap_or(0)),
            eos => first(row, eos),
        })
        .collect()
}

/// CLIP's text tower attends only to earlier tokens. transformers adds the dtype's minimum
/// above the diagonal; the scores are f32 here (see the attention), so f32's minimum, which
/// gives those entries exactly zero weight, as in transformers.
fn causal_mask(len: usize, device: &Device) -> Result<Tensor> {
    let mask: Vec<f32> = (0..len)
        .flat_map(|i| (0..len).map(move |j| if j > i { f32::MIN } else { 0.0 }))
        .collect();
    Tensor::from_vec(mask, (len, len), device)
}

/// The text encoder: token ids `(B, L)` (u32 or i64, `L <= max_position_embeddings`, as
/// [`ClipTokenizer::encode`] gives them) to `last_hidden_state` `(B, L, hidden_size)` in the
/// model's dtype.
#[derive(Clone, Debug)]
pub struct ClipTextModel {
    text_model: ClipTextTransformer,
    config: ClipTextConfig,
}

impl ClipTextModel {
    /// Build from any `VarBuilder` (a checkpoint, or a manifest for shape-only checks). The
    /// weights' dtype and device are the `VarBuilder`'s; so is the compute dtype.
    pub fn new(cfg: &ClipTextConfig, vb: VarBuilder) -> Result<Self> {
        let enc = cfg.check().map_err(Unsupported::into_candle)?;
        Ok(Self {
            text_model: ClipTextTransformer::new(cfg, &enc, vb.pp("text_model"))?,
            config: cfg.clone(),
        })
    }

    /// Load a transformers `save_pretrained` folder (SD 1.5's `text_encoder/`): `config.json`
    /// and `model.safetensors` or its `model.fp16.safetensors` variant, converted to `dtype`.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> crate::load::Result<Self> {
        let config = ClipTextConfig::load(&dir.join("config.json"))?;
        // Files saved before transformers made `position_ids` non-persistent (SD 1.5's among
        // them) still hold it; it is always `arange`, so it is not read.
        let extra = ["text_model.embeddings.position_ids"];
        load_checkpoint(dir, dtype, device, &extra, |vb| Self::new(&config, vb))
    }

    pub fn config(&self) -> &ClipTextConfig {
        &self.config
    }

    /// diffusers' `clip_skip`: the hidden state `clip_skip` layers before the last, through
    /// `final_layer_norm` (`encode_prompt` reads `hidden_states[-(clip_skip + 1)]`; `num_hidden_layers`
    /// reaches the embeddings). 0 is the plain [`Module::forward`].
    pub fn forward_with_clip_skip(&self, input_ids: &Tensor, clip_skip: usize) -> Result<Tensor> {
        let layers = self.config.num_hidden_layers;
        if clip_skip > layers {
            candle_core::bail!("clip_skip {clip_skip} is more than the model's {layers} layers");
        }
        self.text_model.forward(input_ids, layers - clip_skip)
    }
}

impl Module for ClipTextModel {
    fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
        self.forward_with_clip_skip(input_ids, 0)
    }
}

#[cfg(test)]
mod tests {
    use super::end_positions;

    /// The first end token, or (old configs) the first highest id.
    #[test]
    fn the_pooled_output_is_read_at_the_end_token() {
        let ids = vec![vec![49406, 320, 49407, 49407], vec![49406, 49407, 0, 0]];
        assert_eq!(end_positions(&ids, 49407), [2, 1]);
        assert_eq!(end_positions(&ids, 2), [2, 1]);
        assert_eq!(end_positions(&[vec![5, 9, 9, 1]], 2), [1]);
        assert_eq!(
            end_positions(&[vec![5, 6]], 7),
            [0],
            "no end token: position 0"
        );
    }
}
