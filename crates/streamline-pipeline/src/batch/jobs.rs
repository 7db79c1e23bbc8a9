//! The jobs file: one JSON object per line, each field checked where it is read, so a bad line
//! is refused with its line number and field before any job runs.

use std::collections::HashMap;
use std::path::Path;

use serde_json::{Map, Value};

use super::{
    AnimateDiffOverrides, Job, JobInputs, JobsError, PipelineKind, SharedOverrides, SvdOverrides,
};

/// The longest job `id`: it names a file, and file systems allow 255 bytes.
const MAX_ID: usize = 200;

/// Reads and checks every job of a JSONL file for `kind` (blank lines are skipped). Relative
/// image paths are relative to the jobs file's folder, so a jobs file and its images move
/// together.
pub fn read_jobs(path: &Path, kind: PipelineKind) -> Result<Vec<Job>, JobsError> {
    let text = std::fs::read_to_string(path).map_err(|error| JobsError::Read {
        path: path.to_path_buf(),
        error,
    })?;
    let base = path.parent().unwrap_or(Path::new(""));
    let mut jobs: Vec<Job> = Vec::new();
    let mut names: HashMap<String, usize> = HashMap::new();
    for (index, text) in text.lines().enumerate() {
        let line = index + 1;
        if text.trim().is_empty() {
            continue;
        }
        let error = |reason: String| JobsError::Line {
            path: path.to_path_buf(),
            line,
            reason,
        };
        let job = parse_job(text, line, kind, base).map_err(error)?;
        if let Some(first) = names.insert(job.name.clone(), line) {
            return Err(error(format!(
                "output name {:?} is already line {first}'s; give each job its own `id`",
                job.name
            )));
        }
        jobs.push(job);
    }
    if jobs.is_empty() {
        return Err(JobsError::Empty {
            path: path.to_path_buf(),
        });
    }
    Ok(jobs)
}

fn parse_job(text: &str, line: usize, kind: PipelineKind, base: &Path) -> Result<Job, String> {
    let value: Value = serde_json::from_str(text).map_err(|e| format!("not a JSON object: {e}"))?;
    let Value::Object(map) = value else {
        return Err("not a JSON object".into());
    };
    let mut fields = Fields(map);
    let name = match fields.string("id")? {
        Some(id) => check_id(id)?,
        None => format!("line-{line:05}"),
    };
    let seed = fields.integer("seed")?;
    let inputs = match kind {
        PipelineKind::Svd => svd_inputs(&mut fields, base)?,
        PipelineKind::AnimateDiff => animatediff_inputs(&mut fields)?,
    };
    fields.finish(kind)?;
    Ok(Job {
        line,
        name,
        seed,
        inputs,
    })
}

fn svd_inputs(fields: &mut Fields, base: &Path) -> Result<JobInputs, String> {
    let image = fields.required_string("image")?;
    if image.is_empty() {
        return Err("`image`: must name an image file".into());
    }
    let image = base.join(image);
    if !image.is_file() {
        return Err(format!("`image`: {} is not a file", image.display()));
    }
    let overrides = SvdOverrides {
        shared: shared_overrides(fields)?,
        min_guidance_scale: fields.number("min_guidance_scale")?,
        max_guidance_scale: fields.number("max_guidance_scale")?,
        motion_bucket_id: fields.integer("motion_bucket_id")?.map(|v| v as usize),
        noise_aug_strength: fields.non_negative("noise_aug_strength")?,
    };
    Ok(JobInputs::Svd { image, overrides })
}

fn animatediff_inputs(fields: &mut Fields) -> Result<JobInputs, String> {
    let prompt = fields.required_string("prompt")?;
    let negative_prompt = fields.string("negative_prompt")?;
    let overrides = AnimateDiffOverrides {
        shared: shared_overrides(fields)?,
        guidance_scale: fields.number("guidance_scale")?,
    };
    Ok(JobInputs::AnimateDiff {
        prompt,
        negative_prompt,
        overrides,
    })
}

fn shared_overrides(fields: &mut Fields) -> Result<SharedOverrides, String> {
    Ok(SharedOverrides {
        height: fields.count("height")?,
        width: fields.count("width")?,
        num_frames: fields.count("num_frames")?,
        num_inference_steps: fields.count("num_inference_steps")?,
        decode_chunk_size: fields.count("decode_chunk_size")?,
        fps: fields.count("fps")?,
    })
}

/// An `id` names the job's output file, so it must be a plain file name.
fn check_id(id: String) -> Result<String, String> {
    let plain = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    if id.is_empty() || id.len() > MAX_ID || id.starts_with('.') || !id.chars().all(plain) {
        return Err(format!(
            "`id` {id:?}: must be 1 to {MAX_ID} letters, digits, `-`, `_` or `.` (not first), as it names the output file"
        ));
    }
    Ok(id)
}

/// A job line's fields, taken one by one; what is left at the end is unknown.
struct Fields(Map<String, Value>);

impl Fields {
    fn take(&mut self, name: &str) -> Option<Value> {
        self.0.remove(name).filter(|v| !v.is_null())
    }

    /// The field `name` if present, as `get` reads it; `expected` says what it should be.
    fn typed<T>(
        &mut self,
        name: &str,
        expected: &str,
        get: impl Fn(&Value) -> Option<T>,
    ) -> Result<Option<T>, String> {
        match self.take(name) {
            None => Ok(None),
            Some(v) => get(&v)
                .map(Some)
                .ok_or_else(|| format!("`{name}`: expected {expected}, got {v}")),
        }
    }

    fn string(&mut self, name: &str) -> Result<Option<String>, String> {
        self.typed(name, "a string", |v| v.as_str().map(str::to_string))
    }

    fn required_string(&mut self, name: &str) -> Result<String, String> {
        self.string(name)?
            .ok_or_else(|| format!("`{name}` is missing"))
    }

    /// A non-negative integer (a seed, a motion bucket).
    fn integer(&mut self, name: &str) -> Result<Option<u64>, String> {
        self.typed(name, "a non-negative integer", Value::as_u64)
    }

    /// An integer of at least 1 (sizes, frames, steps, frame rates).
    fn count(&mut self, name: &str) -> Result<Option<usize>, String> {
        match self.integer(name)? {
            Some(0) => Err(format!("`{name}`: must be at least 1, got 0")),
            n => Ok(n.map(|n| n as usize)),
        }
    }

    /// A number (JSON has no NaN or infinity, so every number is finite).
    fn number(&mut self, name: &str) -> Result<Option<f64>, String> {
        self.typed(name, "a number", Value::as_f64)
    }

    fn non_negative(&mut self, name: &str) -> Result<Option<f64>, String> {
        match self.number(name)? {
            Some(v) if v < 0.0 => Err(format!("`{name}`: must be at least 0, got {v}")),
            v => Ok(v),
        }
    }

    fn finish(self, kind: PipelineKind) -> Result<(), String> {
        match self.0.keys().next() {
            None => Ok(()),
            Some(name) => Err(format!(
                "unknown field `{name}` for {kind} jobs (known: {})",
                kind.fields().join(", ")
            )),
        }
    }
}
