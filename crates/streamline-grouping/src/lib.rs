//! # streamline-grouping
//!
//! **Owns** Operator Grouping (design.md), as two passes over a `streamline_ir::Plan`:
//! [`OperatorGrouping`] merges maximal runs of consecutive groups sliced along the same axis
//! into one group, which the executor runs slice by slice, so intermediates inside a group
//! exist one slice at a time while values read later (skip connections, cached features)
//! become the group's outputs, written slice by slice into preallocated tensors.
//! [`HoistWhole`] first moves the small per-batch computations (time embeddings and their
//! projections) ahead of the video path so they do not cut runs apart.
//!
//! **Promises:** grouping never changes what a plan computes: a group is only formed when
//! `streamline_ir::check_group` accepts it, so a temporal GroupNorm's statistics (a reduction)
//! always finish in a group before the group that applies them.
//!
//! **Tests:** `cargo test -p streamline-grouping` runs the passes on random toy graphs
//! (streamline-ir's `testing` harness): grouped plans match the trivial plan (proptest, chunk
//! counts that do not divide the axis) and are maximal, grouping lowers the planned peak, and
//! hoisting keeps the numbers while joining the runs a per-batch node split. Exactness on the
//! SVD and AnimateDiff fixtures is tested in `streamline-pipeline`.

mod group;
mod hoist;

pub use group::OperatorGrouping;
pub use hoist::HoistWhole;
