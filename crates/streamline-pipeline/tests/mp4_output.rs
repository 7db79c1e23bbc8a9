//! MP4 output read back by a real decoder: the file is demuxed by the `mp4` crate and its
//! H.264 decoded by OpenH264 (`read_video`), and its boxes are checked as a player reads them
//! (frame count, size, timescale and sample durations, a key frame first, `moov` ahead of
//! `mdat`), with decoded pixels close to the frames written.

use std::fs;
use std::io::BufReader;
use std::path::Path;

use candle_core::{Device, Tensor};
use image::RgbImage;
use streamline_pipeline::video::{read_video, write_video, VideoError, VideoOutput};

mod common;

use common::Scratch;

/// Smooth colour gradients with a soft bright disc moving right: what video frames look like
/// to a codec. (Sharp colour edges would measure 4:2:0's halved chroma resolution, which no
/// yuv420p file escapes, rather than the encoder.)
fn moving_disc(frames: usize, height: usize, width: usize) -> Tensor {
    let mut values = Vec::with_capacity(frames * 3 * height * width);
    for f in 0..frames {
        let (cx, cy) = ((2 + 3 * f) as f32, height as f32 / 2.0);
        for c in 0..3 {
            for y in 0..height {
                for x in 0..width {
                    let (fx, fy) = (x as f32 / width as f32, y as f32 / height as f32);
                    let background = [0.2 + 0.6 * fx, 0.3 + 0.4 * fy, 0.8 - 0.5 * fx][c];
                    let r2 = (x as f32 - cx).powi(2) + (y as f32 - cy).powi(2);
                    let disc = (-r2 / 30.0).exp();
                    values.push(disc * [0.95, 0.9, 0.2][c] + (1.0 - disc) * background);
                }
            }
        }
    }
    Tensor::from_vec(values, (frames, 3, height, width), &Device::Cpu).unwrap()
}

/// Frame `f` quantised as every 8-bit writer does.
fn rgb8(frames: &Tensor, f: usize) -> RgbImage {
    let (_, _, h, w) = frames.dims4().unwrap();
    let planes = frames
        .get(f)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    RgbImage::from_fn(w as u32, h as u32, |x, y| {
        let i = y as usize * w + x as usize;
        image::Rgb(std::array::from_fn(|c| {
            (planes[c * h * w + i].clamp(0.0, 1.0) * 255.0).round() as u8
        }))
    })
}

/// PSNR in dB of `decoded` against `expected` over `expected`'s pixels.
fn psnr(decoded: &RgbImage, expected: &RgbImage) -> f64 {
    let mut sum = 0.0;
    for (x, y, p) in expected.enumerate_pixels() {
        let q = decoded.get_pixel(x, y);
        for c in 0..3 {
            sum += (f64::from(p[c]) - f64::from(q[c])).powi(2);
        }
    }
    let mse = sum / (3 * expected.width() * expected.height()) as f64;
    10.0 * (255.0f64.powi(2) / mse).log10()
}

/// What a player reads from the boxes: `(sample count, width, height, timescale, every
/// sample's duration, whether sample 1 is a key frame)`.
fn track_facts(path: &Path) -> (u32, u16, u16, u32, Vec<u32>, bool) {
    let size = fs::metadata(path).unwrap().len();
    let file = BufReader::new(fs::File::open(path).unwrap());
    let mut mp4 = mp4::Mp4Reader::read_header(file, size).unwrap();
    let track = mp4.tracks().values().next().unwrap();
    assert_eq!(track.media_type().unwrap(), mp4::MediaType::H264);
    let (id, count) = (track.track_id(), track.sample_count());
    let facts = (count, track.width(), track.height(), track.timescale());
    let samples: Vec<mp4::Mp4Sample> = (1..=count)
        .map(|s| mp4.read_sample(id, s).unwrap().unwrap())
        .collect();
    let durations = samples.iter().map(|s| s.duration).collect();
    (
        facts.0,
        facts.1,
        facts.2,
        facts.3,
        durations,
        samples[0].is_sync,
    )
}

/// The top-level boxes' types, in file order.
fn top_level_boxes(path: &Path) -> Vec<String> {
    let bytes = fs::read(path).unwrap();
    let mut kinds = Vec::new();
    let mut at = 0;
    while at + 8 <= bytes.len() {
        let size = u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        kinds.push(String::from_utf8_lossy(&bytes[at + 4..at + 8]).into_owned());
        at += size;
    }
    kinds
}

