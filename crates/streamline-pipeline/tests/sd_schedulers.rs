//! The schedulers AnimateDiff runs with (DDIM, and Euler as SD 1.5 configures it) against
//! diffusers 0.30.1 (fixtures/scripts/sd_schedulers.py): timesteps, initial noise scales and
//! whole denoising loops, each scheduler picked from its fixture file's `_class_name`; config
//! errors that name the file and the field or class; misuse that must be an error.

mod common;

use common::schedulers::{loops_match, prefixes, write_config};
use common::{fixture, io};
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use streamline_pipeline::scheduler::{
    DdimScheduler, EulerDiscreteScheduler, PredictionType, Scheduler, SchedulerClass,
    SchedulerConfig, SchedulerError, TimestepSpacing,
};

/// Every step output (and model input) within this relative L2 of diffusers'. It holds for
/// the half-precision loop too: DDIM replays torch's f16 arithmetic exactly.
const TOLERANCE: f64 = 1e-5;

fn config_path(case: &str) -> PathBuf {
    fixture("sd_schedulers")
        .join(case)
        .join("scheduler_config.json")
}

/// The scheduler for a fixture key prefix `<case>.n<N>[...]`, loaded by `_class_name`.
fn scheduler_for(prefix: &str) -> Scheduler {
    let mut parts = prefix.split('.');
    let case = parts.next().unwrap();
    let mut scheduler = Scheduler::load(&config_path(case)).unwrap();
    let expected = if case.contains("euler") {
        SchedulerClass::EulerDiscrete
    } else {
        SchedulerClass::Ddim
    };
    assert_eq!(scheduler.class(), expected, "{case}");
    let n = parts.next().unwrap().strip_prefix('n').unwrap();
    scheduler.set_timesteps(n.parse().unwrap()).unwrap();
    scheduler
}

