//! Kernel micro-benchmarks: streamline's CPU kernels, candle's ops and PyTorch's on the
//! `[[kernel]]` cases of bench/scenarios.toml, each implementation in its own process.

use std::fs;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};
use serde::Deserialize;

use super::run_logged;

#[derive(Deserialize)]
struct Ours {
    name: String,
    streamline_seconds: f64,
    candle_seconds: f64,
    rel_l2: f64,
}

#[derive(Deserialize)]
struct Torch {
    name: String,
    torch_seconds: f64,
}

fn read<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text =
        fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("cannot parse {}", path.display()))
}

/// Run the cases with `runs` timed calls each and return the report's markdown table.
pub fn run(root: &Path, bin: &Path, python: Option<&Path>, runs: usize) -> Result<String> {
    let cases = root.join("bench/scenarios.toml");
    let dir = root.join("target/bench/kernels");
    fs::create_dir_all(&dir)?;
    let (ours_json, torch_json) = (dir.join("streamline.json"), dir.join("torch.json"));
    run_logged(
        Command::new(bin)
            .arg("kernels")
            .arg("--cases")
            .arg(&cases)
            .args(["--runs", &runs.to_string()])
            .arg("--out")
            .arg(&ours_json),
        &dir.join("streamline.log"),
    )?;
    let torch: Vec<Torch> = match python {
        Some(python) => {
            run_logged(
                Command::new(python)
                    .arg(root.join("bench/diffusers_peer.py"))
                    .arg("kernels")
                    .arg("--cases")
                    .arg(&cases)
                    .args(["--runs", &runs.to_string()])
                    .arg("--out")
                    .arg(&torch_json),
                &dir.join("torch.log"),
            )?;
            read(&torch_json)?
        }
        None => Vec::new(),
    };
    let ours: Vec<Ours> = read(&ours_json)?;
    let ms = |s: f64| format!("{:.1}", s * 1e3);
    let mut table = String::from(
        "| kernel | streamline ms | candle ms | PyTorch ms | streamline / PyTorch | streamline / candle | rel L2 vs candle |\n|---|---:|---:|---:|---:|---:|---:|\n",
    );
    for o in &ours {
        let t = torch.iter().find(|t| t.name == o.name);
        table.push_str(&format!(
            "| {} | {} | {} | {} | {} | {:.2}x | {:.1e} |\n",
            o.name,
            ms(o.streamline_seconds),
            ms(o.candle_seconds),
            t.map_or("-".into(), |t| ms(t.torch_seconds)),
            t.map_or("-".into(), |t| format!(
                "{:.2}x",
                o.streamline_seconds / t.torch_seconds
            )),
            o.streamline_seconds / o.candle_seconds,
            o.rel_l2,
        ));
    }
    Ok(table)
}
