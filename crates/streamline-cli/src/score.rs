//! `streamline score clip-sim`: how well videos follow their prompts (docs/clip-sim.md), for
//! one video or every video of batch results files.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use serde_json::json;
use streamline_pipeline::batch::read_results;
use streamline_pipeline::clip_sim::ClipSim;
use streamline_pipeline::video::read_video;

use crate::DeviceArg;

#[derive(Subcommand, Debug)]
pub enum ScoreCommand {
    /// The mean over frames of the cosine similarity between each frame's CLIP image
    /// embedding and the prompt's text embedding (in [-1, 1]; not scaled by 100).
    ClipSim(ClipSimArgs),
}

#[derive(Args, Debug)]
pub struct ClipSimArgs {
    /// A transformers CLIPModel folder (config.json with text_config and vision_config,
    /// model.safetensors, tokenizer files, preprocessor_config.json), e.g.
    /// openai/clip-vit-base-patch32.
    #[arg(long)]
    model: PathBuf,
    /// A video: `.mp4`, `.gif`, `.safetensors` or a directory of PNG frames.
    #[arg(long, requires = "prompt", conflicts_with = "results")]
    video: Option<PathBuf>,
    /// The prompt the --video was made from.
    #[arg(long, requires = "video")]
    prompt: Option<String>,
    /// Results files of `streamline batch animatediff` (every shard's, e.g.
    /// `out/results.shard-*.jsonl`): each video written is scored against its job's prompt; a
    /// job recorded twice counts once.
    #[arg(long = "results", num_args = 1.., required_unless_present = "video")]
    results: Vec<PathBuf>,
    /// `cpu`, `cuda[:N]` or `metal[:N]`.
    #[arg(long, default_value = "cpu")]
    device: DeviceArg,
    /// Print JSON (each video's frames' similarities, its CLIP-SIM, the mean) for scripts.
    #[arg(long)]
    json: bool,
}

/// A video to score and its prompt.
struct Item {
    name: String,
    video: PathBuf,
    prompt: String,
    /// Where it was named, for errors.
    from: String,
}

pub fn run(command: ScoreCommand) -> Result<()> {
    let ScoreCommand::ClipSim(args) = command;
    let items = match (&args.video, &args.prompt) {
        (Some(video), Some(prompt)) => vec![Item {
            name: video.display().to_string(),
            video: video.clone(),
            prompt: prompt.clone(),
            from: "--video".into(),
        }],
        _ => items_of_results(&args.results)?,
    };
    for item in &items {
        if std::fs::symlink_metadata(&item.video).is_err() {
            bail!("{} {}: no such video", item.from, item.video.display());
        }
    }
    let device = args.device.device().map_err(anyhow::Error::msg)?;
    let scorer = ClipSim::load(&args.model, &device)
        .with_context(|| format!("--model {}", args.model.display()))?;
    let mut scores = Vec::with_capacity(items.len());
    for item in &items {
        let frames = read_video(&item.video)?.frames;
        let score = scorer
            .score(&frames, &item.prompt)
            .with_context(|| item.video.display().to_string())?;
        if !args.json {
            println!(
                "{:.4}  {} ({} frames)",
                score.clip_sim,
                item.name,
                frames.len()
            );
        }
        scores.push(score);
    }
    let mean = scores.iter().map(|s| s.clip_sim).sum::<f64>() / scores.len() as f64;
    if args.json {
        let videos: Vec<_> = items
            .iter()
            .zip(&scores)
            .map(|(item, s)| {
                json!({"video": item.name, "prompt": item.prompt, "clip_sim": s.clip_sim, "frames": s.frames})
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({"videos": videos, "mean": mean}))?
        );
    } else if items.len() > 1 {
        println!("{mean:.4}  mean CLIP-SIM of {} videos", items.len());
    }
    Ok(())
}

/// Every written video of the results files with its prompt, each job once (its last
/// successful record), outputs found beside their results file.
fn items_of_results(files: &[PathBuf]) -> Result<Vec<Item>> {
    let mut jobs: BTreeMap<String, Item> = BTreeMap::new();
    for file in files {
        let records =
            read_results(file).with_context(|| format!("--results {}", file.display()))?;
        let dir = file.parent().unwrap_or(Path::new(""));
        for record in records.into_iter().filter(|r| r.error.is_none()) {
            let Some(prompt) = record.prompt else {
                bail!(
                    "--results {}: job {} (line {}) has no prompt: CLIP-SIM scores text-to-video jobs",
                    file.display(),
                    record.job,
                    record.line
                );
            };
            let item = Item {
                name: record.job.clone(),
                video: dir.join(&record.output),
                prompt,
                from: format!("--results {} job {}", file.display(), record.job),
            };
            jobs.insert(record.job, item);
        }
    }
    if jobs.is_empty() {
        bail!("the results files record no video written");
    }
    Ok(jobs.into_values().collect())
}
