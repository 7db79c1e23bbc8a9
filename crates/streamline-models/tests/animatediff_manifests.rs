//! Full-size AnimateDiff loaders request exactly the tensors of the real checkpoints: SD 1.5's
//! UNet with motion adapter v1-5-2 (mid block included) and SD 1.5's VAE, by the names and
//! shapes of diffusers' full-size models (written from torch's meta device). No weights needed.

mod common;

use candle_core::{DType, Device};
use common::*;
use streamline_models::sd::{
    AutoencoderKL, MotionAdapterConfig, MotionUNetConfig, UNet2DConfig, UNetMotionModel,
};
use streamline_models::svd::{UNetShape, VaeConfig};

#[test]
fn full_size_motion_unet_uses_both_checkpoints_exactly() {
    let (unet_config, unet_source, unet_path) = manifest("sd15_unet");
    let (adapter_config, adapter_source, adapter_path) =
        manifest("animatediff_motion_adapter_v1_5_2");
    let (unet_tensors, adapter_tensors) = (
        unet_source.tensors().unwrap(),
        adapter_source.tensors().unwrap(),
    );
    let (unet_usage, adapter_usage) = (unet_source.usage(), adapter_source.usage());
    let unet: UNet2DConfig = serde_json::from_value(unet_config).unwrap();
    let adapter: MotionAdapterConfig = serde_json::from_value(adapter_config).unwrap();
    // The built-in configs are the checkpoints'.
    assert_eq!(format!("{unet:?}"), format!("{:?}", UNet2DConfig::sd15()));
    assert_eq!(
        format!("{adapter:?}"),
        format!("{:?}", MotionAdapterConfig::v1_5_2())
    );
    let config = MotionUNetConfig::new(unet, &unet_path, adapter, &adapter_path).unwrap();
    let model = UNetMotionModel::new(
        &config,
        unet_source.var_builder(DType::F16, &Device::Cpu),
        adapter_source.var_builder(DType::F16, &Device::Cpu),
    )
    .unwrap();
    assert_exact("sd15_unet", unet_tensors, unet_usage.requested());
    assert_exact("motion adapter", adapter_tensors, adapter_usage.requested());
    // AnimateDiff at 512x512 (64x64 latents), 16 frames, CFG batch 2, CLIP's 77 tokens.
    let g = model
        .lower(UNetShape {
            batch: 2,
            frames: 16,
            height: 64,
            width: 64,
            context_len: 77,
        })
        .unwrap();
    let out = g.info(g.outputs()[0]);
    assert_eq!(out.shape.dims(), &[32, 4, 64, 64]);
    // Motion modules: 2 per down block (8), 1 in the mid block, 3 per up block (12); each
    // has one GroupNorm statistics node.
    let stats = g
        .nodes()
        .iter()
        .filter(|n| n.name.contains("motion_modules.") && n.name.ends_with(".norm.stats"))
        .count();
    assert_eq!(stats, 21);
}

#[test]
fn full_size_sd_vae_uses_the_checkpoint_exactly() {
    let (config, source, _) = manifest("sd15_vae");
    let tensors = source.tensors().unwrap();
    let usage = source.usage();
    let config: VaeConfig = serde_json::from_value(config).unwrap();
    assert_eq!(format!("{config:?}"), format!("{:?}", VaeConfig::sd()));
    let vae = AutoencoderKL::new(&config, source.var_builder(DType::F16, &Device::Cpu)).unwrap();
    assert_exact("sd15_vae", tensors, usage.requested());
    assert_eq!(vae.scale_factor(), 8);
    vae.lower_decoder(1, 16, 64, 64).unwrap();
    vae.lower_encoder(1, 512, 512).unwrap();
}

/// 7x8 latents go down to 4x4; as diffusers forwards upsample sizes, the upsampler returns to
/// the skip connection's 7x8, not to 8x8.
#[test]
fn motion_unet_forwards_upsample_sizes_of_latents_it_cannot_halve() {
    let dir = fixture_dir("animatediff_unet");
    let model = UNetMotionModel::load(
        &dir.join("unet"),
        &dir.join("motion_adapter"),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let g = model
        .lower(UNetShape {
            batch: 1,
            frames: 2,
            height: 7,
            width: 8,
            context_len: 7,
        })
        .unwrap();
    let spatial = |name: &str| {
        let node = g.nodes().iter().find(|n| n.name == name).unwrap();
        let input = g.info(node.inputs[0]).shape.dims()[2..].to_vec();
        (input, g.info(node.output).shape.dims()[2..].to_vec())
    };
    assert_eq!(
        spatial("down_blocks.0.downsamplers.0.conv"),
        (vec![7, 8], vec![4, 4])
    );
    assert_eq!(
        spatial("up_blocks.0.upsamplers.0.upsample"),
        (vec![4, 4], vec![7, 8])
    );
    assert_eq!(g.info(g.outputs()[0]).shape.dims(), [2, 4, 7, 8]);
}
