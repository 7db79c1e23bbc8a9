//! Image input and video output of the jobs.
//!
//! Pixel conversions follow diffusers' image processor in both directions, so an image loaded
//! here conditions the model with the numbers diffusers would feed it, and frames written here
//! are byte for byte the PIL frames diffusers would produce from the same decoder output.
//!
//! Every output is built under a temporary name next to its target and renamed into place, so a
//! failed run leaves no truncated GIF or partial frame sequence behind (into an existing
//! directory, finished frames move one by one; see [`write_video`]).

use std::ffi::{OsStr, OsString};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use candle_core::{DType, Device, Tensor};
use image::codecs::gif::{GifEncoder, Repeat};
use image::codecs::png::PngEncoder;
use image::{
    Delay, DynamicImage, ExtendedColorType, Frame, ImageEncoder, ImageReader, Rgb, RgbImage,
};
use thiserror::Error;

/// Every variant carries the path the caller gave, so the message alone says which input or
/// output failed.
#[derive(Debug, Error)]
pub enum VideoError {
    #[error("{path}: cannot read image: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: image::ImageError,
    },
    #[error("{path}: unsupported video output; write to a `.gif` file (animated GIF), a `.safetensors` file (f32 frames under `frames`) or a directory for PNG frames (an existing directory, or a path ending in `/` or without an extension)")]
    UnsupportedPath { path: PathBuf },
    #[error("{path}: exists and is not a directory, so it cannot hold PNG frames")]
    NotADirectory { path: PathBuf },
    #[error("{path}: {reason}")]
    Frames { path: PathBuf, reason: String },
    #[error("{path}: frame rate must be positive and finite, got {fps}")]
    Fps { path: PathBuf, fps: f64 },
    #[error("{path}: {source}")]
    Tensor {
        path: PathBuf,
        #[source]
        source: candle_core::Error,
    },
    #[error("{path}: cannot encode: {source}")]
    Encode {
        path: PathBuf,
        #[source]
        source: image::ImageError,
    },
    #[error("{path}: {action}: {source}")]
    Io {
        path: PathBuf,
        action: &'static str,
        #[source]
        source: io::Error,
    },
}

/// Reads an image as a (3, H, W) f32 tensor in [0, 1] on the CPU, resized to `size`
/// (height, width) when given and different.
///
/// The resize runs on the 8-bit image with a Lanczos-3 filter, as diffusers resizes the PIL
/// image with `Image.LANCZOS` before converting; the two Lanczos implementations differ
/// slightly, so for bit-level comparisons pass an image that already has the target size.
/// The format is sniffed from the content, so a mislabelled file still loads; a GIF gives its
/// first frame. Alpha is dropped without compositing, as PIL's `convert("RGB")` in diffusers'
/// `load_image` does, and values are `u8 / 255` in f32 as in diffusers' `pil_to_numpy`.
pub fn load_image(path: &Path, size: Option<(usize, usize)>) -> Result<Tensor, VideoError> {
    let read = |source| VideoError::Read {
        path: path.to_path_buf(),
        source,
    };
    let image = ImageReader::open(path)
        .and_then(|reader| reader.with_guessed_format())
        .map_err(|e| read(image::ImageError::IoError(e)))?
        .decode()
        .map_err(read)?
        .into_rgb8();
    let image = match size {
        Some((h, w)) if (h, w) != (image.height() as usize, image.width() as usize) => {
            image::imageops::resize(
                &image,
                w as u32,
                h as u32,
                image::imageops::FilterType::Lanczos3,
            )
        }
        _ => image,
    };
    let (width, height) = (image.width() as usize, image.height() as usize);
    let plane = width * height;
    let mut planes = vec![0f32; 3 * plane];
    for (i, pixel) in image.pixels().enumerate() {
        for (c, &value) in pixel.0.iter().enumerate() {
            planes[c * plane + i] = f32::from(value) / 255.0;
        }
    }
    Tensor::from_vec(planes, (3, height, width), &Device::Cpu).map_err(|source| {
        VideoError::Tensor {
            path: path.to_path_buf(),
            source,
        }
    })
}

