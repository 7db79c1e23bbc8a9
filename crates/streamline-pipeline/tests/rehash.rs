//! Step Rehash inside the SVD pipeline: a schedule of only key steps is original inference,
//! partial steps compute less, rehash composes with slicing and grouping, auto schedules
//! choose their key steps during the run, and on the default model a 13-of-25 schedule from
//! the dynamic program keeps frames above 30 dB PSNR and `auto:0.3` above 35 dB.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use common::{default_model, example, fixture, generate, max_abs};
use streamline_pipeline::quality::{psnr, ssim};
use streamline_pipeline::svd::{Planes, RunReport, StableVideoDiffusion, SvdError, SvdSettings};
use streamline_pipeline::Optimization;
use streamline_rehash::{optimal, similarity, AutoRule, CachePoint, Metric, Rehash, Schedule};

const PAPER: Optimization = Optimization::Paper {
    temporal_chunks: 7,
    spatial_chunks: 7,
};

struct Fixture {
    pipe: StableVideoDiffusion,
    io: HashMap<String, Tensor>,
    image: Planes,
}

/// The tiny pipeline fixture (3 frames 16x24, 2 up blocks: one boundary) at 4 steps.
fn fixture_pipe() -> Fixture {
    let dev = Device::Cpu;
    let dir = fixture("svd_pipeline");
    let io = candle_core::safetensors::load(dir.join("io.safetensors"), &dev).unwrap();
    let pipe = StableVideoDiffusion::load(&dir.join("model"), DType::F32, &dev).unwrap();
    let image = streamline_pipeline::video::load_image(&dir.join("image.png"), None).unwrap();
    Fixture {
        pipe,
        io,
        image: Planes::from_tensor(&image).unwrap(),
    }
}

impl Fixture {
    fn run(&self, optimization: Optimization, rehash: Rehash) -> (Tensor, RunReport) {
        self.try_run(optimization, rehash).unwrap()
    }

    fn try_run(
        &self,
        optimization: Optimization,
        rehash: Rehash,
    ) -> Result<(Tensor, RunReport), SvdError> {
        let settings = SvdSettings {
            height: 16,
            width: 24,
            num_frames: Some(3),
            num_inference_steps: 4,
            rehash,
            ..SvdSettings::default()
        };
        self.pipe.generate(
            &self.image,
            &settings,
            &self.io["latents"],
            &self.io["image_noise"],
            optimization,
            &mut |_| {},
        )
    }
}

#[test]
fn a_schedule_of_only_key_steps_is_original_inference() {
    let f = fixture_pipe();
    for optimization in [Optimization::Original, PAPER] {
        let (original, plain) = f.run(optimization, Rehash::Off);
        let (every, report) = f.run(optimization, Rehash::Schedule(Schedule::every_step(4)));
        assert_eq!(max_abs(&every, &original), 0.0, "{optimization:?}");
        assert_eq!((report.full_steps, report.partial_steps), (4, 0));
        assert_eq!(report.unet_flops, plain.unet_flops);
    }
}

fn auto(threshold: f64) -> Rehash {
    Rehash::Auto(AutoRule::new(threshold))
}

/// `auto:0` is original inference; above every change only the first step runs whole; a run
/// chooses the same key steps every time, and with the paper's slicing too.
#[test]
fn an_auto_schedule_chooses_key_steps_during_the_run() {
    let f = fixture_pipe();
    let (original, plain) = f.run(Optimization::Original, Rehash::Off);
    let (every, report) = f.run(Optimization::Original, auto(0.0));
    assert_eq!(max_abs(&every, &original), 0.0);
    assert_eq!(report.key_steps, vec![0, 1, 2, 3]);
    assert_eq!(report.unet_flops, plain.unet_flops);
    let (first, report) = f.run(Optimization::Original, auto(1e9));
    assert_eq!((report.key_steps, report.partial_steps), (vec![0], 3));
    assert!(max_abs(&first, &original) > 0.0);
    // A threshold between: the fixture's output changes pick some steps, the same each run.
    let (frames, report) = f.run(Optimization::Original, auto(0.05));
    eprintln!("auto:0.05 key steps {:?}", report.key_steps);
    let (again, second) = f.run(Optimization::Original, auto(0.05));
    assert_eq!(max_abs(&again, &frames), 0.0);
    assert_eq!(second.key_steps, report.key_steps);
    let (sliced, sliced_report) = f.run(PAPER, auto(0.05));
    assert_eq!(sliced_report.key_steps, report.key_steps);
    assert!(max_abs(&sliced, &frames) <= 2e-3);
}

#[test]
fn partial_steps_compute_less_and_compose_with_slicing() {
    let f = fixture_pipe();
    let (original, full) = f.run(Optimization::Original, Rehash::Off);
    let schedule = Schedule {
        key_steps: vec![0, 2],
        ..Schedule::every_step(4)
    };
    let rehash = Rehash::Schedule(schedule);
    let (frames, report) = f.run(Optimization::Original, rehash.clone());
    assert_eq!((report.full_steps, report.partial_steps), (2, 2));
    assert!(
        report.unet_flops < full.unet_flops,
        "{} FLOPs with rehash, {} without",
        report.unet_flops,
        full.unet_flops
    );
    assert!(
        max_abs(&frames, &original) > 0.0,
        "partial steps reuse stale features"
    );
    // A whole-run budget that slices the UNet step with each model only in its phases
    // (3.3 MiB for this fixture, Step Rehash's cache counted; 6.0 MiB for original inference).
    let budget = Optimization::Budget {
        bytes: (33 << 20) / 10,
    };
    for optimization in [PAPER, budget] {
        let (sliced, _) = f.run(optimization, rehash.clone());
        let diff = max_abs(&sliced, &frames);
        assert!(
            diff <= 2e-3,
            "{optimization:?}: rehash frames differ by {diff}"
        );
    }
}

