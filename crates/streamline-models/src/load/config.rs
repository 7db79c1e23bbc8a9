use std::path::Path;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

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

/// An `int` or one value per block, as diffusers accepts for per-block settings.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum PerBlock {
    One(usize),
    Each(Vec<usize>),
}

impl PerBlock {
    /// One value per block; a list of the wrong length is an error naming the file and field.
    pub fn expand(&self, blocks: usize, field: &str, path: &Path) -> Result<Vec<usize>> {
        match self {
            PerBlock::One(v) => Ok(vec![*v; blocks]),
            PerBlock::Each(v) if v.len() == blocks => Ok(v.clone()),
            PerBlock::Each(v) => Err(ModelError::Config {
                path: path.to_path_buf(),
                reason: format!("`{field}` has {} entries for {blocks} blocks", v.len()),
            }),
        }
    }
}

/// Every GroupNorm of a model with `groups` groups splits its channels: those of a block in
/// `block_out_channels`, or of two blocks' concatenated (torch refuses other counts). `source`
/// says where the count comes from, in errors naming `path`.
pub(crate) fn check_groups(
    path: &Path,
    block_out_channels: &[usize],
    groups: usize,
    source: &str,
) -> Result<()> {
    match block_out_channels
        .iter()
        .find(|&&c| groups == 0 || c % groups != 0)
    {
        Some(c) => Err(ModelError::Config {
            path: path.to_path_buf(),
            reason: format!(
                "`block_out_channels` entry {c} is not a multiple of the {groups} GroupNorm groups ({source})"
            ),
        }),
        None => Ok(()),
    }
}

/// Each per-block list of a config, `(field, entries)`, has one entry per block of
/// `block_out_channels` (`blocks`, at least one); errors name `path` and the fields.
pub(crate) fn check_block_lists(path: &Path, blocks: usize, lists: &[(&str, usize)]) -> Result<()> {
    if blocks > 0 && lists.iter().all(|&(_, entries)| entries == blocks) {
        return Ok(());
    }
    let lists: Vec<String> = lists
        .iter()
        .map(|(field, entries)| format!("`{field}` ({entries})"))
        .collect();
    Err(ModelError::Config {
        path: path.to_path_buf(),
        reason: format!(
            "{} and `block_out_channels` ({blocks}) must have one entry per block",
            lists.join(", ")
        ),
    })
}

/// Every entry of the block type list `field` is `allowed`; `reason` says why, in the error
/// naming `path` and the first other entry.
pub(crate) fn check_block_types(
    path: &Path,
    field: &str,
    types: &[String],
    allowed: &str,
    reason: &str,
) -> Result<()> {
    match types.iter().enumerate().find(|(_, t)| *t != allowed) {
        Some((i, t)) => Err(ModelError::Unsupported {
            path: path.to_path_buf(),
            field: format!("{field}[{i}]"),
            value: t.clone(),
            reason: reason.into(),
        }),
        None => Ok(()),
    }
}
