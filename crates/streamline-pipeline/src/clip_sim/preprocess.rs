//! transformers' `CLIPImageProcessor` on 8-bit RGB frames, to the same numbers: the shortest
//! side resized with Pillow's bicubic filter (reproduced here to the integer: its fixed-point
//! coefficients, the rounding after each pass), a centre crop, `x * rescale_factor` in f64
//! then f32, and `(x - mean) / std` in f32, as numpy computes them.

use std::path::Path;

use candle_core::{Device, Tensor};
use image::RgbImage;
use serde::Deserialize;

use crate::run::PipelineError;

/// Pillow's fixed-point precision for 8-bit images (`PRECISION_BITS` in Resample.c).
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// PIL's `Image.BICUBIC`, the only filter CLIP's processor configs use.
const BICUBIC: u32 = 3;

/// `size` / `crop_size` as configs write them: `{"shortest_edge": n}`, `{"height", "width"}`,
/// or a bare number (older configs: the shortest edge for `size`, a square for `crop_size`).
#[derive(Clone, Copy, Debug, Deserialize)]
#[serde(untagged)]
enum Size {
    ShortestEdge { shortest_edge: usize },
    Exact { height: usize, width: usize },
    Number(usize),
}

/// `preprocessor_config.json`; a missing field takes `CLIPImageProcessor`'s default.
#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct ClipImageProcessor {
    do_resize: bool,
    size: Size,
    resample: u32,
    do_center_crop: bool,
    crop_size: Size,
    do_rescale: bool,
    rescale_factor: f64,
    do_normalize: bool,
    image_mean: [f64; 3],
    image_std: [f64; 3],
}

impl Default for ClipImageProcessor {
    fn default() -> Self {
        ClipImageProcessor {
            do_resize: true,
            size: Size::ShortestEdge { shortest_edge: 224 },
            resample: BICUBIC,
            do_center_crop: true,
            crop_size: Size::Exact {
                height: 224,
                width: 224,
            },
            do_rescale: true,
            rescale_factor: 1.0 / 255.0,
            do_normalize: true,
            image_mean: [0.48145466, 0.4578275, 0.40821073],
            image_std: [0.26862954, 0.26130258, 0.27577711],
        }
    }
}

impl ClipImageProcessor {
    /// Reads `preprocessor_config.json` from a CLIP folder (transformers' defaults when the
    /// folder has none), refusing a filter other than bicubic.
    pub fn load(dir: &Path) -> Result<Self, PipelineError> {
        let path = dir.join("preprocessor_config.json");
        if !path.is_file() {
            return Ok(ClipImageProcessor::default());
        }
        let processor: Self = streamline_models::load::load_config(&path)?;
        if processor.resample != BICUBIC {
            return Err(PipelineError::Input(format!(
                "{}: `resample` {} is not supported: CLIP-SIM resizes with bicubic (3), as CLIP's processors do",
                path.display(),
                processor.resample
            )));
        }
        Ok(processor)
    }

    /// The pixel values of `frames`: `(N, 3, H, W)` f32 on `device`.
    pub fn pixel_values(
        &self,
        frames: &[RgbImage],
        device: &Device,
    ) -> Result<Tensor, PipelineError> {
        let mut values = Vec::new();
        let mut shape = (0, 0);
        for frame in frames {
            let frame = self.resized_and_cropped(frame)?;
            shape = (frame.height() as usize, frame.width() as usize);
            values.extend(self.planes(&frame));
        }
        Ok(Tensor::from_vec(
            values,
            (frames.len(), 3, shape.0, shape.1),
            device,
        )?)
    }

    fn resized_and_cropped(&self, frame: &RgbImage) -> Result<RgbImage, PipelineError> {
        let (w, h) = (frame.width() as usize, frame.height() as usize);
        let frame = match (self.do_resize, self.size) {
            (false, _) => frame.clone(),
            (true, Size::Exact { height, width }) => resize_bicubic(frame, width, height),
            (true, Size::ShortestEdge { shortest_edge: s } | Size::Number(s)) => {
                // `get_resize_output_image_size(default_to_square=False)`.
                let (short, long) = (w.min(h), w.max(h));
                let long = s * long / short;
                let (width, height) = if w <= h { (s, long) } else { (long, s) };
                resize_bicubic(frame, width, height)
            }
        };
        if !self.do_center_crop {
            return Ok(frame);
        }
        let (height, width) = match self.crop_size {
            Size::Exact { height, width } => (height, width),
            Size::ShortestEdge { shortest_edge: n } | Size::Number(n) => (n, n),
        };
        let (fw, fh) = (frame.width() as usize, frame.height() as usize);
        if fw < width || fh < height {
            return Err(PipelineError::Input(format!(
                "a {fw}x{fh} frame is smaller than the {width}x{height} crop"
            )));
        }
        let (top, left) = ((fh - height) / 2, (fw - width) / 2);
        let crop =
            image::imageops::crop_imm(&frame, left as u32, top as u32, width as u32, height as u32);
        Ok(crop.to_image())
    }

