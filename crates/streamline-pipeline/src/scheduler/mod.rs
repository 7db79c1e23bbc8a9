//! Noise schedulers, ported number for number from diffusers 0.30.1.
//!
//! Stable Video Diffusion samples with [`EulerDiscreteScheduler`]. A scheduler is configured
//! from the checkpoint's `scheduler/scheduler_config.json`: [`SchedulerConfig::load`] reads it
//! with diffusers' defaults for absent fields, ignores fields it does not know (configs of
//! other schedulers share the file format, and diffusers swaps schedulers by reusing them),
//! and rejects a value it cannot honour with an error naming the file and the field, before
//! any sampling starts.

mod euler;

use std::path::Path;

use candle_core::DType;
use serde::Deserialize;
use streamline_models::load::{load_config, ModelError};
use thiserror::Error;

pub use euler::EulerDiscreteScheduler;

/// What the model predicts (`prediction_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PredictionType {
    /// `epsilon`: the added noise.
    Epsilon,
    /// `v_prediction`: the velocity of Imagen Video, SVD's choice.
    VPrediction,
    /// `sample` (or diffusers' legacy alias `original_sample`): the denoised sample itself.
    Sample,
}

/// Where the training betas come from (`trained_betas`, else `beta_schedule`).
#[derive(Clone, Debug, PartialEq)]
pub enum BetaSchedule {
    /// `linear` from `beta_start` to `beta_end`.
    Linear { start: f64, end: f64 },
    /// `scaled_linear`: linear in sqrt(beta), Stable Diffusion's and SVD's schedule.
    ScaledLinear { start: f64, end: f64 },
    /// `squaredcos_cap_v2`: GLIDE's cosine schedule.
    SquaredCosCapV2,
    /// `trained_betas`: explicit betas, one per training timestep.
    Trained(Vec<f64>),
}

/// How inference timesteps are spread over the training range (`timestep_spacing`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimestepSpacing {
    Linspace,
    Leading,
    Trailing,
}

/// How inference sigmas are read off the training sigmas (`interpolation_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Interpolation {
    /// `linear`: interpolated at the (fractional) timesteps.
    Linear,
    /// `log_linear`: evenly spaced in log sigma. diffusers then keeps `n + 1` of them plus the
    /// final sigma, so the last step ends at the smallest training sigma rather than the final
    /// one (continuous timesteps get `n + 1` steps instead); ported as is.
    LogLinear,
}

/// The sigma after the last step (`final_sigmas_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinalSigma {
    /// `zero`: the last step lands on the clean sample.
    Zero,
    /// `sigma_min`: the smallest training sigma.
    SigmaMin,
}

/// A validated `scheduler_config.json`. `Default` is diffusers' constructor defaults.
#[derive(Clone, Debug, PartialEq)]
pub struct SchedulerConfig {
    pub num_train_timesteps: usize,
    pub betas: BetaSchedule,
    pub prediction_type: PredictionType,
    pub interpolation_type: Interpolation,
    pub use_karras_sigmas: bool,
    /// Karras schedule bounds; `None` takes them from the interpolated sigmas.
    pub sigma_min: Option<f64>,
    pub sigma_max: Option<f64>,
    pub timestep_spacing: TimestepSpacing,
    /// `timestep_type` `continuous`: the model is conditioned on `0.25 ln(sigma)` instead of a
    /// training timestep. diffusers honours it only for v-prediction, and so do we.
    pub continuous_timesteps: bool,
    pub steps_offset: i64,
    pub final_sigmas_type: FinalSigma,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        RawConfig::default()
            .parse()
            .expect("diffusers' defaults are supported")
    }
}

impl SchedulerConfig {
    /// Stable Video Diffusion's scheduler (`stabilityai/stable-video-diffusion-img2vid`), for
    /// callers that have no scheduler folder.
    pub fn svd() -> Self {
        SchedulerConfig {
            betas: BetaSchedule::ScaledLinear {
                start: 0.00085,
                end: 0.012,
            },
            prediction_type: PredictionType::VPrediction,
            use_karras_sigmas: true,
            sigma_min: Some(0.002),
            sigma_max: Some(700.0),
            timestep_spacing: TimestepSpacing::Leading,
            continuous_timesteps: true,
            steps_offset: 1,
            ..Self::default()
        }
    }

