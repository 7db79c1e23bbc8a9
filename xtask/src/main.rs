//! Project tasks that are not part of the library: `cargo xtask fixtures`,
//! `cargo xtask train-default`, `cargo xtask bench` and `cargo xtask check-cuda`.
//!
//! Fixtures are made by diffusers itself (design.md, "Reference implementation"): a venv under
//! `target/` gets the pinned packages of `fixtures/requirements.txt`, then every script in
//! `fixtures/scripts/` writes tiny random-weight models and their inputs and outputs. Tests read
//! the committed results and never need Python. The same venv trains the built-in default
//! model (`training/`, docs/default-model.md).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Measure memory, speed and error of every scenario x mode in bench/scenarios.toml,
    /// beside diffusers on the same weights (when target/fixtures-venv exists); writes
    /// target/bench/latest.json, docs/benchmarks.md and docs/benchmarks.png (about 25 minutes).
    Bench {
        /// A smoke run of a few scenarios and modes in under 5 minutes; its report goes to
        /// target/bench/ instead of docs/.
        #[arg(long)]
        quick: bool,
        /// Run only this scenario (repeat for several), with its full modes and runs and no
        /// kernel or planning tables; the report goes to target/bench/.
        #[arg(long = "scenario", value_name = "NAME")]
        scenarios: Vec<String>,
    },
    /// Check that the CUDA build (features cuda and cudnn) compiles, with no GPU or CUDA
    /// install: nvcc comes from PyPI's CUDA 13 wheels (target/cuda-venv, about 350 MB).
    CheckCuda {
        /// Build release binaries (target/cuda/release) to carry to a machine with a GPU.
        #[arg(long)]
        build: bool,
    },
    /// Regenerate fixtures/data from diffusers (creates target/fixtures-venv on first use).
    Fixtures {
        /// Regenerate into target/fixtures-check and compare byte for byte with fixtures/data.
        #[arg(long)]
        check: bool,
    },
    /// Retrain the built-in default model into target/default-model (70-90 minutes on 2 cores),
    /// run its motion test on the result and compare it with models/default.
    TrainDefault {
        /// A seconds-long smoke run of the whole program (the model is not trained enough to
        /// pass the test, which is skipped).
        #[arg(long)]
        quick: bool,
        /// Then copy the model into models/default and its example images into examples/.
        #[arg(long, conflicts_with = "quick")]
        install: bool,
    },
}

mod bench;
mod cuda;
mod cuda_stubs;
mod train;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// `python script args...` with the environment every reproducible run uses.
fn python_cmd(python: &Path, script: &Path) -> Command {
    let mut cmd = Command::new(python);
    cmd.arg(script)
        .env("CUDA_VISIBLE_DEVICES", "")
        .env("PYTHONHASHSEED", "0")
        .env("HF_HUB_OFFLINE", "1");
    cmd
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

/// The venv's python, (re)installing the pinned packages when the requirements changed.
fn venv(root: &Path) -> Result<PathBuf> {
    let dir = root.join("target/fixtures-venv");
    let python = dir.join("bin/python");
    let requirements = root.join("fixtures/requirements.txt");
    let wanted = fs::read_to_string(&requirements)
        .with_context(|| format!("cannot read {}", requirements.display()))?;
    let stamp = dir.join("installed-requirements.txt");
    if python.exists() && fs::read_to_string(&stamp).ok().as_deref() == Some(wanted.as_str()) {
        return Ok(python);
    }
    eprintln!("xtask: creating {} (torch pulls about 3 GB)", dir.display());
    run(Command::new("python3").args(["-m", "venv"]).arg(&dir))?;
    run(Command::new(&python)
        .args(["-m", "pip", "install", "--no-input", "-r"])
        .arg(&requirements))?;
    fs::write(&stamp, wanted)?;
    Ok(python)
}

fn scripts(root: &Path) -> Result<Vec<PathBuf>> {
    let mut scripts: Vec<PathBuf> = fs::read_dir(root.join("fixtures/scripts"))?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    scripts.retain(|p| {
        p.extension().is_some_and(|e| e == "py")
            && !p
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with('_'))
    });
    scripts.sort();
    Ok(scripts)
}

/// Every file below `dir`, relative to it, sorted.
fn files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in fs::read_dir(&d).with_context(|| format!("cannot read {}", d.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push(path.strip_prefix(dir)?.to_path_buf());
            }
        }
    }
    out.sort();
    Ok(out)
}

fn fixtures(check: bool) -> Result<()> {
    let root = root();
    let python = venv(&root)?;
    let committed = root.join("fixtures/data");
    let out = if check {
        root.join("target/fixtures-check")
    } else {
        committed.clone()
    };
    if out.exists() {
        fs::remove_dir_all(&out)?;
    }
    fs::create_dir_all(&out)?;
    for script in scripts(&root)? {
        eprintln!("xtask: {}", script.display());
        run(python_cmd(&python, &script)
            .arg(&out)
            .env("OMP_NUM_THREADS", "1"))?;
    }
    if !check {
        eprintln!("xtask: fixtures written to {}", out.display());
        return Ok(());
    }
    let differ = compare_trees(&out, &committed)?;
    if !differ.is_empty() {
        bail!("regenerated fixtures differ:\n  {}", differ.join("\n  "));
    }
    eprintln!(
        "xtask: {} fixture files regenerate byte for byte",
        files(&out)?.len()
    );
    Ok(())
}

/// How the files below `made` differ from those below `committed` (empty: byte for byte equal).
fn compare_trees(made_dir: &Path, committed_dir: &Path) -> Result<Vec<String>> {
    let (made, kept) = (files(made_dir)?, files(committed_dir)?);
    let mut differ: Vec<String> = Vec::new();
    for f in made.iter().filter(|f| !kept.contains(f)) {
        differ.push(format!("new, not committed: {}", f.display()));
    }
    for f in kept.iter().filter(|f| !made.contains(f)) {
        differ.push(format!("committed, no longer made: {}", f.display()));
    }
    for f in made.iter().filter(|f| kept.contains(f)) {
        if fs::read(made_dir.join(f))? != fs::read(committed_dir.join(f))? {
            differ.push(format!("bytes differ: {}", f.display()));
        }
    }
    Ok(differ)
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::Bench { quick, scenarios } => bench::bench(quick, &scenarios),
        Task::CheckCuda { build } => cuda::check_cuda(build),
        Task::Fixtures { check } => fixtures(check),
        Task::TrainDefault { quick, install } => train::train_default(quick, install),
    }
}