#[test]
fn calibration_records_every_step_and_needs_one_call_per_step() {
    let f = fixture_pipe();
    let (original, _) = f.run(Optimization::Original, Rehash::Off);
    let (frames, report) = f.run(
        Optimization::Original,
        Rehash::Record(CachePoint::default()),
    );
    assert_eq!(
        max_abs(&frames, &original),
        0.0,
        "recording is original inference"
    );
    assert_eq!(report.recorded.len(), 4);
    let sim = similarity(&report.recorded, Metric::Cosine).unwrap();
    assert!((0..4).all(|i| (sim.get(i, i) - 1.0).abs() < 1e-9));

    let naive = Optimization::Naive { temporal_chunks: 2 };
    let record = Rehash::Record(CachePoint::default());
    let err = f.try_run(naive, record).unwrap_err().to_string();
    assert!(err.contains("naive"), "{err}");
    let bad = Rehash::Record(CachePoint::UpBlock(3));
    let err = f
        .try_run(Optimization::Original, bad)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("up_blocks.3") && err.contains("up_blocks.0"),
        "{err}"
    );
}

/// Calibrate on the blue example (seed 1), evaluate on the red one (seed 0): held-out image
/// and noise.
#[test]
fn dp_schedule_13_of_25_keeps_the_default_model_above_30_db() {
    let pipe = default_model();
    let (_, blue) = example(&pipe, "blue");
    let record = Rehash::Record(CachePoint::default());
    let (_, calibration) = generate(&pipe, &blue, 1, Optimization::Original, record);
    let sim = similarity(&calibration.recorded, Metric::Cosine).unwrap();
    let schedule = Schedule {
        key_steps: optimal(&sim, 13).unwrap(),
        ..Schedule::every_step(25)
    };
    let rehash = Rehash::Schedule(schedule.clone());

    let (_, red) = example(&pipe, "red");
    let (original, full) = generate(&pipe, &red, 0, Optimization::Original, Rehash::Off);
    let (frames, report) = generate(&pipe, &red, 0, Optimization::Original, rehash.clone());
    let quality = psnr(&frames, &original).unwrap();
    let structure = ssim(&frames, &original).unwrap();
    eprintln!(
        "key steps {:?}: PSNR {quality:.2} dB, SSIM {structure:.4}, UNet FLOPs {:.3}x of original, denoising {:.2} s vs {:.2} s",
        schedule.key_steps,
        report.unet_flops as f64 / full.unet_flops as f64,
        report.denoise_seconds,
        full.denoise_seconds
    );
    assert_eq!((report.full_steps, report.partial_steps), (13, 12));
    assert!(report.unet_flops < full.unet_flops);
    assert!(quality >= 30.0, "PSNR {quality:.2} dB < 30 dB");

    let (sliced, _) = generate(&pipe, &red, 0, PAPER, rehash);
    let diff = max_abs(&sliced, &frames);
    assert!(
        diff <= 2e-3,
        "rehash with paper 7/7: frames differ by {diff}"
    );

    // No calibration: key steps chosen during the run.
    let (frames, report) = generate(&pipe, &red, 0, Optimization::Original, auto(0.3));
    let quality = psnr(&frames, &original).unwrap();
    eprintln!(
        "auto:0.3 key steps {:?}: PSNR {quality:.2} dB",
        report.key_steps
    );
    assert!(report.key_steps.len() < 13 && report.key_steps[0] == 0);
    assert!(quality >= 35.0, "auto:0.3: PSNR {quality:.2} dB < 35 dB");
}

/// Guidance reuse in the SVD loop: partial steps of the conditional half alone compute less,
/// choose the same key steps under auto, and keep the frames near those of partial steps of
/// both halves.
#[test]
fn partial_steps_reuse_the_guidance_difference() {
    let f = fixture_pipe();
    let settings = |rehash, reuse_guidance| SvdSettings {
        height: 16,
        width: 24,
        num_frames: Some(3),
        num_inference_steps: 4,
        rehash,
        reuse_guidance,
        ..SvdSettings::default()
    };
    let run = |s: &SvdSettings| {
        let (latents, noise) = (&f.io["latents"], &f.io["image_noise"]);
        f.pipe
            .generate(
                &f.image,
                s,
                latents,
                noise,
                Optimization::Original,
                &mut |_| {},
            )
            .unwrap()
    };
    let schedule = Rehash::Schedule(Schedule {
        key_steps: vec![0, 2],
        ..Schedule::every_step(4)
    });
    let (two, two_report) = run(&settings(schedule.clone(), false));
    let (one, one_report) = run(&settings(schedule, true));
    assert_eq!(one_report.key_steps, vec![0, 2]);
    assert!(one_report.unet_flops < two_report.unet_flops);
    let err = max_abs(&one, &two);
    assert!(
        err > 0.0 && err < 0.2,
        "reused guidance moved the frames by {err}"
    );
    let (_, sliced) = f
        .pipe
        .generate(
            &f.image,
            &settings(auto(0.05), true),
            &f.io["latents"],
            &f.io["image_noise"],
            PAPER,
            &mut |_| {},
        )
        .unwrap();
    let (_, whole) = run(&settings(auto(0.05), true));
    assert_eq!(sliced.key_steps, whole.key_steps);
}
