//! `streamline batch svd | animatediff JOBS.jsonl --output-dir DIR`: many videos from one
//! model load, one shard of the jobs per process (docs/batch.md).
//!
//! Every line of the jobs file is read and checked before any weights load (its fields, its
//! settings against the model's configs, the run's plan and memory, its output's form),
//! whichever shard owns it, so every shard refuses a bad file alike. Then the shard's jobs run
//! one after another, each recorded in the shard's results file whether it wrote its output
//! or failed; a failed job does not stop the batch, and the exit status says whether any did.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use clap::{Args, Subcommand, ValueEnum};
use streamline_pipeline::animatediff::{AnimateDiff, AnimateDiffSettings};
use streamline_pipeline::batch::{
    read_jobs, Batch, Job, JobInputs, JobReport, OutputFormat, PipelineKind, Shard,
};
use streamline_pipeline::svd::{unit_noise, RunReport, SvdSettings};
use streamline_pipeline::video::{check_output, VideoOutput};
use streamline_rehash::RehashArg;

use crate::animatediff::{warn_if_empty, AnimateDiffCommon, Prepared};
use crate::checks::{positive, Source};
use crate::progress::{jobs_bar, Progress};
use crate::session::{Checked, Session, SvdCommon};

#[derive(Subcommand, Debug)]
pub enum BatchCommand {
    /// Image-to-video jobs: `{"image": "cat.png", "seed": 1, ...}` per line, with optional
    /// `id` and per-job height, width, num_frames, num_inference_steps, min_guidance_scale,
    /// max_guidance_scale, fps, motion_bucket_id, noise_aug_strength, decode_chunk_size.
    Svd(SvdBatchArgs),
    /// Text-to-video jobs: `{"prompt": "a boat", "negative_prompt": "blurry", "seed": 1, ...}`
    /// per line, with optional `id` and per-job height, width, num_frames,
    /// num_inference_steps, guidance_scale, decode_chunk_size, fps.
    Animatediff(AnimateDiffBatchArgs),
}

/// The form of a batch's outputs.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum FormatArg {
    /// H.264 in MP4 (`NAME.mp4`).
    Mp4,
    /// Animated GIF (`NAME.gif`).
    Gif,
    /// PNG frames in a directory per job (`NAME/`).
    Png,
    /// Raw f32 frames (`NAME.safetensors`).
    Safetensors,
}

impl From<FormatArg> for OutputFormat {
    fn from(f: FormatArg) -> OutputFormat {
        match f {
            FormatArg::Mp4 => OutputFormat::Mp4,
            FormatArg::Gif => OutputFormat::Gif,
            FormatArg::Png => OutputFormat::Png,
            FormatArg::Safetensors => OutputFormat::Safetensors,
        }
    }
}

/// The flags every batch has.
#[derive(Args, Debug)]
pub struct BatchArgs {
    /// The jobs: one JSON object per line; relative image paths are relative to this file's
    /// folder.
    jobs: PathBuf,
    /// Where each job's output (named after its `id`, else `line-NNNNN`) and this shard's
    /// results file (`results.shard-I-of-N.jsonl`) go; created if missing.
    #[arg(long)]
    output_dir: PathBuf,
    #[arg(long, value_enum, default_value = "mp4")]
    format: FormatArg,
    /// Run shard I of N (from 0): the jobs whose place in the file is I modulo N. Defaults to
    /// the Slurm array task (SLURM_ARRAY_TASK_ID of SLURM_ARRAY_TASK_COUNT), else the
    /// Kubernetes Indexed Job's JOB_COMPLETION_INDEX of --shard-count, else every job.
    #[arg(long, value_name = "I/N")]
    shard: Option<Shard>,
    /// The shard count of a Kubernetes Indexed Job (its `completions`); defaults to
    /// $STREAMLINE_SHARD_COUNT.
    #[arg(long, value_parser = positive, conflicts_with = "shard")]
    shard_count: Option<usize>,
}

#[derive(Args, Debug)]
pub struct SvdBatchArgs {
    #[command(flatten)]
    batch: BatchArgs,
    #[command(flatten)]
    common: SvdCommon,
    /// Step Rehash for every job: `off`, `uniform:K`, `auto:THRESHOLD` or a schedule file
    /// (for the jobs' step count).
    #[arg(long, default_value = "off")]
    rehash: RehashArg,
}

#[derive(Args, Debug)]
pub struct AnimateDiffBatchArgs {
    #[command(flatten)]
    batch: BatchArgs,
    #[command(flatten)]
    common: AnimateDiffCommon,
}

