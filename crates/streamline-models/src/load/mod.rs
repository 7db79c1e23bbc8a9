//! Loading diffusers checkpoints: config.json into serde `Config`s, safetensors into a
//! candle `VarBuilder` that checks names, shapes and finite values and records what was used.

mod config;
mod error;
mod finite;
mod weights;

pub(crate) use config::{check_block_lists, check_block_types, check_groups};
pub use config::{load_config, PerBlock};
pub use error::{ModelError, Result};
pub use weights::{weights_file, Manifest, Usage, WeightSource};
