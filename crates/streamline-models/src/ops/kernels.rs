//! Which kernel computes an op, as the plan's [`Kernels`] say, and what it allocates.
//!
//! streamline's CPU kernels serve [`Kernels::Cpu`]; the portable path
//! (`streamline_kernels::portable`, candle ops tiled to bounded buffers) serves every other
//! choice, with attention through flash-attn for [`Kernels::FlashAttn`] in builds that have
//! it. Forward and workspace formulas dispatch through the same functions, so an op plans for
//! exactly the implementation that runs it.

use candle_core::{DType, Result, Tensor};
use streamline_ir::Kernels;
use streamline_kernels::portable;
use streamline_kernels::{AttentionSizes, Compute, ConvGeometry, KvRows};

/// Scaled dot-product attention (see `streamline_kernels::attention`).
pub(crate) fn attention(
    kernels: Kernels,
    [q, k, v]: [&Tensor; 3],
    heads: usize,
    scale: f64,
    kv: KvRows,
) -> Result<Tensor> {
    match kernels {
        Kernels::Cpu => streamline_kernels::attention(q, k, v, heads, scale, kv),
        #[cfg(feature = "flash-attn")]
        Kernels::FlashAttn => portable::attention::flash_attention(q, k, v, heads, scale, kv),
        _ => portable::attention::attention(q, k, v, heads, scale, kv),
    }
}

/// Bytes [`attention`] allocates beyond its inputs and output.
pub(crate) fn attention_workspace(kernels: Kernels, s: AttentionSizes, dtype: DType) -> usize {
    match kernels {
        Kernels::Cpu => {
            streamline_kernels::attention_workspace(s, dtype, &candle_core::Device::Cpu)
        }
        #[cfg(feature = "flash-attn")]
        Kernels::FlashAttn => portable::attention::flash_attention_workspace(s, dtype),
        _ => portable::attention::attention_workspace(s, dtype, kernels.on_cpu()),
    }
}

/// `x @ w^T + b` on the last dim.
pub(crate) fn linear(
    kernels: Kernels,
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
) -> Result<Tensor> {
    match kernels {
        Kernels::Cpu => streamline_kernels::linear(x, w, b),
        _ => portable::linear::linear(x, w, b),
    }
}

/// diffusers' GEGLU with its two projections.
pub(crate) fn linear_geglu(
    kernels: Kernels,
    x: &Tensor,
    w: [&Tensor; 2],
    b: [Option<&Tensor>; 2],
) -> Result<Tensor> {
    match kernels {
        Kernels::Cpu => streamline_kernels::linear_geglu(x, w, b),
        _ => portable::linear::linear_geglu(x, w, b),
    }
}

/// 2D convolution of NCHW frames, with bias.
pub(crate) fn conv2d(
    kernels: Kernels,
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    g: ConvGeometry,
) -> Result<Tensor> {
    match kernels {
        Kernels::Cpu => streamline_kernels::conv2d(x, w, b, g),
        _ => portable::conv::conv2d(x, w, b, g),
    }
}

/// The `(k, 1, 1)` convolution over the frames of position-major features.
pub(crate) fn temporal_conv(
    kernels: Kernels,
    x: &Tensor,
    taps: &Tensor,
    bias: &Tensor,
    kernel: usize,
) -> Result<Tensor> {
    match kernels {
        Kernels::Cpu => streamline_kernels::temporal_conv(x, taps, bias, kernel),
        _ => portable::linear::temporal_conv(x, taps, bias, kernel),
    }
}

/// GroupNorm of each frame over (C/G, H, W).
pub(crate) fn group_norm(
    kernels: Kernels,
    x: &Tensor,
    [w, b]: [&Tensor; 2],
    groups: usize,
    eps: f64,
) -> Result<Tensor> {
    match kernels {
        Kernels::Cpu => streamline_kernels::group_norm(x, w, b, groups, eps),
        _ => portable::norm::group_norm(x, w, b, groups, eps),
    }
}

/// SiLU, pointwise.
pub(crate) fn silu(kernels: Kernels, x: &Tensor) -> Result<Tensor> {
    match kernels {
        Kernels::Cpu => streamline_kernels::silu(x),
        _ => portable::linear::silu(x),
    }
}

/// `a + b` for two tensors of one shape.
pub(crate) fn add(kernels: Kernels, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    match kernels {
        Kernels::Cpu => streamline_kernels::add(a, b),
        _ => a + b,
    }
}

/// `alpha * (a - b) + b` for two tensors of one shape, in one pass on the CPU (`None`
/// elsewhere: the caller tiles candle's ops).
pub(crate) fn blend(
    kernels: Kernels,
    a: &Tensor,
    b: &Tensor,
    alpha: f64,
) -> Option<Result<Tensor>> {
    (kernels == Kernels::Cpu && Compute::of(a) == Compute::F32)
        .then(|| streamline_kernels::blend(a, b, alpha))
}

/// A contiguous copy.
pub(crate) fn contiguous(kernels: Kernels, x: &Tensor) -> Result<Tensor> {
    match kernels {
        Kernels::Cpu => streamline_kernels::contiguous(x),
        _ => x.contiguous(),
    }
}

/// Parts joined along dim 0.
pub(crate) fn cat0(kernels: Kernels, parts: &[Tensor]) -> Result<Tensor> {
    match kernels {
        Kernels::Cpu => streamline_kernels::cat0(parts),
        _ => Tensor::cat(parts, 0),
    }
}
