//! # streamline-slicer
//!
//! **Will own** the Feature Slicer pass (design.md): a pass over a `streamline_ir::Graph` that
//! gives every node a slice axis and a chunk count, in paper mode (`temporal_chunks` over the
//! B*T frames for frame-wise layers, `spatial_chunks` over the B*H*W positions for
//! position-wise layers), in budget mode (the least slicing whose planned peak fits a byte
//! budget) and in the deliberately inexact naive mode kept for comparisons.
//!
//! **Promises:** every plan it emits passes `Plan::validate` and matches the trivial plan to
//! relative L2 <= 1e-5 in f32.
//!
//! **Tests:** `cargo test -p streamline-slicer`. The pass arrives with the slicer issue; until
//! then this crate only reserves its place in the workspace.
