//! Whether a run fits the machine, decided before anything is allocated: a size too large is
//! refused with the figures and the flags that lower them, instead of an allocation aborting
//! the process (`memory allocation of N bytes failed`) or the system swapping for hours.
//!
//! Two checks, cheapest first: [`check_video`], the frames the run must hold whatever its
//! plan (it also keeps sizes whose plans could not even be counted from being planned), then
//! [`check_plan`], the planned peak of the run from configs alone (its largest phase, see
//! [`PlanReport::total`]).

use streamline_ir::human;

use crate::phases::Phase;
use crate::planner::PlanReport;
use crate::run::PipelineError;

/// The memory a run may use on this machine: RAM plus swap, or the cgroup's limit when lower
/// (a container's `/proc/meminfo` shows the host's memory). `None` where neither can be read,
/// and the checks are then skipped.
pub fn machine_memory() -> Option<usize> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let field = |name: &str| -> Option<usize> {
        let line = meminfo.lines().find(|l| l.starts_with(name))?;
        let kib: usize = line.split_whitespace().nth(1)?.parse().ok()?;
        kib.checked_mul(1024)
    };
    let total = field("MemTotal:")?.saturating_add(field("SwapTotal:").unwrap_or(0));
    let cgroup = std::fs::read_to_string("/sys/fs/cgroup/memory.max")
        .ok()
        .and_then(|limit| limit.trim().parse::<usize>().ok());
    Some(cgroup.map_or(total, |limit| limit.min(total)))
}

fn refusal(size: &str, needs: String, memory: usize, remedy: &str) -> PipelineError {
    PipelineError::Input(format!(
        "{size}: {needs}, more than the {} of memory this machine has (RAM and swap); {remedy}",
        human(memory)
    ))
}

/// The decoded video in f32, `frames x 3 x height x width`, which every run holds at its end:
/// refused if it alone exceeds `memory` (or cannot be counted).
pub fn check_video(
    frames: usize,
    (height, width): (usize, usize),
    memory: usize,
) -> Result<(), PipelineError> {
    let bytes = [frames, 3, height, width, 4]
        .into_iter()
        .try_fold(1usize, usize::checked_mul);
    if bytes.is_some_and(|b| b <= memory) {
        return Ok(());
    }
    let needs = match bytes {
        Some(b) => format!(
            "{frames} frames of {height}x{width} pixels take {} in f32",
            human(b)
        ),
        None => format!("{frames} frames of {height}x{width} pixels are too many bytes to count"),
    };
    Err(refusal(
        &format!("--height {height} --width {width}"),
        needs,
        memory,
        "a smaller --height/--width or fewer --num-frames lowers it",
    ))
}

/// The run's planned peak (its largest phase: weights, held values and activations) against
/// `memory`.
pub fn check_plan(report: &PlanReport, memory: usize) -> Result<(), PipelineError> {
    let total = report.total();
    if total <= memory {
        return Ok(());
    }
    let phase = report.peak_phase();
    let remedy = match phase.phase {
        Phase::Decode => {
            "--memory-budget, a smaller --decode-chunk-size or a smaller --height/--width lowers it"
        }
        _ => "--memory-budget, fewer --num-frames or a smaller --height/--width lowers it",
    };
    let needs = format!(
        "{} frames are planned to need {} in the {} phase ({} of weights, {} handed on and {} of activations)",
        report.frames,
        human(total),
        phase.phase,
        human(phase.weights),
        human(phase.held),
        human(phase.activations)
    );
    let size = format!(
        "--height {} --width {}",
        report.request.height, report.request.width
    );
    Err(refusal(&size, needs, memory, remedy))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_video_that_cannot_be_held_or_counted_is_refused_by_its_size() {
        assert!(check_video(14, (576, 1024), 1 << 30).is_ok());
        let message = check_video(14, (576, 1024), 1 << 20)
            .unwrap_err()
            .to_string();
        assert!(
            message.starts_with("--height 576 --width 1024: 14 frames of 576x1024 pixels take 94.5 MiB in f32, more than the 1.0 MiB"),
            "{message}"
        );
        let message = check_video(usize::MAX, (8, 8), usize::MAX)
            .unwrap_err()
            .to_string();
        assert!(message.contains("too many bytes to count"), "{message}");
    }

    #[test]
    fn a_plan_past_the_memory_is_refused_naming_the_call_that_sets_it() {
        let report = crate::planner::plan_report(crate::planner::PlanRequest {
            model: crate::planner::ModelSpec::Svd,
            height: 64,
            width: 64,
            num_frames: None,
            batch: 1,
            cfg: true,
            dtype: candle_core::DType::F16,
            optimization: crate::Optimization::Original,
            kernels: crate::Kernels::Cpu,
            decode_chunk_size: 14,
            rehash: crate::planner::RehashMemory::Off,
        })
        .unwrap();
        assert!(check_plan(&report, report.total()).is_ok());
        let message = check_plan(&report, report.total() - 1)
            .unwrap_err()
            .to_string();
        assert!(
            message.starts_with("--height 64 --width 64: 14 frames are planned to need")
                && message.contains(&human(report.total()))
                && message.contains("--memory-budget"),
            "{message}"
        );
    }

    #[test]
    fn the_machine_has_some_memory_where_proc_says_so() {
        if std::path::Path::new("/proc/meminfo").exists() {
            assert!(machine_memory().is_some_and(|m| m > 0));
        }
    }
}
