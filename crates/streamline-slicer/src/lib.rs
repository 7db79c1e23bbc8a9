//! # streamline-slicer
//!
//! **Owns** the Feature Slicer (design.md): passes that give every group of a
//! `streamline_ir::Plan` a slice axis and a chunk count.
//!
//! - [`PaperSlicer`]: the paper's setting (the official code's `num_temporal_chunk` /
//!   `num_spatial_chunk`): frame-wise groups in `temporal_chunks` slices of the B*T frames,
//!   position-wise groups (temporal layers, their GroupNorm statistics) in `spatial_chunks`
//!   slices of the B*H*W positions.
//! - [`FitBudget`] / [`fit_budget`]: the least slicing (and op tiling) whose planned peak of
//!   activations fits a byte budget, re-costing only the group each step changes; an
//!   impossible budget is an `IrError::Infeasible` stating the smallest feasible peak (one
//!   figure whatever the budget) and the group that sets it.
//! - [`Coarsen`] / [`coarsen`]: every sliced group cut back to the fewest slices whose
//!   planned peak stays within the plan's peak, so that a fixed chunk count's memory costs
//!   no calls for the small groups that never set it.
//! - [`naive`]: the paper's Sec. 3 baseline, temporal layers cut along frames too. It is
//!   **wrong on purpose** (motion across chunk borders is lost) and exists only for comparisons.
//!
//! **Promises:** every plan [`PaperSlicer`], [`Coarsen`] and [`FitBudget`] emit passes
//! `Plan::validate` and computes what the trivial plan computes, to float rounding, for any
//! chunk count including counts that do not divide the axis; a fitted plan's planned peak is
//! within its budget; a coarsened plan's planned peak is at most the peak of the plan it was
//! given.
//!
//! **Tests:** `cargo test -p streamline-slicer` runs the passes on random toy graphs
//! (streamline-ir's `testing` harness): sliced plans match the trivial plan (proptest, chunk
//! counts that do not divide the axis; coarsened plans too, their peak checked), budgets are
//! met with an exact plan or refused with the same smallest peak for every budget below it. Exactness on the SVD and AnimateDiff fixtures
//! is tested in `streamline-pipeline`, which sees models, slicer and grouping together.

mod budget;
mod coarsen;
pub mod naive;
mod paper;

pub use budget::{fit_budget, FitBudget};
pub use coarsen::{coarsen, Coarsen};
pub use paper::PaperSlicer;
