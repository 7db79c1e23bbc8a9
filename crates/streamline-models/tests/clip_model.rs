//! transformers' `CLIPModel` (fixtures/scripts/clip_sim.py): a Hub CLIP folder loads with its
//! tokenizer, gives transformers' ids for each prompt (one past 77 tokens) and its text
//! features; the image side is checked through CLIP-SIM's preprocessing in
//! streamline-pipeline (tests/clip_sim.rs).

mod common;

use candle_core::{DType, Device, Tensor};
use common::{fixture_dir, load_io, rel_l2};
use streamline_models::clip_model::ClipModel;
use streamline_models::clip_text::ClipTokenizer;

const VIDEOS: [&str; 3] = ["upscaled", "wide", "tall"];

#[test]
fn text_features_match_transformers() {
    let dir = fixture_dir("clip_sim").join("model");
    let model = ClipModel::load(&dir, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(model.config().projection_dim, 16);
    let tokenizer = ClipTokenizer::load(&dir).unwrap();
    let io = load_io("clip_sim");
    let scores: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture_dir("clip_sim").join("scores.json")).unwrap(),
    )
    .unwrap();
    for (i, name) in VIDEOS.iter().enumerate() {
        let prompt = scores["videos"][i]["prompt"].as_str().unwrap();
        let encoding = tokenizer.encode(prompt).unwrap();
        let expected_ids: Vec<i64> = io[&format!("input_ids_{name}")]
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let ids: Vec<i64> = encoding.ids.iter().map(|&id| i64::from(id)).collect();
        assert_eq!(ids, expected_ids, "{name}: ids");
        assert_eq!(
            encoding.truncated.is_some(),
            *name == "tall",
            "{name}: truncation"
        );
        let ids = Tensor::new(encoding.ids.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let features = model.text_features(&ids).unwrap();
        let err = rel_l2(&features, &io[&format!("text_embeds_{name}")]);
        assert!(err <= 1e-5, "{name}: text features relative L2 {err:.2e}");
    }
}
