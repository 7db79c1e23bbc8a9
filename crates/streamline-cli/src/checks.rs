//! The checks every job makes before any weights load: flag values (as clap value parsers,
//! so a refusal names the flag), the precision the device can compute in, the run's plan and
//! memory, and outputs that would overwrite an input.

use std::path::Path;

use anyhow::{bail, Result};
use candle_core::DType;
use streamline_pipeline::memory::{check_plan, check_video, machine_memory};
use streamline_pipeline::planner::{plan_report, PlanRequest};
use streamline_pipeline::{DeviceKind, SizeError};

use crate::Dtype;

/// What a refusal of a setting names: the command line's flag, or the field of a batch job's
/// line (whose number the caller adds).
#[derive(Clone, Copy, Debug)]
pub enum Source {
    Flags,
    Job,
}

impl Source {
    /// `num_inference_steps` as `--num-inference-steps`, or as the field `` `num_inference_steps` ``.
    pub fn name(self, field: &str) -> String {
        match self {
            Source::Flags => format!("--{}", field.replace('_', "-")),
            Source::Job => format!("`{field}`"),
        }
    }

    /// A size refusal as the flag or field it came from: `--height 72 must be ...`.
    pub fn size_error(self, e: SizeError) -> anyhow::Error {
        match self {
            Source::Flags => anyhow::anyhow!("--{e}"),
            Source::Job => anyhow::anyhow!("{e}"),
        }
    }
}

/// A count that must be at least 1 (frames, steps, videos, frames per decode call).
pub fn positive(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

/// A finite number: NaN or infinite guidance or noise gives a NaN video.
pub fn finite(text: &str) -> Result<f64, String> {
    let value: f64 = text.parse().map_err(|e| format!("{e}"))?;
    if value.is_finite() {
        Ok(value)
    } else {
        Err("must be a finite number".into())
    }
}

/// A finite number of at least 0 (a noise strength).
pub fn non_negative(text: &str) -> Result<f64, String> {
    match finite(text)? {
        v if v >= 0.0 => Ok(v),
        _ => Err("must be at least 0".into()),
    }
}

/// The dtype a job computes in on `device`. candle's CPU backend has no bf16 matrix multiply,
/// and computing it in f32 instead would be f32's speed and memory under bf16's name, so bf16
/// is refused on the CPU here rather than failing inside the first UNet step.
pub fn compute_dtype(dtype: Dtype, device: DeviceKind) -> Result<DType> {
    if matches!(dtype, Dtype::Bf16) && device == DeviceKind::Cpu {
        bail!(
            "--dtype bf16: the CPU has no bf16 matrix multiply in candle, so bf16 runs only on a \
             GPU (--device cuda or metal); on the CPU use --dtype f32 or f16"
        );
    }
    Ok(dtype.into())
}

/// Plans the run's UNet step and decode call from configs alone, which refuses a budget
/// either cannot meet, and refuses sizes this machine cannot hold: the video always (it comes
/// back to the host), the planned peak when the run computes on the CPU (a GPU's memory is its
/// own, and is not queried).
pub fn check_run(request: PlanRequest, device: DeviceKind) -> Result<()> {
    let memory = machine_memory();
    if let (Some(memory), Some(frames)) = (memory, request.num_frames) {
        check_video(frames, (request.height, request.width), memory)?;
    }
    let report = plan_report(request)?;
    if let (Some(memory), DeviceKind::Cpu) = (memory, device) {
        check_plan(&report, memory)?;
    }
    Ok(())
}

/// Refuses an output (`overwrites`: whether writing it replaces a file) that is one of the
/// `inputs`, each named by its flag.
pub fn refuse_overwriting<'a>(
    output: (&str, &Path),
    overwrites: impl Fn(&Path) -> bool,
    inputs: impl IntoIterator<Item = (&'a str, &'a Path)>,
) -> Result<()> {
    for (flag, input) in inputs {
        if overwrites(input) {
            bail!(
                "{} {}: writing it would overwrite the {flag} input {}",
                output.0,
                output.1.display(),
                input.display()
            );
        }
    }
    Ok(())
}
