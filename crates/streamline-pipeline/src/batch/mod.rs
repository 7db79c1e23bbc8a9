//! Many videos from one model load: a jobs file (JSON lines), split into shards that cluster
//! schedulers run side by side (Slurm job arrays, Kubernetes Indexed Jobs), and resumed after
//! an interruption.
//!
//! - [`read_jobs`] checks every line (fields, types, unknown fields, unique output names,
//!   images that exist) before the first job runs, naming the line and the field.
//! - [`Shard`] assigns job `i` (in file order) to shard `i mod N`: shards never overlap and
//!   together cover every job, whichever machine runs which.
//! - [`Batch`] is one shard's run in an output folder: a job whose output exists is done (each
//!   output appears in one rename, so it is whole), leftovers of an interrupted run's staging
//!   are removed, and every finished or failed job appends one line to the shard's own results
//!   file, `results.shard-I-of-N.jsonl`, so shards never write the same file.
//!
//! The jobs themselves run in the caller (the CLI), which owns the models and the display.

mod jobs;
mod results;
mod shard;

use std::fmt;
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::animatediff::AnimateDiffSettings;
use crate::svd::SvdSettings;

pub use jobs::read_jobs;
pub use results::{read_results, Batch, JobReport, Record};
pub use shard::{Shard, ShardError, SHARD_COUNT_ENV};

/// The pipeline a jobs file is for: it decides the fields a line may have.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PipelineKind {
    Svd,
    AnimateDiff,
}

impl PipelineKind {
    /// The fields a job line may have.
    pub fn fields(self) -> &'static [&'static str] {
        match self {
            PipelineKind::Svd => &[
                "id",
                "seed",
                "image",
                "height",
                "width",
                "num_frames",
                "num_inference_steps",
                "min_guidance_scale",
                "max_guidance_scale",
                "fps",
                "motion_bucket_id",
                "noise_aug_strength",
                "decode_chunk_size",
            ],
            PipelineKind::AnimateDiff => &[
                "id",
                "seed",
                "prompt",
                "negative_prompt",
                "height",
                "width",
                "num_frames",
                "num_inference_steps",
                "guidance_scale",
                "decode_chunk_size",
                "fps",
            ],
        }
    }
}

impl fmt::Display for PipelineKind {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(match self {
            PipelineKind::Svd => "svd",
            PipelineKind::AnimateDiff => "animatediff",
        })
    }
}

/// One line of a jobs file.
#[derive(Clone, Debug, PartialEq)]
pub struct Job {
    /// Its line in the jobs file, from 1.
    pub line: usize,
    /// What its output is named (without extension): its `id`, else `line-NNNNN`, so a rerun
    /// of the same file finds it.
    pub name: String,
    /// Its seed; the batch's `--seed` when it names none.
    pub seed: Option<u64>,
    pub inputs: JobInputs,
}

/// What a job conditions on, and its changes to the batch's settings.
#[derive(Clone, Debug, PartialEq)]
pub enum JobInputs {
    Svd {
        image: PathBuf,
        overrides: SvdOverrides,
    },
    AnimateDiff {
        prompt: String,
        negative_prompt: Option<String>,
        overrides: AnimateDiffOverrides,
    },
}

impl Job {
    /// The prompt a text-to-video job conditions on.
    pub fn prompt(&self) -> Option<&str> {
        match &self.inputs {
            JobInputs::AnimateDiff { prompt, .. } => Some(prompt),
            JobInputs::Svd { .. } => None,
        }
    }
}

/// A job's own values of the arguments both pipelines take, and its output's frame rate.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SharedOverrides {
    pub height: Option<usize>,
    pub width: Option<usize>,
    pub num_frames: Option<usize>,
    pub num_inference_steps: Option<usize>,
    pub decode_chunk_size: Option<usize>,
    pub fps: Option<usize>,
}

/// A job's own values of diffusers' SVD arguments (`fps` conditions the model too).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SvdOverrides {
    pub shared: SharedOverrides,
    pub min_guidance_scale: Option<f64>,
    pub max_guidance_scale: Option<f64>,
    pub motion_bucket_id: Option<usize>,
    pub noise_aug_strength: Option<f64>,
}

impl SvdOverrides {
    /// `base` (the batch's settings) with this job's values.
    pub fn apply(&self, base: &SvdSettings) -> SvdSettings {
        let (s, base) = (&self.shared, base.clone());
        SvdSettings {
            height: s.height.unwrap_or(base.height),
            width: s.width.unwrap_or(base.width),
            num_frames: s.num_frames.or(base.num_frames),
            num_inference_steps: s.num_inference_steps.unwrap_or(base.num_inference_steps),
            decode_chunk_size: s.decode_chunk_size.or(base.decode_chunk_size),
            fps: s.fps.unwrap_or(base.fps),
            min_guidance_scale: self.min_guidance_scale.unwrap_or(base.min_guidance_scale),
            max_guidance_scale: self.max_guidance_scale.unwrap_or(base.max_guidance_scale),
            motion_bucket_id: self.motion_bucket_id.unwrap_or(base.motion_bucket_id),
            noise_aug_strength: self.noise_aug_strength.unwrap_or(base.noise_aug_strength),
            rehash: base.rehash,
            reuse_guidance: base.reuse_guidance,
        }
    }
}

/// A job's own values of diffusers' AnimateDiff arguments.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AnimateDiffOverrides {
    pub shared: SharedOverrides,
    pub guidance_scale: Option<f64>,
}

impl AnimateDiffOverrides {
    /// `base` (the batch's settings) with this job's values (its frame rate is the output's
    /// alone: `shared.fps`).
    pub fn apply(&self, base: &AnimateDiffSettings) -> AnimateDiffSettings {
        let (s, base) = (&self.shared, base.clone());
        AnimateDiffSettings {
            height: s.height.unwrap_or(base.height),
            width: s.width.unwrap_or(base.width),
            num_frames: s.num_frames.unwrap_or(base.num_frames),
            num_inference_steps: s.num_inference_steps.unwrap_or(base.num_inference_steps),
            decode_chunk_size: s.decode_chunk_size.unwrap_or(base.decode_chunk_size),
            guidance_scale: self.guidance_scale.unwrap_or(base.guidance_scale),
            rehash: base.rehash,
            reuse_guidance: base.reuse_guidance,
        }
    }
}

/// The form every output of a batch takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputFormat {
    Mp4,
    Gif,
    Safetensors,
    /// A directory of PNG frames per job.
    Png,
}

impl OutputFormat {
    /// Where `name`'s output goes in `dir` (a PNG directory is named with a trailing `/`, so
    /// a name with a dot is still a directory).
    pub fn output(self, dir: &Path, name: &str) -> PathBuf {
        match self {
            OutputFormat::Mp4 => dir.join(format!("{name}.mp4")),
            OutputFormat::Gif => dir.join(format!("{name}.gif")),
            OutputFormat::Safetensors => dir.join(format!("{name}.safetensors")),
            OutputFormat::Png => dir.join(format!("{name}/")),
        }
    }
}

/// Causes are part of the message and never also a `source()`, as in [`crate::video`].
#[derive(Debug, Error)]
pub enum JobsError {
    #[error("{path}: cannot read the jobs file: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path} line {line}: {reason}")]
    Line {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("{path}: holds no jobs (one JSON object per line)")]
    Empty { path: PathBuf },
}
