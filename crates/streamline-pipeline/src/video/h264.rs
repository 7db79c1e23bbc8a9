//! H.264 through OpenH264, built from its bundled source (no system library, no ffmpeg):
//! RGB frames to yuv420p access units and back.
//!
//! Colours are BT.601 limited range (Y in 16..=235), the matrix decoders assume for untagged
//! video and the one OpenH264's own YUV -> RGB conversion applies; the stream also says so in
//! its VUI, so players that read the tags agree. 4:2:0 chroma covers 2x2 pixels and H.264 crops
//! a 4:2:0 picture only by whole chroma samples, so an odd side cannot be signalled: such
//! frames are padded to the next even size by repeating their last row or column.

use image::RgbImage;
use openh264::decoder::{DecodedYUV, Decoder, DecoderConfig, Flush};
use openh264::encoder::{
    Complexity, Encoder, EncoderConfig, FrameType, RateControlMode, UsageType, VuiConfig,
};
use openh264::formats::{YUVBuffer, YUVSource};
use openh264::OpenH264API;

/// NAL unit types (H.264 Table 7-1) the muxer handles apart from slice data.
const NAL_SPS: u8 = 7;
const NAL_PPS: u8 = 8;

/// The largest frame OpenH264 encodes (level 5.2): 3840 x 2160, either way round.
pub const MAX_SIDES: (usize, usize) = (3840, 2160);

/// The smallest: one 16 x 16 macroblock.
pub const MIN_SIDE: usize = 16;

/// A coded picture: its NAL units without start codes, and whether it starts a group of
/// pictures (an IDR frame, which a player can seek to).
pub struct AccessUnit {
    pub nals: Vec<Vec<u8>>,
    pub is_sync: bool,
}

/// An encoded video: parameter sets (for the MP4 sample description) and one access unit per
/// frame, in order.
pub struct Encoded {
    pub width: usize,
    pub height: usize,
    pub sps: Vec<u8>,
    pub pps: Vec<u8>,
    pub frames: Vec<AccessUnit>,
}

/// Why OpenH264 cannot encode frames of `height` x `width` (sides padded to even), if it
/// cannot.
pub fn size_rule(height: usize, width: usize) -> Option<String> {
    let (long, short) = (height.max(width), height.min(width));
    let (max_long, max_short) = MAX_SIDES;
    if short < MIN_SIDE {
        Some(format!(
            "an MP4 (H.264) frame is at least {MIN_SIDE}x{MIN_SIDE}"
        ))
    } else if long + long % 2 > max_long || short + short % 2 > max_short {
        Some(format!(
            "an MP4 (H.264) frame is at most {max_long}x{max_short} or {max_short}x{max_long}"
        ))
    } else {
        None
    }
}

/// OpenH264's settings for files rather than calls: a constant quantiser (OpenH264's default,
/// 26) and no rate control, because OpenH264 meets a bitrate only by dropping frames and every
/// frame of the video belongs in the file; the slowest search; one thread, so the same frames
/// give the same bytes.
fn encoder_config() -> EncoderConfig {
    EncoderConfig::new()
        .skip_frames(false)
        .usage_type(UsageType::CameraVideoRealTime)
        .rate_control_mode(RateControlMode::Off)
        .complexity(Complexity::High)
        .num_threads(1)
        .vui(VuiConfig::bt601())
}

/// Encodes `frames` (all of one size) as H.264.
pub fn encode(
    frames: impl IntoIterator<Item = Result<RgbImage, String>>,
) -> Result<Encoded, String> {
    let mut encoder = Encoder::with_api_config(OpenH264API::from_source(), encoder_config())
        .map_err(|e| format!("cannot start the H.264 encoder: {e}"))?;
    let mut out = Encoded {
        width: 0,
        height: 0,
        sps: Vec::new(),
        pps: Vec::new(),
        frames: Vec::new(),
    };
    for (index, frame) in frames.into_iter().enumerate() {
        let yuv = rgb_to_yuv420(&frame?);
        (out.width, out.height) = yuv.dimensions();
        let stream = encoder
            .encode(&yuv)
            .map_err(|e| format!("cannot encode frame {index}: {e}"))?;
        let mut unit = AccessUnit {
            nals: Vec::new(),
            is_sync: stream.frame_type() == FrameType::IDR,
        };
        for layer in (0..stream.num_layers()).filter_map(|l| stream.layer(l)) {
            for nal in (0..layer.nal_count()).filter_map(|n| layer.nal_unit(n)) {
                let nal = strip_start_code(nal);
                match nal.first().map(|b| b & 0x1f) {
                    Some(NAL_SPS) => out.sps = nal.to_vec(),
                    Some(NAL_PPS) => out.pps = nal.to_vec(),
                    Some(_) => unit.nals.push(nal.to_vec()),
                    None => {}
                }
            }
        }
        if unit.nals.is_empty() {
            return Err(format!(
                "the H.264 encoder gave no picture for frame {index}"
            ));
        }
        out.frames.push(unit);
    }
    if out.sps.is_empty() || out.pps.is_empty() {
        return Err("the H.264 encoder gave no parameter sets".into());
    }
    Ok(out)
}

/// A NAL unit as OpenH264 hands it over (Annex B: after a 3- or 4-byte start code).
fn strip_start_code(nal: &[u8]) -> &[u8] {
    nal.strip_prefix(&[0, 0, 0, 1])
        .or_else(|| nal.strip_prefix(&[0, 0, 1]))
        .unwrap_or(nal)
}

