//! CLIP-SIM against transformers (fixtures/scripts/clip_sim.py): each video's frames through
//! CLIPImageProcessor's resize (Pillow's bicubic, to the integer), crop and normalization give
//! transformers' image features, and each frame's similarity to its prompt and their mean
//! (the video's CLIP-SIM) match within 1e-4.

use std::path::PathBuf;

use candle_core::{DType, Device};
use serde::Deserialize;
use streamline_models::clip_model::ClipModel;
use streamline_pipeline::clip_sim::{ClipImageProcessor, ClipSim};
use streamline_pipeline::video::read_video;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/data/clip_sim")
}

#[derive(Deserialize)]
struct Expected {
    video: String,
    prompt: String,
    frame_scores: Vec<f64>,
    clip_sim: f64,
}

#[derive(Deserialize)]
struct Scores {
    videos: Vec<Expected>,
}

fn expected() -> Vec<Expected> {
    let text = std::fs::read_to_string(fixture().join("scores.json")).unwrap();
    serde_json::from_str::<Scores>(&text).unwrap().videos
}

#[test]
fn image_features_match_transformers() {
    let dir = fixture().join("model");
    let model = ClipModel::load(&dir, DType::F32, &Device::Cpu).unwrap();
    let processor = ClipImageProcessor::load(&dir).unwrap();
    let io =
        candle_core::safetensors::load(fixture().join("io.safetensors"), &Device::Cpu).unwrap();
    for video in expected() {
        let frames = read_video(&fixture().join("videos").join(&video.video))
            .unwrap()
            .frames;
        let pixels = processor.pixel_values(&frames, &Device::Cpu).unwrap();
        let features = model.image_features(&pixels).unwrap();
        let err = streamline_ir::testing::rel_l2(
            &features,
            &io[&format!("image_embeds_{}", video.video)],
        );
        assert!(
            err <= 1e-5,
            "{}: image features relative L2 {err:.2e}",
            video.video
        );
    }
}

#[test]
fn clip_sim_matches_transformers() {
    let scorer = ClipSim::load(&fixture().join("model"), &Device::Cpu).unwrap();
    let mut worst: f64 = 0.0;
    for video in expected() {
        let frames = read_video(&fixture().join("videos").join(&video.video))
            .unwrap()
            .frames;
        let score = scorer.score(&frames, &video.prompt).unwrap();
        assert_eq!(
            score.frames.len(),
            video.frame_scores.len(),
            "{}",
            video.video
        );
        for (got, want) in score.frames.iter().zip(&video.frame_scores) {
            worst = worst.max((got - want).abs());
        }
        worst = worst.max((score.clip_sim - video.clip_sim).abs());
    }
    eprintln!("CLIP-SIM vs transformers: largest difference {worst:.2e}");
    assert!(
        worst <= 1e-4,
        "CLIP-SIM differs from transformers by {worst:.2e}"
    );
}
