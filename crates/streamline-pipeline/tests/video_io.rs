//! Round trips through every output form of `write_video`, and `load_image`, on tiny synthetic
//! videos whose colours a GIF palette holds exactly.

use std::fs;
use std::path::Path;

use candle_core::{Device, Tensor};
use image::codecs::gif::GifDecoder;
use image::{AnimationDecoder, Rgb, RgbImage};
use streamline_pipeline::video::{load_image, write_video, VideoError};

mod common;

use common::{names_in, Scratch};

const FRAMES: usize = 3;
const HEIGHT: usize = 8;
const WIDTH: usize = 12;

/// Pure colours (every channel 0 or 1) in quadrants that move from frame to frame, so a swapped
/// axis, channel or frame shows; some channels overshoot [0, 1] to exercise the clamp.
fn channel_value(f: usize, c: usize, y: usize, x: usize) -> f32 {
    let colour = (f * 3 + (y * 2 / HEIGHT) * 2 + x * 2 / WIDTH) % 8;
    let on = (colour >> c) & 1 == 1;
    match (on, (x + y) % 5) {
        (true, 0) => 1.25,
        (true, _) => 1.0,
        (false, 0) => -0.5,
        (false, _) => 0.0,
    }
}

fn synthetic_values() -> Vec<f32> {
    let mut values = Vec::with_capacity(FRAMES * 3 * HEIGHT * WIDTH);
    for f in 0..FRAMES {
        for c in 0..3 {
            for y in 0..HEIGHT {
                for x in 0..WIDTH {
                    values.push(channel_value(f, c, y, x));
                }
            }
        }
    }
    values
}

fn synthetic_video() -> Tensor {
    Tensor::from_vec(synthetic_values(), (FRAMES, 3, HEIGHT, WIDTH), &Device::Cpu).unwrap()
}

fn expected_frame(f: usize) -> RgbImage {
    RgbImage::from_fn(WIDTH as u32, HEIGHT as u32, |x, y| {
        let (x, y) = (x as usize, y as usize);
        Rgb(std::array::from_fn(|c| {
            if channel_value(f, c, y, x) > 0.5 {
                255
            } else {
                0
            }
        }))
    })
}

fn frame_names(count: usize) -> Vec<String> {
    (0..count).map(|i| format!("frame_{i:03}.png")).collect()
}

#[test]
fn gif_holds_every_frame_at_the_frame_rate_and_loops() {
    let scratch = Scratch::new("gif");
    let path = scratch.path("clip.gif");
    write_video(&synthetic_video(), &path, 7.0).unwrap();
    assert_eq!(scratch.entries(), ["clip.gif"]);

    let bytes = fs::read(&path).unwrap();
    let netscape_loop_forever = b"NETSCAPE2.0\x03\x01\x00\x00";
    assert!(
        bytes
            .windows(netscape_loop_forever.len())
            .any(|w| w == netscape_loop_forever),
        "no infinite-loop extension"
    );
    let decoder = GifDecoder::new(std::io::Cursor::new(bytes)).unwrap();
    let frames = decoder.into_frames().collect_frames().unwrap();
    assert_eq!(frames.len(), FRAMES);
    for (f, frame) in frames.into_iter().enumerate() {
        // round(100 / 7) = 14 centiseconds.
        assert_eq!(frame.delay().numer_denom_ms(), (140, 1), "frame {f}");
        let rgb = image::DynamicImage::ImageRgba8(frame.into_buffer()).into_rgb8();
        assert_eq!(rgb, expected_frame(f), "frame {f}");
    }
}

#[test]
fn png_frames_go_into_a_new_directory_named_with_a_slash() {
    let scratch = Scratch::new("png-new");
    let dir = scratch.path("nested/frames");
    let mut with_slash = dir.clone().into_os_string();
    with_slash.push("/");
    write_video(&synthetic_video(), Path::new(&with_slash), 8.0).unwrap();

    assert_eq!(names_in(&dir), frame_names(FRAMES));
    assert_eq!(names_in(&scratch.path("nested")), ["frames"]);
    for (f, name) in frame_names(FRAMES).iter().enumerate() {
        let read = image::open(dir.join(name)).unwrap();
        assert!(matches!(read, image::DynamicImage::ImageRgb8(_)));
        assert_eq!(read.into_rgb8(), expected_frame(f), "{name}");
    }
}

/// Same-named frames are replaced; everything else stays, frames past the new count included
/// (they may be the user's own: nothing the write did not make is deleted).
#[test]
fn png_frames_replace_same_named_frames_in_an_existing_directory() {
    let scratch = Scratch::new("png-existing");
    let dir = scratch.path("out");
    fs::create_dir(&dir).unwrap();
    fs::write(dir.join("notes.txt"), "kept").unwrap();
    let longer = Tensor::zeros((5, 3, 2, 2), candle_core::DType::F32, &Device::Cpu).unwrap();
    write_video(&longer, &dir, 8.0).unwrap();
    assert_eq!(names_in(&dir).len(), 6);

    write_video(&synthetic_video(), &dir, 8.0).unwrap();
    let mut expected = frame_names(5);
    expected.push("notes.txt".into());
    assert_eq!(names_in(&dir), expected);
    assert_eq!(fs::read_to_string(dir.join("notes.txt")).unwrap(), "kept");
    let last = image::open(dir.join("frame_002.png")).unwrap().into_rgb8();
    assert_eq!(last, expected_frame(2));
}

