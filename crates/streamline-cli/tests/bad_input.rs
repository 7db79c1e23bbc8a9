//! The corpus of bad and edge inputs: every kind of input that once aborted, hung, ran to a
//! blank video, failed only after all the inference, left files behind or said something
//! unclear. Each refusal must exit non-zero (not by a signal: no abort), with no panic, a
//! message naming the culprit and telling each cause once, and no output or temporary file.
//!
//! Checks that must come before any weights load run on a model folder whose configs are the
//! fixture's and whose weights files are garbage: a check made after loading would fail on the
//! weights instead, with another message, so each expected message proves the ordering.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};

use candle_core::{DType, Device, Tensor};

mod common;

use common::{copy_model, Scratch};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/data")
}

fn svd_fixture() -> PathBuf {
    fixtures().join("svd_pipeline")
}

/// Sets `key` of the JSON file `path` (`null` removes it).
fn edit_json(path: &Path, key: &str, value: serde_json::Value) {
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let object = json.as_object_mut().unwrap();
    if value.is_null() {
        object.remove(key);
    } else {
        object.insert(key.into(), value);
    }
    std::fs::write(path, serde_json::to_string_pretty(&json).unwrap()).unwrap();
}

struct Outcome {
    status: ExitStatus,
    stderr: String,
}

fn streamline(args: &[String]) -> Outcome {
    let out = Command::new(env!("CARGO_BIN_EXE_streamline"))
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    Outcome {
        status: out.status,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `streamline svd` on `model` with the fixture's image and small sizes (and the 3 frames of
/// the fixture's UNet config); flags in `extra` replace the defaults.
fn svd_args(model: &Path, output: &Path, extra: &[&str]) -> Vec<String> {
    let (model, output) = (model.display().to_string(), output.display().to_string());
    let image = svd_fixture().join("image.png").display().to_string();
    let defaults = [
        ("--model", model.as_str()),
        ("--image", image.as_str()),
        ("--height", "16"),
        ("--width", "24"),
        ("--num-inference-steps", "2"),
        ("--output", output.as_str()),
    ];
    common::with_defaults(&["svd"], &defaults, extra)
}

/// A cause told twice in a row, as in "X: X" (or "X: Y: X: Y"), anywhere in `message`.
fn repeated_cause(message: &str) -> Option<String> {
    let parts: Vec<&str> = message.split(": ").collect();
    (1..=parts.len() / 2).find_map(|n| {
        (0..=parts.len() - 2 * n)
            .find(|&i| parts[i..i + n] == parts[i + n..i + 2 * n])
            .map(|i| parts[i..i + n].join(": "))
    })
}

/// The refusal every case must be: see the module doc.
fn assert_refused(case: &str, out: &Outcome, needles: &[&str], output: &Path) {
    let err = &out.stderr;
    assert!(
        out.status.signal().is_none() && out.status.code() != Some(0),
        "{case}: exit {:?} ({err})",
        out.status
    );
    assert!(!err.contains("panicked"), "{case}: {err}");
    for needle in needles {
        assert!(
            err.contains(needle),
            "{case}: should mention `{needle}`: {err}"
        );
    }
    for line in err.lines() {
        assert_eq!(
            repeated_cause(line),
            None,
            "{case}: a cause told twice: {line}"
        );
    }
    assert!(!output.exists(), "{case}: left {} behind", output.display());
    if let Some(Ok(entries)) = output.parent().map(std::fs::read_dir) {
        let temporary: Vec<_> = entries
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".tmp"))
            .collect();
        assert!(temporary.is_empty(), "{case}: left {temporary:?} behind");
    }
}

fn save_latents(path: &Path, latents: Tensor) {
    let tensors = std::collections::HashMap::from([("latents".to_string(), latents)]);
    candle_core::safetensors::save(&tensors, path).unwrap();
}

#[test]
fn the_repeat_detector_finds_causes_told_twice() {
    assert!(repeated_cause("error: a: No such file: No such file").is_some());
    assert!(repeated_cause("error: x: a: b: a: b").is_some());
    assert_eq!(
        repeated_cause("error: x: creating a file: No such file"),
        None
    );
}

