//! diffusers' `EulerDiscreteScheduler` as Stable Video Diffusion calls it: `set_timesteps`,
//! `scale_model_input`, and the deterministic Euler `step` (`s_churn = 0`, so no noise).
//!
//! The schedule reproduces diffusers' numbers, not just its formulas: torch computes the
//! training betas, their cumulative product and the sigmas in f32 (see [`super::schedule`]),
//! numpy interpolates and builds the Karras schedule in f64, and the result is stored in f32.
//! Each helper below mirrors the torch or numpy routine it replaces, rounding where that
//! routine rounds, so sigmas and timesteps agree to the last bit, or to an ulp where torch's
//! f32 square roots and logs (not correctly rounded on CPU) and numpy's SIMD `log`/`pow`
//! differ from Rust's.

use candle_core::{DType, Tensor};

use super::schedule::{
    alphas_cumprod, float_dtype, numpy_linspace, scalar, spaced_timesteps, torch_linspace_f32,
};
use super::{
    FinalSigma, Interpolation, PredictionType, SchedulerClass, SchedulerConfig, SchedulerError,
    Step, TimestepSpacing,
};

/// Karras et al.'s rho, fixed in diffusers.
const KARRAS_RHO: f64 = 7.0;

/// Euler sampler over a sigma schedule. The pipeline calls [`Self::scale_model_input`] and
/// [`Self::step`] with the index of the step in [`Self::timesteps`]; diffusers derives the same
/// index from the timestep value (its `_step_index`), which for a full loop is this one.
#[derive(Clone, Debug)]
pub struct EulerDiscreteScheduler {
    config: SchedulerConfig,
    /// Training sigmas in f32, in training-timestep order (increasing noise).
    train_sigmas: Vec<f32>,
    timesteps: Vec<f32>,
    /// One more than `timesteps` (the sigma after the last step), or two with discrete
    /// `log_linear` timesteps (see [`Interpolation::LogLinear`]).
    sigmas: Vec<f32>,
}

impl EulerDiscreteScheduler {
    /// Builds the scheduler as diffusers' constructor leaves it: the full training schedule,
    /// until [`Self::set_timesteps`] picks the inference steps.
    pub fn from_config(config: &SchedulerConfig) -> Result<Self, SchedulerError> {
        config.check(SchedulerClass::EulerDiscrete)?;
        let train_sigmas: Vec<f32> = alphas_cumprod(config)
            .iter()
            .map(|&a| ((1.0 - a) / a).sqrt())
            .collect();
        let mut sigmas: Vec<f32> = train_sigmas.iter().rev().copied().collect();
        let timesteps = if continuous(config) {
            sigmas.iter().map(|&s| continuous_timestep(s)).collect()
        } else {
            (0..config.num_train_timesteps)
                .rev()
                .map(|t| t as f32)
                .collect()
        };
        sigmas.push(0.0);
        Ok(EulerDiscreteScheduler {
            config: config.clone(),
            train_sigmas,
            timesteps,
            sigmas,
        })
    }

