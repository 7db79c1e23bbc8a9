//! Stable Video Diffusion image-to-video, with diffusers' `StableVideoDiffusionPipeline` math.

use std::path::PathBuf;

mod noise;
mod pipeline;
mod preprocess;

pub use noise::unit_noise;
pub use pipeline::{RunReport, StableVideoDiffusion, Stage, SvdError, SvdSettings};
pub use preprocess::{clip_input, resize_with_antialiasing, Planes};

/// Environment variable that points [`default_model_dir`] at another folder (a retrained model).
pub const DEFAULT_MODEL_ENV: &str = "STREAMLINE_DEFAULT_MODEL";

/// The built-in default model: a tiny SVD trained by `training/train.py` on synthetic motion
/// (docs/default-model.md), committed in the source tree at `models/default`, so a first run
/// needs no download. `$STREAMLINE_DEFAULT_MODEL` overrides the folder.
pub fn default_model_dir() -> PathBuf {
    std::env::var_os(DEFAULT_MODEL_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let crate_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
            crate_dir
                .ancestors()
                .nth(2)
                .expect("the pipeline crate lives at <workspace>/crates/streamline-pipeline")
                .join("models/default")
        })
}
