//! Noise schedulers, ported number for number from diffusers 0.30.1.
//!
//! Stable Video Diffusion samples with [`EulerDiscreteScheduler`]; AnimateDiff with
//! [`DdimScheduler`] (the paper's setting) or Euler, as Stable Diffusion 1.5 configures them.
//! A scheduler is configured from the checkpoint's `scheduler/scheduler_config.json`:
//! [`SchedulerConfig::load`] reads it with the scheduler class's defaults for absent fields,
//! ignores fields it does not know (configs of other schedulers share the file format, and
//! diffusers swaps schedulers by reusing them), and rejects a value it cannot honour with an
//! error naming the file and the field, before any sampling starts. [`Scheduler::load`] picks
//! the class from the file's `_class_name`, as diffusers' pipelines do.

mod ddim;
mod dispatch;
mod euler;
mod schedule;

use std::path::Path;

use candle_core::DType;
use serde::Deserialize;
use streamline_models::load::{load_config, ModelError};
use thiserror::Error;

/// What a scheduler's `step` gives: the next sample, or why it cannot.
pub type Step = Result<candle_core::Tensor, SchedulerError>;

pub use ddim::DdimScheduler;
pub use dispatch::Scheduler;
pub use euler::EulerDiscreteScheduler;

/// The diffusers scheduler classes this port implements; each has its own config defaults.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SchedulerClass {
    /// `EulerDiscreteScheduler`.
    EulerDiscrete,
    /// `DDIMScheduler`.
    Ddim,
}

impl SchedulerClass {
    pub const ALL: [SchedulerClass; 2] = [SchedulerClass::EulerDiscrete, SchedulerClass::Ddim];

    /// The `_class_name` diffusers writes into the config.
    pub fn class_name(self) -> &'static str {
        match self {
            SchedulerClass::EulerDiscrete => "EulerDiscreteScheduler",
            SchedulerClass::Ddim => "DDIMScheduler",
        }
    }

    pub fn from_class_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.class_name() == name)
    }
}

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

