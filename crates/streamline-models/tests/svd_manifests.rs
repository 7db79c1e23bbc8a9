//! Full-size SVD loaders request exactly the tensors of the real checkpoints: every name and
//! shape of diffusers' full-size models (written from torch's meta device), none missing, none
//! unused. No weights are needed.

mod common;

use candle_core::{DType, Device};
use common::*;
use streamline_models::svd::{
    AutoencoderKLTemporalDecoder, UNetConfig, UNetShape, UNetSpatioTemporalConditionModel,
    VaeConfig,
};

#[test]
fn full_size_unet_uses_the_checkpoint_exactly() {
    let (config, source, _) = manifest("svd_unet");
    let tensors = source.tensors().unwrap();
    let usage = source.usage();
    let config: UNetConfig = serde_json::from_value(config).unwrap();
    // The built-in SVD config is the checkpoint's, up to the frame count.
    assert_eq!(
        format!("{config:?}"),
        format!("{:?}", UNetConfig::svd(config.num_frames))
    );
    let unet = UNetSpatioTemporalConditionModel::new(
        &config,
        source.var_builder(DType::F16, &Device::Cpu),
    )
    .unwrap();
    assert_exact("svd_unet", tensors, usage.requested());
    // SVD at 576x1024 (72x128 latents), 14 frames, CFG batch 2 lowers without error.
    let g = unet
        .lower(UNetShape {
            batch: 2,
            frames: 14,
            height: 72,
            width: 128,
            context_len: 1,
        })
        .unwrap();
    assert!(g.nodes().len() > 1000);
}

#[test]
fn full_size_vae_uses_the_checkpoint_exactly() {
    let (config, source, _) = manifest("svd_vae");
    let tensors = source.tensors().unwrap();
    let usage = source.usage();
    let config: VaeConfig = serde_json::from_value(config).unwrap();
    assert_eq!(format!("{config:?}"), format!("{:?}", VaeConfig::svd()));
    let vae =
        AutoencoderKLTemporalDecoder::new(&config, source.var_builder(DType::F16, &Device::Cpu))
            .unwrap();
    assert_exact("svd_vae", tensors, usage.requested());
    assert_eq!(vae.scale_factor(), 8);
    vae.lower_decoder(1, 14, 72, 128).unwrap();
    vae.lower_encoder(1, 576, 1024).unwrap();
}
