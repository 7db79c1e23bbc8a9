use std::path::PathBuf;

use thiserror::Error;

/// Why a model could not be loaded or built. Every variant names the file, and the tensor or
/// field where one is at fault.
#[derive(Debug, Error)]
pub enum ModelError {
    #[error("{path}: {reason}")]
    Io { path: PathBuf, reason: String },
    #[error("{path}: {reason}")]
    Config { path: PathBuf, reason: String },
    #[error("{path}: `{field}` = {value:?} is not supported: {reason}")]
    Unsupported {
        path: PathBuf,
        field: String,
        value: String,
        reason: String,
    },
    /// Raised while building modules from the weights file `path`; `error` names the tensor
    /// (see [`super::WeightSource`]). Told in the message, so not also a `source()`, which
    /// would print it twice in a reported chain.
    #[error("{path}: {error}")]
    Weights {
        path: PathBuf,
        error: candle_core::Error,
    },
    #[error(transparent)]
    Ir(#[from] streamline_ir::IrError),
}

pub type Result<T, E = ModelError> = std::result::Result<T, E>;
