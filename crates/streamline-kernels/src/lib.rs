//! CPU kernels that beat candle's defaults where a UNet step spends its time, and the
//! portable path every other device runs.
//!
//! **Owns** candle custom ops for the CPU: 2D convolution through tiled im2col and `gemm`
//! (no full-size im2col buffer), GroupNorm statistics and normalization with f32
//! accumulation, LayerNorm, attention with query tiles and an online softmax (no tokens x
//! tokens buffer), GEGLU's gate and SiLU in vectorized passes, residual adds, blends and
//! per-channel affine maps, and products with the bias fused (linear layers, the temporal
//! `(k, 1, 1)` convolution; the models keep linear weights in [`WeightOrder::InOut`], which
//! gemm reads without gathering them element by element on every call). Every kernel splits
//! its work over rayon's threads, and [`on_worker`] runs a caller's code on one of them, so
//! that a kernel's threads join instead of sleeping between kernels. And [`portable`], the
//! path for every other device, from candle's tensor ops alone: attention in query tiles and
//! key blocks with an online softmax (flash-attn behind `flash-attn`), convolution in bands
//! of rows under a bound on im2col, products, LayerNorm, GroupNorm and temporal GroupNorm's
//! mergeable moments in tiles of rows.
//!
//! **Promises** every kernel equals candle's reference ops (also exported here, and used on
//! other devices and dtypes) within 1e-5 relative L2; f16 and bf16 compute in f32 inside.
//! Each kernel reports the scratch it allocates, so the planner can count it. The portable
//! ops equal the same references (norms judged in f64) within 1e-5 relative L2 in f32,
//! compute statistics in f32 on the tensor's device with no f64 tensor and no read back to
//! the host; every one but SiLU (which allocates its output alone) and the moment merge (a
//! few values a group) has a workspace function that declares its heap on the CPU to within
//! 10% + 64 KiB of what a counting allocator measures.
//!
//! **Tests:** `cargo test -p streamline-kernels` (property tests against the reference ops
//! over random shapes, strides, paddings, bands and splits; `tests/portable_ops_workspace.rs`
//! measures the portable ops' heap); timings against PyTorch are in `cargo xtask bench`.

mod activation;
mod attention;
mod conv;
mod copy;
mod cpu_op;
mod elementwise;
mod group_norm;
mod layer_norm;
mod linear;
mod par;
pub mod portable;
mod simd;
mod storage;

pub use activation::{geglu, linear_geglu, linear_geglu_workspace, silu};
pub use attention::{
    attention, attention_reference, attention_runs, attention_scratch, attention_workspace,
    AttentionSizes, KvRows,
};
pub use conv::{conv2d, conv2d_reference, ConvGeometry};
pub use copy::{cat0, contiguous};
pub use elementwise::{add, batch_affine, blend, ChannelTables};
pub use group_norm::{
    group_norm, group_norm_reference, group_norm_workspace, group_sums, group_sums_runs,
};
pub use layer_norm::{layer_norm, layer_norm_reference};
pub use linear::{
    linear, linear_reference, linear_workspace, temporal_conv, temporal_conv_reference,
    temporal_conv_workspace, WeightOrder,
};
pub use par::on_worker;
pub use storage::Compute;
