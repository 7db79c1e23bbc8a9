//! AnimateDiff's UNet (SD UNet + motion adapter, assembled as diffusers' `from_unet2d`) lowered
//! to the IR matches diffusers' `UNetMotionModel`; mismatched adapters are refused clearly.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use streamline_ir::{Executor, Plan, Request};
use streamline_models::sd::UNetMotionModel;
use streamline_models::svd::UNetShape;

fn load(unet: &std::path::Path, adapter: &std::path::Path) -> Result<UNetMotionModel, String> {
    UNetMotionModel::load(unet, adapter, DType::F32, &Device::Cpu).map_err(|e| e.to_string())
}

/// diffusers' `(B, C, F, H, W)` as the graph's frame-major `(B*F, C, H, W)`.
fn frame_major(t: &Tensor) -> Tensor {
    let (b, c, f, h, w) = t.dims5().unwrap();
    t.permute((0, 2, 1, 3, 4))
        .unwrap()
        .reshape((b * f, c, h, w))
        .unwrap()
}

#[test]
fn motion_unet_matches_diffusers() {
    let dir = fixture_dir("animatediff_unet");
    let io = load_io("animatediff_unet");
    let model = load(&dir.join("unet"), &dir.join("motion_adapter")).unwrap();
    let (b, _, f, h, w) = io["sample"].dims5().unwrap();
    let shape = UNetShape {
        batch: b,
        frames: f,
        height: h,
        width: w,
        context_len: io["encoder_hidden_states"].dim(1).unwrap(),
    };
    let g = model.lower(shape).unwrap();
    let plan = Plan::trivial(&g);
    let inputs = vec![
        frame_major(&io["sample"]),
        io["timestep"].clone(),
        io["encoder_hidden_states"].clone(),
    ];
    let out = Executor::new(&g, &plan, &Device::Cpu)
        .unwrap()
        .run(inputs, &Request::default())
        .unwrap()
        .outputs
        .remove(0);
    let err = rel_l2(&out, &frame_major(&io["out"]));
    assert!(err <= 1e-4, "relative L2 vs diffusers {err}");
}

#[test]
fn mismatched_motion_adapters_are_refused() {
    let dir = fixture_dir("animatediff_unet");
    let adapter = std::fs::read_to_string(dir.join("motion_adapter/config.json")).unwrap();
    for (from, to, expect) in [
        (
            "\"block_out_channels\": [\n    32,\n    64\n  ]",
            "\"block_out_channels\": [\n    32,\n    64,\n    64\n  ]",
            "the motion adapter has 3 blocks",
        ),
        (
            "\"motion_layers_per_block\": 2",
            "\"motion_layers_per_block\": 1",
            "`motion_layers_per_block` [1, 1] differ from the UNet's `layers_per_block` [2, 2]",
        ),
    ] {
        assert!(
            adapter.contains(from),
            "fixture adapter config lacks {from}"
        );
        let tmp = temp_dir(&format!("adapter-{}", expect.len()));
        std::fs::write(tmp.join("config.json"), adapter.replace(from, to)).unwrap();
        std::fs::copy(
            dir.join("motion_adapter/diffusion_pytorch_model.safetensors"),
            tmp.join("diffusion_pytorch_model.safetensors"),
        )
        .unwrap();
        let err = load(&dir.join("unet"), &tmp).unwrap_err();
        assert!(
            err.contains(expect) && err.contains("config.json"),
            "{expect}: {err}"
        );
    }
}

#[test]
fn a_missing_motion_tensor_names_the_adapter_file() {
    let dir = fixture_dir("animatediff_unet");
    let tmp = temp_dir("adapter-missing-tensor");
    std::fs::copy(
        dir.join("motion_adapter/config.json"),
        tmp.join("config.json"),
    )
    .unwrap();
    let mut tensors = candle_core::safetensors::load(
        dir.join("motion_adapter/diffusion_pytorch_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let name = "up_blocks.1.motion_modules.2.proj_out.weight";
    assert!(tensors.remove(name).is_some());
    candle_core::safetensors::save(&tensors, tmp.join("diffusion_pytorch_model.safetensors"))
        .unwrap();
    let err = load(&dir.join("unet"), &tmp).unwrap_err();
    assert!(
        err.contains(name) && err.contains(&tmp.display().to_string()),
        "{err}"
    );
}
