//! # streamline-rehash
//!
//! **Owns** Step Rehash (design.md): which denoising steps run the whole UNet, and what the
//! others reuse.
//! - [`cache`]: cache points, named by up-block boundary and resolved on the lowered graph;
//! - [`step`]: the per-step choice — a key step runs the whole plan and keeps the cached value,
//!   any other step substitutes it (`streamline_ir::Request`) and the executor prunes what it
//!   no longer needs; calibration records the value at every step;
//! - [`calibrate`]: step-to-step similarity matrices (cosine, relative L2) of recorded features;
//! - [`search`]: the key-step search over such a matrix — the optimal dynamic program, the
//!   paper's greedy threshold walk (Algorithm 1) and uniform spacing;
//! - [`schedule`]: schedules as TOML files and the `--rehash off | uniform:K | auto:T |
//!   FILE.toml` flag, with an optional `@up_blocks.N` cache point;
//! - [`auto`]: key steps chosen during the run from how much the shallow features change.
//!
//! **Promises:** the dynamic program's key steps score as high as any choice of the same
//! number of key steps; a schedule where every step is a key step, and `auto:0`, is original
//! inference; an auto schedule's key steps depend only on the run's numbers.
//!
//! **Tests:** `cargo test -p streamline-rehash` (proptest: DP = exhaustive search on random
//! matrices; greedy valid and never better than the DP; schedule parsing and validation; the
//! auto rule's key steps on given output changes; cache points and partial-step FLOPs on a
//! fixture UNet). End-to-end rehash runs are tested in
//! streamline-pipeline (`tests/rehash.rs`).

pub mod auto;
pub mod cache;
pub mod calibrate;
pub mod schedule;
pub mod search;
pub mod step;

pub use auto::AutoRule;
pub use cache::{CacheError, CachePoint};
pub use calibrate::{mean, similarity, CalibrationError, Metric};
pub use schedule::{KeySteps, RehashArg, Schedule, ScheduleError};
pub use search::{greedy, optimal, uniform, Method, SearchError, Similarity};
pub use step::{Rehash, StepError, StepRehash};
