//! One budget for the whole run, on the built-in model: every phase's measured peak (heap
//! bytes above the run's baseline, counted by a tracking global allocator, so weights read
//! again, buffers inside candle ops and the pipeline's own tensors count) within 10% of its
//! planned peak, with every model resident and with each model only in its phases; the
//! frames of every plan equal to original inference's within rounding, and a run that reads
//! its models again equal to the one before, bit for bit.
//!
//! One test in its own binary, so nothing else allocates while it measures.

mod common;

use candle_core::{Device, Tensor};
use common::{
    assert_phases_within_ten_percent, assert_plan_frames, assert_same_frames, default_model,
    example,
};
use streamline_ir::alloc::TrackingAllocator;
use streamline_ir::human;
use streamline_pipeline::phases::Residency;
use streamline_pipeline::run::RunReport;
use streamline_pipeline::svd::{unit_noise, Planes, StableVideoDiffusion, SvdSettings};
use streamline_pipeline::Optimization;

#[global_allocator]
static ALLOC: TrackingAllocator = TrackingAllocator;

const MIB: usize = 1 << 20;

/// A short run (memory does not depend on the step count) of the built-in model.
fn generate(
    pipe: &StableVideoDiffusion,
    image: &Planes,
    settings: &SvdSettings,
    optimization: Optimization,
) -> (Tensor, RunReport) {
    let frames = pipe.num_frames(settings);
    let s = pipe.scale_factor();
    let (h, w) = (settings.height, settings.width);
    let latents = unit_noise(
        (1, frames, pipe.latent_channels(), h / s, w / s),
        7,
        &Device::Cpu,
    );
    let image_noise = unit_noise((1, 3, h, w), 8, &Device::Cpu).unwrap();
    pipe.generate(
        image,
        settings,
        &latents.unwrap(),
        &image_noise,
        optimization,
        &mut |_| {},
    )
    .unwrap()
}

#[test]
fn every_phase_is_measured_within_ten_percent_of_its_plan_and_residency_keeps_the_frames() {
    let pipe = default_model();
    let (_, image) = example(&pipe, "red");
    let (h, w) = pipe.native_size().unwrap();
    let settings = SvdSettings {
        height: h,
        width: w,
        num_inference_steps: 3,
        ..SvdSettings::default()
    };
    let residency = |o| pipe.plan(&settings, o).unwrap().run.residency;
    // A budget that everything resident meets, and one that needs each model in its phases
    // only (just above the smallest whole-run peak, so the calls are sliced too).
    let roomy = Optimization::Budget { bytes: 48 * MIB };
    let tight = Optimization::Budget { bytes: 34 * MIB };
    assert_eq!(residency(roomy), Residency::Resident);
    assert_eq!(residency(tight), Residency::PerPhase);

    let (original, _) = generate(&pipe, &image, &settings, Optimization::Original);
    // Each budget twice: the second run reads the released models again, and gives the first
    // run's frames bit for bit; every plan gives original inference's frames to rounding.
    let mut last: Vec<(Optimization, Tensor)> = Vec::new();
    for optimization in [Optimization::Original, roomy, tight, tight, roomy] {
        let (frames, report) = generate(&pipe, &image, &settings, optimization);
        let label = format!("{optimization:?}");
        assert_plan_frames(&label, &frames, &original);
        if let Some((_, earlier)) = last.iter().find(|(o, _)| *o == optimization) {
            assert_same_frames(&label, &frames, earlier);
        }
        last.push((optimization, frames));
        assert_phases_within_ten_percent(&format!("{optimization:?}"), &report);
        if let Optimization::Budget { bytes } = optimization {
            let peak = report.phases.iter().map(|p| p.planned).max().unwrap();
            assert!(peak <= bytes, "{optimization:?}: planned {}", human(peak));
        }
    }
}
