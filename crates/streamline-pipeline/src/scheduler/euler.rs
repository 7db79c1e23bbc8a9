//! diffusers' `EulerDiscreteScheduler` as Stable Video Diffusion calls it: `set_timesteps`,
//! `scale_model_input`, and the deterministic Euler `step` (`s_churn = 0`, so no noise).
//!
//! The schedule reproduces diffusers' numbers, not just its formulas: torch computes the
//! training betas, their cumulative product and the sigmas in f32 (the cumulative product
//! accumulating in f64, as torch's CPU kernel does), numpy interpolates and builds the Karras
//! schedule in f64, and the result is stored in f32. Each helper below mirrors the torch or
//! numpy routine it replaces, rounding where that routine rounds, so sigmas and timesteps agree
//! to the last bit, or to an ulp where torch's f32 square roots and logs (not correctly rounded
//! on CPU) and numpy's SIMD `log`/`pow` differ from Rust's.

use candle_core::{DType, Tensor};

use super::{
    BetaSchedule, FinalSigma, Interpolation, PredictionType, SchedulerConfig, SchedulerError,
    TimestepSpacing,
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
        config.check()?;
        let train_sigmas = train_sigmas(config);
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

    /// Reads a diffusers `scheduler_config.json` (see [`SchedulerConfig::load`]).
    pub fn load(path: &std::path::Path) -> Result<Self, SchedulerError> {
        Self::from_config(&SchedulerConfig::load(path)?)
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    /// The inference schedule for `num_inference_steps`. With `trailing` spacing some step
    /// counts (61, 103, ... of 1000) yield one step more, because diffusers builds the
    /// timesteps with numpy's `arange` on a fractional stride; the schedule keeps it, so
    /// loop over [`Self::timesteps`], not over the requested count.
    pub fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<(), SchedulerError> {
        let n = num_inference_steps;
        if n == 0 {
            return Err(SchedulerError::NoSteps);
        }
        let c = &self.config;
        let train = c.num_train_timesteps;
        let mut timesteps: Vec<f64> = match c.timestep_spacing {
            // np.linspace(0, T - 1, n, dtype=np.float32)[::-1]
            TimestepSpacing::Linspace => numpy_linspace(0.0, (train - 1) as f64, n)
                .into_iter()
                .rev()
                .map(|t| t as f32 as f64)
                .collect(),
            // (np.arange(0, n) * (T // n)).round()[::-1].astype(np.float32) + steps_offset
            TimestepSpacing::Leading => (0..n)
                .rev()
                .map(|i| ((i * (train / n)) as f32 + c.steps_offset as f32) as f64)
                .collect(),
            // np.arange(T, 0, -T / n).round().astype(np.float32) - 1
            TimestepSpacing::Trailing => {
                numpy_arange(train as f64, 0.0, -(train as f64 / n as f64))
                    .into_iter()
                    .map(|t| (t.round_ties_even() as f32 - 1.0) as f64)
                    .collect()
            }
        };
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
        let scale = scalar((sigma * sigma + 1.0).sqrt(), sample)?.to_dtype(work)?;
        Ok(sample
            .to_dtype(work)?
            .broadcast_div(&scale)?
            .to_dtype(dtype)?)
    }

    /// One Euler step from `sample` at step `step_index` to the next sigma, returned in the
    /// model output's dtype. As in diffusers, the sample is upcast to f32 and the model output
    /// keeps its dtype: products with it are rounded to that dtype (f16 for a half-precision
    /// UNet) before they meet the f32 sample. Model outputs in f64 are stepped in f32.
    pub fn step(
        &self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
    ) -> Result<Tensor, SchedulerError> {
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

fn float_dtype(t: &Tensor) -> Result<DType, SchedulerError> {
    match t.dtype() {
        d @ (DType::F16 | DType::BF16 | DType::F32 | DType::F64) => Ok(d),
        other => Err(SchedulerError::DType(other)),
    }
}

/// A rank-0 f32 tensor on `like`'s device: diffusers' per-step scalars are 0-dim f32 tensors.
fn scalar(value: f32, like: &Tensor) -> candle_core::Result<Tensor> {
    Tensor::new(value, like.device())
}

/// sqrt((1 - alphas_cumprod) / alphas_cumprod) in f32, from diffusers' constructor. The
/// cumulative product must be bit-exact: near t = 0 the subtraction `1 - a` leaves ~10 bits,
/// so one ulp of `a` would move the smallest sigmas by 1e-3.
fn train_sigmas(config: &SchedulerConfig) -> Vec<f32> {
    let n = config.num_train_timesteps;
    let betas: Vec<f32> = match &config.betas {
        BetaSchedule::Linear { start, end } => torch_linspace_f32(*start as f32, *end as f32, n),
        BetaSchedule::ScaledLinear { start, end } => {
            torch_linspace_f32(start.sqrt() as f32, end.sqrt() as f32, n)
                .into_iter()
                .map(|b| b * b)
                .collect()
        }
        BetaSchedule::SquaredCosCapV2 => {
            // betas_for_alpha_bar: Python floats, then a float32 tensor.
            let alpha_bar = |t: f64| {
                let c = ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0).cos();
                c * c
            };
            (0..n)
                .map(|i| {
                    let (t1, t2) = (i as f64 / n as f64, (i + 1) as f64 / n as f64);
                    (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
                })
                .collect()
        }
        BetaSchedule::Trained(betas) => betas.iter().map(|&b| b as f32).collect(),
    };
    cumprod(&betas)
        .iter()
        .map(|&a| ((1.0 - a) / a).sqrt())
        .collect()
}

/// torch.cumprod(1 - betas) on CPU: f32 factors, f64 running product, f32 results.
fn cumprod(betas: &[f32]) -> Vec<f32> {
    let mut acc = 1.0f64;
    betas
        .iter()
        .map(|&b| {
            acc *= (1.0 - b) as f64;
            acc as f32
        })
        .collect()
}

/// torch.linspace in f32 on CPU (`steps >= 2`): the first half counts up from `start`, the
/// second down from `end`, each value one fused multiply-add (torch's kernel is compiled with
/// FMA contraction on AVX2 and newer CPUs, where the fixtures were made).
fn torch_linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
    let step = (end - start) / (steps - 1) as f32;
    let half = steps / 2;
    (0..steps)
        .map(|i| {
            if i < half {
                step.mul_add(i as f32, start)
            } else {
                (-step).mul_add((steps - 1 - i) as f32, end)
            }
        })
        .collect()
}

/// np.linspace(start, stop, num) in f64: `i * step + start`, the last value exactly `stop`.
fn numpy_linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 1 {
        return vec![start];
    }
    let step = (stop - start) / (num - 1) as f64;
    let mut y: Vec<f64> = (0..num).map(|i| i as f64 * step + start).collect();
    y[num - 1] = stop;
    y
}

/// np.arange(start, stop, step) in f64: `ceil((stop - start) / step)` values; after the first
/// two, numpy adds multiples of their difference (not of `step`) to `start`.
fn numpy_arange(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil().max(0.0) as usize;
    let delta = (start + step) - start;
    (0..len)
        .map(|i| match i {
            0 => start,
            1 => start + step,
            _ => start + i as f64 * delta,
        })
        .collect()
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
