//! One scheduler type for pipelines that run whichever scheduler the checkpoint names
//! (AnimateDiff checkpoints ship DDIM or Euler configs).

use std::path::Path;

use super::{
    DdimScheduler, EulerDiscreteScheduler, SchedulerClass, SchedulerConfig, SchedulerError, Step,
};
use candle_core::Tensor;

/// Any supported scheduler; the methods delegate to the variant's.
#[derive(Clone, Debug)]
pub enum Scheduler {
    EulerDiscrete(EulerDiscreteScheduler),
    Ddim(DdimScheduler),
}

/// `$body` with `$s` bound to the variant's scheduler, whichever it is.
macro_rules! delegate {
    ($self:expr, $s:ident => $body:expr) => {
        match $self {
            Scheduler::EulerDiscrete($s) => $body,
            Scheduler::Ddim($s) => $body,
        }
    };
}

impl Scheduler {
    /// Reads a diffusers `scheduler_config.json` and builds the class its `_class_name`
    /// names, with that class's defaults. An absent or unsupported class is an error naming
    /// the file and the class (see [`SchedulerConfig::load_named`]): a config of another class
    /// (say SD 1.5's `PNDMScheduler`) runs with a supported one through
    /// [`SchedulerConfig::load`], as diffusers' `from_config` does.
    pub fn load(path: &Path) -> Result<Self, SchedulerError> {
        let (class, config) = SchedulerConfig::load_named(path, &SchedulerClass::ALL)?;
        Self::from_config(class, &config)
    }

    pub fn from_config(
        class: SchedulerClass,
        config: &SchedulerConfig,
    ) -> Result<Self, SchedulerError> {
        Ok(match class {
            SchedulerClass::EulerDiscrete => {
                Scheduler::EulerDiscrete(EulerDiscreteScheduler::from_config(config)?)
            }
            SchedulerClass::Ddim => Scheduler::Ddim(DdimScheduler::from_config(config)?),
        })
    }

    pub fn class(&self) -> SchedulerClass {
        match self {
            Scheduler::EulerDiscrete(_) => SchedulerClass::EulerDiscrete,
            Scheduler::Ddim(_) => SchedulerClass::Ddim,
        }
    }

    pub fn config(&self) -> &SchedulerConfig {
        delegate!(self, s => s.config())
    }

    /// See [`EulerDiscreteScheduler::set_timesteps`] and [`DdimScheduler::set_timesteps`].
    pub fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<(), SchedulerError> {
        delegate!(self, s => s.set_timesteps(num_inference_steps))
    }

    /// What the model is conditioned on at each step, in order.
    pub fn timesteps(&self) -> &[f32] {
        delegate!(self, s => s.timesteps())
    }

    pub fn num_steps(&self) -> usize {
        delegate!(self, s => s.num_steps())
    }

    /// Standard deviation of the initial noise.
    pub fn init_noise_sigma(&self) -> f32 {
        delegate!(self, s => s.init_noise_sigma())
    }

    /// The model input at step `step_index`.
    pub fn scale_model_input(
        &self,
        sample: &Tensor,
        step_index: usize,
    ) -> Result<Tensor, SchedulerError> {
        delegate!(self, s => s.scale_model_input(sample, step_index))
    }

    /// The sample after step `step_index` (deterministic: Euler without churn, DDIM with
    /// `eta = 0`).
    pub fn step(&self, model_output: &Tensor, step_index: usize, sample: &Tensor) -> Step {
        delegate!(self, s => s.step(model_output, step_index, sample))
    }
}

impl From<EulerDiscreteScheduler> for Scheduler {
    fn from(s: EulerDiscreteScheduler) -> Self {
        Scheduler::EulerDiscrete(s)
    }
}

impl From<DdimScheduler> for Scheduler {
    fn from(s: DdimScheduler) -> Self {
        Scheduler::Ddim(s)
    }
}
