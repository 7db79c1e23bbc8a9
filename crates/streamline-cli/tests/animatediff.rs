//! `streamline animatediff` on the tiny AnimateDiff fixture: frames equal diffusers' with the
//! same latents, prompts that are too long or empty warn, bad input fails clearly.

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{Device, Tensor};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/data/animatediff_pipeline")
}

fn temp(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("streamline-ad-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Run with the fixture's call settings plus `extra`; returns success and stderr.
fn animatediff(adapter: &Path, output: &Path, extra: &[&str]) -> (bool, String) {
    let dir = fixture();
    let out = Command::new(env!("CARGO_BIN_EXE_streamline"))
        .arg("animatediff")
        .arg("--model")
        .arg(dir.join("model"))
        .arg("--motion-adapter")
        .arg(adapter)
        .args(["--num-frames", "5", "--height", "16", "--width", "16"])
        .args(["--num-inference-steps", "4", "--decode-chunk-size", "2"])
        .arg("--latents")
        .arg(dir.join("io.safetensors"))
        .arg("--output")
        .arg(output)
        .args(extra)
        .output()
        .expect("the streamline binary runs");
    (out.status.success(), String::from_utf8(out.stderr).unwrap())
}

fn frames(path: &Path) -> Tensor {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()["frames"].clone()
}

#[test]
fn frames_equal_diffusers_and_long_prompts_warn() {
    let dir = temp("frames");
    let out = dir.join("video.safetensors");
    let (ok, err) = animatediff(
        &fixture().join("motion_adapter"),
        &out,
        &[
            "--prompt",
            "A red ball rolls, slowly!",
            "--negative-prompt",
            "blurry, static",
            "--temporal-chunks",
            "7",
            "--spatial-chunks",
            "7",
        ],
    );
    assert!(ok, "{err}");
    assert!(
        err.contains("truncated") && err.contains("slowly!"),
        "{err}"
    );
    let io =
        candle_core::safetensors::load(fixture().join("io.safetensors"), &Device::Cpu).unwrap();
    let reference = io["frames"].squeeze(0).unwrap();
    let diff = (frames(&out) - reference)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(diff <= 2e-3, "frames vs diffusers: max abs {diff}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn bad_input_fails_clearly_and_writes_nothing() {
    let dir = temp("bad");
    let out = dir.join("video.gif");
    let adapter = fixture().join("motion_adapter");
    let size = Command::new(env!("CARGO_BIN_EXE_streamline"))
        .arg("animatediff")
        .arg("--model")
        .arg(fixture().join("model"))
        .arg("--motion-adapter")
        .arg(&adapter)
        .args(["--prompt", "x", "--height", "20", "--output"])
        .arg(&out)
        .output()
        .unwrap();
    let err = String::from_utf8(size.stderr).unwrap();
    assert!(
        !size.status.success() && err.contains("--height 20"),
        "{err}"
    );
    // An adapter for another UNet: one block too many.
    let other = dir.join("adapter");
    std::fs::create_dir_all(&other).unwrap();
    let config = std::fs::read_to_string(adapter.join("config.json")).unwrap();
    let bad = config.replace(
        "\"block_out_channels\": [\n    32,\n    64\n  ]",
        "\"block_out_channels\": [\n    32,\n    64,\n    64\n  ]",
    );
    assert_ne!(bad, config);
    std::fs::write(other.join("config.json"), bad).unwrap();
    std::fs::copy(
        adapter.join("diffusion_pytorch_model.safetensors"),
        other.join("diffusion_pytorch_model.safetensors"),
    )
    .unwrap();
    let (ok, err) = animatediff(&other, &out, &["--prompt", "x"]);
    assert!(
        !ok && err.contains("the motion adapter has 3 blocks"),
        "{err}"
    );
    let (ok, err) = animatediff(&adapter, &out, &["--prompt", ""]);
    assert!(ok && err.contains("--prompt is empty"), "{err}");
    std::fs::remove_file(&out).unwrap();
    assert!(!out.exists());
    let (ok, _) = animatediff(&adapter, &out, &["--prompt", "x", "--latents-typo"]);
    assert!(!ok && !out.exists());
    std::fs::remove_dir_all(dir).unwrap();
}