/// A model folder of the SVD fixture's configs with garbage weights, in `scratch`.
fn configs_only(scratch: &Scratch) -> PathBuf {
    let model = scratch.path("model");
    copy_model(&svd_fixture().join("model"), &model, true);
    model
}

/// Flag values, sizes and budgets, each refused before any weights load: `(flags, what the
/// message names)`, space- and `|`-separated.
#[test]
fn svd_flags_are_refused_before_weights_load() {
    let scratch = Scratch::new("bad", "svd-flags");
    let model = configs_only(&scratch);
    let out = scratch.path("out.gif");
    let cases = [
        // Abort: the video alone could not be allocated.
        (
            "--height 100000 --width 100000",
            "--height 100000 --width 100000|of memory this machine has",
        ),
        // Silent NaN videos.
        ("--min-guidance-scale NaN", "--min-guidance-scale|finite"),
        ("--max-guidance-scale inf", "--max-guidance-scale|finite"),
        ("--noise-aug-strength NaN", "--noise-aug-strength|finite"),
        // Checks that came after the inference.
        ("--fps 0", "out.gif|frame rate must be positive"),
        (
            "--memory-budget 100KiB",
            "100.0 KiB cannot be met|smallest whole-run peak|denoise phase|UNet weights|--num-frames",
        ),
        // Late or cryptic.
        ("--num-frames 0", "--num-frames|at least 1"),
        (
            "--num-inference-steps 0",
            "--num-inference-steps|at least 1",
        ),
        ("--dtype bf16", "--dtype bf16|--dtype f32"),
        // Unclear.
        ("--decode-chunk-size 0", "--decode-chunk-size|at least 1"),
    ];
    for (flags, needles) in cases {
        let flags: Vec<&str> = flags.split(' ').collect();
        let needles: Vec<&str> = needles.split('|').collect();
        let outcome = streamline(&svd_args(&model, &out, &flags));
        assert_refused(&format!("{flags:?}"), &outcome, &needles, &out);
    }
}

/// Latents, model folders and outputs, each refused before any weights load.
#[test]
fn svd_files_are_refused_before_weights_load() {
    let scratch = Scratch::new("bad", "svd-files");
    let model = configs_only(&scratch);
    let out = scratch.path("out.gif");
    let nan_latents = scratch.path("nan.safetensors");
    let mut values = vec![0f32; 3 * 4 * 8 * 12];
    values[17] = f32::NAN;
    let nan = Tensor::from_vec(values, (1, 3, 4, 8, 12), &Device::Cpu).unwrap();
    save_latents(&nan_latents, nan);
    let wrong_latents = scratch.path("wrong.safetensors");
    let wrong = Tensor::zeros((1, 3, 4, 4, 6), DType::F32, &Device::Cpu).unwrap();
    save_latents(&wrong_latents, wrong);
    let missing = scratch.path("none");
    let cases: [(&str, &Path, &[&str]); 3] = [
        (
            "--latents",
            &nan_latents,
            &["--latents", "nan.safetensors", "NaN or infinite"],
        ),
        (
            "--latents",
            &wrong_latents,
            &["expected [1, 3, 4, 8, 12]", "height/2, width/2"],
        ),
        ("--model", &missing, &["none", "no such model folder"]),
    ];
    for (flag, path, needles) in cases {
        let outcome = streamline(&svd_args(&model, &out, &[flag, path.to_str().unwrap()]));
        assert_refused(flag, &outcome, needles, &out);
    }
    for name in ["out.mkv", "out.avi", "out.txt", "out.png"] {
        let output = scratch.path(name);
        let outcome = streamline(&svd_args(&model, &output, &[]));
        assert_refused(name, &outcome, &[name, "unsupported video output"], &output);
    }
    let mp4 = scratch.path("small.mp4");
    let outcome = streamline(&svd_args(&model, &mp4, &["--height", "8"]));
    assert_refused(
        "8-pixel MP4",
        &outcome,
        &["small.mp4", "at least 16x16"],
        &mp4,
    );
    let file = scratch.path("file");
    std::fs::write(&file, "a file, not a folder").unwrap();
    let under_file = file.join("out.gif");
    let outcome = streamline(&svd_args(&model, &under_file, &[]));
    let needles = ["file/out.gif", "beside it"];
    assert_refused("under a file", &outcome, &needles, &under_file);
    assert_eq!(
        std::fs::read_to_string(&file).unwrap(),
        "a file, not a folder"
    );
}