/// Writes frames (F, 3, H, W), floats in [0, 1], in the form the path names:
///
/// - `*.gif`: an animated GIF that loops forever, each frame shown `round(100 / fps)`
///   centiseconds (at least 1: GIF counts delays in centiseconds, and viewers replace 0 with
///   their own default);
/// - `*.safetensors`: the frames as given, converted to f32 but neither clamped nor quantised,
///   under the key `frames`, so comparisons against a reference see the pipeline's own numbers;
/// - an existing directory, a path ending in `/`, or a path without an extension: PNG frames
///   `frame_000.png`, `frame_001.png`, ...
///
/// GIF and PNG pixels are `round(clamp(x, 0, 1) * 255)`, ties to even, as diffusers' `numpy_to_pil`
/// makes them. Missing parent directories are created for every form. In an existing directory
/// the new frames replace same-named files and stale frames past the new count are removed, so
/// the directory holds exactly this video; there, frames are moved in one by one once all are
/// encoded, while every other output appears in a single rename.
pub fn write_video(frames: &Tensor, path: &Path, fps: f64) -> Result<(), VideoError> {
    let form = output_form(path).ok_or_else(|| VideoError::UnsupportedPath {
        path: path.to_path_buf(),
    })?;
    let count = check_frames(frames, path)?;
    match form {
        Form::Gif => {
            if !(fps.is_finite() && fps > 0.0) {
                return Err(VideoError::Fps {
                    path: path.to_path_buf(),
                    fps,
                });
            }
            write_atomically(path, &encode_gif(frames, count, fps, path)?)
        }
        Form::Safetensors => {
            let tensor_error = |source| VideoError::Tensor {
                path: path.to_path_buf(),
                source,
            };
            let frames = frames
                .to_device(&Device::Cpu)
                .and_then(|t| t.to_dtype(DType::F32))
                .and_then(|t| t.contiguous())
                .map_err(tensor_error)?;
            let (staged, file) = stage_file(path)?;
            drop(file);
            frames
                .save_safetensors("frames", &staged.path)
                .map_err(tensor_error)?;
            staged.commit(path)
        }
        Form::PngFrames => write_png_frames(frames, count, path),
    }
}

/// Write `bytes` to `path` through a temporary sibling and one rename, so a failure leaves
/// no half-written file (videos, Step Rehash schedules).
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), VideoError> {
    let (staged, mut file) = stage_file(path)?;
    file.write_all(bytes)
        .map_err(|source| io_error(path, "writing", source))?;
    staged.commit(path)
}

enum Form {
    Gif,
    Safetensors,
    PngFrames,
}

fn output_form(path: &Path) -> Option<Form> {
    let ends_with_separator = path
        .as_os_str()
        .as_encoded_bytes()
        .last()
        .is_some_and(|&b| std::path::is_separator(char::from(b)));
    if ends_with_separator || path.is_dir() {
        return Some(Form::PngFrames);
    }
    match path.extension() {
        None => Some(Form::PngFrames),
        Some(ext) if ext.eq_ignore_ascii_case("gif") => Some(Form::Gif),
        Some(ext) if ext.eq_ignore_ascii_case("safetensors") => Some(Form::Safetensors),
        Some(_) => None,
    }
}

/// Returns the frame count.
fn check_frames(frames: &Tensor, path: &Path) -> Result<usize, VideoError> {
    let error = |reason| VideoError::Frames {
        path: path.to_path_buf(),
        reason,
    };
    match *frames.dims() {
        [count, 3, height, width] if count > 0 && height > 0 && width > 0 => {
            if !frames.dtype().is_float() {
                return Err(error(format!(
                    "frames must be floats in [0, 1], got {:?}",
                    frames.dtype()
                )));
            }
            if u32::try_from(height.max(width)).is_err() {
                return Err(error(format!(
                    "frames of {height}x{width} are too large for an image"
                )));
            }
            Ok(count)
        }
        _ => Err(error(format!(
            "frames must be a non-empty (frames, 3, height, width) tensor, got shape {:?}",
            frames.dims()
        ))),
    }
}