/// A validated `scheduler_config.json`. `Default` is diffusers' `EulerDiscreteScheduler`
/// constructor defaults, [`SchedulerConfig::defaults`] any class's. Fields that only one class
/// reads are kept for both, so a config can be moved between classes as in diffusers.
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
    /// Zero terminal SNR (Lin et al. 2023): the last training timestep becomes pure noise.
    /// DDIM only; see [`DdimScheduler`] for how closely it follows diffusers.
    pub rescale_betas_zero_snr: bool,
    /// DDIM: clamp the predicted clean sample to `±clip_sample_range` (unless `thresholding`).
    pub clip_sample: bool,
    pub clip_sample_range: f64,
    /// DDIM: the alpha product after the last step is 1 (the clean sample) instead of the
    /// first training timestep's.
    pub set_alpha_to_one: bool,
    /// DDIM: Imagen's dynamic thresholding of the predicted clean sample, per batch item, at
    /// the `dynamic_thresholding_ratio` quantile of its magnitudes, capped at
    /// `sample_max_value`.
    pub thresholding: bool,
    pub dynamic_thresholding_ratio: f64,
    pub sample_max_value: f64,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self::defaults(SchedulerClass::EulerDiscrete)
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
            // SVD's file carries these DDIM fields too.
            clip_sample: false,
            set_alpha_to_one: false,
            ..Self::default()
        }
    }

    /// The AnimateDiff paper's sampler, as diffusers' AnimateDiff example builds it from
    /// Stable Diffusion 1.5's file: DDIM on linear betas with `linspace` spacing.
    pub fn animatediff() -> Self {
        SchedulerConfig {
            betas: BetaSchedule::Linear {
                start: 0.00085,
                end: 0.012,
            },
            timestep_spacing: TimestepSpacing::Linspace,
            steps_offset: 1,
            clip_sample: false,
            set_alpha_to_one: false,
            ..Self::defaults(SchedulerClass::Ddim)
        }
    }

    /// diffusers' constructor defaults of `class`.
    pub fn defaults(class: SchedulerClass) -> Self {
        RawConfig::default()
            .parse(class)
            .expect("diffusers' defaults are supported")
    }

    /// Reads a diffusers `scheduler_config.json` for `class`, whatever class the file names
    /// (as diffusers' `from_pretrained` of a given class does); errors name the file (and the
    /// field).
    pub fn load(path: &Path, class: SchedulerClass) -> Result<Self, SchedulerError> {
        let raw: RawConfig = load_config(path)?;
        raw.parse(class).map_err(|u| u.in_file(path))
    }

    /// Reads a diffusers `scheduler_config.json` whose `_class_name` must be one of
    /// `supported` (a pipeline that samples with one class only passes that one): an absent
    /// or other class is an error naming the file, the class and the supported ones, since
    /// running a checkpoint with a scheduler it does not name changes its videos silently.
    pub fn load_named(
        path: &Path,
        supported: &[SchedulerClass],
    ) -> Result<(SchedulerClass, Self), SchedulerError> {
        let raw: RawConfig = load_config(path)?;
        let named = raw.class_name.as_deref();
        let Some(class) = named
            .and_then(SchedulerClass::from_class_name)
            .filter(|c| supported.contains(c))
        else {
            let names: Vec<&str> = supported.iter().map(|c| c.class_name()).collect();
            let reason = format!("expected one of {}", names.join(", "));
            let value = named.unwrap_or("(absent)");
            return Err(Unsupported::new("_class_name", value, reason).in_file(path));
        };
        let config = raw.parse(class).map_err(|u| u.in_file(path))?;
        Ok((class, config))
    }

    /// The numeric preconditions of `class`'s schedule math (string fields are checked by
    /// parsing).
    fn check(&self, class: SchedulerClass) -> Result<(), Unsupported> {
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
        match class {
            SchedulerClass::EulerDiscrete if self.rescale_betas_zero_snr => {
                // The rescaled alpha products are not bit-equal to diffusers' (see
                // `schedule::rescale_zero_terminal_snr`), which moves Euler's smallest sigmas
                // by ~1e-5 where its schedules otherwise agree to an ulp; and Euler clamps the
                // last one to 2^-24 on top. SD 1.5 and SVD do not use it.
                Err(Unsupported::new(
                    "rescale_betas_zero_snr",
                    true,
                    "zero terminal SNR rescaling is ported for DDIM only",
                ))
            }
            SchedulerClass::Ddim
                if self.thresholding && !(0.0..=1.0).contains(&self.dynamic_thresholding_ratio) =>
            {
                Err(Unsupported::new(
                    "dynamic_thresholding_ratio",
                    self.dynamic_thresholding_ratio,
                    "a quantile must lie in [0, 1]",
                ))
            }
            _ => Ok(()),
        }
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

    fn in_file(self, path: &Path) -> SchedulerError {
        SchedulerError::from(ModelError::Unsupported {
            path: path.to_path_buf(),
            field: self.field.to_string(),
            value: self.value,
            reason: self.reason,
        })
    }
}

/// The file as diffusers writes it; strings stay strings here so that a bad value can be
/// reported with its field name (serde's enum errors do not name the field).
#[derive(Deserialize)]
#[serde(default)]
struct RawConfig {
    #[serde(rename = "_class_name")]
    class_name: Option<String>,
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
    /// `None` takes the class's default.
    timestep_spacing: Option<String>,
    timestep_type: String,
    steps_offset: i64,
    rescale_betas_zero_snr: bool,
    final_sigmas_type: String,
    clip_sample: bool,
    clip_sample_range: f64,
    set_alpha_to_one: bool,
    thresholding: bool,
    dynamic_thresholding_ratio: f64,
    sample_max_value: f64,
}

impl Default for RawConfig {
    fn default() -> Self {
        RawConfig {
            class_name: None,
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
            timestep_spacing: None,
            timestep_type: "discrete".into(),
            steps_offset: 0,
            rescale_betas_zero_snr: false,
            final_sigmas_type: "zero".into(),
            clip_sample: true,
            clip_sample_range: 1.0,
            set_alpha_to_one: true,
            thresholding: false,
            dynamic_thresholding_ratio: 0.995,
            sample_max_value: 1.0,
        }
    }
}

