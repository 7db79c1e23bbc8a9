//! `streamline batch` end to end: on the built-in model, two shards of a 5-job batch (one
//! from Slurm's array variables, one from a Kubernetes completion index) write each output
//! once and a rerun skips all; a batch killed mid-run (SIGKILL, so nothing cleans up) and
//! rerun finishes with no duplicate and no partial file; a failing job is recorded and the
//! batch goes on; a batch job makes the frames of the single-video command with its settings;
//! bad jobs files and shards are refused before any weights load.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use candle_core::Device;
use streamline_pipeline::batch::{read_results, Record};
use streamline_pipeline::video::read_video;

mod common;

use common::{copy_model, Scratch};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// What a scheduler or a user's shell may have set, cleared so each test says what it sets.
const SCHEDULER_VARIABLES: [&str; 7] = [
    "SLURM_ARRAY_TASK_ID",
    "SLURM_ARRAY_TASK_COUNT",
    "SLURM_ARRAY_TASK_MIN",
    "SLURM_ARRAY_TASK_STEP",
    "JOB_COMPLETION_INDEX",
    "STREAMLINE_SHARD_COUNT",
    "STREAMLINE_DEFAULT_MODEL",
];

/// `streamline ARGS` with only `env` of the scheduler variables set.
fn streamline(args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_streamline"));
    cmd.args(args).env("RUST_BACKTRACE", "0");
    for name in SCHEDULER_VARIABLES {
        cmd.env_remove(name);
    }
    cmd.envs(env.iter().copied());
    cmd
}

fn run(args: &[&str], env: &[(&str, &str)]) -> (Output, String) {
    let out = streamline(args, env).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out, stderr)
}

/// `count` SVD jobs on the example images, 2 steps and 4 frames each; returns the jobs file.
fn svd_jobs(scratch: &Scratch, count: usize, steps: usize) -> PathBuf {
    let colours = ["red", "blue", "green"];
    let lines: Vec<String> = (0..count)
        .map(|i| {
            let image = repo().join(format!("examples/{}.png", colours[i % 3]));
            format!(
                r#"{{"image": {:?}, "seed": {i}, "num_inference_steps": {steps}, "num_frames": 4}}"#,
                image.display().to_string()
            )
        })
        .collect();
    let path = scratch.path("jobs.jsonl");
    fs::write(&path, lines.join("\n") + "\n").unwrap();
    path
}

fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

fn outputs(count: usize) -> Vec<String> {
    (1..=count).map(|n| format!("line-{n:05}.mp4")).collect()
}