/// Quantises frame `index` of a checked (F, 3, H, W) tensor as `round(clamp(x, 0, 1) * 255)`,
/// computed in f32 with ties to even. That is diffusers' `numpy_to_pil`
/// (`(images * 255).round().astype("uint8")` in numpy, on frames its postprocessing already
/// clamped), so GIF and PNG frames match the reference pipeline's. One frame at a time keeps the
/// host copy of a long video at one frame.
fn frame_to_rgb8(frames: &Tensor, index: usize) -> candle_core::Result<RgbImage> {
    let (_, _, height, width) = frames.dims4()?;
    let planes = frames
        .get(index)?
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let plane = height * width;
    let quantise = |x: f32| (x.clamp(0.0, 1.0) * 255.0).round_ties_even() as u8;
    // `check_frames` bounds both sides by u32::MAX.
    Ok(RgbImage::from_fn(width as u32, height as u32, |x, y| {
        let i = y as usize * width + x as usize;
        Rgb([
            quantise(planes[i]),
            quantise(planes[plane + i]),
            quantise(planes[2 * plane + i]),
        ])
    }))
}

/// gif's recommended balance: image's default (1) spends far longer in NeuQuant on frames of
/// more than 256 colours, which real video frames always are, for no visible gain.
const GIF_SPEED: i32 = 10;

/// Encodes in memory, because the GIF trailer is written when the encoder drops, where a write
/// error would be lost; the compressed GIF is small next to the frames.
fn encode_gif(frames: &Tensor, count: usize, fps: f64, path: &Path) -> Result<Vec<u8>, VideoError> {
    let encode_error = |source| VideoError::Encode {
        path: path.to_path_buf(),
        source,
    };
    let centiseconds = (100.0 / fps).round().clamp(1.0, f64::from(u16::MAX)) as u32;
    let delay = Delay::from_numer_denom_ms(centiseconds * 10, 1);
    let mut bytes = Vec::new();
    {
        let mut encoder = GifEncoder::new_with_speed(&mut bytes, GIF_SPEED);
        encoder.set_repeat(Repeat::Infinite).map_err(encode_error)?;
        for index in 0..count {
            let rgb = frame_to_rgb8(frames, index).map_err(|source| VideoError::Tensor {
                path: path.to_path_buf(),
                source,
            })?;
            let rgba = DynamicImage::ImageRgb8(rgb).into_rgba8();
            encoder
                .encode_frame(Frame::from_parts(rgba, 0, 0, delay))
                .map_err(encode_error)?;
        }
    }
    Ok(bytes)
}

fn write_png_frames(frames: &Tensor, count: usize, path: &Path) -> Result<(), VideoError> {
    let existing = path.is_dir();
    if !existing && fs::symlink_metadata(path).is_ok() {
        return Err(VideoError::NotADirectory {
            path: path.to_path_buf(),
        });
    }
    // In an existing directory the staging directory goes inside it, which keeps the moves on
    // one file system without needing the target's name or parent.
    let staged = if existing {
        Staged::dir(path, OsStr::new("frames"))
            .map_err(|source| io_error(path, "creating a temporary directory", source))?
    } else {
        let (parent, name) = parent_and_name(path)?;
        Staged::dir(&parent, name)
            .map_err(|source| io_error(path, "creating a temporary directory", source))?
    };
    let names: Vec<String> = (0..count).map(frame_name).collect();
    for (index, name) in names.iter().enumerate() {
        let rgb = frame_to_rgb8(frames, index).map_err(|source| VideoError::Tensor {
            path: path.to_path_buf(),
            source,
        })?;
        write_png(&rgb, &staged.path.join(name), path)?;
    }
    if !existing {
        return staged.commit(path);
    }
    for name in &names {
        fs::rename(staged.path.join(name), path.join(name))
            .map_err(|source| io_error(path, "moving a frame into place", source))?;
    }
    let entries = fs::read_dir(path).map_err(|source| io_error(path, "listing", source))?;
    for entry in entries {
        let entry = entry.map_err(|source| io_error(path, "listing", source))?;
        if frame_number(&entry.file_name()).is_some_and(|n| n >= count) {
            fs::remove_file(entry.path())
                .map_err(|source| io_error(path, "removing a stale frame", source))?;
        }
    }
    Ok(())
}

