//! # streamline-grouping
//!
//! **Will own** the Operator Grouping pass (design.md): it merges maximal runs of consecutive
//! nodes sliced along the same axis into one `streamline_ir::Group`, so intermediates inside a
//! group exist only one slice at a time, while values used later (skip connections, cached
//! features) become the group's outputs; norm statistics are scheduled so results stay exact.
//!
//! **Promises:** grouped plans compute what the ungrouped plan computes, with a planned peak no
//! higher.
//!
//! **Tests:** `cargo test -p streamline-grouping`. The pass arrives with the slicer issue.
