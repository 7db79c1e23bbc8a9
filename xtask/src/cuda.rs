//! `cargo xtask check-cuda`: the CUDA build, checked (or built, to carry to a GPU machine) on a
//! machine without a GPU or a CUDA install.
//!
//! candle's `cuda` feature compiles its kernels with nvcc at build time (candle-kernels'
//! build script) and loads the driver, cuBLAS and cuDNN at run time (cudarc loads them
//! dynamically), so the build needs nvcc and CUDA's headers alone. PyPI's CUDA 13 wheels ship
//! both (the CUDA 12 nvcc wheels ship no nvcc); they go into a venv under `target/`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result};

/// The toolkit wheels: nvcc, its C runtime headers, NVVM, the runtime headers and CCCL.
const WHEELS: [&str; 5] = [
    "nvidia-cuda-nvcc==13.4.*",
    "nvidia-cuda-runtime==13.4.*",
    "nvidia-cuda-crt==13.4.*",
    "nvidia-nvvm==13.4.*",
    "nvidia-cuda-cccl",
];

/// The compute capability kernels are compiled for unless `CUDA_COMPUTE_CAP` says otherwise:
/// candle's kernels are PTX, which the driver compiles for newer GPUs too.
const DEFAULT_COMPUTE_CAP: &str = "89";

/// `site-packages/nvidia/cu13` of the toolkit venv, installing the wheels when missing.
fn toolkit(root: &Path) -> Result<PathBuf> {
    let venv = root.join("target/cuda-venv");
    let python = venv.join("bin/python");
    let stamp = venv.join("installed-wheels.txt");
    let wanted = WHEELS.join("\n");
    if !python.exists() || fs::read_to_string(&stamp).ok().as_deref() != Some(wanted.as_str()) {
        eprintln!(
            "xtask: installing CUDA's nvcc wheels into {} (about 350 MB)",
            venv.display()
        );
        crate::run(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
        crate::run(
            Command::new(&python)
                .args(["-m", "pip", "install", "--no-input", "--quiet"])
                .args(WHEELS),
        )?;
        fs::write(&stamp, &wanted)?;
    }
    let lib = fs::read_dir(venv.join("lib"))?
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("site-packages/nvidia/cu13"))
        .find(|p| p.join("bin/nvcc").is_file())
        .context("the CUDA wheels installed no bin/nvcc")?;
    Ok(lib)
}

/// `cargo check` (or, with `build`, a release build) of the CLI and the bench with the `cuda`
/// and `cudnn` features, in its own target directory `target/cuda`. A build links the
/// binaries against stubs of CUDA's libraries made from what cudarc declares
/// ([`crate::cuda_stubs`]) and packages `streamline-bench` for a GPU machine.
pub fn check_cuda(build: bool) -> Result<()> {
    let root = crate::root();
    let cuda = toolkit(&root)?;
    let target = root.join("target/cuda");
    let start = Instant::now();
    eprintln!(
        "xtask: {} the cuda + cudnn build with nvcc from {} (nvcc compiling candle's kernels \
         takes tens of minutes on 2 cores)",
        if build { "building" } else { "checking" },
        cuda.display()
    );
    if build {
        let stubs = crate::cuda_stubs::write(&root, &target.join("stubs"), &cuda)?;
        let mut bins = cargo(&root, &cuda, &["build", "--release"]);
        crate::run(binaries(&mut bins).env("LIBRARY_PATH", &stubs))?;
        let package = crate::cuda_stubs::package(&target.join("release"))?;
        eprintln!(
            "xtask: binaries in {}; {} to carry to a GPU machine (it needs CUDA 13's runtime, \
             cuBLAS, cuRAND and cuDNN 9 there)",
            target.join("release").display(),
            package.display()
        );
    } else {
        crate::run(binaries(&mut cargo(&root, &cuda, &["check"])))?;
    }
    let minutes = start.elapsed().as_secs_f64() / 60.0;
    eprintln!("xtask: the cuda build passed in {minutes:.1} min");
    Ok(())
}

/// `cargo <args>` with nvcc from the toolkit `cuda` on the PATH, in `target/cuda`.
fn cargo(root: &Path, cuda: &Path, args: &[&str]) -> Command {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut paths = vec![cuda.join("bin")];
    paths.extend(std::env::split_paths(&path));
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| DEFAULT_COMPUTE_CAP.into());
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.args(args)
        .current_dir(root)
        .env(
            "PATH",
            std::env::join_paths(paths).expect("PATH entries without separators"),
        )
        .env("CUDA_HOME", cuda)
        .env("CUDA_PATH", cuda)
        .env("CUDA_COMPUTE_CAP", cap)
        .env("CARGO_TARGET_DIR", root.join("target/cuda"));
    cmd
}

/// The CLI and the bench with the `cuda` and `cudnn` features.
fn binaries(cmd: &mut Command) -> &mut Command {
    cmd.args(["-p", "streamline-cli", "-p", "streamline-bench"])
        .args(["--features", "streamline-cli/cuda,streamline-cli/cudnn"])
        .args(["--features", "streamline-bench/cuda,streamline-bench/cudnn"])
}