    /// Reads a diffusers `scheduler_config.json`; errors name the file (and the field).
    pub fn load(path: &Path) -> Result<Self, SchedulerError> {
        let raw: RawConfig = load_config(path)?;
        raw.parse().map_err(|u| {
            SchedulerError::from(ModelError::Unsupported {
                path: path.to_path_buf(),
                field: u.field.to_string(),
                value: u.value,
                reason: u.reason,
            })
        })
    }

    /// The numeric preconditions of the schedule math (string fields are checked by parsing).
    fn check(&self) -> Result<(), Unsupported> {
        if self.num_train_timesteps < 2 {
            return Err(Unsupported::new(
                "num_train_timesteps",
                self.num_train_timesteps,
                "sigmas are interpolated between training timesteps, so at least 2 are needed",
            ));
        }
        if let BetaSchedule::Trained(betas) = &self.betas {
            if betas.len() != self.num_train_timesteps {
                return Err(Unsupported::new(
                    "trained_betas",
                    format!("{} values", betas.len()),
                    format!(
                        "expected num_train_timesteps = {}",
                        self.num_train_timesteps
                    ),
                ));
            }
        }
        for (field, sigma) in [("sigma_min", self.sigma_min), ("sigma_max", self.sigma_max)] {
            if let Some(s) = sigma.filter(|s| !(*s > 0.0 && s.is_finite())) {
                return Err(Unsupported::new(
                    field,
                    s,
                    "a sigma must be positive and finite",
                ));
            }
        }
        Ok(())
    }
}

/// A config value this port cannot run; [`SchedulerConfig::load`] adds the file.
#[derive(Debug)]
struct Unsupported {
    field: &'static str,
    value: String,
    reason: String,
}

impl Unsupported {
    fn new(field: &'static str, value: impl ToString, reason: impl ToString) -> Self {
        Unsupported {
            field,
            value: value.to_string(),
            reason: reason.to_string(),
        }
    }
}

/// The file as diffusers writes it; strings stay strings here so that a bad value can be
/// reported with its field name (serde's enum errors do not name the field).
#[derive(Deserialize)]
#[serde(default)]
struct RawConfig {
    num_train_timesteps: usize,
    beta_start: f64,
    beta_end: f64,
    beta_schedule: String,
    trained_betas: Option<Vec<f64>>,
    prediction_type: String,
    interpolation_type: String,
    use_karras_sigmas: Option<bool>,
    sigma_min: Option<f64>,
    sigma_max: Option<f64>,
    timestep_spacing: String,
    timestep_type: String,
    steps_offset: i64,
    rescale_betas_zero_snr: bool,
    final_sigmas_type: String,
}

impl Default for RawConfig {
    fn default() -> Self {
        RawConfig {
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: "linear".into(),
            trained_betas: None,
            prediction_type: "epsilon".into(),
            interpolation_type: "linear".into(),
            use_karras_sigmas: Some(false),
            sigma_min: None,
            sigma_max: None,
            timestep_spacing: "linspace".into(),
            timestep_type: "discrete".into(),
            steps_offset: 0,
            rescale_betas_zero_snr: false,
            final_sigmas_type: "zero".into(),
        }
    }
}

