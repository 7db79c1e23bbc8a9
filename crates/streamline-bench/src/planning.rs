//! How long `streamline plan` takes to answer, for the full-size models in fp16 at budgets
//! from below the smallest feasible peak to above the original peak.

use std::fs;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::DType;
use serde::Serialize;
use streamline_pipeline::planner::{plan_report, ModelSpec, PlanRequest, RehashMemory};
use streamline_pipeline::Optimization;

/// One planning request and how it went.
#[derive(Serialize)]
struct Record {
    model: String,
    optimization: String,
    seconds: f64,
    /// The plan's planned whole-run peak, or `None` when the budget was refused.
    planned_peak_bytes: Option<usize>,
    /// The refusal, when there was one.
    refusal: Option<String>,
}

const GIB: usize = 1 << 30;
const MIB: usize = 1 << 20;

/// The budgets asked of every model: the list, and one each side of it.
fn budgets() -> Vec<(String, Optimization)> {
    let mut out = vec![
        ("original".into(), Optimization::Original),
        (
            "paper 7/7".into(),
            Optimization::Paper {
                temporal_chunks: 7,
                spatial_chunks: 7,
            },
        ),
    ];
    for (name, bytes) in [
        ("256MiB", 256 * MIB),
        ("1GiB", GIB),
        ("3GiB", 3 * GIB),
        ("4GiB", 4 * GIB),
        ("4500MiB", 4500 * MIB),
        ("5GiB", 5 * GIB),
        ("8GiB", 8 * GIB),
        ("64GiB", 64 * GIB),
    ] {
        out.push((format!("budget {name}"), Optimization::Budget { bytes }));
    }
    out
}

/// Time every model x budget, write the records as JSON to `out`.
pub fn run(out: &Path) -> Result<()> {
    let mut records = Vec::new();
    for (name, model) in [
        ("svd", ModelSpec::Svd),
        ("svd-xt", ModelSpec::SvdXt),
        ("animatediff", ModelSpec::AnimateDiff),
    ] {
        for (optimization_name, optimization) in budgets() {
            let (height, width) = model.default_size();
            let request = PlanRequest {
                model: model.clone(),
                height,
                width,
                num_frames: None,
                batch: 1,
                cfg: true,
                dtype: DType::F16,
                optimization,
                kernels: streamline_pipeline::Kernels::Cpu,
                decode_chunk_size: 14,
                rehash: RehashMemory::Off,
            };
            let start = Instant::now();
            let result = plan_report(request);
            let seconds = start.elapsed().as_secs_f64();
            let (planned_peak_bytes, refusal) = match result {
                Ok(report) => (Some(report.total()), None),
                Err(e) => (None, Some(e.to_string())),
            };
            eprintln!("{name} {optimization_name}: {seconds:.2} s");
            records.push(Record {
                model: name.into(),
                optimization: optimization_name,
                seconds,
                planned_peak_bytes,
                refusal,
            });
        }
    }
    fs::write(out, serde_json::to_string_pretty(&records)?)
        .with_context(|| format!("cannot write {}", out.display()))
}
