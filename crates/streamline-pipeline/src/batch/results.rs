//! A shard's run in an output folder: what is done already, what is left, and the results
//! file it appends to.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{Job, OutputFormat, Shard};
use crate::video::remove_leftovers;

/// What one job's run gives its record.
#[derive(Clone, Debug, PartialEq)]
pub struct JobReport {
    pub seconds: f64,
    /// The run's measured peak: its highest phase's heap bytes, resident weights included, on
    /// the CPU; its live-tensor peak elsewhere.
    pub peak_bytes: usize,
    /// The denoising steps that ran the whole UNet (all of them without Step Rehash).
    pub key_steps: Vec<usize>,
}

/// One line of a results file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// The job's output name (its `id`, or `line-NNNNN`).
    pub job: String,
    /// Its line in the jobs file.
    pub line: usize,
    /// The output, relative to the results file's folder.
    pub output: String,
    pub seed: u64,
    /// The prompt of a text-to-video job, so the results file alone can be scored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    pub seconds: Option<f64>,
    pub peak_bytes: Option<usize>,
    pub key_steps: Option<Vec<usize>>,
    /// Why the job failed; `None` when its output was written.
    pub error: Option<String>,
    /// The output was found on a rerun, written by a run that ended before recording it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub resumed: bool,
}

/// One shard's run of a batch in its output folder.
#[derive(Debug)]
pub struct Batch {
    dir: PathBuf,
    format: OutputFormat,
    results_path: PathBuf,
    results: File,
    /// This shard's jobs still to run (places in the jobs list), in file order.
    pub pending: Vec<usize>,
    /// This shard's jobs whose output an earlier run wrote.
    pub done: usize,
}

impl Batch {
    /// Creates `dir` if needed, removes the staging leftovers of this shard's outputs (a run
    /// killed without a chance to clean up), and sorts the shard's jobs into done (the output
    /// exists; recorded now if the earlier run could not) and pending.
    pub fn prepare(
        dir: &Path,
        jobs: &[Job],
        shard: Shard,
        format: OutputFormat,
        default_seed: u64,
    ) -> io::Result<Batch> {
        fs::create_dir_all(dir)?;
        let results_path = dir.join(shard.results_name());
        let recorded: HashSet<String> = match fs::metadata(&results_path) {
            Ok(_) => read_results(&results_path)?
                .into_iter()
                .filter(|r| r.error.is_none())
                .map(|r| r.job)
                .collect(),
            Err(_) => HashSet::new(),
        };
        let mut batch = Batch {
            results: open_for_append(&results_path)?,
            results_path,
            dir: dir.to_path_buf(),
            format,
            pending: Vec::new(),
            done: 0,
        };
        for (place, job) in jobs.iter().enumerate().filter(|(i, _)| shard.owns(*i)) {
            let output = batch.output(job);
            let removed = remove_leftovers(&output)?;
            if removed > 0 {
                tracing::info!(
                    "{}: removed {removed} leftovers of an interrupted run",
                    output.display()
                );
            }
            if fs::symlink_metadata(&output).is_err() {
                batch.pending.push(place);
                continue;
            }
            batch.done += 1;
            if !recorded.contains(&job.name) {
                let mut record = batch.record_for(job, job.seed.unwrap_or(default_seed));
                record.resumed = true;
                batch.append(&record)?;
            }
        }
        Ok(batch)
    }

    /// Where `job`'s output goes.
    pub fn output(&self, job: &Job) -> PathBuf {
        self.format.output(&self.dir, &job.name)
    }

    pub fn results_path(&self) -> &Path {
        &self.results_path
    }

    /// Appends the record of `job`'s run with `seed`.
    pub fn record(
        &mut self,
        job: &Job,
        seed: u64,
        outcome: Result<JobReport, String>,
    ) -> io::Result<()> {
        let mut record = self.record_for(job, seed);
        match outcome {
            Ok(report) => {
                record.seconds = Some(report.seconds);
                record.peak_bytes = Some(report.peak_bytes);
                record.key_steps = Some(report.key_steps);
            }
            Err(error) => record.error = Some(error),
        }
        self.append(&record)
    }

    fn record_for(&self, job: &Job, seed: u64) -> Record {
        let output = self.output(job);
        let output = output.strip_prefix(&self.dir).unwrap_or(&output);
        Record {
            job: job.name.clone(),
            line: job.line,
            output: output.to_string_lossy().into_owned(),
            seed,
            prompt: job.prompt().map(str::to_string),
            seconds: None,
            peak_bytes: None,
            key_steps: None,
            error: None,
            resumed: false,
        }
    }

    /// One write per line, synced, so a record is whole or absent whatever stops the process
    /// afterwards.
    fn append(&mut self, record: &Record) -> io::Result<()> {
        let mut line = serde_json::to_string(record).map_err(io::Error::other)?;
        line.push('\n');
        self.results.write_all(line.as_bytes())?;
        self.results.sync_data()
    }
}

/// Opens a results file for appending, first dropping a line a killed run left unfinished
/// (it holds no whole record), so that every record starts a line.
fn open_for_append(path: &Path) -> io::Result<File> {
    let mut file = OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .open(path)?;
    let mut text = Vec::new();
    file.read_to_end(&mut text)?;
    let whole = text.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    if whole < text.len() {
        tracing::warn!("{}: dropped an unfinished last line", path.display());
        file.set_len(whole as u64)?;
    }
    Ok(file)
}

/// Every record of a results file, in order. A line a killed run left unfinished is skipped
/// with a warning; any other line that is not a record is an error naming it.
pub fn read_results(path: &Path) -> io::Result<Vec<Record>> {
    let text = fs::read_to_string(path)?;
    let mut records = Vec::new();
    for (index, line) in text.split_inclusive('\n').enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Record>(line) {
            Ok(record) => records.push(record),
            Err(_) if !line.ends_with('\n') => {
                tracing::warn!(
                    "{} line {}: an unfinished record (the run was killed while writing it), skipped",
                    path.display(),
                    index + 1
                );
            }
            Err(e) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "{} line {}: not a results record: {e}",
                        path.display(),
                        index + 1
                    ),
                ))
            }
        }
    }
    Ok(records)
}
