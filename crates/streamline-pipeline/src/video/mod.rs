//! Image input and video output of the jobs.
//!
//! Pixel conversions follow diffusers' image processor in both directions, so an image loaded
//! here conditions the model with the numbers diffusers would feed it, and frames written here
//! are byte for byte the PIL frames diffusers would produce from the same decoder output.
//!
//! Every output is opened before the run ([`VideoOutput::create`], [`FileOutput::create`]:
//! form, frame rate and a writable folder checked, a temporary output created beside the
//! target) and renamed into place once written, so a failed or interrupted run leaves no
//! truncated GIF or partial frame sequence behind (into an existing directory, finished frames
//! move in together; see [`write_video`]). [`remove_staged`] removes every output still in
//! progress, for signal handlers.

mod h264;
mod mp4;
mod output;
mod read;
mod staged;

use std::ffi::OsStr;
use std::io;
use std::path::{Path, PathBuf};

pub use output::{check_output, FileOutput, VideoOutput};
pub use read::{read_video, Video};
pub use staged::{remove_leftovers, remove_staged};

use candle_core::{DType, Device, Tensor};
use image::codecs::gif::{GifEncoder, Repeat};
use image::codecs::png::PngEncoder;
use image::{
    Delay, DynamicImage, ExtendedColorType, Frame, ImageEncoder, ImageReader, Rgb, RgbImage,
};
use thiserror::Error;

