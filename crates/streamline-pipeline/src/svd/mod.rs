//! Stable Video Diffusion image-to-video, with diffusers' `StableVideoDiffusionPipeline` math.

use std::path::PathBuf;

mod noise;
mod pipeline;
mod preprocess;

pub use noise::unit_noise;
pub use pipeline::{StableVideoDiffusion, SvdConfigs, SvdSettings};

pub use crate::run::{PipelineError, RunReport, Stage};

/// The SVD pipeline's errors (every pipeline shares [`PipelineError`]).
pub type SvdError = PipelineError;
pub use preprocess::{clip_input, resize_with_antialiasing, Planes};

/// Environment variable that points [`default_model_dir`] at another folder (a retrained model).
pub const DEFAULT_MODEL_ENV: &str = "STREAMLINE_DEFAULT_MODEL";

/// The built-in default model: a tiny SVD trained by `training/train.py` on synthetic motion
/// (docs/default-model.md), committed in the source tree at `models/default`, so a first run
/// needs no download. `$STREAMLINE_DEFAULT_MODEL` overrides the folder.
pub fn default_model_dir() -> PathBuf {
    std::env::var_os(DEFAULT_MODEL_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| source_tree().join("models/default"))
}

/// The default model's example conditioning images (`examples/*.png` in the source tree), one
/// per taught motion; Step Rehash calibrates on them when given no image.
pub fn example_images() -> Vec<PathBuf> {
    ["red", "blue", "green"]
        .iter()
        .map(|name| source_tree().join(format!("examples/{name}.png")))
        .collect()
}

fn source_tree() -> PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("the pipeline crate lives at <workspace>/crates/streamline-pipeline")
        .to_path_buf()
}
