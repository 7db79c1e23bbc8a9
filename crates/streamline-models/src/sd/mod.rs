//! Stable Diffusion 1.5 parts AnimateDiff runs on, lowered to the IR: the VAE
//! (`AutoencoderKL`) and the motion modules of a motion adapter.

mod motion;
mod vae;

pub use motion::MotionModule;
pub use vae::AutoencoderKL;
