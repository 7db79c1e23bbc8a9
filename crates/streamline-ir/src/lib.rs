//! # streamline-ir
//!
//! The intermediate representation every streamline model lowers into and every optimization
//! transforms.
//!
//! **Owns:** the [`Graph`] of nodes over values whose [`Layout`] says how each slicing [`Axis`]
//! maps onto the tensor; the [`Op`] trait (forward, independence, shape, workspace, FLOPs);
//! [`Plan`]s of groups (a run of nodes, an axis, a chunk count); the [`Executor`] that runs a
//! plan on a candle device or dry on shapes; the memory [`Ledger`]; and a counting global
//! allocator for whole-process measurements ([`alloc`]).
//!
//! **Promises:** the trivial plan ([`Plan::trivial`]) is original inference; any plan that
//! [`Plan::validate`] accepts computes the same numbers up to float rounding; an invalid plan is
//! rejected with an error naming the node; the dry run's planned peak is never below the
//! measured peak of live tensor bytes for the same plan.
//!
//! **Tests:** `cargo test -p streamline-ir` runs a proptest over random graphs of frame-wise,
//! position-wise, pointwise and reduction toy ops with random valid plans, the bad-plan
//! rejections, and insta snapshots of the graph and plan dumps.

pub mod alloc;
mod error;
mod exec;
mod graph;
mod ledger;
mod op;
mod pass;
mod plan;
mod value;

pub use error::{IrError, Result};
pub use exec::{Executor, Request, RunOutput};
pub use graph::{Graph, Node, Producer, Value, ValueId};
pub use ledger::{Ledger, RunStats};
pub use op::{Independence, Op, SliceCtx};
pub use pass::Pass;
pub use plan::{check_group, chunk_ranges, Group, Plan, PlanDump};
pub use value::{Axis, AxisTag, Layout, ValueInfo};