pub fn run(command: BatchCommand) -> Result<()> {
    match command {
        BatchCommand::Svd(args) => {
            let pipeline = SvdBatch {
                checked: args.common.prepare()?,
                rehash: args.rehash,
                session: None,
            };
            run_batch(&args.batch, PipelineKind::Svd, pipeline, args.common.seed)
        }
        BatchCommand::Animatediff(args) => {
            let pipeline = AnimateDiffBatch {
                prepared: args.common.prepare()?,
                common: &args.common,
                loaded: None,
            };
            run_batch(
                &args.batch,
                PipelineKind::AnimateDiff,
                pipeline,
                args.common.seed,
            )
        }
    }
}

/// What a batch needs of its pipeline: each job's settings, checked before any weights load,
/// then the model, loaded once, and one video per job.
trait BatchPipeline {
    type Settings: Clone + PartialEq;

    /// The batch's settings with `job`'s overrides, and its output's frame rate.
    fn job_settings(&self, job: &Job) -> (Self::Settings, usize);
    /// Refuses what the configs, the plan or the machine cannot run.
    fn check(&self, settings: Self::Settings) -> Result<Self::Settings>;
    /// (height, width) of the frames.
    fn size(settings: &Self::Settings) -> (usize, usize);
    fn load(&mut self) -> Result<()>;
    fn generate(
        &self,
        job: &Job,
        settings: &Self::Settings,
        seed: u64,
        progress: &mut Progress,
    ) -> Result<(Tensor, RunReport)>;
}

/// A job's checked settings and its output's frame rate.
struct Planned<S> {
    settings: S,
    fps: usize,
}

fn run_batch<P: BatchPipeline>(
    args: &BatchArgs,
    kind: PipelineKind,
    mut pipeline: P,
    default_seed: u64,
) -> Result<()> {
    let (shard, from) = Shard::resolve(args.shard, args.shard_count, |n| std::env::var(n).ok())?;
    let jobs = read_jobs(&args.jobs, kind)?;
    let format = OutputFormat::from(args.format);
    let planned = check_jobs(&pipeline, args, format, &jobs)?;
    let batch = Batch::prepare(&args.output_dir, &jobs, shard, format, default_seed)
        .with_context(|| format!("--output-dir {}", args.output_dir.display()))?;
    let pending = batch.pending.len();
    tracing::info!(
        "shard {shard} ({from}): {} of {} jobs, {} done by an earlier run, {pending} to run",
        pending + batch.done,
        jobs.len(),
        batch.done
    );
    if pending == 0 {
        return Ok(());
    }
    pipeline.load()?;
    let failed = run_jobs(&pipeline, batch, &jobs, &planned, default_seed)?;
    if failed > 0 {
        let results = args.output_dir.join(shard.results_name());
        bail!(
            "{failed} of {pending} jobs failed; each error is in {}",
            results.display()
        );
    }
    Ok(())
}

/// Checks every job, each distinct setting once (a batch of thousands usually has a few),
/// and each output's form, frame rate and size.
fn check_jobs<P: BatchPipeline>(
    pipeline: &P,
    args: &BatchArgs,
    format: OutputFormat,
    jobs: &[Job],
) -> Result<Vec<Planned<P::Settings>>> {
    let mut checked: Vec<(P::Settings, P::Settings)> = Vec::new();
    let mut planned = Vec::with_capacity(jobs.len());
    for job in jobs {
        let at = || format!("{} line {}", args.jobs.display(), job.line);
        let (settings, fps) = pipeline.job_settings(job);
        let settings = match checked.iter().find(|(asked, _)| *asked == settings) {
            Some((_, done)) => done.clone(),
            None => {
                let done = pipeline.check(settings.clone()).with_context(at)?;
                checked.push((settings, done.clone()));
                done
            }
        };
        let output = format.output(&args.output_dir, &job.name);
        check_output(&output, fps as f64, P::size(&settings)).with_context(at)?;
        if let Some(prompt) = job.prompt() {
            warn_if_empty(prompt, &format!("{}: `prompt`", at()));
        }
        planned.push(Planned { settings, fps });
    }
    Ok(planned)
}

