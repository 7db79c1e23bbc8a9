//! Link stubs for the CUDA build on a machine without CUDA's libraries.
//!
//! candle-core turns on cudarc's `dynamic-linking`, so the binaries link against libcuda
//! (the driver), libnvrtc, libcurand, libcublas, libcublasLt and libcudnn; the nvcc wheels
//! ship none of them. The linker only needs each library's soname and the symbols the Rust
//! code calls, so a stub per library (every symbol an empty function) links the binaries; on
//! the GPU machine the dynamic loader binds the real libraries by those sonames.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// Each library: symbol prefix, file name, soname (CUDA 13, cuDNN 9), most specific first.
const LIBRARIES: [(&str, &str, &str); 6] = [
    ("cudnn", "libcudnn.so", "libcudnn.so.9"),
    ("cublasLt", "libcublasLt.so", "libcublasLt.so.13"),
    ("cublas", "libcublas.so", "libcublas.so.13"),
    ("curand", "libcurand.so", "libcurand.so.10"),
    ("nvrtc", "libnvrtc.so", "libnvrtc.so.13"),
    ("cu", "libcuda.so", "libcuda.so.1"),
];

/// cudarc's source folder, from `cargo metadata` with the `cuda` feature.
fn cudarc_source(root: &Path) -> Result<PathBuf> {
    let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args([
            "metadata",
            "--format-version",
            "1",
            "--features",
            "streamline-cli/cuda",
        ])
        .current_dir(root)
        .output()?;
    if !out.status.success() {
        bail!("cargo metadata: {}", String::from_utf8_lossy(&out.stderr));
    }
    let metadata: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let manifest = metadata["packages"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["name"] == "cudarc")
        .and_then(|p| p["manifest_path"].as_str())
        .context("cargo metadata lists no cudarc")?;
    Ok(Path::new(manifest).with_file_name("src"))
}

/// Every C function cudarc declares (`fn cuInit(...)` in its `sys` bindings), grouped by
/// library: a superset of what the binaries call, found before anything is compiled.
fn symbols(root: &Path) -> Result<BTreeMap<&'static str, Vec<String>>> {
    let mut groups: BTreeMap<&'static str, Vec<String>> = BTreeMap::new();
    let mut dirs = vec![cudarc_source(root)?];
    while let Some(dir) = dirs.pop() {
        for entry in fs::read_dir(&dir)? {
            let path = entry?.path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                for name in fs::read_to_string(&path)?.lines().filter_map(declared) {
                    // The CUDA runtime (cuda*) is in the wheels.
                    let library = LIBRARIES.iter().find(|(p, ..)| name.starts_with(p));
                    if let Some((prefix, ..)) = library.filter(|_| !name.starts_with("cuda")) {
                        groups.entry(prefix).or_default().push(name.to_string());
                    }
                }
            }
        }
    }
    for symbols in groups.values_mut() {
        symbols.sort();
        symbols.dedup();
    }
    Ok(groups)
}

/// `cuInit` of a line `    pub fn cuInit(flags: ...) -> ...` or `    fn cuInit(...`.
fn declared(line: &str) -> Option<&str> {
    let rest = line.trim_start();
    let rest = rest
        .strip_prefix("pub ")
        .unwrap_or(rest)
        .strip_prefix("fn ")?;
    let name = &rest[..rest.find('(')?];
    let c_like = name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    (c_like && LIBRARIES.iter().any(|(p, ..)| name.starts_with(p))).then_some(name)
}

/// Stubs for the libraries cudarc calls, in `dir` (with `libcudart.so` from the toolkit
/// `cuda`, whose wheel ships only the versioned file).
pub fn write(root: &Path, dir: &Path, cuda: &Path) -> Result<PathBuf> {
    fs::create_dir_all(dir)?;
    let groups = symbols(root)?;
    if groups.is_empty() {
        bail!("found no CUDA function in cudarc's source");
    }
    for (prefix, symbols) in groups {
        let (_, file, soname) = LIBRARIES
            .iter()
            .find(|(p, ..)| *p == prefix)
            .expect("grouped by these prefixes");
        let source = dir.join(format!("{prefix}.c"));
        let body: String = symbols
            .iter()
            .map(|s| format!("void {s}(void) {{}}\n"))
            .collect();
        fs::write(&source, body)?;
        crate::run(
            Command::new("cc")
                .args(["-shared", "-fPIC", "-o"])
                .arg(dir.join(file))
                .arg(format!("-Wl,-soname,{soname}"))
                .arg(&source),
        )?;
        link(&dir.join(file), &dir.join(soname))?;
    }
    link(&cuda.join("lib/libcudart.so.13"), &dir.join("libcudart.so"))?;
    Ok(dir.to_path_buf())
}

fn link(target: &Path, name: &Path) -> Result<()> {
    let _ = fs::remove_file(name);
    std::os::unix::fs::symlink(target, name)
        .with_context(|| format!("cannot link {}", name.display()))
}

/// `streamline-bench` stripped and gzipped beside `release/`, small enough to carry to a
/// GPU machine (about 16 MB).
pub fn package(release: &Path) -> Result<PathBuf> {
    let dir = release.parent().context("release/ has a parent")?;
    let stripped = dir.join("streamline-bench");
    crate::run(
        Command::new("strip")
            .arg("-o")
            .arg(&stripped)
            .arg(release.join("streamline-bench")),
    )?;
    crate::run(Command::new("gzip").args(["-f", "-9"]).arg(&stripped))?;
    Ok(dir.join("streamline-bench.gz"))
}
