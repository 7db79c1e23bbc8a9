//! # streamline-pipeline
//!
//! **Owns** the end-to-end jobs (design.md) and the choice of optimization each model call
//! runs with:
//! - [`optimize()`](optimize::optimize) turns a lowered graph and an [`Optimization`]
//!   (original, slicer only, slicer + grouping at the paper's chunk counts, a memory budget,
//!   the naive baseline) into the graph and plan to execute; [`planner`] reports plans from
//!   configs alone.
//! - [`svd`]: Stable Video Diffusion / SVD-XT image-to-video with diffusers' math
//!   (preprocessing, CLIP and VAE conditioning, classifier-free guidance, per-frame guidance,
//!   chunked temporal decoding).
//! - [`animatediff`]: AnimateDiff text-to-video with diffusers' math (prompt and negative
//!   prompt through CLIP text, classifier-free guidance, the checkpoint's scheduler, per-frame
//!   decoding in chunks).
//! - [`phases`]: one memory budget for the whole run: the encode, denoise and decode phases,
//!   each with its weights, held values and activations, and the residency that fits them;
//!   [`residency`]: models on the device only in their phases, each phase's peak measured;
//! - [`kernels`]: which implementation of the ops runs on which device (`--kernels`);
//! - [`memory`]: whether a run's sizes fit the machine, from its plan, before anything is
//!   allocated;
//! - [`run`]: what both share (errors, one planned model call, chunked decoding, progress).
//! - [`scheduler`]: diffusers' Euler (SVD, SD 1.5) and DDIM (AnimateDiff) schedulers,
//!   reproducing their schedules and steps; `Scheduler::load` picks one by `_class_name`.
//! - [`video`] reads the conditioning image and writes frames as an MP4 (H.264 through
//!   OpenH264 built from source, no system library), a GIF, PNG files or safetensors: an
//!   output is checked and staged before a run and renamed into place after it, and
//!   [`video::remove_staged`] removes every unfinished one (for signal handlers);
//!   [`video::read_video`] reads every form back; [`quality`] scores frames against a
//!   reference (PSNR, SSIM).
//! - [`batch`]: many videos from one model load: the jobs file, checked line by line before
//!   any job runs; shards for Slurm job arrays and Kubernetes Indexed Jobs; a shard's run in
//!   its output folder, resumable, with a results file of its own.
//! - [`clip_sim`]: CLIP-SIM, videos scored against their prompts with a CLIP model, frames
//!   preprocessed exactly as transformers' `CLIPImageProcessor` does.
//! - Both pipelines read and check every config before any weights load (`configs`), and
//!   stop a run whose latents stop being finite, naming the step.
//! - Step Rehash runs inside both denoising loops: `SvdSettings::rehash` and
//!   `AnimateDiffSettings::rehash` pick, per step, the whole UNet or the partial plan that
//!   reuses cached features (streamline-rehash).
//!
//! **Promises:** every optimization except the naive baseline computes what original
//! inference computes, to float rounding; no run returns non-finite frames (it stops with an
//! error naming the step or the decode call); no output is left half-written; shards of a
//! batch never share a job and together run every one; CLIP-SIM is transformers' to 1e-4.
//!
//! **Tests:** `cargo test -p streamline-pipeline` checks every optimization against original
//! inference on the SVD and AnimateDiff fixtures (whole-run budgets with either residency bit
//! for bit), each phase's measured peak within 10% of its plan on the built-in model
//! (`tests/phase_memory.rs`), the naive baseline for being measurably different, and
//! both whole pipelines against diffusers' frames; `tests/video_io.rs` every output form and
//! what a failed write leaves (nothing); `tests/mp4_output.rs` MP4s read back by a real
//! demuxer and decoder (frame count, size, timing, PSNR); `tests/batch_jobs.rs` the jobs
//! file's refusals, sharding and resuming without a model; `tests/clip_sim.rs` CLIP-SIM
//! against transformers; unit tests the memory checks, the staging and the shards. The CLI's
//! `tests/bad_input.rs` drives the refusals end to end, `tests/batch.rs` batches.

pub mod animatediff;
pub mod batch;
pub mod clip_sim;
pub mod kernels;
pub mod memory;
pub mod optimize;
pub mod phases;
pub mod planner;
pub mod quality;
pub mod residency;
pub mod run;
pub mod scheduler;
pub mod svd;
pub mod video;

pub use kernels::{kernels_for, DeviceKind, DeviceSpec, KernelChoice};
pub use optimize::{
    optimize, optimize_for, paper_passes, parse_bytes, plan_call, CallError, CallKind, Optimization,
};
pub use run::Sizes;
pub use streamline_ir::Kernels;
pub use streamline_models::{SizeError, SizeRule};
