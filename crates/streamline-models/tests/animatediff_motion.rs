//! AnimateDiff's motion module lowered to the IR matches diffusers' `AnimateDiffTransformer3D`.

mod common;

use candle_core::{DType, Device};
use common::*;
use streamline_models::load::WeightSource;
use streamline_models::sd::MotionModule;

fn module() -> MotionModule {
    let file = fixture_dir("animatediff_motion").join("module.safetensors");
    let vb = WeightSource::open(&file)
        .unwrap()
        .var_builder(DType::F32, &Device::Cpu);
    MotionModule::new(64, 2, 2, 8, vb).unwrap()
}

#[test]
fn motion_module_matches_diffusers() {
    let io = load_io("animatediff_motion");
    let x = &io["hidden_states"];
    let (n, _, h, w) = x.dims4().unwrap();
    let g = module().lower_alone(2, n / 2, h, w).unwrap();
    for (k, out) in run_each(&g, vec![x.clone()]) {
        let err = rel_l2(&out, &io["out"]);
        assert!(err <= 1e-4, "{k}: relative L2 vs diffusers {err}");
    }
    // The module changes its input: a residual alone would not pass.
    assert!(rel_l2(x, &io["out"]) > 1e-2);
}

#[test]
fn more_frames_than_positional_embeddings_is_an_error() {
    let err = module().lower_alone(1, 9, 2, 2).unwrap_err().to_string();
    assert!(
        err.contains("9 frames") && err.contains("motion_max_seq_length"),
        "{err}"
    );
}
