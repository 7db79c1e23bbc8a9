//! diffusers' `Timesteps` + `TimestepEmbedding`: sinusoids through a two-layer MLP.

use std::sync::Arc;

use candle_core::DType;
use candle_nn::VarBuilder;
use streamline_ir::{Graph, Result, ValueId};

use crate::blocks::node;
use crate::ops::{Linear, Silu, Sinusoid};

/// `linear_2(silu(linear_1(x)))`.
#[derive(Debug)]
pub(crate) struct TimestepEmbedding {
    linear_1: Arc<Linear>,
    linear_2: Arc<Linear>,
}

impl TimestepEmbedding {
    pub fn new(
        in_dim: usize,
        hidden: usize,
        out_dim: usize,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        Ok(TimestepEmbedding {
            linear_1: Arc::new(Linear::new(in_dim, hidden, true, vb.pp("linear_1"))?),
            linear_2: Arc::new(Linear::new(hidden, out_dim, true, vb.pp("linear_2"))?),
        })
    }

    pub fn lower(&self, g: &mut Graph, p: &str, x: ValueId) -> Result<ValueId> {
        let h = node(g, p, "linear_1", self.linear_1.clone(), &[x])?;
        let h = node(g, p, "act", Arc::new(Silu), &[h])?;
        node(g, p, "linear_2", self.linear_2.clone(), &[h])
    }
}

/// `Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=0)`, as every SVD module and SD
/// 1.5's UNet use it.
pub(crate) fn sinusoid(dim: usize, dtype: DType) -> Arc<Sinusoid> {
    Arc::new(Sinusoid {
        dim,
        flip_sin_to_cos: true,
        downscale_freq_shift: 0.0,
        dtype,
    })
}
