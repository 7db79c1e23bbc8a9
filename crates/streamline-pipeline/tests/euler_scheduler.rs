//! The Euler scheduler against diffusers 0.30.1 (fixtures/scripts/svd_scheduler.py): schedules
//! for every fixture config and step count, whole denoising loops in f32 (and f16 for SVD's
//! config), and config errors that name the file and the field.

mod common;

use common::schedulers::{loops_match, prefixes, write_config};
use common::{fixture, io};
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use streamline_pipeline::scheduler::{
    EulerDiscreteScheduler, Scheduler, SchedulerClass, SchedulerConfig, SchedulerError,
    TimestepSpacing,
};

fn config_path(case: &str) -> PathBuf {
    match case {
        "svd" => fixture("svd_scheduler").join("scheduler_config.json"),
        other => fixture("svd_scheduler")
            .join(other)
            .join("scheduler_config.json"),
    }
}

/// The scheduler for fixture key prefix `<case>.init` or `<case>.n<N>[.<dtype>]`.
fn scheduler_for(prefix: &str) -> EulerDiscreteScheduler {
    let mut parts = prefix.split('.');
    let case = parts.next().unwrap();
    let mut scheduler = EulerDiscreteScheduler::load(&config_path(case)).unwrap();
    let state = parts.next().unwrap();
    if let Some(n) = state.strip_prefix('n') {
        scheduler.set_timesteps(n.parse().unwrap()).unwrap();
    }
    scheduler
}

fn values(t: &Tensor) -> Vec<f32> {
    t.to_vec1::<f32>().unwrap()
}

/// Largest `|a - b| / |b|` over matching entries.
fn max_rel(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "lengths differ");
    a.iter()
        .zip(b)
        .map(|(&x, &y)| match (x as f64 - y as f64).abs() {
            0.0 => 0.0,
            d => d / (y as f64).abs(),
        })
        .fold(0.0, f64::max)
}

/// Largest `|a - b|` relative to the largest `|b|`: continuous timesteps `0.25 ln(sigma)` cross
/// zero, where an ulp of torch's f32 log is a large elementwise relative error, and the model
/// sees a timestep through a sinusoidal embedding, where only its absolute error matters.
fn max_rel_to_range(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "lengths differ");
    let range = b.iter().map(|y| y.abs() as f64).fold(0.0, f64::max);
    let diff = a.iter().zip(b).map(|(&x, &y)| (x as f64 - y as f64).abs());
    diff.fold(0.0, f64::max) / range
}

