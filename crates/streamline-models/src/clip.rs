//! SVD's image encoder: transformers' `CLIPVisionModelWithProjection` (CLIP ViT-H/14 in SVD).
//!
//! It runs once per video on the conditioning image, so it stays an eager candle model rather
//! than being lowered to the IR. candle-transformers' CLIP hard-codes `quick_gelu` and one
//! LayerNorm eps, while SVD's encoder uses the exact erf GELU; this one follows the config.
//! Module and tensor names match transformers 4.44.2, so Hugging Face checkpoints load as is.

use std::path::Path;

use candle_core::{DType, Device, IndexOp, Module, Result, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, LayerNorm, Linear, VarBuilder};
use serde::Deserialize;

use crate::load::{load_config, weights_file, ModelError, WeightSource};

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

/// A config value this implementation cannot run, found before any weight is read.
struct Unsupported {
    field: &'static str,
    value: String,
    reason: &'static str,
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
    pub fn load(path: &Path) -> std::result::Result<Self, ModelError> {
        let config: Self = load_config(path)?;
        config.check().map_err(|u| ModelError::Unsupported {
            path: path.to_path_buf(),
            field: u.field.to_string(),
            value: u.value,
            reason: u.reason.to_string(),
        })?;
        Ok(config)
    }

    /// Tokens per image: one per patch plus the class token.
    pub fn num_positions(&self) -> usize {
        (self.image_size / self.patch_size).pow(2) + 1
    }

    fn check(&self) -> std::result::Result<HiddenAct, Unsupported> {
        if self.num_attention_heads == 0 || self.hidden_size % self.num_attention_heads != 0 {
            return Err(Unsupported {
                field: "num_attention_heads",
                value: self.num_attention_heads.to_string(),
                reason: "it must divide hidden_size",
            });
        }
        if self.patch_size == 0 || self.patch_size > self.image_size {
            return Err(Unsupported {
                field: "patch_size",
                value: self.patch_size.to_string(),
                reason: "it must be between 1 and image_size",
            });
        }
        HiddenAct::from_name(&self.hidden_act).ok_or_else(|| Unsupported {
            field: "hidden_act",
            value: self.hidden_act.clone(),
            reason: "expected one of gelu, quick_gelu, gelu_new, gelu_pytorch_tanh",
        })
    }
}

/// The activations of transformers' `ACT2FN` that CLIP checkpoints use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HiddenAct {
    /// `gelu`: the exact erf form (ViT-H/14, SVD's encoder).
    Gelu,
    /// `gelu_new` and `gelu_pytorch_tanh`: the tanh approximation.
    GeluTanh,
    /// `quick_gelu`: `x * sigmoid(1.702 x)` (OpenAI's CLIP checkpoints).
    QuickGelu,
}

impl HiddenAct {
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "gelu" => Some(Self::Gelu),
            "gelu_new" | "gelu_pytorch_tanh" => Some(Self::GeluTanh),
            "quick_gelu" => Some(Self::QuickGelu),
            _ => None,
        }
    }
}

impl Module for HiddenAct {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Self::Gelu => xs.gelu_erf(),
            Self::GeluTanh => xs.gelu(),
            Self::QuickGelu => xs * candle_nn::ops::sigmoid(&(xs * 1.702)?)?,
        }
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

#[derive(Clone, Debug)]
struct ClipAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    num_heads: usize,
    head_dim: usize,
    scale: f64,
}

impl ClipAttention {
    fn new(cfg: &ClipVisionConfig, vb: VarBuilder) -> Result<Self> {
        let e = cfg.hidden_size;
        let head_dim = e / cfg.num_attention_heads;
        Ok(Self {
            q_proj: candle_nn::linear(e, e, vb.pp("q_proj"))?,
            k_proj: candle_nn::linear(e, e, vb.pp("k_proj"))?,
            v_proj: candle_nn::linear(e, e, vb.pp("v_proj"))?,
            out_proj: candle_nn::linear(e, e, vb.pp("out_proj"))?,
            num_heads: cfg.num_attention_heads,
            head_dim,
            scale: (head_dim as f64).powf(-0.5),
        })
    }

    /// `(B, S, E)` -> `(B, heads, S, head_dim)`.
    fn heads(&self, xs: Tensor) -> Result<Tensor> {
        let (b, s, _) = xs.dims3()?;
        xs.reshape((b, s, self.num_heads, self.head_dim))?
            .transpose(1, 2)?
            .contiguous()
    }
}

impl Module for ClipAttention {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, s, e) = xs.dims3()?;
        // transformers scales the queries, not the scores.
        let q = self.heads((self.q_proj.forward(xs)? * self.scale)?)?;
        let k = self.heads(self.k_proj.forward(xs)?)?;
        let v = self.heads(self.v_proj.forward(xs)?)?;
        let scores = q.matmul(&k.t()?)?;
        // Exponentials summed over 257 tokens lose precision in f16 / bf16, so the softmax runs
        // in f32; the matmuls around it keep the model's dtype.
        let probs = candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?
            .to_dtype(xs.dtype())?;
        let out = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, s, e))?;
        self.out_proj.forward(&out)
    }
}

