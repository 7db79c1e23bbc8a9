//! One budget for the whole run on svd-small (SVD's UNet at a fifth of the width, random
//! weights made in Rust, written as a diffusers folder beside the built-in model's VAE,
//! scheduler and feature extractor, with an image encoder projecting to its 256 channels):
//! each phase's measured peak (heap bytes above the run's baseline, a tracking global
//! allocator counting) within 10% of its plan, with every model resident and with each model
//! only in its phases; frames equal to original inference's within rounding.
//!
//! One test in its own binary, so nothing else allocates while it measures.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use common::{assert_phases_within_ten_percent, assert_plan_frames, per_phase_budget};
use streamline_ir::alloc::TrackingAllocator;
use streamline_models::clip::{ClipVisionConfig, ClipVisionModelWithProjection};
use streamline_models::load::WeightSource;
use streamline_models::svd::{UNetConfig, UNetSpatioTemporalConditionModel};
use streamline_pipeline::phases::Residency;
use streamline_pipeline::run::RunReport;
use streamline_pipeline::svd::{
    default_model_dir, unit_noise, Planes, StableVideoDiffusion, SvdSettings,
};
use streamline_pipeline::Optimization;

#[global_allocator]
static ALLOC: TrackingAllocator = TrackingAllocator;

/// Random weights for every tensor a model built from `build` requests, saved in f16.
fn write_weights(path: &Path, build: impl Fn(WeightSource)) {
    let source = WeightSource::random(2024);
    let usage = source.usage();
    build(source);
    let requested: BTreeMap<String, Vec<usize>> = usage.requested();
    let vb = WeightSource::random(2024).var_builder(DType::F16, &Device::Cpu);
    let tensors: HashMap<String, Tensor> = requested
        .into_iter()
        .map(|(name, shape)| {
            let t = vb.get(shape.as_slice(), &name).unwrap();
            (name, t)
        })
        .collect();
    candle_core::safetensors::save(&tensors, path).unwrap();
}

/// svd-small as a diffusers folder in the temp directory.
fn svd_small_folder() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("streamline-svd-small-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let builtin = default_model_dir();
    // The built-in model's VAE, scheduler and feature extractor as they are.
    for folder in ["vae", "scheduler", "feature_extractor"] {
        std::fs::create_dir_all(dir.join(folder)).unwrap();
        for entry in std::fs::read_dir(builtin.join(folder)).unwrap() {
            let file = entry.unwrap().path();
            std::fs::copy(&file, dir.join(folder).join(file.file_name().unwrap())).unwrap();
        }
    }
    for folder in ["unet", "image_encoder"] {
        std::fs::create_dir_all(dir.join(folder)).unwrap();
    }
    let unet = UNetConfig::svd_small(14);
    std::fs::write(
        dir.join("unet/config.json"),
        serde_json::to_string(&unet).unwrap(),
    )
    .unwrap();
    write_weights(&dir.join("unet/diffusion_pytorch_model.safetensors"), |s| {
        UNetSpatioTemporalConditionModel::new(&unet, s.var_builder(DType::F32, &Device::Cpu))
            .unwrap();
    });
    let mut clip: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(builtin.join("image_encoder/config.json")).unwrap(),
    )
    .unwrap();
    clip["projection_dim"] = 256.into();
    let clip_path = dir.join("image_encoder/config.json");
    std::fs::write(&clip_path, clip.to_string()).unwrap();
    let clip = ClipVisionConfig::load(&clip_path).unwrap();
    write_weights(&dir.join("image_encoder/model.safetensors"), |s| {
        ClipVisionModelWithProjection::new(&clip, s.var_builder(DType::F32, &Device::Cpu)).unwrap();
    });
    dir
}

fn generate(
    pipe: &StableVideoDiffusion,
    settings: &SvdSettings,
    optimization: Optimization,
) -> (Tensor, RunReport) {
    let (h, w) = (settings.height, settings.width);
    let s = pipe.scale_factor();
    let frames = pipe.num_frames(settings);
    let dev = Device::Cpu;
    let latents = unit_noise((1, frames, pipe.latent_channels(), h / s, w / s), 3, &dev).unwrap();
    let image_noise = unit_noise((1, 3, h, w), 4, &dev).unwrap();
    let pixels: Vec<f32> = (0..3 * h * w).map(|i| (i % 251) as f32 / 250.0).collect();
    let image = Planes {
        channels: 3,
        height: h,
        width: w,
        data: pixels,
    };
    pipe.generate(
        &image,
        settings,
        &latents,
        &image_noise,
        optimization,
        &mut |_| {},
    )
    .unwrap()
}

#[test]
fn svd_small_phases_are_measured_within_ten_percent_of_their_plans() {
    let dir = svd_small_folder();
    let pipe = StableVideoDiffusion::load(&dir, DType::F32, &Device::Cpu).unwrap();
    // 32x32 latents (the built-in VAE's scale is 4), 8 frames; memory does not depend on the
    // step count.
    let settings = SvdSettings {
        height: 128,
        width: 128,
        num_frames: Some(8),
        num_inference_steps: 2,
        ..SvdSettings::default()
    };
    let budget = per_phase_budget(|o| pipe.plan(&settings, o));
    // Warm up thread pools and kernel caches, so they are not charged to a measured run.
    let (original, _) = generate(&pipe, &settings, Optimization::Original);
    for optimization in [Optimization::Original, budget] {
        let residency = pipe.plan(&settings, optimization).unwrap().run.residency;
        let (frames, report) = generate(&pipe, &settings, optimization);
        assert_plan_frames(&format!("{optimization:?}"), &frames, &original);
        assert_phases_within_ten_percent(&format!("{optimization:?} ({residency:?})"), &report);
        assert_eq!(
            residency,
            match optimization {
                Optimization::Original => Residency::Resident,
                _ => Residency::PerPhase,
            }
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
