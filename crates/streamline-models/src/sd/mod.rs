//! Stable Diffusion 1.5 parts AnimateDiff runs on, lowered to the IR: the motion UNet
//! (`UNetMotionModel`, SD's UNet plus a motion adapter), its motion modules, and the VAE
//! (`AutoencoderKL`).

mod config;
mod motion;
mod transformer;
mod unet;
mod vae;

pub use config::{MotionAdapterConfig, MotionUNetConfig, UNet2DConfig};
pub use motion::MotionModule;
pub use unet::UNetMotionModel;
pub use vae::AutoencoderKL;

pub use crate::blocks::autoencoder::VaeConfig;