/// Every variant carries the path the caller gave, so the message alone says which input or
/// output failed. Causes are part of the message and so are never also a `source()`: a
/// reporter that prints the chain would tell them twice.
#[derive(Debug, Error)]
pub enum VideoError {
    #[error("{path}: cannot read image: {error}")]
    Read {
        path: PathBuf,
        error: image::ImageError,
    },
    #[error("{path}: unsupported video output; write to a `.mp4` file (H.264), a `.gif` file (animated GIF), a `.safetensors` file (f32 frames under `frames`) or a directory for PNG frames (an existing directory, or a path ending in `/` or without an extension)")]
    UnsupportedPath { path: PathBuf },
    #[error("{path}: exists and is not a directory, so it cannot hold PNG frames")]
    NotADirectory { path: PathBuf },
    #[error("{path}: is a directory; name a file to write")]
    IsADirectory { path: PathBuf },
    #[error("{path}: {reason}")]
    Frames { path: PathBuf, reason: String },
    #[error("{path}: frame rate must be {rule}, got {fps}")]
    Fps {
        path: PathBuf,
        fps: f64,
        rule: &'static str,
    },
    #[error("{path}: {error}")]
    Tensor {
        path: PathBuf,
        error: candle_core::Error,
    },
    #[error("{path}: cannot encode: {error}")]
    Encode {
        path: PathBuf,
        error: image::ImageError,
    },
    #[error("{path}: {reason}")]
    Mp4 { path: PathBuf, reason: String },
    #[error("{path}: {action}: {error}")]
    Io {
        path: PathBuf,
        action: &'static str,
        error: io::Error,
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
    let read = |error| VideoError::Read {
        path: path.to_path_buf(),
        error,
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
    Tensor::from_vec(planes, (3, height, width), &Device::Cpu).map_err(|error| VideoError::Tensor {
        path: path.to_path_buf(),
        error,
    })
}

/// Writes frames (F, 3, H, W), floats in [0, 1], in the form the path names:
///
/// - `*.mp4`: H.264 (yuv420p, BT.601 limited range, odd sides padded to even ones) in an MP4
///   laid out for streaming, each frame lasting exactly `1 / fps` (to a thousandth of a frame
///   per second), as browsers and players expect of diffusers' `export_to_video`;
/// - `*.gif`: an animated GIF that loops forever, each frame shown `round(100 / fps)`
///   centiseconds (at least 1: GIF counts delays in centiseconds, and viewers replace 0 with
///   their own default);
/// - `*.safetensors`: the frames as given, converted to f32 but neither clamped nor quantised,
///   under the key `frames`, so comparisons against a reference see the pipeline's own numbers;
/// - an existing directory, a path ending in `/`, or a path without an extension: PNG frames
///   `frame_000.png`, `frame_001.png`, ...
///
/// GIF, MP4 and PNG pixels are `round(clamp(x, 0, 1) * 255)`, ties to even, as diffusers' `numpy_to_pil`
/// makes them. Missing parent directories are created for every form (and removed again if the
/// write fails); files are created with the process umask. In an existing directory the new
/// frames replace same-named files, moved in together once all are encoded; other files,
/// frames past the new count included, are left as they are (with a warning about those
/// frames), since they may be the user's. Every other output appears in a single rename.
/// A job opens its output with [`VideoOutput::create`] before it runs; this is that and
/// [`VideoOutput::write`] in one.
pub fn write_video(frames: &Tensor, path: &Path, fps: f64) -> Result<(), VideoError> {
    check_frames(frames, path)?;
    VideoOutput::create(path, fps)?.write(frames)
}

/// Write `bytes` to `path` through a temporary sibling and one rename, so a failure leaves
/// no half-written file (videos, Step Rehash schedules); see [`FileOutput`].
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), VideoError> {
    FileOutput::create(path)?.write(bytes)
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
    let encode_error = |error| VideoError::Encode {
        path: path.to_path_buf(),
        error,
    };
    let centiseconds = (100.0 / fps).round().clamp(1.0, f64::from(u16::MAX)) as u32;
    let delay = Delay::from_numer_denom_ms(centiseconds * 10, 1);
    let mut bytes = Vec::new();
    {
        let mut encoder = GifEncoder::new_with_speed(&mut bytes, GIF_SPEED);
        encoder.set_repeat(Repeat::Infinite).map_err(encode_error)?;
        for index in 0..count {
            let rgb = frame_to_rgb8(frames, index).map_err(|error| VideoError::Tensor {
                path: path.to_path_buf(),
                error,
            })?;
            let rgba = DynamicImage::ImageRgb8(rgb).into_rgba8();
            encoder
                .encode_frame(Frame::from_parts(rgba, 0, 0, delay))
                .map_err(encode_error)?;
        }
    }
    Ok(bytes)
}

/// The MP4 in memory, like the GIF, so that nothing but its final write touches the staging.
fn encode_mp4(frames: &Tensor, count: usize, fps: f64, path: &Path) -> Result<Vec<u8>, VideoError> {
    let error = |reason| VideoError::Mp4 {
        path: path.to_path_buf(),
        reason,
    };
    let (_, _, height, width) = frames.dims4().map_err(|error| VideoError::Tensor {
        path: path.to_path_buf(),
        error,
    })?;
    if let Some(rule) = h264::size_rule(height, width) {
        return Err(error(format!(
            "frames of {height}x{width} do not fit: {rule}"
        )));
    }
    let rgb = (0..count).map(|i| frame_to_rgb8(frames, i).map_err(|e| e.to_string()));
    mp4::encode_mp4(rgb, fps).map_err(error)
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

/// Frame `index` as PNG bytes.
fn encode_png(frames: &Tensor, index: usize, path: &Path) -> Result<Vec<u8>, VideoError> {
    let rgb = frame_to_rgb8(frames, index).map_err(|error| VideoError::Tensor {
        path: path.to_path_buf(),
        error,
    })?;
    let mut bytes = Vec::new();
    PngEncoder::new(&mut bytes)
        .write_image(
            rgb.as_raw(),
            rgb.width(),
            rgb.height(),
            ExtendedColorType::Rgb8,
        )
        .map_err(|error| VideoError::Encode {
            path: path.to_path_buf(),
            error,
        })?;
    Ok(bytes)
}

fn io_error(path: &Path, action: &'static str, error: io::Error) -> VideoError {
    VideoError::Io {
        path: path.to_path_buf(),
        action,
        error,
    }
}
