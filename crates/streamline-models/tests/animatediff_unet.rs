//! AnimateDiff's UNet (SD UNet + motion adapter, assembled as diffusers' `from_unet2d`) lowered
//! to the IR matches diffusers' `UNetMotionModel`, with 8 GroupNorm groups and at latents that
//! are not multiples of 2^levels too; mismatched adapters are refused clearly.

mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use common::*;
use streamline_models::sd::UNetMotionModel;
use streamline_models::svd::UNetShape;

fn load(unet: &Path, adapter: &Path) -> Result<UNetMotionModel, String> {
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

/// Relative L2 (the larger of the CPU kernels' and the portable path's) of the lowered UNet
/// (`unet`, `adapter` folders) against diffusers' output on
/// the fixture `io`'s tensors `{prefix}sample`, `{prefix}timestep`,
/// `{prefix}encoder_hidden_states` and `{prefix}out`.
fn parity(unet: &Path, adapter: &Path, io: &HashMap<String, Tensor>, prefix: &str) -> f64 {
    let model = load(unet, adapter).unwrap();
    let t = |name: &str| io[&format!("{prefix}{name}")].clone();
    let (b, _, f, h, w) = t("sample").dims5().unwrap();
    let shape = UNetShape {
        batch: b,
        frames: f,
        height: h,
        width: w,
        context_len: t("encoder_hidden_states").dim(1).unwrap(),
    };
    let g = model.lower(shape).unwrap();
    let inputs = vec![
        frame_major(&t("sample")),
        t("timestep"),
        t("encoder_hidden_states"),
    ];
    // The larger error of the CPU kernels and the portable path.
    run_each(&g, inputs)
        .iter()
        .map(|(_, out)| rel_l2(out, &frame_major(&t("out"))))
        .fold(0.0, f64::max)
}

#[test]
fn motion_unet_matches_diffusers() {
    let dir = fixture_dir("animatediff_unet");
    let io = load_io("animatediff_unet");
    let err = parity(&dir.join("unet"), &dir.join("motion_adapter"), &io, "");
    assert!(err <= 1e-4, "relative L2 vs diffusers {err}");
}

/// 8 GroupNorm groups in the UNet and the adapter: the motion modules use the UNet's, as
/// diffusers' `from_unet2d` builds them, so the adapter's `motion_norm_num_groups` changes
/// nothing.
#[test]
fn motion_unet_with_8_groups_matches_diffusers_whatever_the_adapters_groups() {
    let dir = fixture_dir("animatediff_groups");
    let io = load_io("animatediff_groups");
    let (unet, adapter) = (dir.join("model/unet"), dir.join("motion_adapter"));
    let err = parity(&unet, &adapter, &io, "unet_");
    eprintln!("8 groups: relative L2 vs diffusers {err:.2e}");
    assert!(err <= 1e-4, "relative L2 vs diffusers {err}");
    let config = std::fs::read_to_string(adapter.join("config.json")).unwrap();
    let (from, to) = (
        "\"motion_norm_num_groups\": 8",
        "\"motion_norm_num_groups\": 16",
    );
    assert!(config.contains(from), "{config}");
    let other = temp_dir("adapter-16-groups");
    std::fs::write(other.join("config.json"), config.replace(from, to)).unwrap();
    let weights = "diffusion_pytorch_model.safetensors";
    std::fs::copy(adapter.join(weights), other.join(weights)).unwrap();
    assert_eq!(parity(&unet, &other, &io, "unet_"), err);
}

/// 18x10 latents through three levels: 9x5, then 5x3, and back up to the skips' sizes.
#[test]
fn motion_unet_at_latents_it_cannot_halve_matches_diffusers() {
    let dir = fixture_dir("animatediff_odd_size");
    let io = load_io("animatediff_odd_size");
    let err = parity(
        &dir.join("model/unet"),
        &dir.join("motion_adapter"),
        &io,
        "unet_",
    );
    eprintln!("18x10 latents: relative L2 vs diffusers {err:.2e}");
    assert!(err <= 1e-4, "relative L2 vs diffusers {err}");
}

/// `UNetMotionModel.from_unet2d` drops `flip_sin_to_cos`, `freq_shift` and
/// `center_input_sample` (its time projection is always `Timesteps(c, True, 0)`), and
/// diffusers' "swish" is SiLU: such UNet configs assemble the same motion UNet.
#[test]
fn unet_fields_from_unet2d_drops_change_nothing() {
    let dir = fixture_dir("animatediff_unet");
    let io = load_io("animatediff_unet");
    let mut config = std::fs::read_to_string(dir.join("unet/config.json")).unwrap();
    for (from, to) in [
        ("\"act_fn\": \"silu\"", "\"act_fn\": \"swish\""),
        (
            "\"center_input_sample\": false",
            "\"center_input_sample\": true",
        ),
        ("\"flip_sin_to_cos\": true", "\"flip_sin_to_cos\": false"),
        ("\"freq_shift\": 0", "\"freq_shift\": 1"),
    ] {
        assert!(config.contains(from), "{config}");
        config = config.replace(from, to);
    }
    let unet = temp_dir("unet-dropped-fields");
    std::fs::write(unet.join("config.json"), config).unwrap();
    let weights = "diffusion_pytorch_model.safetensors";
    std::fs::copy(dir.join("unet").join(weights), unet.join(weights)).unwrap();
    let adapter = dir.join("motion_adapter");
    let err = parity(&unet, &adapter, &io, "");
    assert_eq!(err, parity(&dir.join("unet"), &adapter, &io, ""));
}

#[test]
fn groups_that_do_not_split_the_channels_are_refused() {
    let dir = fixture_dir("animatediff_groups");
    let unet = std::fs::read_to_string(dir.join("model/unet/config.json")).unwrap();
    let (from, to) = ("\"norm_num_groups\": 8", "\"norm_num_groups\": 12");
    assert!(unet.contains(from), "{unet}");
    let tmp = temp_dir("unet-12-groups");
    std::fs::write(tmp.join("config.json"), unet.replace(from, to)).unwrap();
    let err = load(&tmp, &dir.join("motion_adapter")).unwrap_err();
    assert!(
        err.contains(&tmp.join("config.json").display().to_string())
            && err.contains(
                "entry 16 is not a multiple of the 12 GroupNorm groups (`norm_num_groups`)"
            ),
        "{err}"
    );
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
