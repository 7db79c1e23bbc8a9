//! The SVD UNet lowered to the IR matches diffusers on the tiny fixtures.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use streamline_ir::{Executor, Plan, Request};
use streamline_models::svd::UNetSpatioTemporalConditionModel;

/// Run the trivial plan of `unet` on a fixture's inputs; returns (ours, diffusers').
fn run(fixture: &str, unet_dir: &str, dtype: DType) -> (Tensor, Tensor) {
    let io = load_io(fixture);
    let dev = Device::Cpu;
    let unet =
        UNetSpatioTemporalConditionModel::load(&fixture_dir(fixture).join(unet_dir), dtype, &dev)
            .unwrap();
    let (b, f, c, h, w) = io["sample"].dims5().unwrap();
    let g = unet.lower(b, f, h, w).unwrap();
    let plan = Plan::trivial(&g);
    let exec = Executor::new(&g, &plan, &dev).unwrap();
    let inputs = vec![
        io["sample"]
            .reshape((b * f, c, h, w))
            .unwrap()
            .to_dtype(dtype)
            .unwrap(),
        io["timestep"].to_dtype(DType::F32).unwrap(),
        io["encoder_hidden_states"].to_dtype(dtype).unwrap(),
        io["added_time_ids"].to_dtype(DType::F32).unwrap(),
    ];
    let out = exec
        .run(inputs, &Request::default())
        .unwrap()
        .outputs
        .remove(0);
    let expected = &io["out"];
    (out.reshape(expected.dims()).unwrap(), expected.clone())
}

#[test]
fn unet_a_matches_diffusers() {
    let (ours, theirs) = run("svd_unet_a", "unet", DType::F32);
    let err = rel_l2(&ours, &theirs);
    assert!(err <= 1e-4, "relative L2 vs diffusers: {err}");
}

#[test]
fn unet_b_matches_diffusers() {
    let (ours, theirs) = run("svd_unet_b", "unet", DType::F32);
    let err = rel_l2(&ours, &theirs);
    assert!(err <= 1e-4, "relative L2 vs diffusers: {err}");
}

#[test]
fn fp16_variant_loads() {
    let (ours, theirs) = run("svd_unet_a", "unet_fp16", DType::F32);
    let err = rel_l2(&ours, &theirs);
    assert!(err <= 1e-2, "fp16 weights, f32 compute: relative L2 {err}");
}
