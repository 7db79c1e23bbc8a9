//! The transformer encoder that CLIP's text and vision towers share (transformers'
//! `CLIPEncoder`), and the loading both towers do.
//!
//! The towers differ only around it (embeddings, pre/post LayerNorms, the text tower's causal
//! mask), so [`crate::clip`] and [`crate::clip_text`] build this one encoder rather than each
//! carrying a copy. candle-transformers' CLIP hard-codes `quick_gelu` and one LayerNorm eps;
//! this one follows the config.

use std::path::Path;

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{LayerNorm, Linear, VarBuilder};

use crate::load::{weights_file, ModelError, WeightSource};

/// A config value the encoder cannot run, found before any weight is read.
pub(crate) struct Unsupported {
    pub field: &'static str,
    pub value: String,
    pub reason: &'static str,
}

impl Unsupported {
    /// The load error, naming the config file.
    pub fn in_file(self, path: &Path) -> ModelError {
        ModelError::Unsupported {
            path: path.to_path_buf(),
            field: self.field.to_string(),
            value: self.value,
            reason: self.reason.to_string(),
        }
    }

    /// The same error when a model is built from a config value rather than a file.
    pub fn into_candle(self) -> candle_core::Error {
        candle_core::Error::Msg(format!(
            "`{}` = {:?} is not supported: {}",
            self.field, self.value, self.reason
        ))
    }
}

/// The activations of transformers' `ACT2FN` that CLIP checkpoints use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HiddenAct {
    /// `gelu`: the exact erf form (ViT-H/14, SVD's encoder).
    Gelu,
    /// `gelu_new` and `gelu_pytorch_tanh`: the tanh approximation.
    GeluTanh,
    /// `quick_gelu`: `x * sigmoid(1.702 x)` (OpenAI's CLIP checkpoints, SD 1.5's text encoder).
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

/// The sizes of a `CLIPEncoder`, checked: both towers' configs reduce to this.
#[derive(Clone, Copy, Debug)]
pub(crate) struct EncoderConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_attention_heads: usize,
    pub num_hidden_layers: usize,
    pub layer_norm_eps: f64,
    pub activation: HiddenAct,
}

impl EncoderConfig {
    /// Check what every CLIP config must satisfy; `hidden_act` is the config's string.
    pub fn new(
        hidden_size: usize,
        intermediate_size: usize,
        num_attention_heads: usize,
        num_hidden_layers: usize,
        layer_norm_eps: f64,
        hidden_act: &str,
    ) -> std::result::Result<Self, Unsupported> {
        if num_attention_heads == 0 || hidden_size % num_attention_heads != 0 {
            return Err(Unsupported {
                field: "num_attention_heads",
                value: num_attention_heads.to_string(),
                reason: "it must divide hidden_size",
            });
        }
        let activation = HiddenAct::from_name(hidden_act).ok_or_else(|| Unsupported {
            field: "hidden_act",
            value: hidden_act.to_string(),
            reason: "expected one of gelu, quick_gelu, gelu_new, gelu_pytorch_tanh",
        })?;
        Ok(Self {
            hidden_size,
            intermediate_size,
            num_attention_heads,
            num_hidden_layers,
            layer_norm_eps,
            activation,
        })
    }

    pub fn layer_norm(&self, vb: VarBuilder) -> Result<LayerNorm> {
        candle_nn::layer_norm(self.hidden_size, self.layer_norm_eps, vb)
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
    fn new(cfg: &EncoderConfig, vb: VarBuilder) -> Result<Self> {
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

    /// `mask` is an additive `(S, S)` f32 mask (the text tower's causal mask).
    fn forward(&self, xs: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let (b, s, e) = xs.dims3()?;
        // transformers scales the queries, not the scores.
        let q = self.heads((self.q_proj.forward(xs)? * self.scale)?)?;
        let k = self.heads(self.k_proj.forward(xs)?)?;
        let v = self.heads(self.v_proj.forward(xs)?)?;
        // Exponentials summed over hundreds of tokens lose precision in f16 / bf16, so the
        // mask and softmax run in f32; the matmuls around them keep the model's dtype.
        let scores = q.matmul(&k.t()?)?.to_dtype(DType::F32)?;
        let scores = match mask {
            Some(mask) => scores.broadcast_add(mask)?,
            None => scores,
        };
        let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(xs.dtype())?;
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
    fn new(cfg: &EncoderConfig, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            fc1: candle_nn::linear(cfg.hidden_size, cfg.intermediate_size, vb.pp("fc1"))?,
            fc2: candle_nn::linear(cfg.intermediate_size, cfg.hidden_size, vb.pp("fc2"))?,
            activation: cfg.activation,
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
    fn new(cfg: &EncoderConfig, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            self_attn: ClipAttention::new(cfg, vb.pp("self_attn"))?,
            layer_norm1: cfg.layer_norm(vb.pp("layer_norm1"))?,
            mlp: ClipMlp::new(cfg, vb.pp("mlp"))?,
            layer_norm2: cfg.layer_norm(vb.pp("layer_norm2"))?,
        })
    }

    fn forward(&self, xs: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let attn = self
            .self_attn
            .forward(&xs.apply(&self.layer_norm1)?, mask)?;
        let xs = (xs + attn)?;
        &xs + xs.apply(&self.layer_norm2)?.apply(&self.mlp)?
    }
}

/// transformers' `CLIPEncoder`: `layers.{i}.{self_attn,layer_norm1,mlp,layer_norm2}`.
#[derive(Clone, Debug)]
pub(crate) struct ClipEncoder {
    layers: Vec<ClipEncoderLayer>,
}

impl ClipEncoder {
    pub fn new(cfg: &EncoderConfig, vb: VarBuilder) -> Result<Self> {
        let vb = vb.pp("layers");
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| ClipEncoderLayer::new(cfg, vb.pp(i)))
            .collect::<Result<_>>()?;
        Ok(Self { layers })
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Run the first `num_layers` layers (all of them for the model's output; fewer for
    /// diffusers' `clip_skip`, which reads an earlier hidden state).
    pub fn forward(&self, xs: &Tensor, mask: Option<&Tensor>, num_layers: usize) -> Result<Tensor> {
        self.layers
            .iter()
            .take(num_layers)
            .try_fold(xs.clone(), |xs, l| l.forward(&xs, mask))
    }
}

/// Build a model from a transformers `save_pretrained` folder: `model.safetensors` or its
/// `model.fp16.safetensors` variant, converted to `dtype`. Errors name the file (and tensor).
///
/// Extra tensors do not stop loading (transformers ignores them too), but a checkpoint of
/// another model usually shows up as a warning here first; `expected_extra` names tensors that
/// real checkpoints carry and the model does not use (older files' `position_ids` buffer).
pub(crate) fn load_checkpoint<T>(
    dir: &Path,
    dtype: DType,
    device: &Device,
    expected_extra: &[&str],
    build: impl FnOnce(VarBuilder<'static>) -> Result<T>,
) -> std::result::Result<T, ModelError> {
    let path = weights_file(dir, "model")?;
    let source = WeightSource::open(&path)?;
    let held = source.tensors()?;
    let usage = source.usage();
    let model = build(source.var_builder(dtype, device)).map_err(|error| ModelError::Weights {
        path: path.clone(),
        error,
    })?;
    let requested = usage.requested();
    let unused: Vec<&String> = held
        .keys()
        .filter(|n| !requested.contains_key(*n) && !expected_extra.contains(&n.as_str()))
        .collect();
    if !unused.is_empty() {
        tracing::warn!(
            "{}: tensors not used by the model: {unused:?}",
            path.display()
        );
    }
    Ok(model)
}