#[test]
fn timesteps_match_diffusers() {
    let io = io("sd_schedulers");
    let schedules = prefixes(&io, ".timesteps");
    assert!(
        schedules.len() >= 25,
        "fixture has {} schedules",
        schedules.len()
    );
    let mut failures = Vec::new();
    for prefix in &schedules {
        let scheduler = scheduler_for(prefix);
        let expected = &io[&format!("{prefix}.timesteps")];
        let equal = match &scheduler {
            Scheduler::Ddim(ddim) => {
                assert_eq!(expected.dtype(), DType::I64, "{prefix}");
                ddim.train_timesteps() == expected.to_vec1::<i64>().unwrap().as_slice()
                    && ddim
                        .timesteps()
                        .iter()
                        .zip(ddim.train_timesteps())
                        .all(|(&f, &i)| f == i as f32)
            }
            Scheduler::EulerDiscrete(euler) => {
                euler.timesteps() == expected.to_vec1::<f32>().unwrap().as_slice()
            }
        };
        if !equal {
            failures.push(format!(
                "{prefix}: timesteps {:?}, diffusers has {expected}",
                scheduler.timesteps()
            ));
        }
        let init = io[&format!("{prefix}.init_noise_sigma")]
            .to_vec1::<f32>()
            .unwrap()[0];
        let got = scheduler.init_noise_sigma();
        if ((got - init) / init).abs() > 1e-6 {
            failures.push(format!(
                "{prefix}: init_noise_sigma {got}, diffusers has {init}"
            ));
        }
    }
    println!("{} schedules checked", schedules.len());
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The pipeline's loop, step by step against diffusers'.
#[test]
fn loops_match_diffusers() {
    loops_match("sd_schedulers", 15, scheduler_for, TOLERANCE);
}

#[test]
fn presets_and_class_defaults() {
    let animatediff = config_path("animatediff_ddim");
    let loaded = SchedulerConfig::load(&animatediff, SchedulerClass::Ddim).unwrap();
    assert_eq!(loaded, SchedulerConfig::animatediff());

    // A file without `timestep_spacing`, `clip_sample`, `set_alpha_to_one`: each class fills
    // in its own defaults, as diffusers' constructors do.
    let path = write_config(
        "sd_schedulers",
        "defaults",
        r#"{"_class_name": "DDIMScheduler"}"#,
    );
    let ddim = SchedulerConfig::load(&path, SchedulerClass::Ddim).unwrap();
    assert_eq!(ddim.timestep_spacing, TimestepSpacing::Leading);
    assert!(ddim.clip_sample && ddim.set_alpha_to_one && !ddim.thresholding);
    assert_eq!(ddim, SchedulerConfig::defaults(SchedulerClass::Ddim));
    let euler = SchedulerConfig::load(&path, SchedulerClass::EulerDiscrete).unwrap();
    assert_eq!(euler.timestep_spacing, TimestepSpacing::Linspace);
    assert_eq!(euler, SchedulerConfig::default());

    // DDIM ignores Euler's sigma options, as diffusers does; Euler reads them.
    let path = write_config(
        "sd_schedulers",
        "euler_fields",
        r#"{"_class_name": "DDIMScheduler", "interpolation_type": "cubic", "sigma_min": -1}"#,
    );
    assert!(matches!(Scheduler::load(&path), Ok(Scheduler::Ddim(_))));
    assert!(EulerDiscreteScheduler::load(&path).is_err());
}

fn assert_names(name: &str, message: &str, parts: &[&str]) {
    for part in parts {
        assert!(
            message.contains(part),
            "{name}: {message:?} does not name {part:?}"
        );
    }
}

#[test]
fn unsupported_values_name_file_and_field() {
    let ddim = r#""_class_name": "DDIMScheduler""#;
    let cases = [
        (
            "spacing",
            r#""timestep_spacing": "bogus""#,
            "timestep_spacing",
            "bogus",
        ),
        (
            "prediction",
            r#""prediction_type": "original_sample""#,
            "prediction_type",
            "original_sample",
        ),
        (
            "beta",
            r#""beta_schedule": "cosine""#,
            "beta_schedule",
            "cosine",
        ),
        (
            "ratio",
            r#""thresholding": true, "dynamic_thresholding_ratio": 1.5"#,
            "dynamic_thresholding_ratio",
            "1.5",
        ),
        (
            "trained",
            r#""trained_betas": [0.1, 0.2]"#,
            "trained_betas",
            "2 values",
        ),
    ];
    for (name, fields, field, value) in cases {
        let path = write_config("sd_schedulers", name, &format!("{{{ddim}, {fields}}}"));
        let path_str = path.to_str().unwrap();
        let message = Scheduler::load(&path).unwrap_err().to_string();
        assert_names(name, &message, &[path_str, field, value]);
        let message = DdimScheduler::load(&path).unwrap_err().to_string();
        assert_names(name, &message, &[path_str, field, value]);
    }

    let supported = ["EulerDiscreteScheduler", "DDIMScheduler"];
    for (name, json, class) in [
        (
            "pndm",
            r#"{"_class_name": "PNDMScheduler"}"#,
            "PNDMScheduler",
        ),
        ("no_class", r#"{"beta_schedule": "linear"}"#, "(absent)"),
    ] {
        let path = write_config("sd_schedulers", name, json);
        let message = Scheduler::load(&path).unwrap_err().to_string();
        let mut parts = vec![path.to_str().unwrap(), "_class_name", class];
        parts.extend(supported);
        assert_names(name, &message, &parts);
    }
    // SD 1.5's PNDM file still runs with DDIM when DDIM is asked for, as in diffusers.
    let path = write_config(
        "sd_schedulers",
        "pndm",
        r#"{"_class_name": "PNDMScheduler"}"#,
    );
    assert!(DdimScheduler::load(&path).is_ok());

    // Zero terminal SNR is ported for DDIM only.
    let path = write_config(
        "sd_schedulers",
        "euler_snr",
        r#"{"_class_name": "EulerDiscreteScheduler", "rescale_betas_zero_snr": true}"#,
    );
    let message = Scheduler::load(&path).unwrap_err().to_string();
    assert_names(
        "euler_snr",
        &message,
        &[path.to_str().unwrap(), "rescale_betas_zero_snr"],
    );
}

#[test]
fn misuse_is_an_error() {
    let x = Tensor::zeros((1, 4, 2), DType::F32, &Device::Cpu).unwrap();
    let mut ddim = DdimScheduler::from_config(&SchedulerConfig::animatediff()).unwrap();
    assert!(matches!(ddim.step(&x, 0, &x), Err(SchedulerError::NotSet)));
    assert!(matches!(
        ddim.set_timesteps(0),
        Err(SchedulerError::NoSteps)
    ));
    assert!(matches!(
        ddim.set_timesteps(1001),
        Err(SchedulerError::TooManySteps {
            steps: 1001,
            train: 1000
        })
    ));
    ddim.set_timesteps(4).unwrap();
    assert!(matches!(
        ddim.step(&x, 4, &x),
        Err(SchedulerError::StepIndex { index: 4, steps: 4 })
    ));
    let ints = Tensor::zeros((1, 4), DType::U32, &Device::Cpu).unwrap();
    assert!(matches!(
        ddim.scale_model_input(&ints, 0),
        Err(SchedulerError::DType(DType::U32))
    ));
    let mismatched = Tensor::zeros((1, 3, 2), DType::F32, &Device::Cpu).unwrap();
    assert!(ddim.step(&mismatched, 0, &x).is_err());

    // A `steps_offset` that pushes leading timesteps past the training range.
    let config = SchedulerConfig {
        timestep_spacing: TimestepSpacing::Leading,
        steps_offset: 5,
        ..SchedulerConfig::animatediff()
    };
    let mut ddim = DdimScheduler::from_config(&config).unwrap();
    assert!(matches!(
        ddim.set_timesteps(1000),
        Err(SchedulerError::TimestepRange {
            timestep: 1004,
            train: 1000
        })
    ));

    // Thresholding needs (batch, channels, ...) samples.
    let config = SchedulerConfig {
        thresholding: true,
        prediction_type: PredictionType::Sample,
        ..SchedulerConfig::defaults(SchedulerClass::Ddim)
    };
    let mut ddim = DdimScheduler::from_config(&config).unwrap();
    ddim.set_timesteps(2).unwrap();
    let flat = Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap();
    assert!(ddim.step(&flat, 0, &flat).is_err());
    assert!(ddim.step(&x, 0, &x).is_ok());
}
