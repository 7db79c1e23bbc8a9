//! # streamline-models
//!
//! **Owns** the video diffusion models and their lowering to `streamline_ir`: today the ops
//! every temporal layer is built from ([`ops`]: the frame-major <-> position-major layout
//! changes and the GroupNorm over (C/G, T, H, W) split into a mergeable statistics reduction
//! and a pointwise apply). The SVD UNet, temporal VAE and CLIP image encoder, the AnimateDiff
//! UNet with motion modules, SD VAE and CLIP text encoder, and config.json + safetensors loading
//! arrive with their issues.
//!
//! - [`clip`]: SVD's image encoder, transformers' `CLIPVisionModelWithProjection`, run eagerly
//!   (once per video, so not lowered to the IR).
//! - [`svd`]: SVD's UNet and temporal VAE; [`sd`]: AnimateDiff's motion UNet (SD 1.5's UNet
//!   plus a motion adapter's motion modules) and SD's VAE (`AutoencoderKL`). Both are built from shared blocks (the 2D resnet, the VAE encoder and
//!   mid block) and lowered to the IR.
//!
//! **Promises:** every lowered model matches diffusers 0.30.1 on the committed fixtures to
//! relative L2 <= 1e-4 in f32, and declares on every node the axes it is independent of, so
//! the slicing passes stay exact.
//!
//! **Tests:** `cargo test -p streamline-models` compares against the fixtures under
//! `fixtures/data/` (made by `cargo xtask fixtures`; no Python needed to test).

mod blocks;
pub mod clip;
pub mod load;
pub mod ops;
pub mod sd;
pub mod svd;
