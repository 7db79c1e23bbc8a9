//! Reproducible unit Gaussian noise from a seed.
//!
//! candle's CPU `randn` draws from a thread RNG that cannot be seeded, and the same seed must
//! give the same video on every run and device, so noise is drawn on the host: splitmix64
//! uniforms through Box-Muller. It is not torch's generator; to reproduce a diffusers run
//! exactly, pass its noise (`--latents`).

use candle_core::{Device, Shape, Tensor};

/// Standard normal samples of `shape` from `seed`, as f32 on `device`.
pub fn unit_noise(
    shape: impl Into<Shape>,
    seed: u64,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let shape = shape.into();
    let mut state = seed;
    let mut uniform = move || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        // 53 random bits in (0, 1]: never 0, so the logarithm is finite.
        (((z ^ (z >> 31)) >> 11) as f64 + 1.0) / (1u64 << 53) as f64
    };
    let n = shape.elem_count();
    let mut values = Vec::with_capacity(n + 1);
    while values.len() < n {
        let (u1, u2) = (uniform(), uniform());
        let r = (-2.0 * u1.ln()).sqrt();
        let theta = std::f64::consts::TAU * u2;
        values.push((r * theta.cos()) as f32);
        values.push((r * theta.sin()) as f32);
    }
    values.truncate(n);
    Tensor::from_vec(values, shape, device)
}
