//! The SVD UNet lowered to the IR matches diffusers on the tiny fixtures.
//!
//! Fixture `a` has two plain levels (its only transformer is the mid block's); `b` has three
//! levels with cross-attention at full resolution and per-block layer counts. Both run with a
//! frame count different from the config's `num_frames` and batch 2 (two CFG halves that
//! differ in every input).

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use common::*;
use streamline_ir::{Executor, Kernels, Plan, Request};
use streamline_models::svd::{UNetShape, UNetSpatioTemporalConditionModel};

struct Run {
    out: Tensor,
    emb: Tensor,
}

/// Run the trivial plan of a fixture's UNet on its inputs, with the encoder state `ehs`.
fn run(fixture: &str, unet_dir: &str, dtype: DType, ehs: &str, kernels: Kernels) -> Run {
    let io = load_io(fixture);
    let dev = Device::Cpu;
    let dir = fixture_dir(fixture).join(unet_dir);
    let unet = UNetSpatioTemporalConditionModel::load(&dir, dtype, &dev).unwrap();
    let (b, f, c, h, w) = io["sample"].dims5().unwrap();
    let shape = UNetShape {
        batch: b,
        frames: f,
        height: h,
        width: w,
        context_len: io[ehs].dim(1).unwrap(),
    };
    let g = unet.lower(shape).unwrap();
    let plan = Plan::trivial(&g).with_kernels(kernels);
    let exec = Executor::new(&g, &plan, &dev).unwrap();
    let inputs = vec![
        io["sample"]
            .reshape((b * f, c, h, w))
            .unwrap()
            .to_dtype(dtype)
            .unwrap(),
        io["timestep"].clone(),
        io[ehs].to_dtype(dtype).unwrap(),
        io["added_time_ids"].clone(),
    ];
    let request = Request {
        keep: vec!["emb".into()],
        ..Request::default()
    };
    let mut r = exec.run(inputs, &request).unwrap();
    Run {
        out: r.outputs.remove(0).reshape(io["out"].dims()).unwrap(),
        emb: r.kept.remove("emb").unwrap(),
    }
}

/// Errors against diffusers, named `{kernels} {output}`, with the CPU kernels and with the
/// portable path.
fn check(fixture: &str) -> HashMap<String, f64> {
    let io = load_io(fixture);
    let mut errors = HashMap::new();
    for k in KERNELS {
        let one = run(fixture, "unet", DType::F32, "encoder_hidden_states", k);
        // SVD's context is one token, so attn2's queries and keys cannot matter there; the
        // 3-token run exercises them.
        let three = run(fixture, "unet", DType::F32, "encoder_hidden_states_seq3", k);
        for (what, err) in [
            ("out", rel_l2(&one.out, &io["out"])),
            ("emb", rel_l2(&one.emb, &io["emb"])),
            ("out_seq3", rel_l2(&three.out, &io["out_seq3"])),
        ] {
            errors.insert(format!("{k} {what}"), err);
        }
    }
    errors
}

#[test]
fn unet_a_matches_diffusers() {
    for (what, err) in check("svd_unet_a") {
        eprintln!("svd_unet_a {what}: relative L2 {err:.2e}");
        assert!(err <= 1e-4, "{what}: relative L2 vs diffusers {err}");
    }
}

#[test]
fn unet_b_matches_diffusers() {
    for (what, err) in check("svd_unet_b") {
        eprintln!("svd_unet_b {what}: relative L2 {err:.2e}");
        assert!(err <= 1e-4, "{what}: relative L2 vs diffusers {err}");
    }
}

#[test]
fn fp16_variant_loads_and_f16_compute_stays_close() {
    let io = load_io("svd_unet_a");
    let weights_only = run(
        "svd_unet_a",
        "unet_fp16",
        DType::F32,
        "encoder_hidden_states",
        Kernels::Cpu,
    );
    let err = rel_l2(&weights_only.out, &io["out"]);
    assert!(err <= 1e-2, "fp16 weights, f32 compute: relative L2 {err}");
    let half = run(
        "svd_unet_a",
        "unet_fp16",
        DType::F16,
        "encoder_hidden_states",
        Kernels::Cpu,
    );
    let err = rel_l2(&half.out.to_dtype(DType::F32).unwrap(), &io["out"]);
    assert!(err <= 2e-2, "f16 compute: relative L2 {err}");
}

/// diffusers' SVD UNet does not forward upsample sizes, so latents it halves to an odd size
/// cannot come back; lowering refuses them, stating the rule, before any node exists.
#[test]
fn latents_the_unet_cannot_halve_and_double_back_are_refused_at_lowering() {
    let dir = fixture_dir("svd_unet_b").join("unet");
    let unet = UNetSpatioTemporalConditionModel::load(&dir, DType::F32, &Device::Cpu).unwrap();
    let shape = |height, width| UNetShape {
        batch: 1,
        frames: 2,
        height,
        width,
        context_len: 1,
    };
    let err = unet.lower(shape(8, 10)).unwrap_err().to_string();
    assert!(
        err.contains("`sample`")
            && err.contains("latent width 10 must be a positive multiple of 4")
            && err.contains("halves latents 2 times, without forwarding upsample sizes"),
        "{err}"
    );
    assert!(unet.lower(shape(8, 12)).is_ok());
}