impl RawConfig {
    fn parse(self) -> Result<SchedulerConfig, Unsupported> {
        fn pick<T: Copy>(
            field: &'static str,
            value: &str,
            choices: &[(&str, T)],
        ) -> Result<T, Unsupported> {
            let found = choices.iter().find(|(name, _)| *name == value);
            found.map(|(_, v)| *v).ok_or_else(|| {
                let names: Vec<&str> = choices.iter().map(|(name, _)| *name).collect();
                Unsupported::new(
                    field,
                    value,
                    format!("expected one of {}", names.join(", ")),
                )
            })
        }
        let (start, end) = (self.beta_start, self.beta_end);
        // As in diffusers, trained betas win over `beta_schedule`, which is then not read.
        let betas = match self.trained_betas {
            Some(betas) => BetaSchedule::Trained(betas),
            None => match self.beta_schedule.as_str() {
                "linear" => BetaSchedule::Linear { start, end },
                "scaled_linear" => BetaSchedule::ScaledLinear { start, end },
                "squaredcos_cap_v2" => BetaSchedule::SquaredCosCapV2,
                other => {
                    return Err(Unsupported::new(
                        "beta_schedule",
                        other,
                        "expected one of linear, scaled_linear, squaredcos_cap_v2",
                    ))
                }
            },
        };
        use PredictionType as P;
        let prediction_type = pick(
            "prediction_type",
            &self.prediction_type,
            &[
                ("epsilon", P::Epsilon),
                ("v_prediction", P::VPrediction),
                ("sample", P::Sample),
                ("original_sample", P::Sample),
            ],
        )?;
        let interpolation_type = pick(
            "interpolation_type",
            &self.interpolation_type,
            &[
                ("linear", Interpolation::Linear),
                ("log_linear", Interpolation::LogLinear),
            ],
        )?;
        use TimestepSpacing as S;
        let timestep_spacing = pick(
            "timestep_spacing",
            &self.timestep_spacing,
            &[
                ("linspace", S::Linspace),
                ("leading", S::Leading),
                ("trailing", S::Trailing),
            ],
        )?;
        let continuous = pick(
            "timestep_type",
            &self.timestep_type,
            &[("discrete", false), ("continuous", true)],
        )?;
        let final_sigmas_type = pick(
            "final_sigmas_type",
            &self.final_sigmas_type,
            &[
                ("zero", FinalSigma::Zero),
                ("sigma_min", FinalSigma::SigmaMin),
            ],
        )?;
        if self.rescale_betas_zero_snr {
            // diffusers rescales with torch's f32 square root, which on CPU is an ulp off for
            // about a fifth of the values; the rescaling turns those ulps into 1e-3 in the
            // small sigmas, so a port cannot promise diffusers' numbers. SVD does not use it.
            return Err(Unsupported::new(
                "rescale_betas_zero_snr",
                true,
                "zero terminal SNR rescaling is not ported",
            ));
        }
        let config = SchedulerConfig {
            num_train_timesteps: self.num_train_timesteps,
            betas,
            prediction_type,
            interpolation_type,
            use_karras_sigmas: self.use_karras_sigmas.unwrap_or(false),
            sigma_min: self.sigma_min,
            sigma_max: self.sigma_max,
            timestep_spacing,
            continuous_timesteps: continuous,
            steps_offset: self.steps_offset,
            final_sigmas_type,
        };
        config.check()?;
        Ok(config)
    }
}

/// Why a scheduler could not be built or stepped.
#[derive(Debug, Error)]
pub enum SchedulerError {
    /// A scheduler_config.json that could not be read or is not supported (names file and
    /// field).
    #[error(transparent)]
    Config(Box<ModelError>),
    /// A programmatic [`SchedulerConfig`] with a value the schedule math cannot use.
    #[error("scheduler config: `{field}` = {value} is not supported: {reason}")]
    Unsupported {
        field: &'static str,
        value: String,
        reason: String,
    },
    #[error("num_inference_steps must be at least 1")]
    NoSteps,
    #[error("step index {index} is outside the schedule of {steps} steps")]
    StepIndex { index: usize, steps: usize },
    #[error("the scheduler works on floating-point tensors, not {0:?}")]
    DType(DType),
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
}

impl From<ModelError> for SchedulerError {
    fn from(e: ModelError) -> Self {
        SchedulerError::Config(Box::new(e))
    }
}

impl From<Unsupported> for SchedulerError {
    fn from(u: Unsupported) -> Self {
        SchedulerError::Unsupported {
            field: u.field,
            value: u.value,
            reason: u.reason,
        }
    }
}
