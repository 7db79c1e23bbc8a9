//! Outputs opened before a run and written after it: the path's form, the frame rate and the
//! folder's writability are checked, and the temporary output is created, before any weights
//! load, so a run that could not save its result never starts.

use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use super::staged::{locked, Staged};
use super::{
    check_frames, encode_gif, encode_mp4, encode_png, frame_name, frame_number, h264, io_error,
    mp4, VideoError,
};

/// The forms written as one file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FileForm {
    Gif,
    Mp4,
    Safetensors,
}

/// The form a video output path names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Form {
    File(FileForm),
    /// PNG frames; `existing`: into a directory that is already there.
    PngFrames {
        existing: bool,
    },
}

fn output_form(path: &Path) -> Option<Form> {
    let ends_with_separator = path
        .as_os_str()
        .as_encoded_bytes()
        .last()
        .is_some_and(|&b| std::path::is_separator(char::from(b)));
    if path.is_dir() {
        return Some(Form::PngFrames { existing: true });
    }
    if ends_with_separator {
        return Some(Form::PngFrames { existing: false });
    }
    match path.extension() {
        None => Some(Form::PngFrames { existing: false }),
        Some(ext) if ext.eq_ignore_ascii_case("gif") => Some(Form::File(FileForm::Gif)),
        Some(ext) if ext.eq_ignore_ascii_case("mp4") => Some(Form::File(FileForm::Mp4)),
        Some(ext) if ext.eq_ignore_ascii_case("safetensors") => {
            Some(Form::File(FileForm::Safetensors))
        }
        Some(_) => None,
    }
}

/// The staging parent and the output's name; the parent may not exist yet (staging creates
/// it, and removes it again if the output is never written).
fn parent_and_name(path: &Path) -> Result<(PathBuf, &OsStr), VideoError> {
    let name = path
        .file_name()
        .ok_or_else(|| VideoError::UnsupportedPath {
            path: path.to_path_buf(),
        })?;
    let parent = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
        _ => PathBuf::from("."),
    };
    Ok((parent, name))
}

const STAGING: &str = "creating a temporary file beside it (its folder must be writable)";

fn stage_file(path: &Path) -> Result<(Staged, File), VideoError> {
    let (parent, name) = parent_and_name(path)?;
    Staged::file(&parent, name).map_err(|error| io_error(path, STAGING, error))
}

/// What a video output writes into its staging.
#[derive(Debug)]
enum Target {
    /// A GIF, MP4 or safetensors file, staged as one file kept open for the final write.
    File { file: File, form: FileForm },
    /// PNG frames in a staged directory; `existing`: moved into a directory already there.
    Frames { existing: bool },
}

/// A video output, checked and staged: see [`super::write_video`] for the forms.
#[derive(Debug)]
pub struct VideoOutput {
    path: PathBuf,
    fps: f64,
    form: Form,
    staged: Staged,
    target: Target,
}

/// `path`'s form, with `fps` checked for the forms that time their frames.
fn checked_form(path: &Path, fps: f64) -> Result<Form, VideoError> {
    let form = output_form(path).ok_or_else(|| VideoError::UnsupportedPath {
        path: path.to_path_buf(),
    })?;
    let rule = match form {
        Form::File(FileForm::Gif) if !(fps.is_finite() && fps > 0.0) => "positive and finite",
        Form::File(FileForm::Mp4) if !mp4::fps_fits(fps) => "between 0.001 and 1000000 for an MP4",
        _ => return Ok(form),
    };
    Err(VideoError::Fps {
        path: path.to_path_buf(),
        fps,
        rule,
    })
}