/// Config values that gave blank videos or silently another sampler, refused with the file
/// and the field before any weights load.
#[test]
fn svd_config_values_are_refused_before_weights_load() {
    let scratch = Scratch::new("bad", "svd-configs");
    let out = scratch.path("out.gif");
    let cases: [(&str, &str, serde_json::Value, &[&str]); 4] = [
        (
            "vae/config.json",
            "scaling_factor",
            0.into(),
            &["vae/config.json", "`scaling_factor`", "positive and finite"],
        ),
        (
            "scheduler/scheduler_config.json",
            "_class_name",
            "PNDMScheduler".into(),
            &[
                "scheduler_config.json",
                "PNDMScheduler",
                "expected one of EulerDiscreteScheduler",
            ],
        ),
        (
            "scheduler/scheduler_config.json",
            "_class_name",
            serde_json::Value::Null,
            &[
                "scheduler_config.json",
                "(absent)",
                "EulerDiscreteScheduler",
            ],
        ),
        (
            "unet/config.json",
            "num_frames",
            0.into(),
            &["unet/config.json", "`num_frames` is 0"],
        ),
    ];
    for (n, (file, key, value, needles)) in cases.into_iter().enumerate() {
        let model = scratch.path(&format!("model{n}"));
        copy_model(&svd_fixture().join("model"), &model, true);
        edit_json(&model.join(file), key, value);
        let outcome = streamline(&svd_args(&model, &out, &[]));
        assert_refused(&format!("{file} {key}"), &outcome, needles, &out);
    }
}

/// A NaN weight is refused as the checkpoint loads, naming the file and the tensor; a run
/// whose latents overflow stops at that step.
#[test]
fn nan_weights_and_overflowing_steps_never_make_a_video() {
    let scratch = Scratch::new("bad", "nan");
    let model = scratch.path("model");
    copy_model(&svd_fixture().join("model"), &model, false);
    let weights = model.join("unet/diffusion_pytorch_model.safetensors");
    let mut tensors = candle_core::safetensors::load(&weights, &Device::Cpu).unwrap();
    let conv = &tensors["conv_in.weight"];
    let mut values = conv
        .flatten_all()
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    values[5] = f32::NAN;
    let poisoned = Tensor::from_vec(values, conv.dims(), &Device::Cpu)
        .unwrap()
        .to_dtype(conv.dtype())
        .unwrap();
    tensors.insert("conv_in.weight".into(), poisoned);
    candle_core::safetensors::save(&tensors, &weights).unwrap();
    let out = scratch.path("out.safetensors");
    let outcome = streamline(&svd_args(&model, &out, &[]));
    let needles = [
        "unet/diffusion_pytorch_model.safetensors",
        "tensor `conv_in.weight`",
        "NaN or infinite value at element 5",
    ];
    assert_refused("NaN weight", &outcome, &needles, &out);

    let fixture = svd_fixture().join("model");
    let outcome = streamline(&svd_args(&fixture, &out, &["--max-guidance-scale", "1e38"]));
    let needles = ["the latents after denoising step", "of 2 are not finite"];
    assert_refused("overflowing guidance", &outcome, &needles, &out);
}