/// Runs the shard's pending jobs under a bar over them; returns how many failed.
fn run_jobs<P: BatchPipeline>(
    pipeline: &P,
    mut batch: Batch,
    jobs: &[Job],
    planned: &[Planned<P::Settings>],
    default_seed: u64,
) -> Result<usize> {
    let bar = jobs_bar(batch.pending.len());
    let mut failed = 0;
    for place in batch.pending.clone() {
        let (job, plan) = (&jobs[place], &planned[place]);
        let seed = job.seed.unwrap_or(default_seed);
        let output = batch.output(job);
        let start = Instant::now();
        let outcome = VideoOutput::create(&output, plan.fps as f64)
            .map_err(anyhow::Error::from)
            .and_then(|out| {
                let mut progress = Progress::transient("");
                let (video, report) =
                    pipeline.generate(job, &plan.settings, seed, &mut progress)?;
                out.write(&video)?;
                Ok(report)
            });
        let seconds = start.elapsed().as_secs_f64();
        let outcome = match outcome {
            Ok(report) => {
                tracing::info!("{}: wrote {} in {seconds:.1} s", job.name, output.display());
                Ok(JobReport {
                    seconds,
                    peak_bytes: peak_bytes(&report),
                    key_steps: report.key_steps,
                })
            }
            Err(e) => {
                failed += 1;
                tracing::warn!("{} (line {}) failed: {e:#}", job.name, job.line);
                Err(format!("{e:#}"))
            }
        };
        batch
            .record(job, seed, outcome)
            .with_context(|| format!("appending to {}", batch.results_path().display()))?;
        bar.inc(1);
    }
    bar.finish();
    Ok(failed)
}

/// The run's highest measured phase peak, else its highest live-tensor peak.
fn peak_bytes(report: &RunReport) -> usize {
    let measured = report.phases.iter().filter_map(|p| p.measured).max();
    measured.unwrap_or(report.unet_peak_bytes.max(report.decode_peak_bytes))
}

struct SvdBatch {
    checked: Checked,
    rehash: RehashArg,
    session: Option<Session>,
}

impl BatchPipeline for SvdBatch {
    type Settings = SvdSettings;

    fn job_settings(&self, job: &Job) -> (SvdSettings, usize) {
        let JobInputs::Svd { overrides, .. } = &job.inputs else {
            unreachable!("an svd jobs file holds svd jobs");
        };
        let settings = overrides.apply(&self.checked.settings);
        let fps = settings.fps;
        (settings, fps)
    }

    fn check(&self, settings: SvdSettings) -> Result<SvdSettings> {
        let rehash = self.rehash.rehash(settings.num_inference_steps)?;
        let settings = SvdSettings { rehash, ..settings };
        self.checked.check_settings(settings, Source::Job)
    }

    fn size(settings: &SvdSettings) -> (usize, usize) {
        (settings.height, settings.width)
    }

    fn load(&mut self) -> Result<()> {
        self.session = Some(self.checked.load()?);
        Ok(())
    }

    fn generate(
        &self,
        job: &Job,
        settings: &SvdSettings,
        seed: u64,
        progress: &mut Progress,
    ) -> Result<(Tensor, RunReport)> {
        let (JobInputs::Svd { image, .. }, Some(session)) = (&job.inputs, &self.session) else {
            unreachable!("svd jobs run once the model is loaded");
        };
        let inputs = self.checked.inputs(settings, image, seed, None)?;
        session.generate_with(settings, &inputs, self.checked.optimization, progress)
    }
}

struct AnimateDiffBatch<'a> {
    common: &'a AnimateDiffCommon,
    prepared: Prepared,
    loaded: Option<(AnimateDiff, Device)>,
}

impl BatchPipeline for AnimateDiffBatch<'_> {
    type Settings = AnimateDiffSettings;

    fn job_settings(&self, job: &Job) -> (AnimateDiffSettings, usize) {
        let JobInputs::AnimateDiff { overrides, .. } = &job.inputs else {
            unreachable!("an animatediff jobs file holds animatediff jobs");
        };
        let fps = overrides.shared.fps.unwrap_or(self.common.fps);
        (overrides.apply(&self.prepared.settings), fps)
    }

    fn check(&self, settings: AnimateDiffSettings) -> Result<AnimateDiffSettings> {
        self.prepared.check_settings(settings, Source::Job)
    }

    fn size(settings: &AnimateDiffSettings) -> (usize, usize) {
        (settings.height, settings.width)
    }

    fn load(&mut self) -> Result<()> {
        self.loaded = Some(self.common.load(&self.prepared)?);
        Ok(())
    }

    fn generate(
        &self,
        job: &Job,
        settings: &AnimateDiffSettings,
        seed: u64,
        progress: &mut Progress,
    ) -> Result<(Tensor, RunReport)> {
        let (
            JobInputs::AnimateDiff {
                prompt,
                negative_prompt,
                ..
            },
            Some((pipe, device)),
        ) = (&job.inputs, &self.loaded)
        else {
            unreachable!("animatediff jobs run once the models are loaded");
        };
        let shape = self.prepared.latent_shape(settings)?;
        let latents = unit_noise(shape.as_slice(), seed, &Device::Cpu)?.to_device(device)?;
        let out = pipe.generate(
            prompt,
            negative_prompt.as_deref(),
            settings,
            &latents,
            self.prepared.optimization,
            &mut |stage| progress.update(stage),
        )?;
        progress.finish();
        Ok(out)
    }
}
