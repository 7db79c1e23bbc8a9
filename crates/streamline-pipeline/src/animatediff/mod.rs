//! AnimateDiff text-to-video, with diffusers' `AnimateDiffPipeline` math: an SD 1.5 folder
//! (unet/, vae/, text_encoder/, tokenizer/, scheduler/) plus a motion adapter folder.

mod pipeline;

pub use pipeline::{AnimateDiff, AnimateDiffConfigs, AnimateDiffSettings};
