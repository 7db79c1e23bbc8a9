//! Cache points: the UNet values a key step keeps and a partial step substitutes.
//!
//! A cache point is named by an up-block boundary, `up_blocks.N`: the output of up block `N`,
//! which feeds up block `N + 1`. The UNet lowerings mark each up block's output
//! (`streamline_ir::up_block_mark`), so resolving a point on the lowered graph needs no node
//! name and stays valid whatever each block's last node happens to be.

use std::fmt;
use std::str::FromStr;

use streamline_ir::{up_block_mark, Graph, ValueId};

/// Where Step Rehash caches features.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CachePoint {
    /// The deepest up-block output that feeds the last up block: a partial step runs only the
    /// first down block, the last up block and the embeddings (DeepCache's choice).
    #[default]
    LastBoundary,
    /// The output of up block `N`.
    UpBlock(usize),
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum CacheError {
    #[error("cache point {0:?}: expected `up_blocks.N` (the output of up block N)")]
    Parse(String),
    #[error("cache point `{point}`: this UNet's up-block boundaries are {available}")]
    NoSuchBoundary { point: String, available: String },
}

impl FromStr for CachePoint {
    type Err = CacheError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.strip_prefix("up_blocks.")
            .and_then(|n| n.parse().ok())
            .map(CachePoint::UpBlock)
            .ok_or_else(|| CacheError::Parse(s.into()))
    }
}

impl fmt::Display for CachePoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CachePoint::LastBoundary => f.write_str("the last up-block boundary"),
            CachePoint::UpBlock(n) => write!(f, "up_blocks.{n}"),
        }
    }
}

impl CachePoint {
    /// Up-block boundaries of `graph`: `N` such that up block `N` feeds up block `N + 1`.
    pub fn boundaries(graph: &Graph) -> Vec<usize> {
        (0..)
            .take_while(|&n| graph.marked(&up_block_mark(n + 1)).is_some())
            .collect()
    }

    /// The boundary this point names in `graph`.
    pub fn block(&self, graph: &Graph) -> Result<usize, CacheError> {
        let boundaries = Self::boundaries(graph);
        let found = match self {
            CachePoint::LastBoundary => boundaries.last().copied(),
            CachePoint::UpBlock(n) => boundaries.contains(n).then_some(*n),
        };
        found.ok_or_else(|| CacheError::NoSuchBoundary {
            point: self.to_string(),
            available: match (boundaries.first(), boundaries.last()) {
                (Some(a), Some(b)) => format!("up_blocks.{a} ..= up_blocks.{b}"),
                _ => "none (the graph has no up blocks that feed one another)".into(),
            },
        })
    }

    /// The value cached at this point in `graph`.
    pub fn value(&self, graph: &Graph) -> Result<ValueId, CacheError> {
        let n = self.block(graph)?;
        Ok(graph
            .marked(&up_block_mark(n))
            .expect("boundaries() found this mark"))
    }

    /// The name of the value cached at this point in `graph`.
    pub fn value_name(&self, graph: &Graph) -> Result<String, CacheError> {
        Ok(graph.value(self.value(graph)?).name.clone())
    }
}