/// Refuses frames of `height` x `width` that `form` cannot hold: a GIF's sides are 16-bit,
/// H.264 takes 16 x 16 up to 3840 x 2160.
fn check_size(form: Form, path: &Path, height: usize, width: usize) -> Result<(), VideoError> {
    let reason = match form {
        Form::File(FileForm::Mp4) => match h264::size_rule(height, width) {
            Some(rule) => rule,
            None => return Ok(()),
        },
        Form::File(FileForm::Gif) if height.max(width) > usize::from(u16::MAX) => {
            format!("a GIF frame's sides are at most {}", u16::MAX)
        }
        _ => return Ok(()),
    };
    Err(VideoError::Frames {
        path: path.to_path_buf(),
        reason: format!("frames of {height}x{width} do not fit: {reason}"),
    })
}

/// Checks, without creating anything, that `path` names an output form that takes frames of
/// `(height, width)` at `fps`: what [`VideoOutput::create`] and [`VideoOutput::check_size`]
/// would refuse, for outputs that are made later (a batch's).
pub fn check_output(
    path: &Path,
    fps: f64,
    (height, width): (usize, usize),
) -> Result<(), VideoError> {
    check_size(checked_form(path, fps)?, path, height, width)
}

impl VideoOutput {
    /// Checks `path`'s form (and `fps` for a GIF or an MP4) and creates its temporary output,
    /// with any missing parent directories; nothing is left behind if it is dropped unwritten.
    pub fn create(path: &Path, fps: f64) -> Result<Self, VideoError> {
        let form = checked_form(path, fps)?;
        let (staged, target) = match form {
            Form::PngFrames { existing } => {
                (stage_frames(path, existing)?, Target::Frames { existing })
            }
            Form::File(form) => {
                let (staged, file) = stage_file(path)?;
                (staged, Target::File { file, form })
            }
        };
        Ok(VideoOutput {
            path: path.to_path_buf(),
            fps,
            form,
            staged,
            target,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Refuses frames of `height` x `width` that this form cannot hold (a GIF's sides are
    /// 16-bit, H.264 takes 16 x 16 up to 3840 x 2160), so a run checks its size before its
    /// inference.
    pub fn check_size(&self, height: usize, width: usize) -> Result<(), VideoError> {
        check_size(self.form, &self.path, height, width)
    }

    /// Whether writing this output would replace the existing file `input`: it is the output
    /// file itself, or a frame file the output directory would receive.
    pub fn overwrites(&self, input: &Path) -> bool {
        match self.target {
            Target::Frames { .. } => input.canonicalize().is_ok_and(|input| {
                input.parent().map(Path::to_path_buf) == self.path.canonicalize().ok()
                    && input.file_name().is_some_and(|n| frame_number(n).is_some())
            }),
            Target::File { .. } => same_file(&self.path, input),
        }
    }

    /// Writes frames `(F, 3, H, W)`, floats in `[0, 1]`, and moves them into place.
    pub fn write(self, frames: &Tensor) -> Result<(), VideoError> {
        let count = check_frames(frames, &self.path)?;
        let VideoOutput {
            path,
            fps,
            staged,
            target,
            ..
        } = self;
        let (file, bytes) = match target {
            Target::Frames { existing } => {
                return write_frames(frames, count, &path, staged, existing)
            }
            Target::File { file, form } => {
                let bytes = match form {
                    FileForm::Gif => encode_gif(frames, count, fps, &path)?,
                    FileForm::Mp4 => encode_mp4(frames, count, fps, &path)?,
                    FileForm::Safetensors => safetensors_bytes(frames, &path)?,
                };
                (file, bytes)
            }
        };
        write_staged(file, &bytes, &path)?;
        staged
            .commit(&path)
            .map_err(|error| io_error(&path, "moving the output into place", error))
    }
}

/// The frames as f32 under `frames`, in memory: the safetensors crate's own file writer goes
/// through a private (0600) temporary file of its own, which would escape the umask and the
/// staging.
fn safetensors_bytes(frames: &Tensor, path: &Path) -> Result<Vec<u8>, VideoError> {
    let frames = frames
        .to_device(&Device::Cpu)
        .and_then(|t| t.to_dtype(DType::F32))
        .and_then(|t| t.contiguous())
        .map_err(|error| VideoError::Tensor {
            path: path.to_path_buf(),
            error,
        })?;
    safetensors::serialize([("frames", &frames)], None).map_err(|e| VideoError::Frames {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

fn write_frames(
    frames: &Tensor,
    count: usize,
    path: &Path,
    staged: Staged,
    existing: bool,
) -> Result<(), VideoError> {
    let names: Vec<String> = (0..count).map(frame_name).collect();
    for (index, name) in names.iter().enumerate() {
        let png = encode_png(frames, index, path)?;
        locked(|| fs::write(staged.path.join(name), &png))
            .map_err(|error| io_error(path, "writing a frame", error))?;
    }
    if !existing {
        return staged
            .commit(path)
            .map_err(|error| io_error(path, "moving the frames into place", error));
    }
    // One lock for all the moves, so an interrupt never leaves half a video moved in.
    locked(|| {
        names
            .iter()
            .try_for_each(|name| fs::rename(staged.path.join(name), path.join(name)))
    })
    .map_err(|error| io_error(path, "moving a frame into place", error))?;
    warn_about_later_frames(path, count);
    Ok(())
}

/// Frames past this video's end, from an earlier and longer one or the user's own, are left as
/// they are (nothing this run did not write is deleted); say so, since they now follow it.
fn warn_about_later_frames(dir: &Path, count: usize) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    let mut later: Vec<usize> = entries
        .filter_map(|e| frame_number(&e.ok()?.file_name()))
        .filter(|&n| n >= count)
        .collect();
    later.sort_unstable();
    let files = match later.as_slice() {
        [] => return,
        [one] => frame_name(*one),
        [first, .., last] => format!(
            "{} .. {} ({} files)",
            frame_name(*first),
            frame_name(*last),
            later.len()
        ),
    };
    tracing::warn!(
        "{}: {files}, past this video's {count} frames, were already there and are left as they are",
        dir.display()
    );
}

/// The staging directory of PNG frames: inside an existing directory (which keeps the moves
/// on one file system without needing the target's name or parent), else beside the target.
fn stage_frames(path: &Path, existing: bool) -> Result<Staged, VideoError> {
    const ACTION: &str = "creating a temporary directory (the folder must be writable)";
    if existing {
        return Staged::dir(path, OsStr::new("frames")).map_err(|e| io_error(path, ACTION, e));
    }
    if fs::symlink_metadata(path).is_ok() {
        return Err(VideoError::NotADirectory {
            path: path.to_path_buf(),
        });
    }
    let (parent, name) = parent_and_name(path)?;
    Staged::dir(&parent, name).map_err(|e| io_error(path, ACTION, e))
}

/// Writes `bytes` into the staged `file` and flushes it, so a write error is never lost.
fn write_staged(mut file: File, bytes: &[u8], path: &Path) -> Result<(), VideoError> {
    locked(|| file.write_all(bytes).and_then(|()| file.flush()))
        .map_err(|error| io_error(path, "writing", error))
}

/// Whether `a` and `b` name one existing file.
fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// A plain file output (a Step Rehash schedule), checked and staged like a video's.
#[derive(Debug)]
pub struct FileOutput {
    path: PathBuf,
    staged: Staged,
    file: File,
}

impl FileOutput {
    /// Refuses a directory, and creates the temporary file (and any missing parents).
    pub fn create(path: &Path) -> Result<Self, VideoError> {
        if path.is_dir() {
            return Err(VideoError::IsADirectory {
                path: path.to_path_buf(),
            });
        }
        let (staged, file) = stage_file(path)?;
        Ok(FileOutput {
            path: path.to_path_buf(),
            staged,
            file,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether writing this output would replace the existing file `input`.
    pub fn overwrites(&self, input: &Path) -> bool {
        same_file(&self.path, input)
    }

    /// Writes `bytes` and moves the file into place.
    pub fn write(self, bytes: &[u8]) -> Result<(), VideoError> {
        write_staged(self.file, bytes, &self.path)?;
        self.staged
            .commit(&self.path)
            .map_err(|error| io_error(&self.path, "moving the output into place", error))
    }
}