#[derive(Clone, Debug)]
struct ClipMlp {
    fc1: Linear,
    fc2: Linear,
    activation: HiddenAct,
}

impl ClipMlp {
    fn new(cfg: &ClipVisionConfig, activation: HiddenAct, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            fc1: candle_nn::linear(cfg.hidden_size, cfg.intermediate_size, vb.pp("fc1"))?,
            fc2: candle_nn::linear(cfg.intermediate_size, cfg.hidden_size, vb.pp("fc2"))?,
            activation,
        })
    }
}

impl Module for ClipMlp {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        xs.apply(&self.fc1)?
            .apply(&self.activation)?
            .apply(&self.fc2)
    }
}

#[derive(Clone, Debug)]
struct ClipEncoderLayer {
    self_attn: ClipAttention,
    layer_norm1: LayerNorm,
    mlp: ClipMlp,
    layer_norm2: LayerNorm,
}

impl ClipEncoderLayer {
    fn new(cfg: &ClipVisionConfig, activation: HiddenAct, vb: VarBuilder) -> Result<Self> {
        let e = cfg.hidden_size;
        Ok(Self {
            self_attn: ClipAttention::new(cfg, vb.pp("self_attn"))?,
            layer_norm1: candle_nn::layer_norm(e, cfg.layer_norm_eps, vb.pp("layer_norm1"))?,
            mlp: ClipMlp::new(cfg, activation, vb.pp("mlp"))?,
            layer_norm2: candle_nn::layer_norm(e, cfg.layer_norm_eps, vb.pp("layer_norm2"))?,
        })
    }
}

impl Module for ClipEncoderLayer {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let xs = (xs + xs.apply(&self.layer_norm1)?.apply(&self.self_attn)?)?;
        &xs + xs.apply(&self.layer_norm2)?.apply(&self.mlp)?
    }
}

#[derive(Clone, Debug)]
struct ClipEncoder {
    layers: Vec<ClipEncoderLayer>,
}

impl ClipEncoder {
    fn new(cfg: &ClipVisionConfig, activation: HiddenAct, vb: VarBuilder) -> Result<Self> {
        let vb = vb.pp("layers");
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| ClipEncoderLayer::new(cfg, activation, vb.pp(i)))
            .collect::<Result<_>>()?;
        Ok(Self { layers })
    }
}

impl Module for ClipEncoder {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.layers.iter().try_fold(xs.clone(), |xs, l| xs.apply(l))
    }
}

/// transformers' `CLIPVisionTransformer`; its forward gives the pooled output (the final
/// class token after `post_layernorm`), all SVD reads.
#[derive(Clone, Debug)]
struct ClipVisionTransformer {
    embeddings: ClipVisionEmbeddings,
    pre_layrnorm: LayerNorm,
    encoder: ClipEncoder,
    post_layernorm: LayerNorm,
}

impl ClipVisionTransformer {
    fn new(cfg: &ClipVisionConfig, activation: HiddenAct, vb: VarBuilder) -> Result<Self> {
        let (e, eps) = (cfg.hidden_size, cfg.layer_norm_eps);
        Ok(Self {
            embeddings: ClipVisionEmbeddings::new(cfg, vb.pp("embeddings"))?,
            // [sic]: the checkpoint's name.
            pre_layrnorm: candle_nn::layer_norm(e, eps, vb.pp("pre_layrnorm"))?,
            encoder: ClipEncoder::new(cfg, activation, vb.pp("encoder"))?,
            post_layernorm: candle_nn::layer_norm(e, eps, vb.pp("post_layernorm"))?,
        })
    }
}

impl Module for ClipVisionTransformer {
    fn forward(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let last_hidden_state = pixel_values
            .apply(&self.embeddings)?
            .apply(&self.pre_layrnorm)?
            .apply(&self.encoder)?;
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
        let activation = cfg.check().map_err(|u| {
            candle_core::Error::Msg(format!(
                "`{}` = {:?} is not supported: {}",
                u.field, u.value, u.reason
            ))
        })?;
        Ok(Self {
            vision_model: ClipVisionTransformer::new(cfg, activation, vb.pp("vision_model"))?,
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
    pub fn load(
        dir: &Path,
        dtype: DType,
        device: &Device,
    ) -> std::result::Result<Self, ModelError> {
        let config = ClipVisionConfig::load(&dir.join("config.json"))?;
        let path = weights_file(dir, "model")?;
        let source = WeightSource::open(&path)?;
        let held = source.tensors()?;
        let usage = source.usage();
        let model = Self::new(&config, source.var_builder(dtype, device)).map_err(|source| {
            ModelError::Weights {
                path: path.clone(),
                source,
            }
        })?;
        // Extra tensors do not stop loading (transformers ignores them too), but a checkpoint
        // of another model usually shows up here first.
        let requested = usage.requested();
        let unused: Vec<&String> = held
            .keys()
            .filter(|n| !requested.contains_key(*n))
            .collect();
        if !unused.is_empty() {
            tracing::warn!(
                "{}: tensors not used by the model: {unused:?}",
                path.display()
            );
        }
        Ok(model)
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