/// An output that is an input (the image, the latents, a frame in the output directory) is
/// refused, and the input stays as it was.
#[test]
fn an_output_over_an_input_is_refused() {
    let scratch = Scratch::new("bad", "overwrite");
    let model = configs_only(&scratch);
    let gif = scratch.path("image.gif");
    image::open(svd_fixture().join("image.png"))
        .unwrap()
        .save(&gif)
        .unwrap();
    let frames = scratch.path("frames");
    std::fs::create_dir(&frames).unwrap();
    let frame = frames.join("frame_000.png");
    std::fs::copy(svd_fixture().join("image.png"), &frame).unwrap();
    let latents = scratch.path("latents.safetensors");
    save_latents(
        &latents,
        Tensor::zeros((1, 3, 4, 8, 12), DType::F32, &Device::Cpu).unwrap(),
    );
    let before = |p: &Path| std::fs::read(p).unwrap();
    for (input, flag, output) in [
        (&gif, "--image", &gif),
        (&frame, "--image", &frames),
        (&latents, "--latents", &latents),
    ] {
        let content = before(input);
        let outcome = streamline(&svd_args(&model, output, &[flag, input.to_str().unwrap()]));
        assert!(
            outcome.status.code().is_some_and(|c| c != 0),
            "{}",
            outcome.stderr
        );
        let needle = format!("would overwrite the {flag} input");
        assert!(outcome.stderr.contains(&needle), "{}", outcome.stderr);
        assert_eq!(before(input), content, "{} changed", input.display());
    }
}

/// Every output gets the process umask, and frames in an existing folder that this run did not
/// write stay (with a warning); the summary gives sizes in the unit that fits.
#[test]
fn outputs_get_the_umask_and_files_the_run_did_not_write_stay() {
    let scratch = Scratch::new("bad", "umask");
    let fixture = svd_fixture().join("model");
    let reference = scratch.path("reference");
    std::fs::write(&reference, "made with the umask").unwrap();
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    for name in ["out.safetensors", "out.gif"] {
        let outcome = streamline(&svd_args(&fixture, &scratch.path(name), &[]));
        assert!(outcome.status.success(), "{}", outcome.stderr);
        assert_eq!(mode(&scratch.path(name)), mode(&reference), "{name}");
        assert!(
            !outcome.stderr.contains(" 0.0 MiB") && outcome.stderr.contains(" KiB"),
            "{}",
            outcome.stderr
        );
    }
    let frames = scratch.path("frames");
    std::fs::create_dir(&frames).unwrap();
    std::fs::write(frames.join("frame_123.png"), "the user's own").unwrap();
    let outcome = streamline(&svd_args(&fixture, &frames, &[]));
    assert!(outcome.status.success(), "{}", outcome.stderr);
    assert_eq!(
        std::fs::read_to_string(frames.join("frame_123.png")).unwrap(),
        "the user's own"
    );
    assert!(
        outcome.stderr.contains("frame_123.png"),
        "a warning names it: {}",
        outcome.stderr
    );
    assert_eq!(mode(&frames.join("frame_000.png")), mode(&reference));
}

/// SIGINT and SIGTERM while the output is staged (it is, from before the weights load to the
/// final rename) remove it and exit 130 / 143. The run has far more steps than it takes to see
/// the staging appear, so the signal lands mid-run.
#[test]
fn interrupts_leave_nothing_behind() {
    for (signal, code) in [(libc::SIGINT, 130), (libc::SIGTERM, 143)] {
        let scratch = Scratch::new("bad", &format!("signal{signal}"));
        let out = scratch.path("frames");
        let args = svd_args(
            &svd_fixture().join("model"),
            &out,
            &["--num-inference-steps", "500"],
        );
        let mut child = Command::new(env!("CARGO_BIN_EXE_streamline"))
            .args(&args)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let staged = || {
            std::fs::read_dir(scratch.dir())
                .unwrap()
                .any(|e| e.unwrap().file_name().to_string_lossy().ends_with(".tmp"))
        };
        while child.try_wait().unwrap().is_none() && !staged() {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(staged(), "the output was staged while the run went on");
        // SAFETY: signalling our own child, whose pid is live until we wait on it.
        assert_eq!(unsafe { libc::kill(child.id() as i32, signal) }, 0);
        let outcome = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&outcome.stderr);
        assert_eq!(outcome.status.code(), Some(code), "{stderr}");
        assert!(stderr.contains("interrupted"), "{stderr}");
        assert_eq!(
            std::fs::read_dir(scratch.dir()).unwrap().count(),
            0,
            "nothing left behind"
        );
    }
}

