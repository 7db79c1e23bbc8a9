//! SVD end to end vs diffusers' StableVideoDiffusionPipeline on the tiny pipeline fixture,
//! with the same latents and noise-augmentation noise.

mod common;

use common::{fixture, max_abs, per_phase_budget, rel_l2};
use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;
use streamline_pipeline::svd::{Planes, StableVideoDiffusion, SvdSettings};
use streamline_pipeline::Optimization;

#[derive(Deserialize)]
struct Settings {
    height: usize,
    width: usize,
    num_frames: usize,
    num_inference_steps: usize,
    min_guidance_scale: f64,
    max_guidance_scale: f64,
    fps: usize,
    motion_bucket_id: usize,
    noise_aug_strength: f64,
    decode_chunk_size: usize,
}

fn setup() -> (
    StableVideoDiffusion,
    HashMap<String, Tensor>,
    SvdSettings,
    Planes,
) {
    let dev = Device::Cpu;
    let io = candle_core::safetensors::load(fixture("svd_pipeline").join("io.safetensors"), &dev)
        .unwrap();
    let s: Settings = serde_json::from_str(
        &std::fs::read_to_string(fixture("svd_pipeline").join("config.json")).unwrap(),
    )
    .unwrap();
    let settings = SvdSettings {
        height: s.height,
        width: s.width,
        num_frames: Some(s.num_frames),
        num_inference_steps: s.num_inference_steps,
        min_guidance_scale: s.min_guidance_scale,
        max_guidance_scale: s.max_guidance_scale,
        fps: s.fps,
        motion_bucket_id: s.motion_bucket_id,
        noise_aug_strength: s.noise_aug_strength,
        decode_chunk_size: Some(s.decode_chunk_size),
        ..SvdSettings::default()
    };
    let rgb = image::open(fixture("svd_pipeline").join("image.png"))
        .unwrap()
        .to_rgb8();
    let (w, h) = rgb.dimensions();
    let chw: Vec<f32> = (0..3)
        .flat_map(|c| rgb.pixels().map(move |p| p.0[c] as f32 / 255.0))
        .collect();
    let image = Planes {
        channels: 3,
        height: h as usize,
        width: w as usize,
        data: chw,
    };
    let pipe = StableVideoDiffusion::load(&fixture("svd_pipeline").join("model"), DType::F32, &dev)
        .unwrap();
    (pipe, io, settings, image)
}

#[test]
fn conditioning_matches_diffusers() {
    let (pipe, io, settings, image) = setup();
    let embeds = pipe.image_embeddings(&image).unwrap();
    let err = rel_l2(&embeds, &io["image_embeddings"]);
    assert!(err <= 1e-4, "image embeddings: relative L2 {err}");
    let lat = pipe
        .image_latents(
            &image,
            &io["image_noise"],
            settings.noise_aug_strength,
            Optimization::Original,
        )
        .unwrap();
    let err = rel_l2(&lat, &io["image_latents"]);
    assert!(err <= 1e-4, "image latents: relative L2 {err}");
}

#[test]
fn frames_match_diffusers_for_every_optimization() {
    let (pipe, io, settings, image) = setup();
    let expected = io["frames"].squeeze(0).unwrap();
    for opt in [
        Optimization::Original,
        Optimization::Paper {
            temporal_chunks: 7,
            spatial_chunks: 7,
        },
        per_phase_budget(|o| pipe.plan(&settings, o)),
    ] {
        let (frames, _) = pipe
            .generate(
                &image,
                &settings,
                &io["latents"],
                &io["image_noise"],
                opt,
                &mut |_| {},
            )
            .unwrap();
        let err = max_abs(&frames, &expected);
        eprintln!("{opt:?}: max abs difference of [0, 1] frames vs diffusers {err:.2e}");
        assert!(err <= 2e-3, "{opt:?}: max abs {err}");
    }
}