    /// Reads a diffusers `scheduler_config.json` with Euler's defaults (see
    /// [`SchedulerConfig::load`]).
    pub fn load(path: &std::path::Path) -> Result<Self, SchedulerError> {
        Self::from_config(&SchedulerConfig::load(path, SchedulerClass::EulerDiscrete)?)
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    /// The inference schedule for `num_inference_steps`. With `trailing` spacing some step
    /// counts yield one step more (see `schedule::spaced_timesteps`); the schedule keeps it,
    /// so loop over [`Self::timesteps`], not over the requested count.
    pub fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<(), SchedulerError> {
        let n = num_inference_steps;
        if n == 0 {
            return Err(SchedulerError::NoSteps);
        }
        let c = &self.config;
        let train = c.num_train_timesteps;
        // Euler keeps numpy's linspace values as f32 (the others are whole numbers).
        let mut timesteps: Vec<f64> = spaced_timesteps(c, n)
            .into_iter()
            .map(|t| t as f32 as f64)
            .collect();
        let mut sigmas: Vec<f64> = match c.interpolation_type {
            Interpolation::Linear => timesteps
                .iter()
                .map(|&t| interp(t, &self.train_sigmas))
                .collect(),
            Interpolation::LogLinear => {
                let last = self.train_sigmas[train - 1];
                let first = self.train_sigmas[0];
                torch_linspace_f32(last.ln(), first.ln(), n + 1)
                    .into_iter()
                    .map(|l| l.exp() as f64)
                    .collect()
            }
        };
        if c.use_karras_sigmas {
            sigmas = karras(c, &sigmas, n);
            let log_sigmas: Vec<f32> = self.train_sigmas.iter().map(|s| s.ln()).collect();
            timesteps = sigmas.iter().map(|&s| sigma_to_t(s, &log_sigmas)).collect();
        }
        sigmas.push(match c.final_sigmas_type {
            FinalSigma::Zero => 0.0,
            FinalSigma::SigmaMin => self.train_sigmas[0] as f64,
        });
        let sigmas: Vec<f32> = sigmas.into_iter().map(|s| s as f32).collect();
        self.timesteps = if continuous(c) {
            let stepped = &sigmas[..sigmas.len() - 1];
            stepped.iter().map(|&s| continuous_timestep(s)).collect()
        } else {
            timesteps.into_iter().map(|t| t as f32).collect()
        };
        self.sigmas = sigmas;
        Ok(())
    }

    /// What the model is conditioned on at each step, in order: training timesteps, or
    /// `0.25 ln(sigma)` for continuous v-prediction (SVD).
    pub fn timesteps(&self) -> &[f32] {
        &self.timesteps
    }

    /// Noise level before each step, then the one after the last step (and one unused with
    /// discrete [`Interpolation::LogLinear`] timesteps, as in diffusers).
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }

    /// Steps in the current schedule (see [`Self::set_timesteps`] for when this is not the
    /// requested count).
    pub fn num_steps(&self) -> usize {
        self.timesteps.len()
    }

    /// Standard deviation of the initial noise. With `leading` spacing diffusers uses
    /// `sqrt(sigma_max^2 + 1)` (the first step's sigma is below the training maximum).
    pub fn init_noise_sigma(&self) -> f32 {
        let max = self
            .sigmas
            .iter()
            .copied()
            .fold(f32::NEG_INFINITY, f32::max);
        match self.config.timestep_spacing {
            TimestepSpacing::Linspace | TimestepSpacing::Trailing => max,
            TimestepSpacing::Leading => (max * max + 1.0).sqrt(),
        }
    }

    /// The model input at step `step_index`: `sample / sqrt(sigma^2 + 1)`, in the sample's
    /// dtype (computed in f32 for half types, like torch's CPU and CUDA kernels).
    pub fn scale_model_input(
        &self,
        sample: &Tensor,
        step_index: usize,
    ) -> Result<Tensor, SchedulerError> {
        let sigma = self.sigma(step_index)?;
        let dtype = float_dtype(sample)?;
        let work = if dtype == DType::F64 {
            DType::F64
        } else {
            DType::F32
        };
        let sample = sample.to_dtype(work)?;
        let scale = scalar((sigma * sigma + 1.0).sqrt(), &sample)?;
        Ok(sample.broadcast_div(&scale)?.to_dtype(dtype)?)
    }

