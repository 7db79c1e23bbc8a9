//! `streamline animatediff` on the tiny AnimateDiff fixtures: frames equal diffusers' with the
//! same latents (with 8 GroupNorm groups, and at latents that are not multiples of 2^levels too),
//! prompts that are too long or empty warn, bad input fails clearly.

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::Device;

/// A pipeline fixture under fixtures/data and the call settings of its config.json.
struct Fixture {
    name: &'static str,
    /// `--num-frames`, `--height`, `--width`, `--num-inference-steps`, `--decode-chunk-size`.
    sizes: [&'static str; 5],
    prompt: &'static str,
    negative_prompt: &'static str,
}

/// 32 groups, 16x16 pixels.
const PIPELINE: Fixture = Fixture {
    name: "animatediff_pipeline",
    sizes: ["5", "16", "16", "4", "2"],
    prompt: "A red ball rolls, slowly!",
    negative_prompt: "blurry, static",
};

/// 8 GroupNorm groups in the UNet, the motion adapter and the VAE.
const GROUPS: Fixture = Fixture {
    name: "animatediff_groups",
    sizes: ["5", "16", "16", "3", "2"],
    prompt: "A red ball rolls",
    negative_prompt: "blurry",
};

/// 72x40 pixels through a scale-4 VAE: 18x10 latents, which the three-level UNet halves to
/// 9x5 and 5x3.
const ODD_SIZE: Fixture = Fixture {
    name: "animatediff_odd_size",
    sizes: ["4", "72", "40", "3", "3"],
    prompt: "A red ball rolls",
    negative_prompt: "blurry",
};

impl Fixture {
    fn dir(&self) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../fixtures/data")
            .join(self.name)
    }
}

fn temp(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("streamline-ad-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Run with the fixture's call settings and latents plus `extra`; returns success and stderr.
fn animatediff(fixture: &Fixture, adapter: &Path, output: &Path, extra: &[&str]) -> (bool, String) {
    let dir = fixture.dir();
    let flags = [
        "--num-frames",
        "--height",
        "--width",
        "--num-inference-steps",
        "--decode-chunk-size",
    ];
    let out = Command::new(env!("CARGO_BIN_EXE_streamline"))
        .arg("animatediff")
        .arg("--model")
        .arg(dir.join("model"))
        .arg("--motion-adapter")
        .arg(adapter)
        .args(flags.iter().zip(fixture.sizes).flat_map(|(f, v)| [*f, v]))
        .arg("--latents")
        .arg(dir.join("io.safetensors"))
        .arg("--output")
        .arg(output)
        .args(extra)
        .output()
        .expect("the streamline binary runs");
    (out.status.success(), String::from_utf8(out.stderr).unwrap())
}

/// Run with the fixture's prompts and `extra` flags; returns the largest difference of the
/// frames from diffusers', and stderr.
fn frames_vs_diffusers(fixture: &Fixture, extra: &[&str]) -> (f32, String) {
    let dir = temp(fixture.name);
    let out = dir.join("video.safetensors");
    let prompts = ["--prompt", fixture.prompt];
    let negative = ["--negative-prompt", fixture.negative_prompt];
    let flags: Vec<&str> = prompts
        .into_iter()
        .chain(negative)
        .chain(extra.to_vec())
        .collect();
    let (ok, err) = animatediff(fixture, &fixture.dir().join("motion_adapter"), &out, &flags);
    assert!(ok, "{}: {err}", fixture.name);
    let io =
        candle_core::safetensors::load(fixture.dir().join("io.safetensors"), &Device::Cpu).unwrap();
    let frames = candle_core::safetensors::load(&out, &Device::Cpu).unwrap()["frames"].clone();
    let diff = (frames - io["frames"].squeeze(0).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    std::fs::remove_dir_all(dir).unwrap();
    (diff, err)
}

const PAPER_7_7: [&str; 4] = ["--temporal-chunks", "7", "--spatial-chunks", "7"];

#[test]
fn frames_equal_diffusers_and_long_prompts_warn() {
    let (diff, err) = frames_vs_diffusers(&PIPELINE, &PAPER_7_7);
    assert!(
        err.contains("truncated") && err.contains("slowly!"),
        "{err}"
    );
    assert!(diff <= 2e-3, "frames vs diffusers: max abs {diff}");
}

/// The portable path (what a GPU runs) on the CPU matches diffusers too, and the default CPU
/// kernels' frames.
#[test]
fn portable_kernels_give_the_default_frames() {
    let run = |extra: &[&str]| {
        let dir = temp("portable").join(extra.len().to_string());
        std::fs::create_dir_all(&dir).unwrap();
        let out = dir.join("video.safetensors");
        let mut flags = vec!["--prompt", PIPELINE.prompt];
        flags.extend(extra);
        let (ok, err) = animatediff(
            &PIPELINE,
            &PIPELINE.dir().join("motion_adapter"),
            &out,
            &flags,
        );
        assert!(ok, "{err}");
        candle_core::safetensors::load(&out, &Device::Cpu).unwrap()["frames"].clone()
    };
    let default = run(&[]);
    let portable = run(&["--kernels", "portable"]);
    let diff = streamline_pipeline::quality::max_abs(&default, &portable).unwrap();
    eprintln!("portable vs CPU kernels: frames max abs {diff:.2e}");
    assert!(
        diff <= 2e-3,
        "portable vs CPU kernels: frames max abs {diff}"
    );
    let (diff, _) = frames_vs_diffusers(&PIPELINE, &["--kernels", "portable"]);
    assert!(diff <= 2e-3, "portable frames vs diffusers: max abs {diff}");
}

#[test]
fn frames_equal_diffusers_with_8_groupnorm_groups() {
    let (diff, _) = frames_vs_diffusers(&GROUPS, &[]);
    eprintln!("8 groups: frames vs diffusers max abs {diff:.2e}");
    assert!(diff <= 2e-3, "frames vs diffusers: max abs {diff}");
}

/// diffusers' UNetMotionModel forwards upsample sizes at 18x10 latents; so does the lowering,
/// and sliced plans stay exact there.
#[test]
fn frames_equal_diffusers_at_latents_the_unet_cannot_halve() {
    for extra in [&[][..], &PAPER_7_7] {
        let (diff, _) = frames_vs_diffusers(&ODD_SIZE, extra);
        eprintln!("72x40 {extra:?}: frames vs diffusers max abs {diff:.2e}");
        assert!(
            diff <= 2e-3,
            "{extra:?}: frames vs diffusers: max abs {diff}"
        );
    }
}

#[test]
fn bad_input_fails_clearly_and_writes_nothing() {
    let dir = temp("bad");
    let out = dir.join("video.gif");
    let adapter = PIPELINE.dir().join("motion_adapter");
    let size = Command::new(env!("CARGO_BIN_EXE_streamline"))
        .arg("animatediff")
        .arg("--model")
        .arg(PIPELINE.dir().join("model"))
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
    let (ok, err) = animatediff(&PIPELINE, &other, &out, &["--prompt", "x"]);
    assert!(
        !ok && err.contains("the motion adapter has 3 blocks"),
        "{err}"
    );
    let (ok, err) = animatediff(&PIPELINE, &adapter, &out, &["--prompt", ""]);
    assert!(ok && err.contains("--prompt is empty"), "{err}");
    std::fs::remove_file(&out).unwrap();
    assert!(!out.exists());
    let (ok, _) = animatediff(
        &PIPELINE,
        &adapter,
        &out,
        &["--prompt", "x", "--latents-typo"],
    );
    assert!(!ok && !out.exists());
    std::fs::remove_dir_all(dir).unwrap();
}