impl RawConfig {
    fn parse(self, class: SchedulerClass) -> Result<SchedulerConfig, Unsupported> {
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
        // DDIM's constructor has none of Euler's sigma options: diffusers ignores them there.
        let this = match class {
            SchedulerClass::EulerDiscrete => self,
            SchedulerClass::Ddim => {
                let d = RawConfig::default();
                RawConfig {
                    interpolation_type: d.interpolation_type,
                    use_karras_sigmas: d.use_karras_sigmas,
                    sigma_min: d.sigma_min,
                    sigma_max: d.sigma_max,
                    timestep_type: d.timestep_type,
                    final_sigmas_type: d.final_sigmas_type,
                    ..self
                }
            }
        };
        let (start, end) = (this.beta_start, this.beta_end);
        // As in diffusers, trained betas win over `beta_schedule`, which is then not read.
        let betas = match this.trained_betas {
            Some(betas) => BetaSchedule::Trained(betas),
            None => match this.beta_schedule.as_str() {
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
        let predictions = [
            ("epsilon", P::Epsilon),
            ("v_prediction", P::VPrediction),
            ("sample", P::Sample),
            // An alias Euler accepts and DDIM does not.
            ("original_sample", P::Sample),
        ];
        let predictions = match class {
            SchedulerClass::EulerDiscrete => &predictions[..],
            SchedulerClass::Ddim => &predictions[..3],
        };
        let prediction_type = pick("prediction_type", &this.prediction_type, predictions)?;
        let interpolation_type = pick(
            "interpolation_type",
            &this.interpolation_type,
            &[
                ("linear", Interpolation::Linear),
                ("log_linear", Interpolation::LogLinear),
            ],
        )?;
        use TimestepSpacing as S;
        let default_spacing = match class {
            SchedulerClass::EulerDiscrete => "linspace",
            SchedulerClass::Ddim => "leading",
        };
        let timestep_spacing = pick(
            "timestep_spacing",
            this.timestep_spacing.as_deref().unwrap_or(default_spacing),
            &[
                ("linspace", S::Linspace),
                ("leading", S::Leading),
                ("trailing", S::Trailing),
            ],
        )?;
        let continuous = pick(
            "timestep_type",
            &this.timestep_type,
            &[("discrete", false), ("continuous", true)],
        )?;
        let final_sigmas_type = pick(
            "final_sigmas_type",
            &this.final_sigmas_type,
            &[
                ("zero", FinalSigma::Zero),
                ("sigma_min", FinalSigma::SigmaMin),
            ],
        )?;
        let config = SchedulerConfig {
            num_train_timesteps: this.num_train_timesteps,
            betas,
            prediction_type,
            interpolation_type,
            use_karras_sigmas: this.use_karras_sigmas.unwrap_or(false),
            sigma_min: this.sigma_min,
            sigma_max: this.sigma_max,
            timestep_spacing,
            continuous_timesteps: continuous,
            steps_offset: this.steps_offset,
            final_sigmas_type,
            rescale_betas_zero_snr: this.rescale_betas_zero_snr,
            clip_sample: this.clip_sample,
            clip_sample_range: this.clip_sample_range,
            set_alpha_to_one: this.set_alpha_to_one,
            thresholding: this.thresholding,
            dynamic_thresholding_ratio: this.dynamic_thresholding_ratio,
            sample_max_value: this.sample_max_value,
        };
        config.check(class)?;
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
    #[error("num_inference_steps = {steps} exceeds the {train} training timesteps")]
    TooManySteps { steps: usize, train: usize },
    /// A spacing that lands outside the training timesteps (a large `steps_offset`).
    #[error("timestep {timestep} is outside the {train} training timesteps")]
    TimestepRange { timestep: i64, train: usize },
    #[error("set_timesteps must be called before stepping")]
    NotSet,
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
