//! # streamline-rehash
//!
//! **Will own** Step Rehash (design.md): cache points in the IR, calibration of step-to-step
//! feature similarity, the key-step search (the paper's greedy Algorithm 1 and an optimal
//! dynamic program), TOML schedules, and the per-step choice between the full plan and the
//! partial plan that substitutes cached features (`streamline_ir::Request::substitute`).
//!
//! **Promises:** a schedule where every step is a key step reproduces original inference
//! exactly.
//!
//! **Tests:** `cargo test -p streamline-rehash`. Arrives with the Step Rehash issue.
