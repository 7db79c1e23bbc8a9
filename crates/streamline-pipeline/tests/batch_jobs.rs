//! Batch jobs without a model: the jobs file's checks (each refusal names the line and the
//! field), and a shard's bookkeeping (which jobs are its own, what a rerun skips, what a
//! killed run left), with outputs written by hand.

use std::fs;
use std::path::Path;

use streamline_pipeline::batch::{
    read_jobs, read_results, Batch, JobInputs, JobReport, OutputFormat, PipelineKind, Shard,
};

mod common;

use common::{names_in, Scratch};

#[test]
fn job_lines_are_read_with_their_overrides() {
    let scratch = Scratch::new("batch-read");
    scratch.write("cat.png", "");
    let jobs = scratch.write(
        "jobs.jsonl",
        concat!(
            r#"{"image": "cat.png", "seed": 3, "num_frames": 4, "min_guidance_scale": 1.5}"#,
            "\n\n",
            r#"{"id": "second.v2", "image": "cat.png", "motion_bucket_id": 0, "fps": null}"#,
            "\n",
        ),
    );
    let jobs = read_jobs(&jobs, PipelineKind::Svd).unwrap();
    assert_eq!(jobs.len(), 2);
    assert_eq!(
        (jobs[0].line, jobs[0].name.as_str(), jobs[0].seed),
        (1, "line-00001", Some(3))
    );
    assert_eq!(
        (jobs[1].line, jobs[1].name.as_str(), jobs[1].seed),
        (3, "second.v2", None)
    );
    let JobInputs::Svd { image, overrides } = &jobs[0].inputs else {
        panic!("an SVD job");
    };
    assert_eq!(image, &scratch.path("cat.png"), "relative to the jobs file");
    assert_eq!(
        (overrides.shared.num_frames, overrides.min_guidance_scale),
        (Some(4), Some(1.5))
    );
    assert_eq!(overrides.shared.fps, None);

    let prompts = scratch.write(
        "prompts.jsonl",
        r#"{"prompt": "a boat", "negative_prompt": "blurry", "guidance_scale": 6, "id": "boat"}"#,
    );
    let jobs = read_jobs(&prompts, PipelineKind::AnimateDiff).unwrap();
    assert_eq!(jobs[0].prompt(), Some("a boat"));
    let JobInputs::AnimateDiff {
        negative_prompt,
        overrides,
        ..
    } = &jobs[0].inputs
    else {
        panic!("an AnimateDiff job");
    };
    assert_eq!(negative_prompt.as_deref(), Some("blurry"));
    assert_eq!(overrides.guidance_scale, Some(6.0));
}

