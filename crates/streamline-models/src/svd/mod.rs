//! Stable Video Diffusion: the spatio-temporal UNet and the temporal VAE, lowered to the IR.

mod config;
mod resnet;
mod transformer;
mod unet;
mod vae;

pub use config::{SampleSize, UNetConfig};
pub use unet::{UNetShape, UNetSpatioTemporalConditionModel};
pub use vae::AutoencoderKLTemporalDecoder;

pub use crate::blocks::autoencoder::{LatentDist, VaeConfig};
pub use crate::load::PerBlock;