/// The built-in model copied to another folder runs at its own 64x64 (not 576x1024, which
/// took minutes), and a height whose plan no machine holds is refused before its weights load.
#[test]
fn the_built_in_model_anywhere_runs_at_its_size_and_huge_sizes_are_refused() {
    let scratch = Scratch::new("bad", "built-in");
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let copy = scratch.path("copy");
    copy_model(&root.join("models/default"), &copy, false);
    let image = root.join("examples/red.png").display().to_string();
    let run = |model: &Path, output: &Path, extra: &[&str]| {
        let mut args = vec!["svd", "--model", model.to_str().unwrap(), "--image", &image];
        args.extend(["--output", output.to_str().unwrap()]);
        args.extend(extra);
        streamline(&args.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    };
    let gif = scratch.path("out.gif");
    let outcome = run(&copy, &gif, &["--num-inference-steps", "2"]);
    assert!(outcome.status.success(), "{}", outcome.stderr);
    assert!(
        outcome.stderr.contains("(8 frames 64x64)"),
        "{}",
        outcome.stderr
    );

    let configs_only = scratch.path("configs-only");
    copy_model(&root.join("models/default"), &configs_only, true);
    let huge = scratch.path("huge.gif");
    let outcome = run(&configs_only, &huge, &["--height", "10000000"]);
    assert_refused(
        "--height 10000000",
        &outcome,
        &["--height 10000000 --width 64", "of memory this machine has"],
        &huge,
    );
}

#[test]
fn plan_and_rehash_refuse_before_planning_or_calibrating() {
    let scratch = Scratch::new("bad", "plan-rehash");
    let none = scratch.path("none");
    for flag in ["--batch", "--num-frames", "--decode-chunk-size"] {
        let outcome = streamline(&["plan".into(), flag.into(), "0".into()]);
        assert_refused(flag, &outcome, &[flag, "at least 1"], &none);
    }
    let model = configs_only(&scratch);
    let dir = scratch.path("schedules");
    std::fs::create_dir(&dir).unwrap();
    let mut args = svd_args(&model, &none, &[]);
    args.truncate(args.len() - 2);
    args.splice(0..1, ["rehash".to_string(), "search".to_string()]);
    args.extend(["--key-steps", "1", "--out", dir.to_str().unwrap()].map(String::from));
    assert_refused(
        "--out a directory",
        &streamline(&args),
        &["schedules", "is a directory"],
        &none,
    );
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
}

/// AnimateDiff's flags and folders, refused before its weights load.
#[test]
fn animatediff_arguments_are_refused_before_weights_load() {
    let scratch = Scratch::new("bad", "animatediff");
    let fixture = fixtures().join("animatediff_pipeline");
    let (model, adapter) = (scratch.path("model"), scratch.path("adapter"));
    copy_model(&fixture.join("model"), &model, true);
    copy_model(&fixture.join("motion_adapter"), &adapter, true);
    let out = scratch.path("out.gif");
    let missing = scratch.path("none").display().to_string();
    let cases: [(&[&str], &[&str]); 5] = [
        (
            &["--guidance-scale", "NaN"],
            &["--guidance-scale", "finite"],
        ),
        (&["--dtype", "bf16"], &["--dtype bf16"]),
        (
            &["--decode-chunk-size", "0"],
            &["--decode-chunk-size", "at least 1"],
        ),
        (&["--fps", "0"], &["frame rate must be positive"]),
        (&["--model", &missing], &["none", "no such model folder"]),
    ];
    for (extra, needles) in cases {
        let mut args: Vec<String> = [
            "animatediff",
            "--prompt",
            "a ball",
            "--num-frames",
            "2",
            "--height",
            "16",
            "--width",
            "16",
        ]
        .map(String::from)
        .into();
        if !extra.contains(&"--model") {
            args.extend(["--model".into(), model.display().to_string()]);
        }
        args.extend(["--motion-adapter".into(), adapter.display().to_string()]);
        args.extend(["--output".into(), out.display().to_string()]);
        args.extend(extra.iter().map(|s| s.to_string()));
        assert_refused(&format!("{extra:?}"), &streamline(&args), needles, &out);
    }
}