/// Every malformed line is refused naming the file, the line and the field.
#[test]
fn bad_job_lines_name_their_line_and_field() {
    let scratch = Scratch::new("batch-bad");
    scratch.write("cat.png", "");
    let good = r#"{"image": "cat.png"}"#;
    let cases = [
        (r#"{"image": "cat.png""#, "line 2: not a JSON object"),
        (r#"["cat.png"]"#, "line 2: not a JSON object"),
        (r#"{"seed": 1}"#, "line 2: `image` is missing"),
        (r#"{"image": "dog.png"}"#, "line 2: `image`"),
        (
            r#"{"image": 3}"#,
            "line 2: `image`: expected a string, got 3",
        ),
        (
            r#"{"image": "cat.png", "seed": -1}"#,
            "`seed`: expected a non-negative integer, got -1",
        ),
        (
            r#"{"image": "cat.png", "height": "64"}"#,
            "`height`: expected a non-negative integer",
        ),
        (
            r#"{"image": "cat.png", "num_frames": 0}"#,
            "`num_frames`: must be at least 1",
        ),
        (
            r#"{"image": "cat.png", "noise_aug_strength": -0.5}"#,
            "`noise_aug_strength`: must be at least 0",
        ),
        (
            r#"{"image": "cat.png", "prompt": "x"}"#,
            "unknown field `prompt` for svd jobs",
        ),
        (
            r#"{"image": "cat.png", "id": "../escape"}"#,
            "`id` \"../escape\"",
        ),
        (
            r#"{"image": "cat.png", "id": "line-00001"}"#,
            "already line 1's",
        ),
    ];
    for (line, needle) in cases {
        let path = scratch.write("jobs.jsonl", &format!("{good}\n{line}\n"));
        let err = read_jobs(&path, PipelineKind::Svd).unwrap_err().to_string();
        assert!(err.contains("jobs.jsonl"), "{line}: {err}");
        assert!(err.contains(needle), "{line}: {err}");
    }
    let empty = scratch.write("empty.jsonl", "\n\n");
    let err = read_jobs(&empty, PipelineKind::Svd)
        .unwrap_err()
        .to_string();
    assert!(err.contains("holds no jobs"), "{err}");
    let prompts = scratch.write("p.jsonl", r#"{"prompt": "a", "motion_bucket_id": 3}"#);
    let err = read_jobs(&prompts, PipelineKind::AnimateDiff)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("unknown field `motion_bucket_id` for animatediff jobs"),
        "{err}"
    );
}

fn five_jobs(scratch: &Scratch) -> Vec<streamline_pipeline::batch::Job> {
    let lines: Vec<String> = (0..5)
        .map(|i| format!(r#"{{"prompt": "clip {i}", "seed": {i}}}"#))
        .collect();
    let path = scratch.write("jobs.jsonl", &(lines.join("\n") + "\n"));
    read_jobs(&path, PipelineKind::AnimateDiff).unwrap()
}

fn report() -> Result<JobReport, String> {
    Ok(JobReport {
        seconds: 1.5,
        peak_bytes: 1024,
        key_steps: vec![0, 1],
    })
}

/// Runs a shard's pending jobs by writing their outputs by hand (job `fail` fails).
fn run(dir: &Path, jobs: &[streamline_pipeline::batch::Job], shard: Shard, fail: Option<usize>) {
    let mut batch = Batch::prepare(dir, jobs, shard, OutputFormat::Mp4, 0).unwrap();
    for place in batch.pending.clone() {
        let job = &jobs[place];
        if Some(place) == fail {
            batch.record(job, 0, Err("it broke".into())).unwrap();
        } else {
            fs::write(batch.output(job), "video").unwrap();
            batch.record(job, job.seed.unwrap(), report()).unwrap();
        }
    }
}

#[test]
fn two_shards_cover_every_job_once_and_a_rerun_skips_all() {
    let scratch = Scratch::new("batch-shards");
    let jobs = five_jobs(&scratch);
    let out = scratch.path("out");
    let halves = [Shard::new(0, 2).unwrap(), Shard::new(1, 2).unwrap()];
    let pending: Vec<Vec<usize>> = halves
        .iter()
        .map(|&s| {
            Batch::prepare(&out, &jobs, s, OutputFormat::Mp4, 0)
                .unwrap()
                .pending
        })
        .collect();
    assert_eq!(pending, [vec![0, 2, 4], vec![1, 3]]);
    for shard in halves {
        run(&out, &jobs, shard, Some(3));
    }
    let first = read_results(&out.join("results.shard-0-of-2.jsonl")).unwrap();
    let second = read_results(&out.join("results.shard-1-of-2.jsonl")).unwrap();
    let names: Vec<&str> = first
        .iter()
        .chain(&second)
        .map(|r| r.job.as_str())
        .collect();
    assert_eq!(
        names,
        [
            "line-00001",
            "line-00003",
            "line-00005",
            "line-00002",
            "line-00004"
        ]
    );
    assert_eq!(first[1].output, "line-00003.mp4");
    assert_eq!(
        (first[1].seed, first[1].prompt.as_deref()),
        (2, Some("clip 2"))
    );
    assert_eq!(first[1].key_steps.as_deref(), Some(&[0, 1][..]));
    assert_eq!(second[1].error.as_deref(), Some("it broke"));

    // The rerun retries the failed job only.
    let again: Vec<usize> = halves
        .iter()
        .flat_map(|&s| {
            Batch::prepare(&out, &jobs, s, OutputFormat::Mp4, 0)
                .unwrap()
                .pending
        })
        .collect();
    assert_eq!(again, [3]);
    run(&out, &jobs, halves[1], None);
    for shard in halves {
        let batch = Batch::prepare(&out, &jobs, shard, OutputFormat::Mp4, 0).unwrap();
        assert!(batch.pending.is_empty());
    }
    let second = read_results(&out.join("results.shard-1-of-2.jsonl")).unwrap();
    assert_eq!(second.len(), 3, "one more record, for the retried job");
    assert!(second[2].error.is_none());
}

/// A run killed after renaming an output but before recording it, while staging the next
/// and in the middle of a record: the rerun records the found output once, removes the
/// staging and the unfinished record line, and runs only what is left.
#[test]
fn a_killed_run_is_resumed_without_duplicates() {
    let scratch = Scratch::new("batch-killed");
    let jobs = five_jobs(&scratch);
    let out = scratch.path("out");
    let whole = Shard::WHOLE;
    let batch = Batch::prepare(&out, &jobs, whole, OutputFormat::Mp4, 0).unwrap();
    fs::write(batch.output(&jobs[0]), "video").unwrap();
    drop(batch);
    fs::write(out.join(".line-00002.mp4.999999.0.tmp"), "half a video").unwrap();
    let results = out.join("results.shard-0-of-1.jsonl");
    fs::write(&results, r#"{"job": "line-00009", "line"#).unwrap();

    let batch = Batch::prepare(&out, &jobs, whole, OutputFormat::Mp4, 0).unwrap();
    assert_eq!((batch.done, batch.pending.clone()), (1, vec![1, 2, 3, 4]));
    assert!(!out.join(".line-00002.mp4.999999.0.tmp").exists());
    let records = read_results(&results).unwrap();
    assert_eq!(records.len(), 1);
    assert!(records[0].resumed && records[0].error.is_none() && records[0].seconds.is_none());
    drop(batch);
    run(&out, &jobs, whole, None);
    let records = read_results(&results).unwrap();
    let mut names: Vec<&str> = records.iter().map(|r| r.job.as_str()).collect();
    names.sort();
    names.dedup();
    assert_eq!((records.len(), names.len()), (5, 5), "{records:?}");
    assert_eq!(
        names_in(&out),
        [
            "line-00001.mp4",
            "line-00002.mp4",
            "line-00003.mp4",
            "line-00004.mp4",
            "line-00005.mp4",
            "results.shard-0-of-1.jsonl"
        ]
    );
}

#[test]
fn png_outputs_are_directories_even_with_a_dot_in_the_name() {
    let out = Path::new("out");
    assert_eq!(OutputFormat::Png.output(out, "a.b"), Path::new("out/a.b/"));
    assert!(OutputFormat::Png
        .output(out, "a.b")
        .as_os_str()
        .to_string_lossy()
        .ends_with('/'));
    assert_eq!(
        OutputFormat::Gif.output(out, "a.b"),
        Path::new("out/a.b.gif")
    );
}
