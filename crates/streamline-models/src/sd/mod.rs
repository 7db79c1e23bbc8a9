//! Stable Diffusion 1.5 parts AnimateDiff runs on: the VAE (`AutoencoderKL`), lowered to the IR.

mod vae;

pub use vae::AutoencoderKL;
