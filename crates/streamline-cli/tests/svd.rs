//! `streamline svd` and `streamline rehash` on the tiny pipeline fixture: every output form,
//! determinism, Step Rehash schedules, and bad input that fails clearly and writes nothing.

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Device, Tensor};

mod common;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/data/svd_pipeline")
}

fn temp(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("streamline-cli-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Run `streamline COMMAND...` on the fixture; flags in `extra` replace the defaults' values.
/// Returns success, stdout and stderr.
fn streamline(command: &[&str], extra: &[&str]) -> (bool, String, String) {
    let model = fixture().join("model").display().to_string();
    let image = fixture().join("image.png").display().to_string();
    let defaults = [
        ("--model", model.as_str()),
        ("--image", image.as_str()),
        ("--height", "16"),
        ("--width", "24"),
        ("--num-frames", "3"),
        ("--num-inference-steps", "2"),
        ("--decode-chunk-size", "2"),
        ("--seed", "7"),
    ];
    let out = Command::new(env!("CARGO_BIN_EXE_streamline"))
        .args(common::with_defaults(command, &defaults, extra))
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Run `streamline svd` on the fixture, writing `output`.
fn svd(output: &Path, extra: &[&str]) -> (bool, String) {
    let output = output.display().to_string();
    let mut extra = extra.to_vec();
    extra.extend(["--output", output.as_str()]);
    let (ok, _, err) = streamline(&["svd"], &extra);
    (ok, err)
}

fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    streamline_pipeline::quality::max_abs(a, b).unwrap()
}

fn frames(path: &Path) -> Tensor {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()["frames"].clone()
}

#[test]
fn writes_gif_png_frames_and_safetensors() {
    let dir = temp("forms");
    let (ok, err) = svd(&dir.join("out.safetensors"), &[]);
    assert!(ok, "{err}");
    assert!(
        err.contains("wrote") && err.contains("peak"),
        "closing summary: {err}"
    );
    let raw = frames(&dir.join("out.safetensors"));
    assert_eq!(raw.dims(), &[3, 3, 16, 24]);
    let (lo, hi) = (
        raw.flatten_all()
            .unwrap()
            .min(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap(),
        raw.flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap(),
    );
    assert!((0.0..=1.0).contains(&lo) && (0.0..=1.0).contains(&hi) && hi > lo);

    let (ok, err) = svd(&dir.join("out.gif"), &[]);
    assert!(ok, "{err}");
    let gif = image::codecs::gif::GifDecoder::new(std::io::BufReader::new(
        std::fs::File::open(dir.join("out.gif")).unwrap(),
    ))
    .unwrap();
    let decoded = image::AnimationDecoder::into_frames(gif)
        .collect_frames()
        .unwrap();
    assert_eq!(decoded.len(), 3);
    assert_eq!(decoded[0].buffer().dimensions(), (24, 16));

    let (ok, err) = svd(&dir.join("frames"), &[]);
    assert!(ok, "{err}");
    for i in 0..3 {
        let png = image::open(dir.join("frames").join(format!("frame_{i:03}.png")))
            .unwrap()
            .to_rgb8();
        assert_eq!(png.dimensions(), (24, 16));
        // The PNG holds the same frame as the raw output, rounded to 8 bits.
        let expected = (raw.get(i).unwrap().permute((1, 2, 0)).unwrap() * 255.0)
            .unwrap()
            .round()
            .unwrap();
        let got = Tensor::from_vec(png.into_raw(), (16, 24, 3), &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let diff = max_abs(&got, &expected);
        assert!(
            diff <= 1.0,
            "frame {i}: PNG differs from the raw frame by {diff}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The portable path (what a GPU runs) on the CPU gives the frames of the default CPU kernels,
/// and a plan for the CPU kernels is refused where they cannot run.
#[test]
fn portable_kernels_give_the_default_frames() {
    let dir = temp("portable");
    let (default, portable) = (dir.join("a.safetensors"), dir.join("b.safetensors"));
    let (ok, err) = svd(&default, &[]);
    assert!(ok, "{err}");
    let (ok, err) = svd(
        &portable,
        &["--kernels", "portable", "--memory-budget", "34MiB"],
    );
    assert!(ok, "{err}");
    let diff = max_abs(&frames(&default), &frames(&portable));
    eprintln!("portable vs CPU kernels: frames max abs {diff:.2e}");
    assert!(
        diff <= 2e-3,
        "portable vs CPU kernels: frames max abs {diff}"
    );
    let (ok, err) = svd(
        &dir.join("c.gif"),
        &["--device", "cuda", "--kernels", "cpu"],
    );
    assert!(
        !ok && err.contains("--kernels cpu runs on the CPU only"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn same_seed_same_frames_and_latents_file_is_used() {
    let dir = temp("seed");
    let (a, b, c) = (
        dir.join("a.safetensors"),
        dir.join("b.safetensors"),
        dir.join("c.safetensors"),
    );
    assert!(svd(&a, &[]).0 && svd(&b, &[]).0);
    let diff = max_abs(&frames(&a), &frames(&b));
    assert_eq!(diff, 0.0, "the same seed gave different frames");
    let io =
        candle_core::safetensors::load(fixture().join("io.safetensors"), &Device::Cpu).unwrap();
    let latents_file = dir.join("latents.safetensors");
    candle_core::safetensors::save(
        &std::collections::HashMap::from([("latents".to_string(), io["latents"].clone())]),
        &latents_file,
    )
    .unwrap();
    let (ok, err) = svd(
        &c,
        &[
            "--latents",
            latents_file.to_str().unwrap(),
            "--num-inference-steps",
            "3",
        ],
    );
    assert!(ok, "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_input_fails_clearly_and_writes_nothing() {
    let dir = temp("bad");
    let out = dir.join("out.gif");
    let garbage = dir.join("not-an-image.png");
    std::fs::write(&garbage, b"no pixels here").unwrap();
    let wrong_latents = dir.join("wrong.safetensors");
    let t = Tensor::zeros((1, 2, 4, 8, 12), DType::F32, &Device::Cpu).unwrap();
    candle_core::safetensors::save(
        &std::collections::HashMap::from([("latents".to_string(), t)]),
        &wrong_latents,
    )
    .unwrap();
    let broken_model = dir.join("model");
    std::fs::create_dir_all(broken_model.join("unet")).unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["--image", garbage.to_str().unwrap()],
            "not-an-image.png",
        ),
        (vec!["--height", "12"], "--height 12"),
        (
            vec!["--latents", wrong_latents.to_str().unwrap()],
            "expected [1, 3, 4, 8, 12]",
        ),
        (
            vec!["--model", broken_model.to_str().unwrap()],
            "missing `vae/`",
        ),
        (vec!["--memory-budget", "1KiB"], "smallest feasible"),
    ];
    for (flags, needle) in cases {
        let (ok, err) = svd(&out, &flags);
        assert!(!ok, "{flags:?} should fail");
        assert!(
            err.contains(needle),
            "{flags:?}: message should mention `{needle}`: {err}"
        );
        assert!(!out.exists(), "{flags:?} left an output behind");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The built-in model's UNet halves its latents twice and does not forward upsample sizes:
/// 72x72 is refused when the arguments are read, stating the rule. The folder here holds the
/// built-in model's configs without any weights, so a check made after loading would fail on
/// the missing weights instead.
#[test]
fn sizes_the_unet_cannot_take_are_refused_before_weights_load() {
    let dir = temp("size-rule");
    let out = dir.join("out.gif");
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let model = dir.join("configs-only");
    for folder in [
        "unet",
        "vae",
        "image_encoder",
        "scheduler",
        "feature_extractor",
    ] {
        std::fs::create_dir_all(model.join(folder)).unwrap();
    }
    for file in [
        "unet/config.json",
        "vae/config.json",
        "image_encoder/config.json",
        "scheduler/scheduler_config.json",
        "feature_extractor/preprocessor_config.json",
    ] {
        std::fs::copy(root.join("models/default").join(file), model.join(file)).unwrap();
    }
    let (ok, err) = svd(
        &out,
        &[
            "--model",
            model.to_str().unwrap(),
            "--height",
            "72",
            "--width",
            "64",
        ],
    );
    assert!(!ok);
    assert!(
        err.contains("--height 72 must be a positive multiple of 16 for this model"),
        "{err}"
    );
    assert!(!out.exists());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn without_model_uses_the_built_in_model_at_its_size() {
    let dir = temp("default");
    let out = dir.join("out.gif");
    let image = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/red.png");
    let run = |env: Option<&Path>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_streamline"));
        cmd.args(["svd", "--num-inference-steps", "4", "--image"])
            .arg(&image)
            .arg("--output")
            .arg(&out)
            .env_remove("STREAMLINE_DEFAULT_MODEL");
        if let Some(model) = env {
            cmd.env("STREAMLINE_DEFAULT_MODEL", model);
        }
        let o = cmd.output().unwrap();
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    let missing = dir.join("no-such-model");
    let (ok, err) = run(Some(&missing));
    assert!(
        !ok && err.contains("no-such-model") && err.contains("--model"),
        "{err}"
    );
    assert!(!out.exists());

    let (ok, err) = run(None);
    assert!(ok, "{err}");
    let gif = image::codecs::gif::GifDecoder::new(std::io::BufReader::new(
        std::fs::File::open(&out).unwrap(),
    ))
    .unwrap();
    let decoded = image::AnimationDecoder::into_frames(gif)
        .collect_frames()
        .unwrap();
    assert_eq!(decoded.len(), 8, "the default model makes 8 frames");
    assert_eq!(decoded[0].buffer().dimensions(), (64, 64));
    let _ = std::fs::remove_dir_all(&dir);
}

/// The built-in model's video as an MP4, decoded again (the `mp4` crate's demuxer, OpenH264's
/// decoder): its 8 frames at 64x64 and 7 fps, each close to the raw frames of the same run.
#[test]
fn an_mp4_of_the_built_in_model_decodes_to_its_frames() {
    let dir = temp("mp4");
    let image = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/red.png");
    let run = |output: &Path| {
        let o = Command::new(env!("CARGO_BIN_EXE_streamline"))
            .args(["svd", "--num-inference-steps", "3", "--image"])
            .arg(&image)
            .arg("--output")
            .arg(output)
            .env_remove("STREAMLINE_DEFAULT_MODEL")
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    let (mp4, raw, gif) = (
        dir.join("out.mp4"),
        dir.join("out.safetensors"),
        dir.join("out.gif"),
    );
    run(&mp4);
    run(&raw);
    run(&gif);
    let video = streamline_pipeline::video::read_video(&mp4).unwrap();
    assert_eq!(video.frames.len(), 8);
    assert_eq!(video.fps, Some(7.0));
    let expected = frames(&raw);
    for (f, decoded) in video.frames.iter().enumerate() {
        assert_eq!(decoded.dimensions(), (64, 64));
        let got = Tensor::from_vec(decoded.as_raw().clone(), (64, 64, 3), &Device::Cpu)
            .and_then(|t| t.permute((2, 0, 1))?.to_dtype(DType::F32)? / 255.0)
            .unwrap();
        let db = streamline_pipeline::quality::psnr(&got, &expected.get(f).unwrap()).unwrap();
        assert!(
            db > 30.0,
            "frame {f}: PSNR {db:.1} dB against the raw frame"
        );
    }
    let size = |p: &Path| std::fs::metadata(p).unwrap().len();
    eprintln!(
        "built-in model: MP4 {} bytes, GIF {} bytes",
        size(&mp4),
        size(&gif)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn rehash_evaluate_compares_cache_points_and_chooses() {
    // The built-in model: the fixture UNet has a single up-block boundary.
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/default");
    let model = model.to_str().unwrap();
    let size = ["--height", "64", "--width", "64", "--num-frames", "4"];
    let flags = [
        "--model",
        model,
        "--num-inference-steps",
        "3",
        "--rehash",
        "uniform:2",
        "--rehash",
        "auto:0.1@up_blocks.1",
        "--cache-point",
        "up_blocks.0",
        "--cache-point",
        "up_blocks.1",
        "--repeat",
        "2",
        "--min-psnr",
        "0",
        "--json",
    ];
    let (ok, json, err) = streamline(&["rehash", "evaluate"], &[&size[..], &flags].concat());
    assert!(ok, "{err}");
    let rows: Vec<serde_json::Value> = serde_json::from_str(&json).unwrap();
    let names: Vec<&str> = rows
        .iter()
        .map(|r| r["schedule"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "original",
            "uniform:2@up_blocks.0",
            "uniform:2@up_blocks.1",
            "auto:0.1@up_blocks.0",
            "auto:0.1@up_blocks.1"
        ]
    );
    let gflop = |i: usize| rows[i]["unet_gflop"].as_f64().unwrap();
    assert!(
        gflop(1) != gflop(2),
        "the cache point moves the partial step's cost"
    );
    let chosen: Vec<bool> = rows
        .iter()
        .map(|r| r["chosen"].as_bool().unwrap())
        .collect();
    assert_eq!(chosen.iter().filter(|&&c| c).count(), 1, "{json}");
    assert!(
        !chosen[0],
        "original inference is the reference, not a choice"
    );
    let (ok, _, err) = streamline(
        &["rehash", "evaluate"],
        &["--rehash", "uniform:2", "--cache-point", "up_blocks.1"],
    );
    assert!(
        !ok && err.contains("up_blocks.1") && err.contains("up_blocks.0 ..= up_blocks.0"),
        "{err}"
    );
}

#[test]
fn rehash_flag_search_and_evaluate() {
    let dir = temp("rehash");
    let (off, every, some) = (
        dir.join("off.safetensors"),
        dir.join("every.safetensors"),
        dir.join("some.safetensors"),
    );
    let steps = ["--num-inference-steps", "3"];
    assert!(svd(&off, &steps).0);
    let (ok, err) = svd(&every, &[&steps[..], &["--rehash", "uniform:3"]].concat());
    assert!(ok && err.contains("3 full evaluations"), "{err}");
    let diff = max_abs(&frames(&off), &frames(&every));
    assert_eq!(diff, 0.0, "uniform:N over N steps is original inference");

    let schedule = dir.join("schedule.toml");
    let search = [
        "--num-inference-steps",
        "3",
        "--key-steps",
        "2",
        "--out",
        schedule.to_str().unwrap(),
    ];
    let (ok, _, err) = streamline(&["rehash", "search"], &search);
    assert!(ok, "{err}");
    let text = std::fs::read_to_string(&schedule).unwrap();
    assert!(
        text.contains("num_inference_steps = 3") && text.contains("method = \"dp\""),
        "{text}"
    );
    let bad = dir.join("bad.toml");
    let (ok, _, err) = streamline(
        &["rehash", "search"],
        &["--key-steps", "9", "--out", bad.to_str().unwrap()],
    );
    assert!(!ok && err.contains("--key-steps 9"), "{err}");
    assert!(!bad.exists());
    let with_file = [&steps[..], &["--rehash", schedule.to_str().unwrap()]].concat();
    let (ok, err) = svd(&some, &with_file);
    assert!(ok && err.contains("2 full + 1 partial"), "{err}");

    let (ok, table, err) = streamline(
        &["rehash", "evaluate"],
        &[
            &steps[..],
            &[
                "--rehash",
                "uniform:1",
                "--rehash",
                schedule.to_str().unwrap(),
            ],
        ]
        .concat(),
    );
    assert!(ok, "{err}");
    assert_eq!(table.lines().count(), 7, "{table}");
    assert!(table.contains("| uniform:1 | [0] | 1 + 2 |"), "{table}");
    assert!(table.contains("\nchosen: "), "{table}");

    for (flags, needle) in [
        (vec!["--rehash", "fast"], "--rehash"),
        (vec!["--rehash", "uniform:4"], "4 key steps"),
        (
            vec![
                "--num-inference-steps",
                "4",
                "--rehash",
                schedule.to_str().unwrap(),
            ],
            "3 inference steps",
        ),
    ] {
        let out = dir.join("bad.gif");
        let (ok, err) = svd(&out, &flags);
        assert!(!ok && err.contains(needle), "{flags:?}: {err}");
        assert!(!out.exists());
    }
    let _ = std::fs::remove_dir_all(&dir);
}