/// Every schedule in the fixture; all mismatches are reported together.
#[test]
fn schedules_match_diffusers() {
    let io = io("svd_scheduler");
    let schedules = prefixes(&io, ".timesteps");
    assert!(
        schedules.len() >= 30,
        "fixture has {} schedules",
        schedules.len()
    );
    let mut failures = Vec::new();
    let (mut worst_t, mut worst_s) = (0.0f64, 0.0f64);
    for prefix in &schedules {
        let scheduler = scheduler_for(prefix);
        let expected = |name: &str| values(&io[&format!("{prefix}.{name}")]);
        let timesteps = expected("timesteps");
        if scheduler.num_steps() != timesteps.len() {
            failures.push(format!(
                "{prefix}: {} steps, diffusers has {}",
                scheduler.num_steps(),
                timesteps.len()
            ));
            continue;
        }
        let t = max_rel_to_range(scheduler.timesteps(), &timesteps);
        let s = max_rel(scheduler.sigmas(), &expected("sigmas")).max(max_rel(
            &[scheduler.init_noise_sigma()],
            &expected("init_noise_sigma"),
        ));
        if t > 1e-6 || s > 1e-6 {
            failures.push(format!("{prefix}: timesteps off by {t:e}, sigmas by {s:e}"));
        }
        worst_t = worst_t.max(t);
        worst_s = worst_s.max(s);
    }
    println!(
        "{} schedules: timesteps within {worst_t:e} of their range, sigmas and \
         init_noise_sigma within {worst_s:e} relative",
        schedules.len()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The pipeline's loop, step by step against diffusers'.
#[test]
fn loops_match_diffusers() {
    loops_match(
        "svd_scheduler",
        8,
        |p| Scheduler::EulerDiscrete(scheduler_for(p)),
        1e-5,
    );
}

#[test]
fn svd_checkpoint_config_is_svd() {
    // The file also carries other schedulers' fields (clip_sample, skip_prk_steps, ...),
    // which must be ignored.
    let loaded = SchedulerConfig::load(
        &fixture("svd_scheduler").join("scheduler_config.json"),
        SchedulerClass::EulerDiscrete,
    )
    .unwrap();
    assert_eq!(loaded, SchedulerConfig::svd());
    assert_eq!(loaded.timestep_spacing, TimestepSpacing::Leading);
}

#[test]
fn unsupported_values_name_file_and_field() {
    let cases = [
        (
            "prediction",
            r#"{"prediction_type": "foo"}"#,
            "prediction_type",
            "foo",
        ),
        (
            "beta",
            r#"{"beta_schedule": "cosine"}"#,
            "beta_schedule",
            "cosine",
        ),
        (
            "spacing",
            r#"{"timestep_spacing": "middle"}"#,
            "timestep_spacing",
            "middle",
        ),
        (
            "type",
            r#"{"timestep_type": "edm"}"#,
            "timestep_type",
            "edm",
        ),
        (
            "interp",
            r#"{"interpolation_type": "cubic"}"#,
            "interpolation_type",
            "cubic",
        ),
        (
            "final",
            r#"{"final_sigmas_type": "one"}"#,
            "final_sigmas_type",
            "one",
        ),
        (
            "train",
            r#"{"num_train_timesteps": 1}"#,
            "num_train_timesteps",
            "1",
        ),
        (
            "trained",
            r#"{"trained_betas": [0.1, 0.2]}"#,
            "trained_betas",
            "2 values",
        ),
        ("sigma", r#"{"sigma_min": -1.0}"#, "sigma_min", "-1"),
        (
            "snr",
            r#"{"rescale_betas_zero_snr": true}"#,
            "rescale_betas_zero_snr",
            "true",
        ),
    ];
    for (name, json, field, value) in cases {
        let path = write_config("euler_scheduler", name, json);
        let message = EulerDiscreteScheduler::load(&path).unwrap_err().to_string();
        for part in [path.to_str().unwrap(), field, value] {
            assert!(
                message.contains(part),
                "{name}: {message:?} does not name {part:?}"
            );
        }
    }
    // A value of the wrong type still names the file (serde adds line and column).
    let path = write_config(
        "euler_scheduler",
        "type_error",
        r#"{"use_karras_sigmas": "yes"}"#,
    );
    let message = SchedulerConfig::load(&path, SchedulerClass::EulerDiscrete)
        .unwrap_err()
        .to_string();
    assert!(
        message.contains(path.to_str().unwrap()) && message.contains("line 1"),
        "{message}"
    );
}

#[test]
fn misuse_is_an_error() {
    let config = SchedulerConfig {
        num_train_timesteps: 0,
        ..SchedulerConfig::svd()
    };
    let err = EulerDiscreteScheduler::from_config(&config).unwrap_err();
    assert!(matches!(
        err,
        SchedulerError::Unsupported {
            field: "num_train_timesteps",
            ..
        }
    ));

    let mut scheduler = EulerDiscreteScheduler::from_config(&SchedulerConfig::svd()).unwrap();
    assert!(matches!(
        scheduler.set_timesteps(0),
        Err(SchedulerError::NoSteps)
    ));
    scheduler.set_timesteps(4).unwrap();
    let x = Tensor::zeros((1, 4), DType::F32, &Device::Cpu).unwrap();
    let err = scheduler.step(&x, 4, &x).unwrap_err();
    assert!(
        matches!(err, SchedulerError::StepIndex { index: 4, steps: 4 }),
        "{err}"
    );
    let ints = Tensor::zeros((1, 4), DType::U32, &Device::Cpu).unwrap();
    let err = scheduler.scale_model_input(&ints, 0).unwrap_err();
    assert!(matches!(err, SchedulerError::DType(DType::U32)), "{err}");
}
