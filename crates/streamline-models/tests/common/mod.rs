//! Shared helpers for model tests: fixture paths and error measures.

#![allow(dead_code, unused_imports)]

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor};
use serde_json::Value;
use streamline_ir::{Executor, Graph, Kernels, Plan, Request};
use streamline_models::load::{Manifest, WeightSource};

pub fn fixture_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/data")
        .join(name)
}

pub fn load_io(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture_dir(name).join("io.safetensors"), &Device::Cpu)
        .unwrap_or_else(|e| panic!("fixture {name}: {e}"))
}

/// Every implementation of the ops a CPU run can use: streamline's CPU kernels, and the
/// portable path that GPUs run (so that what a GPU runs is checked against diffusers here).
pub const KERNELS: [Kernels; 2] = [Kernels::Cpu, Kernels::Portable { gpu: false }];

/// The first output of the trivial plan of `g` on `inputs`, under each of [`KERNELS`].
pub fn run_each(g: &Graph, inputs: Vec<Tensor>) -> Vec<(Kernels, Tensor)> {
    KERNELS
        .iter()
        .map(|&k| {
            let plan = Plan::trivial(g).with_kernels(k);
            let mut out = Executor::new(g, &plan, &Device::Cpu)
                .unwrap()
                .run(inputs.clone(), &Request::default())
                .unwrap();
            (k, out.outputs.remove(0))
        })
        .collect()
}

pub use streamline_ir::testing::rel_l2;

/// A fresh temporary folder for one test.
pub fn temp_dir(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("streamline-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A full-size model manifest (`fixtures/data/manifests/<name>.json`): its config, a
/// shape-only weight source standing for the checkpoint, and the file.
pub fn manifest(name: &str) -> (Value, WeightSource, std::path::PathBuf) {
    let path = fixture_dir("manifests").join(format!("{name}.json"));
    let json: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let tensors: Manifest = serde_json::from_value(json["tensors"].clone()).unwrap();
    (
        json["config"].clone(),
        WeightSource::manifest(&path, tensors),
        path,
    )
}

/// The tensors a model requested are exactly the checkpoint's: names and shapes.
pub fn assert_exact(name: &str, source_tensors: Manifest, requested: Manifest) {
    let missing: Vec<_> = requested
        .keys()
        .filter(|k| !source_tensors.contains_key(*k))
        .collect();
    let unused: Vec<_> = source_tensors
        .keys()
        .filter(|k| !requested.contains_key(*k))
        .collect();
    assert!(
        missing.is_empty() && unused.is_empty(),
        "{name}: missing {missing:?}, unused {unused:?}"
    );
    assert_eq!(source_tensors, requested, "{name}: shapes differ");
}
