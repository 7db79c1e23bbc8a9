//! # streamline-slicer
//!
//! **Owns** the Feature Slicer (design.md): passes that give every node of a
//! `streamline_ir::Graph` a slice axis and a chunk count.
//!
//! - [`PaperSlicer`]: the paper's setting (the official code's `num_temporal_chunk` /
//!   `num_spatial_chunk`): frame-wise nodes in `temporal_chunks` slices of the B*T frames,
//!   position-wise nodes (temporal layers, their GroupNorm statistics) in `spatial_chunks`
//!   slices of the B*H*W positions.
//! - [`fit_budget`]: the least slicing (and op tiling) whose planned peak of activations fits a
//!   byte budget; an impossible budget is an error stating the smallest feasible one.
//! - [`naive`]: the paper's Sec. 3 baseline, temporal layers cut along frames too. It is
//!   **wrong on purpose** (motion across chunk borders is lost) and exists only for comparisons.
//!
//! **Promises:** every plan [`PaperSlicer`] and [`fit_budget`] emit passes `Plan::validate` and
//! computes what the trivial plan computes, to float rounding, for any chunk count including
//! counts that do not divide the axis.
//!
//! **Tests:** `cargo test -p streamline-slicer`; exactness on the SVD fixtures is tested in
//! `streamline-pipeline` (which sees models, slicer and grouping together).

mod budget;
pub mod naive;
mod paper;

pub use budget::{fit_budget, human, BudgetError};
pub use paper::PaperSlicer;