    /// One Euler step from `sample` at step `step_index` to the next sigma, returned in the
    /// model output's dtype. As in diffusers, the sample is upcast to f32 and the model output
    /// keeps its dtype: products with it are rounded to that dtype (f16 for a half-precision
    /// UNet) before they meet the f32 sample. Model outputs in f64 are stepped in f32.
    pub fn step(&self, model_output: &Tensor, step_index: usize, sample: &Tensor) -> Step {
        let sigma = self.sigma(step_index)?;
        let next = self.sigmas[step_index + 1];
        let out_dtype = float_dtype(model_output)?;
        float_dtype(sample)?;
        let sample = sample.to_dtype(DType::F32)?;
        let output = model_output.to_dtype(DType::F32)?;
        let in_output_dtype = |t: Tensor| -> candle_core::Result<Tensor> {
            match out_dtype {
                DType::F16 | DType::BF16 => t.to_dtype(out_dtype)?.to_dtype(DType::F32),
                _ => Ok(t),
            }
        };
        let pred_original = match self.config.prediction_type {
            PredictionType::Epsilon => {
                let noise = in_output_dtype(output.broadcast_mul(&scalar(sigma, &sample)?)?)?;
                (&sample - noise)?
            }
            PredictionType::VPrediction => {
                let var = sigma * sigma + 1.0;
                let c_out = scalar(-sigma / var.sqrt(), &sample)?;
                let skip = sample.broadcast_div(&scalar(var, &sample)?)?;
                (in_output_dtype(output.broadcast_mul(&c_out)?)? + skip)?
            }
            PredictionType::Sample => output,
        };
        let derivative = (&sample - pred_original)?.broadcast_div(&scalar(sigma, &sample)?)?;
        let prev = (&sample + derivative.broadcast_mul(&scalar(next - sigma, &sample)?)?)?;
        Ok(prev.to_dtype(out_dtype)?)
    }

    fn sigma(&self, step_index: usize) -> Result<f32, SchedulerError> {
        if step_index >= self.timesteps.len() {
            return Err(SchedulerError::StepIndex {
                index: step_index,
                steps: self.timesteps.len(),
            });
        }
        Ok(self.sigmas[step_index])
    }
}

fn continuous(config: &SchedulerConfig) -> bool {
    config.continuous_timesteps && config.prediction_type == PredictionType::VPrediction
}

/// torch's `0.25 * sigma.log()` on an f32 scalar tensor.
fn continuous_timestep(sigma: f32) -> f32 {
    0.25 * sigma.ln()
}

/// np.interp(x, arange(len(fp)), fp) with f32 `fp`, in f64.
fn interp(x: f64, fp: &[f32]) -> f64 {
    let last = fp.len() - 1;
    if x.is_nan() {
        return x;
    }
    if x < 0.0 {
        return fp[0] as f64;
    }
    if x >= last as f64 {
        return fp[last] as f64;
    }
    let j = x.floor() as usize;
    let (lo, hi) = (fp[j] as f64, fp[j + 1] as f64);
    if x == j as f64 {
        return lo;
    }
    (hi - lo) * (x - j as f64) + lo
}

/// Karras et al.'s schedule (`_convert_to_karras`): evenly spaced in sigma^(1/rho) between
/// the configured bounds, or the interpolated schedule's ends.
fn karras(config: &SchedulerConfig, sigmas: &[f64], n: usize) -> Vec<f64> {
    let sigma_min = config.sigma_min.unwrap_or(sigmas[sigmas.len() - 1]);
    let sigma_max = config.sigma_max.unwrap_or(sigmas[0]);
    let min_inv_rho = sigma_min.powf(1.0 / KARRAS_RHO);
    let max_inv_rho = sigma_max.powf(1.0 / KARRAS_RHO);
    numpy_linspace(0.0, 1.0, n)
        .into_iter()
        .map(|r| (max_inv_rho + r * (min_inv_rho - max_inv_rho)).powf(KARRAS_RHO))
        .collect()
}

/// diffusers' `_sigma_to_t`: the fractional training timestep whose log sigma (interpolated
/// linearly between neighbours) is `ln(sigma)`. `log_sigmas` are f32, so their difference is
/// taken in f32 as numpy does.
fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    // cumsum(dists >= 0).argmax(): the last index at or below log_sigma, else 0.
    let low = log_sigmas
        .iter()
        .rposition(|&l| log_sigma - l as f64 >= 0.0)
        .unwrap_or(0)
        .min(log_sigmas.len() - 2);
    let (lo, hi) = (log_sigmas[low], log_sigmas[low + 1]);
    let w = ((lo as f64 - log_sigma) / (lo - hi) as f64).clamp(0.0, 1.0);
    (1.0 - w) * low as f64 + w * (low + 1) as f64
}
