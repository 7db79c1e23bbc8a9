//! The built-in default model (docs/default-model.md) makes the motion it was taught.
//!
//! For the example image of each shape class (examples/*.png) a whole `streamline svd` run at
//! the model's defaults (64x64, 8 frames, 25 steps, guidance 1 -> 3) must move the shape's
//! centroid by at least a quarter of the frame in the taught direction (red right, blue down,
//! green up), and its first frame must resemble the image (PSNR >= 20 dB). The paper's 7/7
//! chunks and a memory budget must give the same frames (max abs <= 2e-3) under a smaller
//! peak. `STREAMLINE_DEFAULT_MODEL=<folder>` runs this against a retrained model
//! (`cargo xtask train-default`).

mod common;

use candle_core::Tensor;
use common::{default_model, example, generate, max_abs};
use streamline_pipeline::quality::psnr;
use streamline_pipeline::Optimization;
use streamline_rehash::Rehash;

/// Shape pixels are saturated in their class colour; backgrounds are grey with a faint tint.
const SATURATION: f32 = 0.3;
const MIN_PSNR_DB: f64 = 20.0;
const PLAN_TOLERANCE: f32 = 2e-3;

struct Case {
    name: &'static str,
    /// RGB channel of the class colour.
    channel: usize,
    /// Taught direction, (dy, dx) in image coordinates.
    direction: (f32, f32),
}

const CASES: [Case; 3] = [
    Case {
        name: "red",
        channel: 0,
        direction: (0.0, 1.0),
    },
    Case {
        name: "blue",
        channel: 2,
        direction: (1.0, 0.0),
    },
    Case {
        name: "green",
        channel: 1,
        direction: (-1.0, 0.0),
    },
];

/// Centroid (y, x) of the pixels saturated in `channel`, and how many there are.
fn centroid(frame: &Tensor, channel: usize) -> ((f32, f32), usize) {
    let width = frame.dim(2).unwrap();
    let rgb = frame.flatten_from(1).unwrap().to_vec2::<f32>().unwrap();
    let (mut sy, mut sx, mut n) = (0.0, 0.0, 0);
    for (i, ((r, g), b)) in rgb[0].iter().zip(&rgb[1]).zip(&rgb[2]).enumerate() {
        let px = [*r, *g, *b];
        let other = (0..3)
            .filter(|c| *c != channel)
            .map(|c| px[c])
            .fold(f32::MIN, f32::max);
        if px[channel] - other > SATURATION {
            sy += (i / width) as f32 + 0.5;
            sx += (i % width) as f32 + 0.5;
            n += 1;
        }
    }
    ((sy / n.max(1) as f32, sx / n.max(1) as f32), n)
}

/// The taught motion: along the direction by >= a quarter of the frame, more than sideways.
fn check_motion(case: &Case, frames: &Tensor, label: &str) {
    let (count, _, _, width) = frames.dims4().unwrap();
    let (first, n_first) = centroid(&frames.get(0).unwrap(), case.channel);
    let (last, n_last) = centroid(&frames.get(count - 1).unwrap(), case.channel);
    assert!(
        n_first > 20 && n_last > 20,
        "{label}: the {} shape is not visible ({n_first} px in the first frame, {n_last} in the last)",
        case.name
    );
    let (dy, dx) = (last.0 - first.0, last.1 - first.1);
    let along = dy * case.direction.0 + dx * case.direction.1;
    let sideways = (dx * case.direction.0 - dy * case.direction.1).abs();
    eprintln!(
        "{label}: centroid {first:?} -> {last:?}, {along:.1} px along the taught direction, {sideways:.1} px sideways"
    );
    assert!(
        along >= width as f32 / 4.0,
        "{label}: the {} shape moved {along:.1} px in its direction (need >= {})",
        case.name,
        width / 4
    );
    assert!(
        sideways < along / 2.0,
        "{label}: the {} shape drifted {sideways:.1} px sideways",
        case.name
    );
}

#[test]
fn default_model_makes_the_taught_motion_under_every_plan() {
    let pipe = default_model();
    for case in &CASES {
        let (image, planes) = example(&pipe, case.name);
        let (original, report) = generate(&pipe, &planes, 0, Optimization::Original, Rehash::Off);
        check_motion(case, &original, &format!("{} original", case.name));
        let quality = psnr(&original.get(0).unwrap(), &image).unwrap();
        eprintln!("{} original: first frame PSNR {quality:.1} dB", case.name);
        assert!(
            quality >= MIN_PSNR_DB,
            "{}: first frame PSNR {quality:.1} dB < {MIN_PSNR_DB}",
            case.name
        );

        // A whole-run budget a third of the decode's activations below original inference's
        // whole-run peak (the decode's), so the budget plan really slices the decode.
        let whole_run = report.phases.iter().map(|p| p.planned).max().unwrap();
        let budget = whole_run - report.decode_peak_bytes / 3;
        let plans = [
            (
                "paper 7/7",
                Optimization::Paper {
                    temporal_chunks: 7,
                    spatial_chunks: 7,
                },
            ),
            ("budget", Optimization::Budget { bytes: budget }),
        ];
        for (label, optimization) in plans {
            let (frames, sliced) = generate(&pipe, &planes, 0, optimization, Rehash::Off);
            let label = format!("{} {label}", case.name);
            let diff = max_abs(&frames, &original);
            eprintln!(
                "{label}: max abs {diff:.2e} vs original; peak bytes UNet step {} -> {}, decode {} -> {}",
                report.unet_peak_bytes,
                sliced.unet_peak_bytes,
                report.decode_peak_bytes,
                sliced.decode_peak_bytes
            );
            assert!(diff <= PLAN_TOLERANCE, "{label}: frames differ by {diff}");
            match optimization {
                Optimization::Budget { bytes } => assert!(
                    sliced.phases.iter().all(|p| p.planned <= bytes)
                        && sliced.decode_peak_bytes < report.decode_peak_bytes,
                    "{label}: over the {bytes}-byte budget, or the decode not sliced"
                ),
                _ => assert!(sliced.unet_peak_bytes < report.unet_peak_bytes, "{label}"),
            }
            check_motion(case, &frames, &label);
        }
    }
}
