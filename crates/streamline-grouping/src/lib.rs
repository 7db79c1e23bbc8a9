//! # streamline-grouping
//!
//! **Owns** Operator Grouping (design.md): [`OperatorGrouping`] merges maximal runs of
//! consecutive nodes sliced along the same axis into one `streamline_ir::Group`, which the
//! executor runs slice by slice, so intermediates inside a group exist one slice at a time
//! while values read later (skip connections, cached features) become the group's outputs,
//! written slice by slice into preallocated tensors. [`hoist_whole`] first moves the small
//! per-batch computations (time embeddings and their projections) ahead of the video path so
//! they do not cut runs apart.
//!
//! **Promises:** grouping never changes what a plan computes: a group is only formed when
//! `streamline_ir::check_group` accepts it, so a temporal GroupNorm's statistics (a reduction)
//! always finish in a group before the group that applies them.
//!
//! **Tests:** `cargo test -p streamline-grouping` (on toy graphs); exactness on the SVD
//! fixtures is tested in `streamline-pipeline`.

mod group;
mod hoist;

pub use group::OperatorGrouping;
pub use hoist::hoist_whole;
