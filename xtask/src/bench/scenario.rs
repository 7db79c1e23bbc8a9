//! bench/scenarios.toml: what to measure, and the process that measures each scenario x mode.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenarios {
    pub quick_runs: usize,
    /// Timed calls per kernel micro-benchmark case in a full run.
    pub kernel_runs: usize,
    #[serde(rename = "scenario")]
    pub scenarios: Vec<Scenario>,
    /// Kernel micro-benchmark cases, read by streamline-bench and the PyTorch peer.
    #[serde(rename = "kernel", default)]
    pub kernels: Vec<toml::Table>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub name: String,
    pub about: String,
    /// One UNet step of a model with random weights, written by the harness.
    pub unet: Option<UnetSpec>,
    /// The SVD pipeline end to end on a committed model folder.
    pub svd: Option<SvdSpec>,
    pub temporal_chunks: usize,
    pub spatial_chunks: usize,
    pub memory_budget: String,
    pub rehash: String,
    pub modes: Vec<String>,
    #[serde(default)]
    pub quick_modes: Vec<String>,
    /// Timed runs in each process.
    pub runs: usize,
    /// Processes per mode in a full run, taken in turns (every mode's first process, then
    /// every mode's second, ...): a machine that slows down for a while slows every mode alike
    /// instead of the one that happened to run then. The timed runs of all rounds are pooled.
    #[serde(default = "one")]
    pub rounds: usize,
}