#[test]
fn an_mp4_is_read_back_with_its_frames_size_and_rate() {
    let scratch = Scratch::new("mp4-round-trip");
    let frames = moving_disc(9, 48, 64);
    let path = scratch.path("clip.mp4");
    write_video(&frames, &path, 7.0).unwrap();
    assert_eq!(scratch.entries().len(), 1, "no staging left behind");
    assert_eq!(
        top_level_boxes(&path),
        ["ftyp", "moov", "mdat"],
        "laid out for streaming"
    );
    let (count, width, height, timescale, durations, key_first) = track_facts(&path);
    assert_eq!((count, width, height), (9, 64, 48));
    assert_eq!(timescale, 7000);
    assert!(durations.iter().all(|&d| d == 1000), "{durations:?}");
    assert!(key_first, "the first frame is a key frame");

    let video = read_video(&path).unwrap();
    assert_eq!(video.frames.len(), 9);
    assert_eq!(video.fps, Some(7.0));
    for (f, decoded) in video.frames.iter().enumerate() {
        assert_eq!(decoded.dimensions(), (64, 48));
        let db = psnr(decoded, &rgb8(&frames, f));
        assert!(db > 35.0, "frame {f}: PSNR {db:.1} dB");
    }
}

/// 4:2:0 needs even sides: an odd frame is padded by repeating its last row and column.
#[test]
fn odd_sizes_are_padded_to_even_ones() {
    let scratch = Scratch::new("mp4-odd");
    let frames = moving_disc(3, 21, 33);
    let path = scratch.path("odd.mp4");
    write_video(&frames, &path, 8.0).unwrap();
    let video = read_video(&path).unwrap();
    assert_eq!(video.frames.len(), 3);
    for (f, decoded) in video.frames.iter().enumerate() {
        assert_eq!(decoded.dimensions(), (34, 22));
        let db = psnr(decoded, &rgb8(&frames, f));
        assert!(db > 30.0, "frame {f}: PSNR {db:.1} dB");
        let diff: u32 = (0..21)
            .flat_map(|y| (0..3).map(move |c| (y, c)))
            .map(|(y, c)| {
                u32::from(decoded.get_pixel(33, y)[c].abs_diff(decoded.get_pixel(32, y)[c]))
            })
            .sum();
        let mean = f64::from(diff) / 63.0;
        assert!(
            mean < 3.0,
            "the padding repeats the last column: off by {mean:.1} on average"
        );
    }
}

/// Frame rates with decimals are timed exactly, to a thousandth of a frame per second.
#[test]
fn a_fractional_frame_rate_is_exact() {
    let scratch = Scratch::new("mp4-ntsc");
    let path = scratch.path("ntsc.mp4");
    write_video(&moving_disc(2, 16, 16), &path, 29.97).unwrap();
    let (count, _, _, timescale, durations, _) = track_facts(&path);
    assert_eq!((count, timescale), (2, 29_970));
    assert_eq!(durations, [1000, 1000]);
    assert_eq!(read_video(&path).unwrap().fps, Some(29.97));
}

#[test]
fn frame_rates_and_sizes_an_mp4_cannot_hold_are_refused_before_any_frame() {
    let scratch = Scratch::new("mp4-refused");
    let path = scratch.path("clip.mp4");
    for fps in [0.0, 0.0001, -7.0, f64::NAN, f64::INFINITY] {
        let err = VideoOutput::create(&path, fps).unwrap_err();
        assert!(matches!(err, VideoError::Fps { .. }), "{err:?}");
        assert!(err.to_string().contains("for an MP4"), "{err}");
    }
    let output = VideoOutput::create(&path, 7.0).unwrap();
    output.check_size(2160, 3840).unwrap();
    output.check_size(3840, 2160).unwrap();
    let err = output.check_size(2162, 3840).unwrap_err();
    assert!(err.to_string().contains("at most 3840x2160"), "{err}");
    let err = output.check_size(16, 14).unwrap_err();
    assert!(err.to_string().contains("at least 16x16"), "{err}");
    drop(output);
    let err = write_video(&moving_disc(2, 8, 24), &path, 8.0).unwrap_err();
    assert!(matches!(err, VideoError::Mp4 { .. }), "{err:?}");
    assert!(
        err.to_string().contains("frames of 8x24 do not fit"),
        "{err}"
    );
    assert!(scratch.entries().is_empty());
}
