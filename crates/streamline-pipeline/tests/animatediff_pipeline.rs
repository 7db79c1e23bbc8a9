//! The AnimateDiff pipeline end to end against diffusers' `AnimateDiffPipeline` on a tiny
//! fixture (same latents, a prompt that gets truncated, a negative prompt, DDIM, guidance),
//! and the same frames under slicing plans.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{assert_plan_frames, fixture, io, per_phase_peak, smallest_peak_on_rows};
use serde::Deserialize;
use streamline_pipeline::animatediff::{AnimateDiff, AnimateDiffSettings};
use streamline_pipeline::phases::Residency;
use streamline_pipeline::quality::max_abs;
use streamline_pipeline::run::RunReport;
use streamline_pipeline::svd::unit_noise;
use streamline_pipeline::Optimization;
use streamline_rehash::{AutoRule, Rehash, Schedule};

#[derive(Deserialize)]
struct Call {
    prompt: String,
    negative_prompt: String,
    num_frames: usize,
    height: usize,
    width: usize,
    num_inference_steps: usize,
    guidance_scale: f64,
    decode_chunk_size: usize,
}

fn setup() -> (AnimateDiff, Call, Tensor, Tensor) {
    let dir = fixture("animatediff_pipeline");
    let call: Call =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let pipe = AnimateDiff::load(
        &dir.join("model"),
        &dir.join("motion_adapter"),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let io = io("animatediff_pipeline");
    (
        pipe,
        call,
        io["latents"].clone(),
        io["frames"].squeeze(0).unwrap(),
    )
}

fn generate(pipe: &AnimateDiff, call: &Call, latents: &Tensor, opt: Optimization) -> Tensor {
    run(pipe, call, latents, opt, Rehash::Off).0
}

/// diffusers' call as the pipeline's settings.
fn settings(call: &Call, rehash: Rehash) -> AnimateDiffSettings {
    AnimateDiffSettings {
        height: call.height,
        width: call.width,
        num_frames: call.num_frames,
        num_inference_steps: call.num_inference_steps,
        guidance_scale: call.guidance_scale,
        decode_chunk_size: call.decode_chunk_size,
        rehash,
        reuse_guidance: false,
    }
}

fn run(
    pipe: &AnimateDiff,
    call: &Call,
    latents: &Tensor,
    opt: Optimization,
    rehash: Rehash,
) -> (Tensor, RunReport) {
    let settings = settings(call, rehash);
    pipe.generate(
        &call.prompt,
        Some(&call.negative_prompt),
        &settings,
        latents,
        opt,
        &mut |_| {},
    )
    .unwrap()
}

/// Every step a key step is original inference; fewer key steps run partial UNet steps;
/// auto schedules choose theirs during the run.
#[test]
fn step_rehash_runs_in_the_animatediff_loop() {
    let (pipe, call, latents, _) = setup();
    let steps = call.num_inference_steps;
    let original = generate(&pipe, &call, &latents, Optimization::Original);
    let schedule = |keys| Rehash::Schedule(Schedule::uniform(steps, keys).unwrap());
    let (all, report) = run(
        &pipe,
        &call,
        &latents,
        Optimization::Original,
        schedule(steps),
    );
    assert_eq!(max_abs(&all, &original).unwrap(), 0.0);
    assert_eq!((report.full_steps, report.partial_steps), (steps, 0));
    let (half, report) = run(&pipe, &call, &latents, Optimization::Original, schedule(2));
    assert_eq!((report.full_steps, report.partial_steps), (2, steps - 2));
    let err = max_abs(&half, &original).unwrap();
    assert!(
        err > 0.0 && err.is_finite(),
        "partial steps changed nothing: {err}"
    );
    // Key steps chosen during the run: every one at a zero threshold, the first only above
    // every change.
    let auto = |threshold| Rehash::Auto(AutoRule::new(threshold));
    let (every, report) = run(&pipe, &call, &latents, Optimization::Original, auto(0.0));
    assert_eq!(max_abs(&every, &original).unwrap(), 0.0);
    assert_eq!(report.key_steps, (0..steps).collect::<Vec<_>>());
    let (_, report) = run(&pipe, &call, &latents, Optimization::Original, auto(1e9));
    assert_eq!(
        (report.key_steps, report.partial_steps),
        (vec![0], steps - 1)
    );
}

#[test]
fn frames_match_diffusers_and_every_plan() {
    let (pipe, call, latents, reference) = setup();
    let ours = generate(&pipe, &call, &latents, Optimization::Original);
    let err = max_abs(&ours, &reference).unwrap();
    assert!(err <= 2e-3, "frames vs diffusers: max abs {err}");
    for opt in [
        Optimization::Paper {
            temporal_chunks: 7,
            spatial_chunks: 7,
        },
        Optimization::Paper {
            temporal_chunks: 2,
            spatial_chunks: 3,
        },
    ] {
        let sliced = generate(&pipe, &call, &latents, opt);
        let err = max_abs(&sliced, &ours).unwrap();
        assert!(err <= 1e-5, "{opt:?}: max abs vs original {err}");
    }
}

#[test]
fn wrong_latents_and_folders_are_clear_errors() {
    let (pipe, call, latents, _) = setup();
    let settings = AnimateDiffSettings {
        height: call.height,
        width: call.width,
        num_frames: call.num_frames + 1,
        ..AnimateDiffSettings::default()
    };
    let err = pipe
        .generate(
            "x",
            None,
            &settings,
            &latents,
            Optimization::Original,
            &mut |_| {},
        )
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("latents have shape") && err.contains("expected [1, 4, 6, 8, 8]"),
        "{err}"
    );
    let dir = fixture("animatediff_pipeline");
    let err = AnimateDiff::load(&dir, &dir.join("motion_adapter"), DType::F32, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("missing `unet/`"), "{err}");
    let not_adapter = dir.join("model/unet/..");
    let err = AnimateDiff::load(&dir.join("model"), &not_adapter, DType::F32, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("not a motion adapter folder"), "{err}");
}