    /// Channel planes of a processed frame, rescaled and normalized in numpy's precision.
    fn planes(&self, frame: &RgbImage) -> Vec<f32> {
        let plane = (frame.width() * frame.height()) as usize;
        let mut out = vec![0f32; 3 * plane];
        for (i, pixel) in frame.pixels().enumerate() {
            for c in 0..3 {
                let mut x = f32::from(pixel[c]);
                if self.do_rescale {
                    x = (f64::from(pixel[c]) * self.rescale_factor) as f32;
                }
                if self.do_normalize {
                    x = (x - self.image_mean[c] as f32) / self.image_std[c] as f32;
                }
                out[c * plane + i] = x;
            }
        }
        out
    }
}

/// Pillow's `bicubic_filter` (a = -0.5, support 2).
fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// One output sample's taps: the first input index and the fixed-point weights.
struct Taps {
    first: usize,
    weights: Vec<i32>,
}

/// Pillow's `precompute_coeffs` and `normalize_coeffs_8bpc` for `input` samples to `output`.
fn taps(input: usize, output: usize) -> Vec<Taps> {
    let scale = input as f64 / output as f64;
    let filter_scale = scale.max(1.0);
    let support = 2.0 * filter_scale;
    let step = 1.0 / filter_scale;
    (0..output)
        .map(|o| {
            let center = (o as f64 + 0.5) * scale;
            // C's `(int)` truncates toward zero; negatives clamp to 0 either way.
            let first = ((center - support + 0.5) as i64).max(0) as usize;
            let last = ((center + support + 0.5) as i64).min(input as i64) as usize;
            let raw: Vec<f64> = (first..last)
                .map(|x| bicubic((x as f64 - center + 0.5) * step))
                .collect();
            let total: f64 = raw.iter().sum();
            let unit = f64::from(1u32 << PRECISION_BITS);
            let weights = raw
                .iter()
                .map(|&w| {
                    let w = if total != 0.0 { w / total } else { w };
                    let half = if w < 0.0 { -0.5 } else { 0.5 };
                    (half + w * unit) as i32
                })
                .collect();
            Taps { first, weights }
        })
        .collect()
}

/// Pillow's `clip8`: the fixed-point sum back to 8 bits.
fn clip8(sum: i32) -> u8 {
    (sum >> PRECISION_BITS).clamp(0, 255) as u8
}

/// One pass along rows (`horizontal`) or columns, rounding to 8 bits as Pillow does.
fn pass(src: &RgbImage, size: usize, horizontal: bool) -> RgbImage {
    let (w, h) = (src.width() as usize, src.height() as usize);
    let taps = taps(if horizontal { w } else { h }, size);
    let (ow, oh) = if horizontal { (size, h) } else { (w, size) };
    RgbImage::from_fn(ow as u32, oh as u32, |x, y| {
        let (o, fixed) = if horizontal { (x, y) } else { (y, x) };
        let t = &taps[o as usize];
        let mut sums = [1i32 << (PRECISION_BITS - 1); 3];
        for (j, &weight) in t.weights.iter().enumerate() {
            let i = (t.first + j) as u32;
            let p = if horizontal {
                src.get_pixel(i, fixed)
            } else {
                src.get_pixel(fixed, i)
            };
            for c in 0..3 {
                sums[c] += i32::from(p[c]) * weight;
            }
        }
        image::Rgb(sums.map(clip8))
    })
}

/// Pillow's `Image.resize((width, height), Image.BICUBIC)` of an RGB image: a horizontal then
/// a vertical pass, each only where that side changes.
fn resize_bicubic(frame: &RgbImage, width: usize, height: usize) -> RgbImage {
    let mut out = frame.clone();
    if width != out.width() as usize {
        out = pass(&out, width, true);
    }
    if height != out.height() as usize {
        out = pass(&out, height, false);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pillow's bicubic keeps a flat image flat and a same-size resize is the identity.
    #[test]
    fn flat_images_stay_flat_and_same_sizes_are_identities() {
        let flat = RgbImage::from_pixel(7, 5, image::Rgb([10, 128, 250]));
        for (w, h) in [(3, 2), (16, 11), (7, 5)] {
            let out = resize_bicubic(&flat, w, h);
            assert!(out.pixels().all(|p| p.0 == [10, 128, 250]), "{w}x{h}");
        }
        let noisy = RgbImage::from_fn(6, 4, |x, y| image::Rgb([(x * 40) as u8, (y * 60) as u8, 7]));
        assert_eq!(pass(&noisy, 6, true), noisy);
    }

    /// The shortest side becomes 224 (the other scaled and truncated, as transformers does),
    /// then the centre 224 x 224.
    #[test]
    fn frames_are_resized_by_their_shortest_side_then_cropped() {
        let processor = ClipImageProcessor::default();
        let frame = RgbImage::new(230, 290);
        let pixels = processor
            .pixel_values(&[frame.clone(), frame], &Device::Cpu)
            .unwrap();
        assert_eq!(pixels.dims(), [2, 3, 224, 224]);
        let wide = processor
            .resized_and_cropped(&RgbImage::new(40, 30))
            .unwrap();
        assert_eq!(wide.dimensions(), (224, 224));
    }
}