fn one() -> usize {
    1
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnetSpec {
    pub config: String,
    pub latent: usize,
    pub frames: usize,
    pub batch: usize,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SvdSpec {
    pub model: PathBuf,
    pub image: PathBuf,
}

/// Our modes, in report order, and the optimization each runs.
pub const MODES: [(&str, &str); 6] = [
    ("original", "original"),
    ("naive", "naive"),
    ("slicer-only", "slicer-only"),
    ("paper", "paper"),
    ("budget", "budget"),
    ("rehash", "original"),
];

/// The diffusers peers' modes.
pub const PEER_MODES: [&str; 2] = ["original", "forward-chunking"];

impl Scenarios {
    pub fn read(path: &Path) -> Result<Self> {
        let text =
            fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        let s: Scenarios = toml::from_str(&text)
            .with_context(|| format!("{}: invalid scenarios", path.display()))?;
        if s.quick_runs == 0 {
            bail!("{}: `quick_runs` must be at least 1", path.display());
        }
        for case in &s.kernels {
            if !case.get("name").is_some_and(toml::Value::is_str) {
                bail!("{}: every [[kernel]] case needs a `name`", path.display());
            }
        }
        for sc in &s.scenarios {
            sc.check()
                .with_context(|| format!("{}: scenario `{}`", path.display(), sc.name))?;
        }
        Ok(s)
    }
}

impl Scenario {
    fn check(&self) -> Result<()> {
        if self.unet.is_some() == self.svd.is_some() {
            bail!("give exactly one of `unet` and `svd`");
        }
        for mode in self.modes.iter().chain(&self.quick_modes) {
            if !MODES.iter().any(|(m, _)| m == mode) {
                bail!(
                    "unknown mode `{mode}` (one of {})",
                    MODES.map(|m| m.0).join(", ")
                );
            }
        }
        if self.modes.first().map(String::as_str) != Some("original")
            || self.quick_modes.first().is_some_and(|m| m != "original")
        {
            bail!("`original` must be the first mode: every error is measured against it");
        }
        if self.runs == 0 || self.rounds == 0 {
            bail!("`runs` and `rounds` must be at least 1");
        }
        Ok(())
    }

    pub fn is_end_to_end(&self) -> bool {
        self.svd.is_some()
    }

    /// The modes of a full or a quick run (empty: the scenario is not run).
    pub fn modes(&self, quick: bool) -> &[String] {
        if quick {
            &self.quick_modes
        } else {
            &self.modes
        }
    }
}

/// Where one scenario's files go.
pub struct Paths {
    /// Model weights and inputs both implementations read (UNet scenarios).
    pub model: PathBuf,
    /// End to end: the latents and noise both implementations use.
    pub inputs: PathBuf,
    pub out: PathBuf,
}

impl Paths {
    pub fn new(root: &Path, scenario: &Scenario) -> Self {
        let dir = root.join("target/bench").join(&scenario.name);
        Paths {
            model: dir.join("model"),
            inputs: dir.join("inputs.safetensors"),
            out: dir.join("out"),
        }
    }

    pub fn measurement(&self, implementation: &str, mode: &str) -> PathBuf {
        self.out.join(format!("{implementation}-{mode}.json"))
    }

    pub fn output(&self, implementation: &str, mode: &str) -> PathBuf {
        self.out
            .join(format!("{implementation}-{mode}.safetensors"))
    }
}

/// The streamline-bench command that prepares a UNet scenario's weights and inputs.
pub fn prepare(bin: &Path, unet: &UnetSpec, paths: &Paths) -> Command {
    let mut cmd = Command::new(bin);
    cmd.arg("prepare-unet")
        .arg("--dir")
        .arg(&paths.model)
        .args(["--config", &unet.config])
        .args(["--frames", &unet.frames.to_string()])
        .args(["--batch", &unet.batch.to_string()])
        .args(["--latent", &unet.latent.to_string()]);
    cmd
}

/// The subcommand and model arguments every measurement of `sc` starts with (both programs
/// take the same ones).
fn model_args(cmd: &mut Command, root: &Path, sc: &Scenario, paths: &Paths) {
    match (&sc.unet, &sc.svd) {
        (Some(_), _) => {
            cmd.arg("unet").arg("--dir").arg(&paths.model);
        }
        (None, Some(svd)) => {
            cmd.arg("svd")
                .arg("--model")
                .arg(root.join(&svd.model))
                .arg("--image")
                .arg(root.join(&svd.image));
        }
        (None, None) => unreachable!("scenarios are checked on reading"),
    }
}

/// Runs and where the measurement and the output go.
fn report_args(cmd: &mut Command, paths: &Paths, implementation: &str, mode: &str, runs: usize) {
    cmd.args(["--runs", &runs.to_string()])
        .arg("--out")
        .arg(paths.measurement(implementation, mode))
        .arg("--output")
        .arg(paths.output(implementation, mode));
}

/// The streamline-bench command measuring `mode`.
pub fn ours(
    bin: &Path,
    root: &Path,
    sc: &Scenario,
    paths: &Paths,
    mode: &str,
    runs: usize,
) -> Command {
    let optimization = MODES
        .iter()
        .find(|(m, _)| *m == mode)
        .map(|m| m.1)
        .expect("modes are checked on reading");
    let mut cmd = Command::new(bin);
    model_args(&mut cmd, root, sc, paths);
    if sc.is_end_to_end() && mode == "original" {
        cmd.arg("--save-inputs").arg(&paths.inputs);
    }
    let rehash = match mode {
        // A schedule file is relative to the repository root.
        "rehash" if sc.rehash.ends_with(".toml") => root.join(&sc.rehash).display().to_string(),
        "rehash" => sc.rehash.clone(),
        _ => "off".into(),
    };
    cmd.args(["--optimization", optimization])
        .args(["--temporal-chunks", &sc.temporal_chunks.to_string()])
        .args(["--spatial-chunks", &sc.spatial_chunks.to_string()])
        .args(["--memory-budget", &sc.memory_budget])
        .args(["--rehash", &rehash]);
    if mode != "original" {
        cmd.arg("--paired");
    }
    report_args(&mut cmd, paths, "streamline", mode, runs);
    cmd
}

/// The diffusers peer command measuring `mode`.
pub fn peer(
    python: &Path,
    root: &Path,
    sc: &Scenario,
    paths: &Paths,
    mode: &str,
    runs: usize,
) -> Command {
    let mut cmd = crate::python_cmd(python, &root.join("bench/diffusers_peer.py"));
    model_args(&mut cmd, root, sc, paths);
    if sc.is_end_to_end() {
        cmd.arg("--inputs").arg(&paths.inputs);
    }
    if mode == "forward-chunking" {
        cmd.arg("--chunking");
    }
    report_args(&mut cmd, paths, "diffusers", mode, runs);
    cmd
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn committed_scenarios_are_valid_and_quick_runs_some() {
        let s = Scenarios::read(&crate::root().join("bench/scenarios.toml")).unwrap();
        assert!(s.scenarios.iter().any(|sc| !sc.modes(true).is_empty()));
        assert!(s.scenarios.iter().any(Scenario::is_end_to_end));
    }

    #[test]
    fn bad_scenarios_are_named() {
        let dir = std::env::temp_dir().join(format!("xtask-bench-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("scenarios.toml");
        let write = |modes: &str| {
            let text = format!(
                "quick_runs = 1\nkernel_runs = 1\n[[scenario]]\nname = \"s\"\nabout = \"a\"\nsvd = {{ model = \"m\", image = \"i\" }}\ntemporal_chunks = 7\nspatial_chunks = 7\nmemory_budget = \"1MiB\"\nrehash = \"uniform:13\"\nmodes = {modes}\nruns = 1\n"
            );
            fs::write(&path, text).unwrap();
            Scenarios::read(&path)
                .map(|_| ())
                .map_err(|e| format!("{e:#}"))
        };
        assert!(write("[\"original\", \"paper\"]").is_ok());
        let err = write("[\"original\", \"fast\"]").unwrap_err();
        assert!(
            err.contains("scenario `s`") && err.contains("unknown mode `fast`"),
            "{err}"
        );
        let err = write("[\"paper\"]").unwrap_err();
        assert!(err.contains("`original` must be the first mode"), "{err}");
        fs::remove_dir_all(&dir).unwrap();
    }
}
