//! # streamline-models
//!
//! **Owns** the video diffusion models, config.json + safetensors loading ([`load`]) and the
//! lowering to `streamline_ir`, built from the ops in [`ops`] (among them the frame-major <->
//! position-major layout changes and the GroupNorm over (C/G, T, H, W) split into a mergeable
//! statistics reduction and a pointwise apply).
//!
//! - [`clip`]: SVD's image encoder, transformers' `CLIPVisionModelWithProjection`, run eagerly
//!   (once per video, so not lowered to the IR).
//! - [`clip_text`]: AnimateDiff's (SD 1.5's) text encoder, transformers' `CLIPTextModel`, and
//!   its tokenizer, ids equal to transformers' slow `CLIPTokenizer`; eager like [`clip`], and
//!   built on the same encoder layers.
//! - [`clip_model`]: transformers' `CLIPModel` (both towers above with their projections), the
//!   scorer of CLIP-SIM.
//! - [`svd`]: SVD's UNet and temporal VAE; [`sd`]: AnimateDiff's motion UNet (SD 1.5's UNet
//!   plus a motion adapter's motion modules) and SD's VAE (`AutoencoderKL`). Both are built
//!   from shared blocks (the 2D resnet, the UNets' skip stack, the VAE encoder and mid block)
//!   and lowered to the IR.
//! - [`size`]: the one [`SizeRule`] per model that says which video sizes it takes.
//!
//! **Promises:** a checkpoint with a NaN or infinite weight (or one past f16's range, loaded
//! as f16) is refused as it loads, naming the file and the tensor; every lowered model matches diffusers 0.30.1 on the committed fixtures to
//! relative L2 <= 1e-4 in f32, and declares on every node the axes it is independent of, so
//! the slicing passes stay exact.
//!
//! **Tests:** `cargo test -p streamline-models` compares against the fixtures under
//! `fixtures/data/` (made by `cargo xtask fixtures`; no Python needed to test), `CLIPModel`'s
//! text and image features against transformers' in `tests/clip_model.rs`; unit tests cover
//! the load-time scan for non-finite weights and where the text tower pools.

mod blocks;
pub mod clip;
mod clip_encoder;
pub mod clip_model;
pub mod clip_text;
pub mod load;
pub mod ops;
pub mod sd;
pub mod size;
pub mod svd;

pub use size::{SizeError, SizeRule};
