//! Videos read back in every form [`super::write_video`] writes, as 8-bit RGB frames: what
//! scoring (CLIP-SIM) and the round-trip tests look at.

use std::fs::{self, File};
use std::io::BufReader;
use std::path::{Path, PathBuf};

use candle_core::Device;
use image::codecs::gif::GifDecoder;
use image::{AnimationDecoder, DynamicImage, RgbImage};

use super::{check_frames, frame_number, frame_to_rgb8, mp4, VideoError};

/// A video's frames, and its frame rate where the form records one (MP4, GIF).
#[derive(Debug)]
pub struct Video {
    pub frames: Vec<RgbImage>,
    pub fps: Option<f64>,
}

/// Reads a video: `*.mp4` (H.264, decoded by OpenH264; frames at the coded size, so an odd
/// side written comes back one pixel longer), `*.gif` (every frame, composited as a viewer
/// shows it), `*.safetensors` (`frames`, quantised as the GIF and PNG writers do), or a
/// directory of `frame_000.png`, `frame_001.png`, ... in frame order.
pub fn read_video(path: &Path) -> Result<Video, VideoError> {
    let error = |reason: String| VideoError::Frames {
        path: path.to_path_buf(),
        reason,
    };
    let extension = path.extension().map(|e| e.to_ascii_lowercase());
    let video = match extension.as_ref().and_then(|e| e.to_str()) {
        _ if path.is_dir() => read_frames_dir(path)?,
        Some("mp4") => {
            let video = mp4::read_mp4(path).map_err(error)?;
            Video {
                frames: video.frames,
                fps: Some(video.fps),
            }
        }
        Some("gif") => read_gif(path)?,
        Some("safetensors") => read_safetensors(path)?,
        _ => {
            return Err(VideoError::UnsupportedPath {
                path: path.to_path_buf(),
            })
        }
    };
    if video.frames.is_empty() {
        return Err(error("holds no frames".into()));
    }
    Ok(video)
}

fn read_gif(path: &Path) -> Result<Video, VideoError> {
    let decode_error = |error| VideoError::Read {
        path: path.to_path_buf(),
        error,
    };
    let file = File::open(path).map_err(|e| super::io_error(path, "opening", e))?;
    let frames = GifDecoder::new(BufReader::new(file))
        .and_then(|gif| gif.into_frames().collect_frames())
        .map_err(decode_error)?;
    let fps = frames.first().and_then(|f| {
        let (numer, denom) = f.delay().numer_denom_ms();
        (numer > 0).then(|| 1000.0 * f64::from(denom) / f64::from(numer))
    });
    let frames = frames
        .into_iter()
        .map(|f| DynamicImage::ImageRgba8(f.into_buffer()).into_rgb8())
        .collect();
    Ok(Video { frames, fps })
}

fn read_safetensors(path: &Path) -> Result<Video, VideoError> {
    let tensor_error = |error| VideoError::Tensor {
        path: path.to_path_buf(),
        error,
    };
    let mut tensors = candle_core::safetensors::load(path, &Device::Cpu).map_err(tensor_error)?;
    let frames = tensors.remove("frames").ok_or_else(|| VideoError::Frames {
        path: path.to_path_buf(),
        reason: "no tensor named `frames`".into(),
    })?;
    let count = check_frames(&frames, path)?;
    let frames = (0..count)
        .map(|i| frame_to_rgb8(&frames, i))
        .collect::<candle_core::Result<_>>()
        .map_err(tensor_error)?;
    Ok(Video { frames, fps: None })
}

fn read_frames_dir(dir: &Path) -> Result<Video, VideoError> {
    let entries = fs::read_dir(dir).map_err(|e| super::io_error(dir, "listing", e))?;
    let mut numbered: Vec<(usize, PathBuf)> = entries
        .filter_map(|e| {
            let e = e.ok()?;
            Some((frame_number(&e.file_name())?, e.path()))
        })
        .collect();
    numbered.sort();
    if let Some(gap) = numbered.iter().enumerate().find(|(i, (n, _))| i != n) {
        return Err(VideoError::Frames {
            path: dir.to_path_buf(),
            reason: format!("frame {} is missing", gap.0),
        });
    }
    let frames = numbered
        .iter()
        .map(|(_, path)| {
            image::open(path)
                .map(DynamicImage::into_rgb8)
                .map_err(|error| VideoError::Read {
                    path: path.clone(),
                    error,
                })
        })
        .collect::<Result<_, _>>()?;
    Ok(Video { frames, fps: None })
}
