use thiserror::Error;

/// Everything that can go wrong while building, planning or running a graph.
///
/// Plan and graph errors name the node (or value) they are about, so a bad plan produced by a
/// pass can be traced back to the exact layer that made it invalid.
#[derive(Debug, Error)]
pub enum IrError {
    #[error("node `{node}`: {reason}")]
    Node { node: String, reason: String },
    #[error("plan: {0}")]
    Plan(String),
    #[error("value `{name}`: {reason}")]
    Value { name: String, reason: String },
    #[error("node `{node}`: {source}")]
    Candle {
        node: String,
        #[source]
        source: candle_core::Error,
    },
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
}

impl IrError {
    pub fn node(node: impl Into<String>, reason: impl Into<String>) -> Self {
        IrError::Node {
            node: node.into(),
            reason: reason.into(),
        }
    }

    pub fn value(name: impl Into<String>, reason: impl Into<String>) -> Self {
        IrError::Value {
            name: name.into(),
            reason: reason.into(),
        }
    }
}

pub type Result<T, E = IrError> = std::result::Result<T, E>;
