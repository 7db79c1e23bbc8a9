use std::path::Path;

use serde::de::DeserializeOwned;

use super::error::{ModelError, Result};

/// Read a diffusers / transformers `config.json`. Unknown fields are ignored (structs do not
/// deny them); a missing required field or a wrong type is an error naming the file and field.
pub fn load_config<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::Io {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    serde_json::from_str(&text).map_err(|e| ModelError::Config {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}
