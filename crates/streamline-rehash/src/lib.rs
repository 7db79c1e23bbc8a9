//! # streamline-rehash
//!
//! **Owns** Step Rehash (design.md): which denoising steps run the whole UNet. Today:
//! - [`search`]: the key-step search over a step-to-step similarity matrix — the optimal
//!   dynamic program, the paper's greedy threshold walk (Algorithm 1) and uniform spacing;
//! - [`schedule`]: schedules as TOML files and the `--rehash off | uniform:K | FILE.toml` flag.
//!
//! Cache points in the IR, calibration and the per-step choice between the full plan and the
//! partial plan that substitutes cached features (`streamline_ir::Request::substitute`) are
//! the rest of the Step Rehash issue.
//!
//! **Promises:** the dynamic program's key steps score as high as any choice of the same
//! number of key steps; a schedule where every step is a key step is original inference.
//!
//! **Tests:** `cargo test -p streamline-rehash` (proptest: DP = exhaustive search on random
//! matrices; greedy valid and never better than the DP; schedule parsing and validation).

pub mod schedule;
pub mod search;

pub use schedule::{RehashArg, Schedule, ScheduleError};
pub use search::{greedy, optimal, uniform, Method, SearchError, Similarity};
