use thiserror::Error;

use crate::ledger::human;

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
    /// The cause is told in the message, so it is not also a `source()` (a reported chain
    /// would print it twice); the same holds for [`IrError::Pass`].
    #[error("node `{node}`: {error}")]
    Candle {
        node: String,
        error: candle_core::Error,
    },
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
    #[error("{0}")]
    Infeasible(Box<Infeasible>),
    /// A pass of a [`crate::PassPipeline`] failed or emitted an invalid plan.
    #[error("pass `{pass}`: {error}")]
    Pass {
        pass: &'static str,
        error: Box<IrError>,
    },
}

/// A memory budget that no plan a pass can reach meets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Infeasible {
    pub budget: usize,
    /// The smallest planned peak the pass reaches; the same figure whatever the budget.
    pub smallest: usize,
    /// The plan group that sets it, with its first and last node.
    pub group: usize,
    pub first: String,
    pub last: String,
    /// Of `smallest`, the bytes earlier groups leave alive for later ones (skip connections,
    /// graph inputs), which no slicing of this group can lower.
    pub held: usize,
}

impl Infeasible {
    /// The group's nodes for messages: `` `a` `` or `` `a` .. `b` ``.
    pub fn nodes(&self) -> String {
        if self.first == self.last {
            format!("`{}`", self.first)
        } else {
            format!("`{}` .. `{}`", self.first, self.last)
        }
    }
}

impl std::fmt::Display for Infeasible {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "a memory budget of {} cannot be met: the smallest feasible peak of activations is {}, \
             set by group {} ({}), of which {} are values earlier groups keep for later ones",
            human(self.budget),
            human(self.smallest),
            self.group,
            self.nodes(),
            human(self.held)
        )
    }
}

impl IrError {
    pub fn node(node: impl Into<String>, reason: impl Into<String>) -> Self {
        IrError::Node {
            node: node.into(),
            reason: reason.into(),
        }
    }

    /// The budget refusal inside this error, looking through the passes that wrap it.
    pub fn infeasible(&self) -> Option<&Infeasible> {
        match self {
            IrError::Infeasible(i) => Some(i),
            IrError::Pass { error, .. } => error.infeasible(),
            _ => None,
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