fn frame_name(index: usize) -> String {
    format!("frame_{index:03}.png")
}

/// The index of a frame file this module writes, if `name` is one.
fn frame_number(name: &OsStr) -> Option<usize> {
    let name = name.to_str()?;
    let index = name
        .strip_prefix("frame_")?
        .strip_suffix(".png")?
        .parse()
        .ok()?;
    (frame_name(index) == name).then_some(index)
}

/// Flushes explicitly: a buffered writer that drops unflushed loses its write errors.
fn write_png(rgb: &RgbImage, file: &Path, target: &Path) -> Result<(), VideoError> {
    let mut writer = BufWriter::new(
        File::create(file).map_err(|source| io_error(target, "creating a frame", source))?,
    );
    PngEncoder::new(&mut writer)
        .write_image(
            rgb.as_raw(),
            rgb.width(),
            rgb.height(),
            ExtendedColorType::Rgb8,
        )
        .map_err(|source| VideoError::Encode {
            path: target.to_path_buf(),
            source,
        })?;
    writer
        .flush()
        .map_err(|source| io_error(target, "writing a frame", source))
}

fn stage_file(path: &Path) -> Result<(Staged, File), VideoError> {
    let (parent, name) = parent_and_name(path)?;
    Staged::file(&parent, name)
        .map_err(|source| io_error(path, "creating a temporary file", source))
}

/// Creates the parent directories, since the staged output must sit beside its target.
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
    fs::create_dir_all(&parent)
        .map_err(|source| io_error(path, "creating the parent directory", source))?;
    Ok((parent, name))
}

fn io_error(path: &Path, action: &'static str, source: io::Error) -> VideoError {
    VideoError::Io {
        path: path.to_path_buf(),
        action,
        source,
    }
}

/// A temporary file or directory that is removed when dropped unless committed, so every error
/// path (and a panic unwinding through the writer) cleans up after itself.
struct Staged {
    path: PathBuf,
    is_dir: bool,
    committed: bool,
}

impl Staged {
    /// Runs `make` on a hidden sibling name of `name` in `parent`, unique to this process and call; a
    /// leftover of a crashed run with the same process id is stepped over, never reused.
    fn create<T>(
        parent: &Path,
        name: &OsStr,
        is_dir: bool,
        make: impl Fn(&Path) -> io::Result<T>,
    ) -> io::Result<(Staged, T)> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        loop {
            let mut staged_name = OsString::from(".");
            staged_name.push(name);
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            staged_name.push(format!(".{}.{n}.tmp", std::process::id()));
            let path = parent.join(staged_name);
            match make(&path) {
                Ok(made) => {
                    let staged = Staged {
                        path,
                        is_dir,
                        committed: false,
                    };
                    return Ok((staged, made));
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
    }

    fn dir(parent: &Path, name: &OsStr) -> io::Result<Staged> {
        Staged::create(parent, name, true, |path| fs::create_dir(path)).map(|(staged, ())| staged)
    }

    fn file(parent: &Path, name: &OsStr) -> io::Result<(Staged, File)> {
        Staged::create(parent, name, false, |path| {
            OpenOptions::new().write(true).create_new(true).open(path)
        })
    }

    fn commit(mut self, target: &Path) -> Result<(), VideoError> {
        fs::rename(&self.path, target)
            .map_err(|source| io_error(target, "moving the output into place", source))?;
        self.committed = true;
        Ok(())
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        // Best effort: the error that brought us here is the one worth reporting.
        let _ = if self.is_dir {
            fs::remove_dir_all(&self.path)
        } else {
            fs::remove_file(&self.path)
        };
    }
}