#[test]
fn a_path_without_extension_is_a_frame_directory() {
    let scratch = Scratch::new("png-bare");
    let dir = scratch.path("frames");
    write_video(&synthetic_video(), &dir, 8.0).unwrap();
    assert_eq!(names_in(&dir), frame_names(FRAMES));
    assert_eq!(scratch.entries(), ["frames"]);
}

/// numpy rounds half to even, so `(x * 255).round()` sends 2.5 to 2 where `f32::round` gives 3.
#[test]
fn quantisation_matches_numpy_rounding() {
    let scratch = Scratch::new("png-rounding");
    let halves = [0.5f32, 2.5, 127.5, 254.5];
    let values: Vec<f32> = halves.iter().map(|h| h / 255.0).collect();
    for (&h, &v) in halves.iter().zip(&values) {
        assert_eq!(
            v * 255.0,
            h,
            "test precondition: {h} / 255 * 255 is exact in f32"
        );
    }
    let mut planes = values.clone();
    planes.extend([0.2f32, 0.6, 1.0 / 3.0, 2.0]);
    planes.extend([f32::NEG_INFINITY, 0.0, 1.0, 0.999]);
    let frame = Tensor::from_vec(planes, (1, 3, 1, 4), &Device::Cpu).unwrap();
    let dir = scratch.path("frames");
    write_video(&frame, &dir, 8.0).unwrap();
    let read = image::open(dir.join("frame_000.png")).unwrap().into_rgb8();
    let pixels: Vec<[u8; 3]> = read.pixels().map(|p| p.0).collect();
    assert_eq!(
        pixels,
        [[0, 51, 0], [2, 153, 0], [128, 85, 255], [254, 255, 255]]
    );
}

#[test]
fn safetensors_holds_the_frames_exactly() {
    let scratch = Scratch::new("safetensors");
    let path = scratch.path("clip.safetensors");
    write_video(&synthetic_video(), &path, 8.0).unwrap();
    assert_eq!(scratch.entries(), ["clip.safetensors"]);

    let tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    assert_eq!(tensors.len(), 1);
    let frames = &tensors["frames"];
    assert_eq!(frames.dims(), [FRAMES, 3, HEIGHT, WIDTH]);
    assert_eq!(frames.dtype(), candle_core::DType::F32);
    let read = frames.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(read, synthetic_values());
}

#[test]
fn an_existing_output_is_replaced_whole() {
    let scratch = Scratch::new("replace");
    let path = scratch.path("clip.safetensors");
    fs::write(&path, "old").unwrap();
    write_video(&synthetic_video(), &path, 8.0).unwrap();
    assert_eq!(scratch.entries(), ["clip.safetensors"]);
    let tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    assert_eq!(tensors["frames"].dims(), [FRAMES, 3, HEIGHT, WIDTH]);
}

#[test]
fn an_unsupported_extension_is_refused_by_name() {
    let scratch = Scratch::new("unsupported");
    let path = scratch.path("clip.mkv");
    let err = write_video(&synthetic_video(), &path, 8.0).unwrap_err();
    assert!(matches!(err, VideoError::UnsupportedPath { .. }), "{err:?}");
    let message = err.to_string();
    assert!(message.contains(&*path.to_string_lossy()), "{message}");
    for form in [".mp4", ".gif", ".safetensors", "directory"] {
        assert!(message.contains(form), "{message}");
    }
    assert!(scratch.entries().is_empty());
}

/// GIF sides are 16-bit, so a 70000-pixel-wide frame fails inside the encoder, after the
/// conversion has begun.
#[test]
fn a_write_that_fails_midway_leaves_nothing_behind() {
    let scratch = Scratch::new("midway");
    let wide = Tensor::zeros((2, 3, 1, 70_000), candle_core::DType::F32, &Device::Cpu).unwrap();
    let path = scratch.path("wide.gif");
    let err = write_video(&wide, &path, 8.0).unwrap_err();
    assert!(matches!(err, VideoError::Encode { .. }), "{err:?}");
    assert!(err.to_string().contains(&*path.to_string_lossy()), "{err}");
    assert!(scratch.entries().is_empty(), "{:?}", scratch.entries());
}

