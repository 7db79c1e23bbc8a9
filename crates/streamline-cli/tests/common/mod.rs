//! What the CLI tests share.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// A fresh folder under the system temp dir, removed when the test ends.
pub struct Scratch(PathBuf);

impl Scratch {
    /// `streamline-SUITE-TEST-PID`: unique to the test, so tests run side by side.
    pub fn new(suite: &str, test: &str) -> Scratch {
        let name = format!("streamline-{suite}-{test}-{}", std::process::id());
        let dir = std::env::temp_dir().join(name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    pub fn dir(&self) -> &Path {
        &self.0
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Copies the folder `from` to `to`; with `garbage_weights`, every safetensors file holds
/// bytes that are no checkpoint (so a check made after loading fails on the weights).
pub fn copy_model(from: &Path, to: &Path, garbage_weights: bool) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_model(&entry.path(), &target, garbage_weights);
        } else if garbage_weights && target.extension().is_some_and(|e| e == "safetensors") {
            std::fs::write(&target, b"not weights").unwrap();
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// The command line `command`, then each `(flag, value)` of `defaults` whose flag `extra`
/// does not name, then `extra`: flags in `extra` replace the defaults' values.
pub fn with_defaults(command: &[&str], defaults: &[(&str, &str)], extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = command.iter().map(|s| s.to_string()).collect();
    for (flag, value) in defaults {
        if !extra.contains(flag) {
            args.extend([flag.to_string(), value.to_string()]);
        }
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}