/// BT.601 limited range: `Y = 16 + 219 * (0.299 R + 0.587 G + 0.114 B)`, chroma `128 + 224 *`
/// the scaled differences, on values in [0, 1].
fn luma(r: f32, g: f32, b: f32) -> f32 {
    16.0 + 219.0 * (0.299 * r + 0.587 * g + 0.114 * b)
}

fn chroma(r: f32, g: f32, b: f32) -> (f32, f32) {
    let y = 0.299 * r + 0.587 * g + 0.114 * b;
    (
        128.0 + 224.0 * (b - y) / 1.772,
        128.0 + 224.0 * (r - y) / 1.402,
    )
}

fn to_u8(x: f32) -> u8 {
    x.round().clamp(0.0, 255.0) as u8
}

/// yuv420p planes of `rgb`, padded to even sides by repeating the last row and column; each
/// chroma sample is that of the 2x2 pixels' mean colour.
fn rgb_to_yuv420(rgb: &RgbImage) -> YUVBuffer {
    let (w, h) = (rgb.width() as usize, rgb.height() as usize);
    let (pw, ph) = (w + w % 2, h + h % 2);
    let pixel = |x: usize, y: usize| -> [f32; 3] {
        let p = rgb.get_pixel(x.min(w - 1) as u32, y.min(h - 1) as u32).0;
        p.map(|c| f32::from(c) / 255.0)
    };
    let mut planes = vec![0u8; pw * ph * 3 / 2];
    let (luma_plane, chroma_planes) = planes.split_at_mut(pw * ph);
    let (u_plane, v_plane) = chroma_planes.split_at_mut(pw * ph / 4);
    for y in 0..ph {
        for x in 0..pw {
            let [r, g, b] = pixel(x, y);
            luma_plane[y * pw + x] = to_u8(luma(r, g, b));
        }
    }
    for cy in 0..ph / 2 {
        for cx in 0..pw / 2 {
            let mut mean = [0f32; 3];
            for (dx, dy) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
                let p = pixel(2 * cx + dx, 2 * cy + dy);
                (0..3).for_each(|c| mean[c] += p[c] / 4.0);
            }
            let (u, v) = chroma(mean[0], mean[1], mean[2]);
            u_plane[cy * pw / 2 + cx] = to_u8(u);
            v_plane[cy * pw / 2 + cx] = to_u8(v);
        }
    }
    YUVBuffer::from_vec(planes, pw, ph)
}

/// Decodes access units (each a sequence of NAL units without start codes, parameter sets
/// first) into RGB frames, in order.
pub fn decode(units: impl IntoIterator<Item = Vec<Vec<u8>>>) -> Result<Vec<RgbImage>, String> {
    let config = DecoderConfig::new().flush_after_decode(Flush::NoFlush);
    let mut decoder = Decoder::with_api_config(OpenH264API::from_source(), config)
        .map_err(|e| format!("cannot start the H.264 decoder: {e}"))?;
    let mut frames = Vec::new();
    for (index, nals) in units.into_iter().enumerate() {
        let mut annex_b = Vec::new();
        for nal in nals {
            annex_b.extend_from_slice(&[0, 0, 0, 1]);
            annex_b.extend_from_slice(&nal);
        }
        let decoded = decoder
            .decode(&annex_b)
            .map_err(|e| format!("cannot decode sample {}: {e}", index + 1))?;
        frames.extend(decoded.map(|yuv| yuv_to_rgb(&yuv)));
    }
    let rest = decoder
        .flush_remaining()
        .map_err(|e| format!("cannot decode the last frames: {e}"))?;
    frames.extend(rest.iter().map(yuv_to_rgb));
    Ok(frames)
}

fn yuv_to_rgb(yuv: &DecodedYUV) -> RgbImage {
    let (w, h) = yuv.dimensions();
    let mut rgb = vec![0u8; w * h * 3];
    yuv.write_rgb8(&mut rgb);
    RgbImage::from_raw(w as u32, h as u32, rgb).expect("write_rgb8 fills w x h x 3 bytes")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Grey stays grey, and the primaries land where BT.601 puts them.
    #[test]
    fn bt601_limited_range() {
        assert_eq!(to_u8(luma(0.0, 0.0, 0.0)), 16);
        assert_eq!(to_u8(luma(1.0, 1.0, 1.0)), 235);
        assert_eq!(chroma(0.5, 0.5, 0.5), (128.0, 128.0));
        let (u, v) = chroma(1.0, 0.0, 0.0);
        assert_eq!((to_u8(u), to_u8(v)), (90, 240));
    }

    /// Odd sides are padded with copies of the last row and column.
    #[test]
    fn odd_frames_are_padded_to_even_sides() {
        let rgb = RgbImage::from_fn(3, 5, |x, y| image::Rgb([(x * 80) as u8, (y * 50) as u8, 0]));
        let yuv = rgb_to_yuv420(&rgb);
        assert_eq!(yuv.dimensions(), (4, 6));
        let y = yuv.y();
        assert_eq!(y[3], y[2], "the last column repeats");
        assert_eq!(&y[5 * 4..6 * 4], &y[4 * 4..5 * 4], "the last row repeats");
    }
}
