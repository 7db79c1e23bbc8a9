//! SVD end to end vs diffusers' StableVideoDiffusionPipeline on the tiny pipeline fixture,
//! with the same latents and noise-augmentation noise.

mod common;

use common::{
    assert_plan_frames, calls_on_rows, fixture, max_abs, per_phase_budget, rel_l2, smallest_peak,
};
use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;
use streamline_pipeline::phases::Residency;
use streamline_pipeline::svd::{unit_noise, Planes, StableVideoDiffusion, SvdSettings};
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

/// The tightest whole-run budget, the smallest peak any plan reaches, at 8 times the
/// fixture's size with 2 frames and no guidance (a maximum scale of 1, which skips the
/// unconditional half as diffusers does), where the decode's full-resolution activations
/// outgrow the UNet's as at full size: row bands in the decode, each model only in its
/// phases, and the frames of original inference within the exactness contract.
#[test]
fn the_smallest_whole_run_peak_keeps_the_frames() {
    let (pipe, _, mut settings, _) = setup();
    (settings.height, settings.width, settings.num_frames) =
        (8 * settings.height, 8 * settings.width, Some(2));
    (settings.min_guidance_scale, settings.max_guidance_scale) = (1.0, 1.0);
    (settings.decode_chunk_size, settings.num_inference_steps) = (Some(2), 1);
    let budget = Optimization::Budget {
        bytes: smallest_peak(|o| pipe.plan(&settings, o)),
    };
    let report = pipe.plan(&settings, budget).unwrap();
    assert_eq!(report.run.residency, Residency::PerPhase);
    let rows = calls_on_rows(&report);
    assert!(rows.contains(&"decode"), "the decode runs on no row bands");
    let (h, w) = (settings.height, settings.width);
    let s = pipe.scale_factor();
    let dev = Device::Cpu;
    let latents = unit_noise((1, 2, pipe.latent_channels(), h / s, w / s), 5, &dev).unwrap();
    let noise = unit_noise((1, 3, h, w), 6, &dev).unwrap();
    let image = Planes {
        channels: 3,
        height: h,
        width: w,
        data: (0..3 * h * w).map(|i| (i % 251) as f32 / 250.0).collect(),
    };
    let run = |opt| {
        pipe.generate(&image, &settings, &latents, &noise, opt, &mut |_| {})
            .unwrap()
            .0
    };
    assert_plan_frames("smallest peak", &run(budget), &run(Optimization::Original));
}
