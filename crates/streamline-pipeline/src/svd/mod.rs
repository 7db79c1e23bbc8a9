//! Stable Video Diffusion image-to-video, with diffusers' `StableVideoDiffusionPipeline` math.

mod noise;
mod pipeline;
mod preprocess;

pub use noise::unit_noise;
pub use pipeline::{RunReport, StableVideoDiffusion, Stage, SvdError, SvdSettings};
pub use preprocess::{clip_input, resize_with_antialiasing, Planes};
