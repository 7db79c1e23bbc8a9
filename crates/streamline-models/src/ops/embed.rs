//! Timestep and frame-index embeddings.

use candle_core::{DType, Device, Tensor};
use streamline_ir::op_contract;
use streamline_ir::{IrError, Layout, Op, Result, SliceCtx, ValueInfo, Workspace};

/// A value fixed at lowering time (frame indices), seen whole by every slice.
#[derive(Debug, Clone)]
pub struct Const {
    value: Tensor,
}

impl Const {
    pub fn new(value: Tensor) -> Self {
        Const { value }
    }

    /// `0, 1, ..., n-1` as f32: the frame indices of the temporal position embedding.
    pub fn arange(n: usize, device: &Device) -> Result<Self> {
        Ok(Const::new(
            Tensor::arange(0u32, n as u32, device)?.to_dtype(DType::F32)?,
        ))
    }
}

impl Op for Const {
    op_contract!("const", None);
    fn infer(&self, _: &[&ValueInfo]) -> Result<ValueInfo> {
        Ok(ValueInfo::new(
            self.value.shape().clone(),
            self.value.dtype(),
            Layout::WHOLE,
        ))
    }
    fn flops(&self, _: &[&ValueInfo], _: &ValueInfo) -> u64 {
        0
    }
    fn forward(&self, _: &[&Tensor], _: &SliceCtx) -> Result<Tensor> {
        Ok(self.value.clone())
    }
}

/// diffusers' `Timesteps` (`get_timestep_embedding`, max period 10000): each scalar of an
/// `(N,)` or `(N, K)` input becomes `dim` sinusoids; an `(N, K)` input yields `(N, K*dim)`, as
/// SVD's `add_time_proj(added_time_ids.flatten()).reshape(batch, -1)` does. Computed in f32.
#[derive(Debug, Clone)]
pub struct Sinusoid {
    pub dim: usize,
    pub flip_sin_to_cos: bool,
    pub downscale_freq_shift: f64,
    pub dtype: DType,
}

impl Op for Sinusoid {
    op_contract!("sinusoid", None);
    fn describe(&self) -> String {
        format!("{}", self.dim)
    }
    fn infer(&self, inputs: &[&ValueInfo]) -> Result<ValueInfo> {
        let per_row = match inputs[0].shape.dims() {
            &[n] => (n, 1),
            &[n, k] => (n, k),
            d => {
                return Err(IrError::Plan(format!(
                    "sinusoid expects (N,) or (N, K), got {d:?}"
                )))
            }
        };
        Ok(ValueInfo::new(
            (per_row.0, per_row.1 * self.dim),
            self.dtype,
            Layout::WHOLE,
        ))
    }
    fn workspace_bytes(&self, inputs: &[&ValueInfo], output: &ValueInfo, _: Workspace) -> usize {
        // All f32: the flat input (a copy unless f32), the exponents and frequencies, the
        // arguments with their sines and cosines, the embedding (the result unless cast; a
        // padded copy for odd dims).
        let n = inputs[0].shape.elem_count();
        let half = self.dim / 2;
        let copy = if inputs[0].dtype == DType::F32 {
            0
        } else {
            4 * n
        };
        let emb = 4 * n * self.dim;
        let cast = if output.dtype == DType::F32 { 0 } else { emb };
        let pad = if self.dim % 2 == 1 { emb + 4 * n } else { 0 };
        copy + 2 * 4 * half + 3 * 4 * n * half + cast + pad
    }
    fn flops(&self, _: &[&ValueInfo], output: &ValueInfo) -> u64 {
        4 * output.shape.elem_count() as u64
    }
    fn forward(&self, x: &[&Tensor], _: &SliceCtx) -> Result<Tensor> {
        let n = x[0].dim(0)?;
        let t = x[0].to_dtype(DType::F32)?.flatten_all()?;
        let half = self.dim / 2;
        let dev = t.device();
        let exponent = (Tensor::arange(0u32, half as u32, dev)?.to_dtype(DType::F32)?
            * (-(10000f64.ln()) / (half as f64 - self.downscale_freq_shift)))?;
        let freqs = exponent.exp()?;
        let args = t.unsqueeze(1)?.broadcast_mul(&freqs.unsqueeze(0)?)?;
        let (sin, cos) = (args.sin()?, args.cos()?);
        let mut emb = if self.flip_sin_to_cos {
            Tensor::cat(&[&cos, &sin], 1)?
        } else {
            Tensor::cat(&[&sin, &cos], 1)?
        };
        if self.dim % 2 == 1 {
            emb = emb.pad_with_zeros(1, 0, 1)?;
        }
        Ok(emb.reshape((n, ()))?.to_dtype(self.dtype)?)
    }
}