/// A directory squatting on a frame's name makes moving that frame in fail after the staging
/// directory is full; the frames already moved stay (moves into an existing directory are one by
/// one), but the staging directory must go.
#[test]
fn a_failed_move_leaves_no_staging_behind() {
    let scratch = Scratch::new("failed-move");
    let dir = scratch.path("out");
    fs::create_dir_all(dir.join("frame_001.png/inside")).unwrap();
    let err = write_video(&synthetic_video(), &dir, 8.0).unwrap_err();
    assert!(matches!(err, VideoError::Io { .. }), "{err:?}");
    assert!(err.to_string().contains(&*dir.to_string_lossy()), "{err}");
    assert_eq!(names_in(&dir), ["frame_000.png", "frame_001.png"]);
}

#[test]
fn malformed_frames_write_nothing_in_any_form() {
    let scratch = Scratch::new("malformed");
    let four_channels =
        Tensor::zeros((2, 4, 8, 12), candle_core::DType::F32, &Device::Cpu).unwrap();
    let integers = Tensor::zeros((2, 3, 8, 12), candle_core::DType::U8, &Device::Cpu).unwrap();
    let no_frames = Tensor::zeros((0, 3, 8, 12), candle_core::DType::F32, &Device::Cpu).unwrap();
    for frames in [&four_channels, &integers, &no_frames] {
        for name in ["clip.gif", "clip.safetensors", "frames/"] {
            let path = scratch.path(name);
            let err = write_video(frames, &path, 8.0).unwrap_err();
            assert!(matches!(err, VideoError::Frames { .. }), "{err:?}");
            assert!(err.to_string().contains(&*path.to_string_lossy()), "{err}");
            assert!(scratch.entries().is_empty(), "{:?}", scratch.entries());
        }
    }
}

#[test]
fn frames_are_not_written_over_a_file() {
    let scratch = Scratch::new("not-a-dir");
    let path = scratch.path("frames");
    fs::write(&path, "precious").unwrap();
    let err = write_video(&synthetic_video(), &path, 8.0).unwrap_err();
    assert!(matches!(err, VideoError::NotADirectory { .. }), "{err:?}");
    assert_eq!(fs::read_to_string(&path).unwrap(), "precious");
    assert_eq!(scratch.entries(), ["frames"]);
}

#[test]
fn a_gif_needs_a_positive_frame_rate() {
    let scratch = Scratch::new("fps");
    for fps in [0.0, -8.0, f64::NAN, f64::INFINITY] {
        let err = write_video(&synthetic_video(), &scratch.path("clip.gif"), fps).unwrap_err();
        assert!(matches!(err, VideoError::Fps { .. }), "{err:?}");
    }
    assert!(scratch.entries().is_empty());
}

#[test]
fn a_missing_image_is_an_error_naming_it() {
    let scratch = Scratch::new("missing");
    let path = scratch.path("absent.png");
    let err = load_image(&path, None).unwrap_err();
    assert!(matches!(err, VideoError::Read { .. }), "{err:?}");
    assert!(err.to_string().contains(&*path.to_string_lossy()), "{err}");

    let garbage = scratch.path("garbage.png");
    fs::write(&garbage, "not an image").unwrap();
    let err = load_image(&garbage, None).unwrap_err();
    assert!(
        err.to_string().contains(&*garbage.to_string_lossy()),
        "{err}"
    );
}

#[test]
fn load_image_gives_channel_planes_in_unit_range() {
    let scratch = Scratch::new("load");
    let image = RgbImage::from_fn(WIDTH as u32, HEIGHT as u32, |x, y| {
        Rgb([(x * 20) as u8, (y * 30) as u8, (x * y) as u8 + 7])
    });
    // A JPEG name on PNG bytes: the format comes from the content.
    let path = scratch.path("input.jpg");
    image
        .save_with_format(&path, image::ImageFormat::Png)
        .unwrap();

    let tensor = load_image(&path, None).unwrap();
    assert_eq!(tensor.dims(), [3, HEIGHT, WIDTH]);
    assert_eq!(tensor.dtype(), candle_core::DType::F32);
    assert!(tensor.device().is_cpu());
    let planes = tensor.to_vec3::<f32>().unwrap();
    for (x, y, pixel) in image.enumerate_pixels() {
        for c in 0..3 {
            let expected = f32::from(pixel[c]) / 255.0;
            assert_eq!(
                planes[c][y as usize][x as usize], expected,
                "({x}, {y}) channel {c}"
            );
        }
    }
}

#[test]
fn load_image_reads_the_first_frame_of_a_gif() {
    let scratch = Scratch::new("load-gif");
    let path = scratch.path("clip.gif");
    write_video(&synthetic_video(), &path, 8.0).unwrap();
    let first = load_image(&path, None).unwrap();
    let expected = expected_frame(0);
    let planes = first.to_vec3::<f32>().unwrap();
    for (x, y, pixel) in expected.enumerate_pixels() {
        for c in 0..3 {
            assert_eq!(
                planes[c][y as usize][x as usize],
                f32::from(pixel[c]) / 255.0
            );
        }
    }
}
