//! # streamline-ir
//!
//! The intermediate representation every streamline model lowers into and every optimization
//! transforms.
//!
//! **Owns:** the [`Graph`] of nodes over values whose [`Layout`] says how each slicing [`Axis`]
//! maps onto the tensor; the [`Op`] trait (forward, independence, shape, workspace, FLOPs);
//! [`Plan`]s of groups (a run of nodes, an axis, a chunk count); the [`Executor`] that runs a
//! plan on a candle device or dry on shapes; [`PlanCost`], which re-costs one group alone; the
//! [`Pass`] trait and the [`PassPipeline`] that composes passes; the memory [`Ledger`]; a
//! counting global allocator for whole-process measurements ([`alloc`]); and, behind the
//! `testing` feature, the toy-op harness every pass crate tests itself on ([`testing`]).
//!
//! **Promises:** the trivial plan ([`Plan::trivial`]) is original inference; any plan that
//! [`Plan::validate`] accepts computes the same numbers up to float rounding; an invalid plan is
//! rejected with an error naming the node (and, from a [`PassPipeline`], the pass); the dry
//! run's planned peak is never below the measured peak of live tensor bytes for the same plan,
//! and [`PlanCost`] gives the same figures as a dry run of the whole plan.
//!
//! **Tests:** `cargo test -p streamline-ir` runs a proptest over random graphs of frame-wise,
//! position-wise, pointwise and reduction toy ops with random valid plans (outputs, peaks and
//! FLOPs against the trivial plan; one group re-costed against a whole dry run; the dry run's
//! one-slice-per-length costing against visiting every slice), the bad-plan rejections, a
//! heap-peak check with the tracking allocator, and insta snapshots of the graph and plan
//! dumps.

pub mod alloc;
mod cost;
mod engine;
mod error;
mod exec;
mod graph;
mod ledger;
mod op;
mod pass;
mod plan;
mod rows;
#[cfg(feature = "testing")]
pub mod testing;
mod value;

pub use cost::{PlanCost, Trial};
pub use error::{Infeasible, IrError, Result};
pub use exec::{Executor, Request, RunOutput};
pub use graph::{up_block_mark, Graph, Node, Producer, Value, ValueId, SHALLOW_MARK};
pub use ledger::{human, Ledger, RunStats};
pub use op::{Independence, Kernels, Op, RowBand, RowRule, SliceCtx, Workspace};
pub use pass::{Pass, PassPipeline};
pub use plan::{check_group, chunk_ranges, Group, Plan, PlanDump};
pub use value::{Axis, AxisTag, Layout, ValueInfo};
