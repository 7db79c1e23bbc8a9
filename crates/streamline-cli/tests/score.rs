//! `streamline score clip-sim`: one video's CLIP-SIM equals transformers' on the tiny CLIP
//! fixture (its PNG frames, and close to it from an MP4 of the same frames), and a batch's
//! results files are scored job by job (each job once, failed jobs left out); refusals name
//! what is wrong.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{Device, Tensor};
use image::RgbImage;
use serde_json::Value;
use streamline_pipeline::video::{read_video, write_video};

mod common;

use common::Scratch;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/data/clip_sim")
}

/// `(video, prompt, CLIP-SIM)` of each fixture video, as transformers scored it.
fn expected() -> Vec<(String, String, f64)> {
    let text = fs::read_to_string(fixture().join("scores.json")).unwrap();
    let json: Value = serde_json::from_str(&text).unwrap();
    json["videos"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            let s = |k: &str| v[k].as_str().unwrap().to_string();
            (s("video"), s("prompt"), v["clip_sim"].as_f64().unwrap())
        })
        .collect()
}

/// `streamline score clip-sim --model FIXTURE ARGS --json`: success, the JSON, stderr.
fn score(args: &[&str]) -> (bool, Value, String) {
    let model = fixture().join("model");
    let out = Command::new(env!("CARGO_BIN_EXE_streamline"))
        .args(["score", "clip-sim", "--json", "--model"])
        .arg(&model)
        .args(args)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let json = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    (out.status.success(), json, stderr)
}

/// `frames` as an `(F, 3, H, W)` tensor in [0, 1].
fn tensor(frames: &[RgbImage]) -> Tensor {
    let (w, h) = frames[0].dimensions();
    let planes: Vec<Tensor> = frames
        .iter()
        .map(|f| {
            let t = Tensor::from_vec(
                f.as_raw().clone(),
                (h as usize, w as usize, 3),
                &Device::Cpu,
            );
            (t.unwrap()
                .permute((2, 0, 1))
                .unwrap()
                .to_dtype(candle_core::DType::F32)
                .unwrap()
                / 255.0)
                .unwrap()
        })
        .collect();
    Tensor::stack(&planes, 0).unwrap()
}

#[test]
fn a_videos_clip_sim_matches_transformers_from_png_frames_and_close_from_an_mp4() {
    let scratch = Scratch::new("score", "one");
    for (name, prompt, want) in expected() {
        let frames = fixture().join("videos").join(&name);
        let (ok, json, err) = score(&["--video", frames.to_str().unwrap(), "--prompt", &prompt]);
        assert!(ok, "{err}");
        let got = json["videos"][0]["clip_sim"].as_f64().unwrap();
        assert!(
            (got - want).abs() <= 1e-4,
            "{name}: {got} vs transformers' {want}"
        );
        assert_eq!(json["mean"].as_f64(), Some(got));

        let mp4 = scratch.path(&format!("{name}.mp4"));
        write_video(&tensor(&read_video(&frames).unwrap().frames), &mp4, 8.0).unwrap();
        let (ok, json, err) = score(&["--video", mp4.to_str().unwrap(), "--prompt", &prompt]);
        assert!(ok, "{err}");
        let from_mp4 = json["videos"][0]["clip_sim"].as_f64().unwrap();
        eprintln!("{name}: CLIP-SIM {got:.5} from PNG frames, {from_mp4:.5} from H.264");
        assert!(
            (from_mp4 - want).abs() <= 0.05,
            "{name}: {from_mp4} from the MP4"
        );
    }
}

/// A results file as `streamline batch` writes it, beside copies of the fixture videos.
fn results_file(dir: &Path) -> PathBuf {
    let mut lines = Vec::new();
    for (i, (name, prompt, _)) in expected().iter().enumerate() {
        let copy = dir.join(name);
        fs::create_dir_all(&copy).unwrap();
        for frame in fs::read_dir(fixture().join("videos").join(name)).unwrap() {
            let frame = frame.unwrap();
            fs::copy(frame.path(), copy.join(frame.file_name())).unwrap();
        }
        let record = |error: Value| {
            serde_json::json!({"job": name, "line": i + 1, "output": name, "seed": 0, "prompt": prompt,
                "seconds": 1.0, "peak_bytes": 1, "key_steps": [0], "error": error})
        };
        lines.push(record(Value::from("a first try failed")).to_string());
        lines.push(record(Value::Null).to_string());
    }
    let path = dir.join("results.shard-0-of-1.jsonl");
    fs::write(&path, lines.join("\n") + "\n").unwrap();
    path
}

#[test]
fn a_batchs_results_are_scored_job_by_job() {
    let scratch = Scratch::new("score", "results");
    let results = results_file(scratch.dir());
    let (ok, json, err) = score(&["--results", results.to_str().unwrap()]);
    assert!(ok, "{err}");
    let videos = json["videos"].as_array().unwrap();
    assert_eq!(videos.len(), 3, "each job once: {json}");
    let expected = expected();
    for (name, _, want) in &expected {
        let video = videos.iter().find(|v| v["video"] == name.as_str()).unwrap();
        let got = video["clip_sim"].as_f64().unwrap();
        assert!((got - want).abs() <= 1e-4, "{name}: {got} vs {want}");
    }
    let mean = expected.iter().map(|e| e.2).sum::<f64>() / 3.0;
    assert!(
        (json["mean"].as_f64().unwrap() - mean).abs() <= 1e-4,
        "{json}"
    );
}

#[test]
fn refusals_name_the_culprit() {
    let scratch = Scratch::new("score", "refused");
    let svd = scratch.path("svd.jsonl");
    let record = r#"{"job": "cat", "line": 4, "output": "cat.mp4", "seed": 0, "seconds": 1.0, "peak_bytes": 1, "key_steps": [0], "error": null}"#;
    fs::write(&svd, format!("{record}\n")).unwrap();
    let garbage = scratch.path("garbage.jsonl");
    fs::write(&garbage, "{\"job\": 1}\nmore\n").unwrap();
    let missing = scratch.path("missing.mp4");
    let cases: [(&[&str], &str); 4] = [
        (
            &["--results", svd.to_str().unwrap()],
            "job cat (line 4) has no prompt",
        ),
        (
            &["--results", garbage.to_str().unwrap()],
            "garbage.jsonl line 1: not a results record",
        ),
        (
            &["--video", missing.to_str().unwrap(), "--prompt", "a cat"],
            "--video",
        ),
        (&["--video", missing.to_str().unwrap()], "--prompt"),
    ];
    for (args, needle) in cases {
        let (ok, _, err) = score(args);
        assert!(
            !ok && !err.contains("panicked") && err.contains(needle),
            "{args:?}: {err}"
        );
    }
}
