//! Planning times: `streamline-bench planning` for the full-size models at many budgets.

use std::fs;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};
use serde_json::Value;

use super::run_logged;

/// Run the planning benchmark and return the report's markdown table.
pub fn run(root: &Path, bin: &Path) -> Result<String> {
    let dir = root.join("target/bench/planning");
    fs::create_dir_all(&dir)?;
    let json = dir.join("planning.json");
    run_logged(
        Command::new(bin).arg("planning").arg("--out").arg(&json),
        &dir.join("planning.log"),
    )?;
    let text =
        fs::read_to_string(&json).with_context(|| format!("cannot read {}", json.display()))?;
    let records: Vec<Value> =
        serde_json::from_str(&text).with_context(|| format!("cannot parse {}", json.display()))?;
    let mut table = String::from(
        "| model | optimization | planning s | planned whole-run peak | refusal |\n|---|---|---:|---:|---|\n",
    );
    for r in &records {
        let text = |key: &str| r[key].as_str().unwrap_or("-").to_string();
        let peak = r["planned_peak_bytes"].as_f64().map_or("-".into(), |b| {
            format!("{:.2} GiB", b / (1u64 << 30) as f64)
        });
        table.push_str(&format!(
            "| {} | {} | {:.2} | {peak} | {} |\n",
            text("model"),
            text("optimization"),
            r["seconds"].as_f64().unwrap_or(f64::NAN),
            text("refusal"),
        ));
    }
    Ok(table)
}
