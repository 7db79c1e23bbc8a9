//! Helpers the exactness tests share: seeded random tensors and the error measures.

use candle_core::{DType, Device, Tensor};
use proptest::test_runner::Config as ProptestConfig;

/// Cases per property: enough to reach the edges of the shape ranges, few enough for seconds.
pub fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 48,
        ..ProptestConfig::default()
    }
}

/// Roughly normal values (a sum of uniforms) from a seeded xorshift, so cases replay.
pub fn randn(dims: &[usize], seed: u64) -> Tensor {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut uniform = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 40) as f32 / (1u64 << 24) as f32
    };
    let n: usize = dims.iter().product();
    let values: Vec<f32> = (0..n)
        .map(|_| (0..4).map(|_| uniform()).sum::<f32>() * 1.7 - 3.4)
        .collect();
    Tensor::from_vec(values, dims, &Device::Cpu).unwrap()
}

pub use streamline_ir::testing::rel_l2;

/// LayerNorm in f64 with centered moments: the exact figure. candle-nn's CPU op takes the
/// variance as E[x^2] - E[x]^2 in f32, which cancels when a row's values nearly agree (two
/// close values of a 2-wide row were 2e-5 off in relative L2), so it cannot be the judge.
pub fn layer_norm_f64(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Tensor {
    let wide = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
    let x = wide(x);
    let centered = x
        .broadcast_sub(&x.mean_keepdim(candle_core::D::Minus1).unwrap())
        .unwrap();
    let var = centered
        .sqr()
        .unwrap()
        .mean_keepdim(candle_core::D::Minus1)
        .unwrap();
    let normed = centered
        .broadcast_div(&(var + eps).unwrap().sqrt().unwrap())
        .unwrap();
    normed
        .broadcast_mul(&wide(w))
        .unwrap()
        .broadcast_add(&wide(b))
        .unwrap()
}
