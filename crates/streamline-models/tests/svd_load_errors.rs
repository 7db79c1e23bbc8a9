//! Bad checkpoints give errors naming the file and the tensor or field; nothing panics.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use common::*;
use streamline_models::svd::{AutoencoderKLTemporalDecoder, UNetSpatioTemporalConditionModel};

const WEIGHTS: &str = "diffusion_pytorch_model.safetensors";

/// A copy of a fixture's `unet/` folder with its weights edited by `edit`.
fn unet_copy(test: &str, edit: impl FnOnce(&mut HashMap<String, Tensor>)) -> PathBuf {
    let src = fixture_dir("svd_unet_a").join("unet");
    let dir = temp_dir(test);
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    let mut tensors = candle_core::safetensors::load(src.join(WEIGHTS), &Device::Cpu).unwrap();
    edit(&mut tensors);
    candle_core::safetensors::save(&tensors, dir.join(WEIGHTS)).unwrap();
    dir
}

fn load_err(dir: &Path) -> String {
    UNetSpatioTemporalConditionModel::load(dir, DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string()
}

#[test]
fn missing_tensor_names_file_and_tensor() {
    let name = "down_blocks.1.resnets.0.temporal_res_block.conv2.bias";
    let dir = unet_copy("missing-tensor", |t| {
        t.remove(name).unwrap();
    });
    let err = load_err(&dir);
    assert!(
        err.contains(WEIGHTS) && err.contains(name) && err.contains("missing"),
        "{err}"
    );
}

#[test]
fn wrong_shape_names_the_tensor_and_both_shapes() {
    let name = "conv_in.weight";
    let dir = unet_copy("wrong-shape", |t| {
        t.insert(
            name.into(),
            Tensor::zeros((32, 4, 3, 3), DType::F32, &Device::Cpu).unwrap(),
        );
    });
    let err = load_err(&dir);
    assert!(
        err.contains(WEIGHTS)
            && err.contains(name)
            && err.contains("[32, 4, 3, 3]")
            && err.contains("[32, 8, 3, 3]"),
        "{err}"
    );
}

#[test]
fn truncated_file_names_the_file() {
    let dir = unet_copy("truncated", |_| {});
    let bytes = std::fs::read(dir.join(WEIGHTS)).unwrap();
    std::fs::write(dir.join(WEIGHTS), &bytes[..bytes.len() / 2]).unwrap();
    let err = load_err(&dir);
    assert!(
        err.contains(WEIGHTS) && err.contains("safetensors"),
        "{err}"
    );
}

#[test]
fn unsupported_block_type_names_the_field() {
    let dir = unet_copy("block-type", |_| {});
    let config = std::fs::read_to_string(dir.join("config.json")).unwrap();
    let config = config.replacen("\"DownBlockSpatioTemporal\"", "\"DownBlock3D\"", 1);
    std::fs::write(dir.join("config.json"), config).unwrap();
    let err = load_err(&dir);
    assert!(
        err.contains("config.json")
            && err.contains("down_block_types[0]")
            && err.contains("DownBlock3D"),
        "{err}"
    );
}

#[test]
fn missing_config_field_names_the_field() {
    let dir = unet_copy("config-field", |_| {});
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let mut config = config.as_object().unwrap().clone();
    config.remove("block_out_channels");
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string(&config).unwrap(),
    )
    .unwrap();
    let err = load_err(&dir);
    assert!(
        err.contains("config.json") && err.contains("block_out_channels"),
        "{err}"
    );
}

#[test]
fn missing_weights_file_names_what_was_looked_for() {
    let dir = unet_copy("no-weights", |_| {});
    std::fs::remove_file(dir.join(WEIGHTS)).unwrap();
    let err = load_err(&dir);
    assert!(
        err.contains(WEIGHTS) && err.contains("diffusion_pytorch_model.fp16.safetensors"),
        "{err}"
    );
}

#[test]
fn vae_unsupported_block_type_names_the_field() {
    let src = fixture_dir("svd_vae").join("vae");
    let dir = temp_dir("vae-block-type");
    std::fs::copy(src.join(WEIGHTS), dir.join(WEIGHTS)).unwrap();
    let config = std::fs::read_to_string(src.join("config.json")).unwrap();
    std::fs::write(
        dir.join("config.json"),
        config.replacen("DownEncoderBlock2D", "AttnDownEncoderBlock2D", 1),
    )
    .unwrap();
    let err = AutoencoderKLTemporalDecoder::load(&dir, DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("down_block_types[0]") && err.contains("AttnDownEncoderBlock2D"),
        "{err}"
    );
}