/// A whole-run budget that only each model in its own phases meets: every phase within it,
/// and the frames of original inference, bit for bit (the text encoder, the UNet and the VAE
/// are read again from their files as the phases need them).
#[test]
fn a_budget_met_by_per_phase_residency_keeps_the_frames() {
    let (pipe, call, latents, _) = setup();
    let settings = settings(&call, Rehash::Off);
    let original = pipe.plan(&settings, Optimization::Original).unwrap();
    // Each phase with only its own models and original inference's activations.
    let budget = per_phase_peak(&original);
    assert!(
        budget < original.total(),
        "the fixture's models are too small"
    );
    let opt = Optimization::Budget { bytes: budget };
    assert_eq!(
        pipe.plan(&settings, opt).unwrap().run.residency,
        Residency::PerPhase
    );
    let expected = generate(&pipe, &call, &latents, Optimization::Original);
    for _ in 0..2 {
        let (frames, report) = run(&pipe, &call, &latents, opt, Rehash::Off);
        assert_eq!(max_abs(&frames, &expected).unwrap(), 0.0);
        assert!(report.phases.iter().all(|p| p.planned <= budget));
    }
    let again = generate(&pipe, &call, &latents, Optimization::Original);
    assert_eq!(max_abs(&again, &expected).unwrap(), 0.0);
}

/// The tightest whole-run budget, the smallest peak any plan reaches, at 8 times the
/// fixture's size with 2 frames and no guidance, where the decode's full-resolution
/// activations outgrow the UNet's as at full size: row bands in the decode, each model only
/// in its phases, and the frames of original inference within the exactness contract.
#[test]
fn the_smallest_whole_run_peak_keeps_the_frames() {
    let (pipe, mut call, latents, _) = setup();
    let (b, c, _, h, w) = latents.dims5().unwrap();
    (call.height, call.width, call.num_frames) = (8 * call.height, 8 * call.width, 2);
    (
        call.guidance_scale,
        call.decode_chunk_size,
        call.num_inference_steps,
    ) = (1.0, 2, 2);
    let latents = unit_noise((b, c, 2, 8 * h, 8 * w), 7, &Device::Cpu).unwrap();
    let settings = settings(&call, Rehash::Off);
    let budget = smallest_peak_on_rows(|o| pipe.plan(&settings, o));
    let frames = generate(&pipe, &call, &latents, budget);
    let original = generate(&pipe, &call, &latents, Optimization::Original);
    assert_plan_frames("smallest peak", &frames, &original);
}

/// Guidance reuse: partial steps run the conditional half alone, so they compute less than
/// partial steps of both halves, and the frames stay near those; key steps are untouched.
#[test]
fn partial_steps_reuse_the_guidance_difference() {
    let (pipe, call, latents, _) = setup();
    let steps = call.num_inference_steps;
    let generate = |s: &AnimateDiffSettings| {
        let negative = Some(call.negative_prompt.as_str());
        pipe.generate(
            &call.prompt,
            negative,
            s,
            &latents,
            Optimization::Original,
            &mut |_| {},
        )
        .unwrap()
    };
    let mut both = settings(
        &call,
        Rehash::Schedule(Schedule::uniform(steps, 2).unwrap()),
    );
    let (two, two_report) = generate(&both);
    both.reuse_guidance = true;
    let (one, one_report) = generate(&both);
    assert_eq!(one_report.key_steps, two_report.key_steps);
    assert!(
        one_report.unet_flops < two_report.unet_flops,
        "{} FLOPs reusing the guidance, {} without",
        one_report.unet_flops,
        two_report.unet_flops
    );
    let err = max_abs(&one, &two).unwrap();
    assert!(
        err > 0.0 && err < 0.2,
        "reused guidance moved the frames by {err}"
    );
    // Every step a key step: nothing to reuse, original inference.
    both.rehash = Rehash::Schedule(Schedule::every_step(steps));
    let (every, _) = generate(&both);
    let original = generate(&settings(&call, Rehash::Off)).0;
    assert_eq!(max_abs(&every, &original).unwrap(), 0.0);
}