/// Every output decodes to the jobs' 4 frames of 64x64.
fn assert_whole_videos(dir: &Path, names: &[String]) {
    for name in names {
        let video = read_video(&dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(video.frames.len(), 4, "{name}");
        assert_eq!(video.frames[0].dimensions(), (64, 64), "{name}");
    }
}

fn lines_of(records: &[Record]) -> Vec<usize> {
    records.iter().map(|r| r.line).collect()
}

#[test]
fn two_shards_write_each_output_once_and_a_rerun_skips_all() {
    let scratch = Scratch::new("batch", "shards");
    let jobs = svd_jobs(&scratch, 5, 2);
    let out = scratch.path("out");
    let (jobs, out_dir) = (jobs.to_str().unwrap(), out.to_str().unwrap());
    let args = ["batch", "svd", jobs, "--output-dir", out_dir];
    let kubernetes = [("JOB_COMPLETION_INDEX", "0")];
    let shard_count = [&args[..], &["--shard-count", "2"]].concat();
    let (first, err) = run(&shard_count, &kubernetes);
    assert!(first.status.success(), "{err}");
    assert!(
        err.contains("shard 0/2 (JOB_COMPLETION_INDEX=0 of --shard-count 2)"),
        "{err}"
    );
    let slurm = [
        ("SLURM_ARRAY_TASK_ID", "1"),
        ("SLURM_ARRAY_TASK_COUNT", "2"),
    ];
    let (second, err) = run(&args, &slurm);
    assert!(second.status.success(), "{err}");
    assert!(err.contains("shard 1/2 (SLURM_ARRAY_TASK_ID=1"), "{err}");

    let mut expected = outputs(5);
    assert_whole_videos(&out, &expected);
    expected.extend(["results.shard-0-of-2.jsonl", "results.shard-1-of-2.jsonl"].map(String::from));
    expected.sort();
    assert_eq!(names_in(&out), expected);
    let results = |shard: usize| out.join(format!("results.shard-{shard}-of-2.jsonl"));
    let records = [
        read_results(&results(0)).unwrap(),
        read_results(&results(1)).unwrap(),
    ];
    assert_eq!(lines_of(&records[0]), [1, 3, 5]);
    assert_eq!(lines_of(&records[1]), [2, 4]);
    for r in records.iter().flatten() {
        assert!(
            r.error.is_none() && r.seconds.is_some() && r.peak_bytes.is_some(),
            "{r:?}"
        );
        assert_eq!(r.key_steps.as_deref(), Some(&[0, 1][..]));
        assert_eq!(r.seed as usize, r.line - 1);
    }

    let before: Vec<Vec<u8>> = [results(0), results(1)]
        .iter()
        .map(|p| fs::read(p).unwrap())
        .collect();
    for shard in ["0/2", "1/2"] {
        let (again, err) = run(&[&args[..], &["--shard", shard]].concat(), &slurm);
        assert!(again.status.success(), "{err}");
        assert!(err.contains("0 to run"), "{err}");
    }
    let after: Vec<Vec<u8>> = [results(0), results(1)]
        .iter()
        .map(|p| fs::read(p).unwrap())
        .collect();
    assert!(
        before == after,
        "a rerun of finished shards records nothing"
    );
}

/// Waits until `dir` holds a finished output, or panics after a minute.
fn wait_for_first_output(dir: &Path, child: &mut std::process::Child) {
    let start = Instant::now();
    while !(dir.is_dir()
        && names_in(dir)
            .iter()
            .any(|n| n.ends_with(".mp4") && !n.starts_with('.')))
    {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the batch ended before it was killed"
        );
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no output after a minute"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_killed_batch_rerun_finishes_with_no_duplicate_and_no_partial_file() {
    let scratch = Scratch::new("batch", "killed");
    let jobs = svd_jobs(&scratch, 5, 4);
    let out = scratch.path("out");
    let args = [
        "batch",
        "svd",
        jobs.to_str().unwrap(),
        "--output-dir",
        out.to_str().unwrap(),
    ];
    let mut child = streamline(&args, &[])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_first_output(&out, &mut child);
    child.kill().unwrap();
    child.wait().unwrap();
    let finished: Vec<String> = names_in(&out)
        .into_iter()
        .filter(|n| n.ends_with(".mp4") && !n.starts_with('.'))
        .collect();
    assert!(!finished.is_empty() && finished.len() < 5, "{finished:?}");
    assert_whole_videos(&out, &finished);

    let (rerun, err) = run(&args, &[]);
    assert!(rerun.status.success(), "{err}");
    let mut expected = outputs(5);
    assert_whole_videos(&out, &expected);
    expected.push("results.shard-0-of-1.jsonl".into());
    assert_eq!(names_in(&out), expected, "no staging left, no other file");
    let records = read_results(&out.join("results.shard-0-of-1.jsonl")).unwrap();
    let mut lines = lines_of(&records);
    lines.sort();
    assert_eq!(lines, [1, 2, 3, 4, 5], "one record per job: {records:?}");
    assert!(records.iter().all(|r| r.error.is_none()));
}

/// A job whose image is no image fails on its own; the others are written, the failure is
/// recorded with its cause and the exit status says so. The jobs that ran are the frames of
/// `streamline svd` with their settings.
#[test]
fn a_failing_job_is_recorded_and_the_batch_goes_on() {
    let scratch = Scratch::new("batch", "failing");
    let broken = scratch.path("broken.png");
    fs::write(&broken, "no pixels").unwrap();
    let red = repo().join("examples/red.png");
    let job = |image: &Path, extra: &str| {
        format!(
            r#"{{"image": {:?}, "num_inference_steps": 2{extra}}}"#,
            image.display().to_string()
        )
    };
    let lines = [
        job(&red, r#", "seed": 5, "num_frames": 3, "id": "red""#),
        job(&broken, ""),
        job(&red, ""),
    ];
    let jobs = scratch.path("jobs.jsonl");
    fs::write(&jobs, lines.join("\n")).unwrap();
    let out = scratch.path("out");
    let (jobs, out_dir) = (jobs.to_str().unwrap(), out.to_str().unwrap());
    let args = [
        "batch",
        "svd",
        jobs,
        "--output-dir",
        out_dir,
        "--format",
        "safetensors",
    ];
    let (batch, err) = run(&args, &[]);
    assert_eq!(batch.status.code(), Some(1), "{err}");
    assert!(
        err.contains("1 of 3 jobs failed") && err.contains("results.shard-0-of-1.jsonl"),
        "{err}"
    );
    let records = read_results(&out.join("results.shard-0-of-1.jsonl")).unwrap();
    assert_eq!(lines_of(&records), [1, 2, 3]);
    let error = records[1].error.as_deref().unwrap_or_default();
    assert!(
        error.contains("broken.png") && error.contains("cannot read image"),
        "{error}"
    );
    assert_eq!(
        names_in(&out),
        [
            "line-00003.safetensors",
            "red.safetensors",
            "results.shard-0-of-1.jsonl"
        ]
    );

    let single = scratch.path("single.safetensors");
    let flags = [
        "svd",
        "--num-inference-steps",
        "2",
        "--num-frames",
        "3",
        "--seed",
        "5",
    ];
    let image = [
        "--image",
        red.to_str().unwrap(),
        "--output",
        single.to_str().unwrap(),
    ];
    let (one, err) = run(&[&flags[..], &image].concat(), &[]);
    assert!(one.status.success(), "{err}");
    let frames =
        |p: &Path| candle_core::safetensors::load(p, &Device::Cpu).unwrap()["frames"].clone();
    let diff = streamline_pipeline::quality::max_abs(
        &frames(&single),
        &frames(&out.join("red.safetensors")),
    )
    .unwrap();
    assert_eq!(diff, 0.0, "a batch job makes the single command's frames");
}

/// AnimateDiff jobs on the tiny pipeline fixture: prompts recorded with their results, and the
/// frames of `streamline animatediff` with the job's prompt, seed and overrides.
#[test]
fn animatediff_jobs_make_the_single_commands_frames() {
    let scratch = Scratch::new("batch", "animatediff");
    let fixture = repo().join("fixtures/data/animatediff_pipeline");
    let (model, adapter) = (fixture.join("model"), fixture.join("motion_adapter"));
    let jobs = scratch.path("prompts.jsonl");
    let lines = [
        r#"{"id": "ball", "prompt": "a red ball", "negative_prompt": "blurry", "seed": 3, "guidance_scale": 6.5}"#,
        r#"{"prompt": "a blue box", "num_frames": 4}"#,
    ];
    fs::write(&jobs, lines.join("\n")).unwrap();
    let out = scratch.path("out");
    let models = [
        "--model",
        model.to_str().unwrap(),
        "--motion-adapter",
        adapter.to_str().unwrap(),
    ];
    let sizes = [
        "--num-frames",
        "5",
        "--height",
        "16",
        "--width",
        "16",
        "--num-inference-steps",
        "2",
        "--decode-chunk-size",
        "2",
    ];
    let batch = [
        "batch",
        "animatediff",
        jobs.to_str().unwrap(),
        "--output-dir",
        out.to_str().unwrap(),
        "--format",
        "safetensors",
    ];
    let (ran, err) = run(&[&batch[..], &models, &sizes].concat(), &[]);
    assert!(ran.status.success(), "{err}");
    let records = read_results(&out.join("results.shard-0-of-1.jsonl")).unwrap();
    let prompts: Vec<Option<&str>> = records.iter().map(|r| r.prompt.as_deref()).collect();
    assert_eq!(prompts, [Some("a red ball"), Some("a blue box")]);
    let frames =
        |p: &Path| candle_core::safetensors::load(p, &Device::Cpu).unwrap()["frames"].clone();
    assert_eq!(frames(&out.join("line-00002.safetensors")).dims()[0], 4);

    let single = scratch.path("single.safetensors");
    let prompt = [
        "--prompt",
        "a red ball",
        "--negative-prompt",
        "blurry",
        "--seed",
        "3",
        "--guidance-scale",
        "6.5",
    ];
    let output = ["animatediff", "--output", single.to_str().unwrap()];
    let (one, err) = run(&[&output[..], &models, &sizes, &prompt].concat(), &[]);
    assert!(one.status.success(), "{err}");
    let diff = streamline_pipeline::quality::max_abs(
        &frames(&single),
        &frames(&out.join("ball.safetensors")),
    )
    .unwrap();
    assert_eq!(diff, 0.0, "a batch job makes the single command's frames");
}

/// A jobs file, flags, scheduler variables, and what the refusal says (`|`-separated).
type Refusal<'a> = (String, &'a [&'a str], &'a [(&'a str, &'a str)], &'a str);

/// Bad jobs files and shards, each refused with the line and field (or the flag or variable)
/// before any weights load: the model's weights here are garbage, so a check made after
/// loading would fail on them instead. Nothing is written, not even the output folder.
#[test]
fn bad_jobs_and_shards_are_refused_before_weights_load() {
    let scratch = Scratch::new("batch", "refused");
    let fixture = repo().join("fixtures/data/svd_pipeline");
    let model = scratch.path("model");
    copy_model(&fixture.join("model"), &model, true);
    let image = fixture.join("image.png").display().to_string();
    let good = format!(r#"{{"image": {image:?}}}"#);
    let out = scratch.path("out");
    let cases: [Refusal; 10] = [
        (format!("{good}\n{{\"image\": 1"), &[], &[], "jobs.jsonl line 2: not a JSON object"),
        (format!("{{\"image\": {image:?}, \"steps\": 2}}"), &[], &[], "line 1: unknown field `steps`"),
        (format!("{good}\n{good}\n{{\"image\": {image:?}, \"height\": 12}}"), &[], &[], "jobs.jsonl line 3: height 12 must be a positive multiple"),
        (format!("{{\"image\": {image:?}, \"height\": 100000, \"width\": 100000}}"), &[], &[], "jobs.jsonl line 1: |of memory this machine has"),
        (format!("{{\"image\": {image:?}, \"height\": 8}}"), &[], &[], "jobs.jsonl line 1: |at least 16x16"),
        (good.clone(), &["--shard", "3/2"], &[], "--shard"),
        (good.clone(), &["--shard", "0/0"], &[], "count must be at least 1"),
        (good.clone(), &[], &[("SLURM_ARRAY_TASK_ID", "5"), ("SLURM_ARRAY_TASK_COUNT", "2")], "SLURM_ARRAY_TASK_ID=5 of SLURM_ARRAY_TASK_COUNT=2: the shard index must be below the count"),
        (good.clone(), &[], &[("JOB_COMPLETION_INDEX", "1")], "JOB_COMPLETION_INDEX=1: a Kubernetes Indexed Job needs its shard count"),
        (good.clone(), &["--format", "webm"], &[], "--format"),
    ];
    for (text, flags, env, needle) in cases {
        let jobs = scratch.path("jobs.jsonl");
        fs::write(&jobs, &text).unwrap();
        let mut args = vec![
            "batch",
            "svd",
            jobs.to_str().unwrap(),
            "--output-dir",
            out.to_str().unwrap(),
        ];
        args.extend([
            "--model",
            model.to_str().unwrap(),
            "--height",
            "16",
            "--width",
            "24",
        ]);
        args.extend(flags);
        let (refused, err) = run(&args, env);
        assert!(
            !refused.status.success() && refused.status.code().is_some(),
            "{text}: {err}"
        );
        assert!(!err.contains("panicked"), "{text}: {err}");
        for needle in needle.split('|') {
            assert!(
                err.contains(needle),
                "{text} {flags:?}: should say `{needle}`: {err}"
            );
        }
        assert!(!out.exists(), "{text}: made the output folder");
    }
}
