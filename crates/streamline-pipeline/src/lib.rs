//! # streamline-pipeline
//!
//! **Owns** the end-to-end jobs (design.md) and the choice of optimization each model call
//! runs with. Today: [`optimize`], which turns a lowered graph and an [`Optimization`]
//! (original, slicer only, slicer + grouping at the paper's chunk counts, a memory budget) into
//! the graph and plan to execute. The SVD / SVD-XT image-to-video and AnimateDiff text-to-video
//! jobs, their schedulers and video IO arrive with their issues.
//!
//! **Promises:** every optimization except the naive baseline computes what original
//! inference computes, to float rounding.
//!
//! **Tests:** `cargo test -p streamline-pipeline` checks every optimization against original
//! inference on the SVD fixtures, and the naive baseline for being measurably different.

pub mod optimize;
pub mod planner;

pub use optimize::{optimize, parse_bytes, Optimization};
