//! What one process measures about itself: wall time of each run, peak resident memory above
//! the baseline taken just before the measured run, and the heap bytes live at the peak.
//!
//! Peak RSS is the kernel's high-water mark (`VmHWM`), reset through `/proc/self/clear_refs`
//! so that loading the weights is not charged to the run. Every implementation (ours and the
//! diffusers peers) measures the same way, each in its own process, so the figures compare.

use std::fs;
use std::path::Path;
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde::Serialize;
use streamline_ir::alloc::{peak_bytes, release_freed_memory, reset_peak};
use streamline_pipeline::quality::psnr;
use streamline_pipeline::residency::PhaseMeasure;

/// One field of `/proc/self/status`, in bytes.
fn status_bytes(field: &str) -> Result<u64> {
    let status = fs::read_to_string("/proc/self/status")
        .context("peak RSS is read from /proc/self/status, which this system lacks (Linux only)")?;
    field_bytes(&status, field)
}

/// `field` of a `/proc/<pid>/status` text (`VmHWM:     1234 kB`), in bytes.
fn field_bytes(status: &str, field: &str) -> Result<u64> {
    let line = status
        .lines()
        .find(|l| {
            l.strip_prefix(field)
                .is_some_and(|rest| rest.starts_with(':'))
        })
        .with_context(|| format!("/proc/self/status has no {field}"))?;
    let kib: u64 = line[field.len() + 1..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .with_context(|| format!("cannot read `{line}`"))?;
    Ok(kib * 1024)
}

/// Memory of the run between [`Baseline::take`] and [`Baseline::peaks`].
pub struct Baseline {
    rss: u64,
    heap: usize,
}

impl Baseline {
    /// Reset the kernel's and the allocator's high-water marks and note where they start.
    pub fn take() -> Result<Self> {
        release_freed_memory();
        // "5" resets VmHWM to the current RSS (Linux >= 4.0).
        if fs::write("/proc/self/clear_refs", "5").is_err() {
            bail!("cannot reset the peak RSS through /proc/self/clear_refs (Linux only)");
        }
        Ok(Baseline {
            rss: status_bytes("VmRSS")?,
            heap: reset_peak(),
        })
    }

    /// Peak RSS and peak live heap bytes above the baseline, so far.
    pub fn peaks(&self) -> Result<(u64, u64)> {
        let hwm = status_bytes("VmHWM")?;
        Ok((
            hwm.saturating_sub(self.rss),
            (peak_bytes().saturating_sub(self.heap)) as u64,
        ))
    }
}

/// Seconds `f` takes.
pub fn timed<T>(f: impl FnOnce() -> Result<T>) -> Result<(T, f64)> {
    let start = Instant::now();
    let out = f()?;
    Ok((out, start.elapsed().as_secs_f64()))
}

/// What one process reports (the same fields as the diffusers peer script writes).
#[derive(Debug, Default, Serialize)]
pub struct Measurement {
    /// UNet step time of each timed run (after the first, measured run).
    pub step_seconds: Vec<f64>,
    /// `--paired`: the original plan's step time after each timed run, in the same process.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub original_step_seconds: Vec<f64>,
    /// End to end: denoising loop time of each timed run.
    pub denoise_seconds: Vec<f64>,
    pub peak_rss_above_baseline_bytes: u64,
    pub live_peak_bytes: u64,
    pub planned_peak_bytes: u64,
    /// On a GPU: the device memory in use at the peak of the measured run, above what was in
    /// use when it began (from the driver).
    pub device_peak_bytes: Option<u64>,
    /// Whole-UNet and partial (Step Rehash) evaluations per run, end to end.
    pub full_steps: usize,
    pub partial_steps: usize,
    /// End to end on the CPU: each phase's planned whole-run peak beside its measured one
    /// (heap bytes above the run's baseline, the bench's tracking allocator counting).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub phases: Vec<PhaseMeasure>,
}

fn read_output(path: &Path) -> Result<Tensor> {
    let mut tensors = candle_core::safetensors::load(path, &Device::Cpu)
        .with_context(|| format!("cannot read {}", path.display()))?;
    tensors
        .remove("output")
        .with_context(|| format!("{} has no tensor `output`", path.display()))?
        .to_dtype(DType::F64)
        .map_err(Into::into)
}

/// Print `{"rel_l2": .., "psnr": ..}` of `output` against `reference` (PSNR only for frames).
pub fn compare(output: &Path, reference: &Path, frames: bool) -> Result<()> {
    let (a, b) = (read_output(output)?, read_output(reference)?);
    ensure!(
        a.dims() == b.dims(),
        "{} has shape {:?}, the reference {} has {:?}",
        output.display(),
        a.dims(),
        reference.display(),
        b.dims()
    );
    let norm = |t: &Tensor| -> Result<f64> { Ok(t.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt()) };
    let rel_l2 = norm(&(&a - &b)?)? / norm(&b)?.max(f64::MIN_POSITIVE);
    let psnr = if frames { Some(psnr(&a, &b)?) } else { None };
    println!("{}", serde_json::json!({ "rel_l2": rel_l2, "psnr": psnr }));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_fields_are_read_in_bytes() {
        let text = "VmPeak:\t  10 kB\nVmHWM:\t    2048 kB\nVmRSS:\t    1024 kB\n";
        assert_eq!(field_bytes(text, "VmHWM").unwrap(), 2 << 20);
        assert_eq!(field_bytes(text, "VmRSS").unwrap(), 1 << 20);
        let err = field_bytes(text, "VmSwap").unwrap_err().to_string();
        assert!(err.contains("VmSwap"), "{err}");
    }

    #[test]
    fn a_touched_allocation_shows_in_both_peaks() {
        const MIB: usize = 1 << 20;
        let baseline = Baseline::take().unwrap();
        let buffer = vec![1u8; 64 * MIB];
        let (rss, live) = baseline.peaks().unwrap();
        drop(buffer);
        assert!(live >= 64 * MIB as u64, "live peak {live}");
        assert!(rss >= 60 * MIB as u64, "peak RSS above baseline {rss}");
        // A fresh baseline no longer counts the freed buffer.
        let (rss, _) = Baseline::take().unwrap().peaks().unwrap();
        assert!(rss < 8 * MIB as u64, "peak RSS after reset {rss}");
    }
}
