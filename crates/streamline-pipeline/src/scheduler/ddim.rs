//! diffusers' `DDIMScheduler` (Song et al. 2021), the AnimateDiff paper's sampler:
//! `set_timesteps`, the identity `scale_model_input`, and `step`, deterministic (`eta = 0`) or
//! with caller-supplied noise.
//!
//! The schedule is diffusers' to the bit (integer timesteps, f32 alpha products from
//! [`super::schedule`]), with diffusers' quirks kept: each step goes back `T / n` training
//! timesteps whatever the spacing (so `linspace` steps land between the listed timesteps), and
//! a `trailing` schedule's extra timestep -1 reads the last alpha product, as Python's negative
//! index does. With `rescale_betas_zero_snr` the alpha products are close to diffusers' but not
//! equal (see `schedule::rescale_zero_terminal_snr`).
//!
//! `step` replays torch's CPU arithmetic: per-step scalars are f32 (square roots correctly
//! rounded, where torch's CPU ones are an ulp off for some values), and every tensor operation
//! rounds to the dtype torch would give its result, so half-precision latents are stepped in
//! half precision as in diffusers. (On CUDA torch multiplies half tensors by the f32 scalars
//! unrounded; the results then differ by about an f16 ulp.) `use_clipped_model_output` is not offered: diffusers' pipelines
//! never set it.

use candle_core::{DType, Tensor};

use super::schedule::{alphas_cumprod, float_dtype, scalar, spaced_timesteps};
use super::{
    PredictionType, SchedulerClass, SchedulerConfig, SchedulerError, Step, TimestepSpacing,
};

/// DDIM sampler over the training alpha products. The pipeline calls
/// [`Self::scale_model_input`] and [`Self::step`] with the index of the step in
/// [`Self::timesteps`] (diffusers passes the timestep value, which names the same step).
#[derive(Clone, Debug)]
pub struct DdimScheduler {
    config: SchedulerConfig,
    alphas_cumprod: Vec<f32>,
    /// The alpha product a step reaches when it goes back past timestep 0.
    final_alpha_cumprod: f32,
    /// The requested step count: diffusers steps back `T / n` training timesteps with it, even
    /// where the schedule has one step more. `None` until [`Self::set_timesteps`].
    num_inference_steps: Option<usize>,
    train_timesteps: Vec<i64>,
    /// `train_timesteps` as the model sees them.
    timesteps: Vec<f32>,
}

impl DdimScheduler {
    /// Builds the scheduler as diffusers' constructor leaves it: every training timestep
    /// listed, no step possible until [`Self::set_timesteps`].
    pub fn from_config(config: &SchedulerConfig) -> Result<Self, SchedulerError> {
        config.check(SchedulerClass::Ddim)?;
        let alphas_cumprod = alphas_cumprod(config);
        let final_alpha_cumprod = if config.set_alpha_to_one {
            1.0
        } else {
            alphas_cumprod[0]
        };
        let train_timesteps: Vec<i64> = (0..config.num_train_timesteps as i64).rev().collect();
        Ok(DdimScheduler {
            config: config.clone(),
            alphas_cumprod,
            final_alpha_cumprod,
            num_inference_steps: None,
            timesteps: train_timesteps.iter().map(|&t| t as f32).collect(),
            train_timesteps,
        })
    }

    /// Reads a diffusers `scheduler_config.json` with DDIM's defaults (see
    /// [`SchedulerConfig::load`]).
    pub fn load(path: &std::path::Path) -> Result<Self, SchedulerError> {
        Self::from_config(&SchedulerConfig::load(path, SchedulerClass::Ddim)?)
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    /// The inference schedule for `num_inference_steps` (at most the training timesteps).
    /// `trailing` spacing can yield one step more (see `schedule::spaced_timesteps`); loop over
    /// [`Self::timesteps`], not over the requested count.
    pub fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<(), SchedulerError> {
        let (n, train) = (num_inference_steps, self.config.num_train_timesteps);
        if n == 0 {
            return Err(SchedulerError::NoSteps);
        }
        if n > train {
            return Err(SchedulerError::TooManySteps { steps: n, train });
        }
        let spacing = self.config.timestep_spacing;
        let timesteps: Vec<i64> = spaced_timesteps(&self.config, n)
            .into_iter()
            .map(|t| match spacing {
                // np.linspace(...).round().astype(np.int64): ties to even.
                TimestepSpacing::Linspace => t.round_ties_even() as i64,
                TimestepSpacing::Leading | TimestepSpacing::Trailing => t as i64,
            })
            .collect();
        // Fail here rather than mid-loop, where diffusers raises its IndexError.
        for &t in &timesteps {
            self.alpha(t)?;
        }
        self.timesteps = timesteps.iter().map(|&t| t as f32).collect();
        self.train_timesteps = timesteps;
        self.num_inference_steps = Some(n);
        Ok(())
    }

    /// What the model is conditioned on at each step, in order (whole training timesteps).
    pub fn timesteps(&self) -> &[f32] {
        &self.timesteps
    }

    /// [`Self::timesteps`] as diffusers' int64 tensor holds them.
    pub fn train_timesteps(&self) -> &[i64] {
        &self.train_timesteps
    }

    /// Steps in the current schedule.
    pub fn num_steps(&self) -> usize {
        self.timesteps.len()
    }

    /// DDIM starts from unit-variance noise.
    pub fn init_noise_sigma(&self) -> f32 {
        1.0
    }

    /// DDIM feeds the model the sample unchanged; this checks the step and dtype so a
    /// pipeline driving any scheduler gets the same errors.
    pub fn scale_model_input(
        &self,
        sample: &Tensor,
        step_index: usize,
    ) -> Result<Tensor, SchedulerError> {
        self.timestep(step_index)?;
        float_dtype(sample)?;
        Ok(sample.clone())
    }

    /// One deterministic DDIM step (`eta = 0`) from `sample` at step `step_index`, returned in
    /// the dtype torch gives it (that of `sample` and `model_output`, the wider if they
    /// differ).
    pub fn step(&self, model_output: &Tensor, step_index: usize, sample: &Tensor) -> Step {
        self.step_inner(model_output, step_index, sample, 0.0, None)
    }

    /// A DDIM step with `eta` times the DDPM posterior's standard deviation of fresh noise
    /// `variance_noise` (shaped like `model_output`; diffusers draws it with `randn` when not
    /// given). `eta = 0` is [`Self::step`], `eta = 1` DDPM's ancestral step.
    pub fn step_with_noise(
        &self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        eta: f64,
        variance_noise: &Tensor,
    ) -> Result<Tensor, SchedulerError> {
        self.step_inner(model_output, step_index, sample, eta, Some(variance_noise))
    }

    fn step_inner(
        &self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        eta: f64,
        variance_noise: Option<&Tensor>,
    ) -> Result<Tensor, SchedulerError> {
        let n = self.num_inference_steps.ok_or(SchedulerError::NotSet)?;
        let t = self.timestep(step_index)?;
        let prev_t = t - (self.config.num_train_timesteps / n) as i64;
        let alpha = self.alpha(t)?;
        let alpha_prev = if prev_t >= 0 {
            self.alpha(prev_t)?
        } else {
            self.final_alpha_cumprod
        };
        let beta = 1.0 - alpha;
        let (sqrt_alpha, sqrt_beta) = (alpha.sqrt(), beta.sqrt());

        let inputs = [Some(model_output), Some(sample), variance_noise];
        let ops = Ops::new(inputs.iter().flatten().copied())?;
        let (output, x) = (ops.input(model_output)?, ops.input(sample)?);
        let (pred_original, pred_epsilon) = match self.config.prediction_type {
            PredictionType::Epsilon => {
                let noise = ops.scale(sqrt_beta, &output)?;
                (ops.div(&ops.sub(&x, &noise)?, sqrt_alpha)?, output)
            }
            PredictionType::Sample => {
                let signal = ops.scale(sqrt_alpha, &output)?;
                let eps = ops.div(&ops.sub(&x, &signal)?, sqrt_beta)?;
                (output, eps)
            }
            PredictionType::VPrediction => (
                ops.sub(&ops.scale(sqrt_alpha, &x)?, &ops.scale(sqrt_beta, &output)?)?,
                ops.add(&ops.scale(sqrt_alpha, &output)?, &ops.scale(sqrt_beta, &x)?)?,
            ),
        };
        let c = &self.config;
        let pred_original = if c.thresholding {
            ops.threshold(
                &pred_original,
                c.dynamic_thresholding_ratio,
                c.sample_max_value,
            )?
        } else if c.clip_sample {
            let range = c.clip_sample_range;
            ops.round(pred_original.t.clamp(-range, range)?, pred_original.dtype)?
        } else {
            pred_original
        };

        // The DDPM posterior variance, as `_get_variance` computes it in f32.
        let beta_prev = 1.0 - alpha_prev;
        let variance = (beta_prev / beta) * (1.0 - alpha / alpha_prev);
        let std_dev = eta as f32 * variance.sqrt();
        let direction = ops.scale(
            ((1.0 - alpha_prev) - std_dev * std_dev).sqrt(),
            &pred_epsilon,
        )?;
        let mut prev = ops.add(&ops.scale(alpha_prev.sqrt(), &pred_original)?, &direction)?;
        if let Some(noise) = variance_noise.filter(|_| eta > 0.0) {
            prev = ops.add(&prev, &ops.scale(std_dev, &ops.input(noise)?)?)?;
        }
        Ok(prev.t.to_dtype(prev.dtype)?)
    }

    fn timestep(&self, step_index: usize) -> Result<i64, SchedulerError> {
        let steps = self.train_timesteps.len();
        let found = self.train_timesteps.get(step_index).copied();
        found.ok_or(SchedulerError::StepIndex {
            index: step_index,
            steps,
        })
    }

    /// `alphas_cumprod[t]` with Python's indexing (negative counts from the end).
    fn alpha(&self, t: i64) -> Result<f32, SchedulerError> {
        let train = self.alphas_cumprod.len();
        let index = if t < 0 { t + train as i64 } else { t };
        let found = usize::try_from(index)
            .ok()
            .and_then(|i| self.alphas_cumprod.get(i));
        found
            .copied()
            .ok_or(SchedulerError::TimestepRange { timestep: t, train })
    }
}

/// A torch tensor of `dtype`, held in the working precision of [`Ops`].
struct Value {
    t: Tensor,
    dtype: DType,
}

/// Tensor arithmetic with torch's result dtypes: computed in f32 (f64 when an input is f64),
/// each result rounded to the dtype torch gives it, the f32 scalars rounded where torch's CPU
/// kernels round them.
struct Ops {
    work: DType,
}

impl Ops {
    fn new<'a>(inputs: impl Iterator<Item = &'a Tensor>) -> Result<Self, SchedulerError> {
        let mut work = DType::F32;
        for t in inputs {
            if float_dtype(t)? == DType::F64 {
                work = DType::F64;
            }
        }
        Ok(Ops { work })
    }

    fn input(&self, t: &Tensor) -> Result<Value, SchedulerError> {
        Ok(Value {
            t: t.to_dtype(self.work)?,
            dtype: t.dtype(),
        })
    }

    fn round(&self, t: Tensor, dtype: DType) -> Result<Value, SchedulerError> {
        let t = if dtype == self.work {
            t
        } else {
            t.to_dtype(dtype)?.to_dtype(self.work)?
        };
        Ok(Value { t, dtype })
    }

    /// `s * v`. torch's CPU kernels cast a 0-dim tensor in front of a half-precision one to
    /// half precision first (CUDA's keep it in f32; diffusers' DDIM always puts it in front).
    fn scale(&self, s: f32, v: &Value) -> Result<Value, SchedulerError> {
        let s = Tensor::new(s, v.t.device())?
            .to_dtype(v.dtype)?
            .to_dtype(self.work)?;
        self.round(v.t.broadcast_mul(&s)?, v.dtype)
    }

    /// `v / s`, with `s` in f32 whatever `v`'s dtype (torch's division keeps a trailing 0-dim
    /// tensor in f32 for half-precision tensors).
    fn div(&self, v: &Value, s: f32) -> Result<Value, SchedulerError> {
        self.round(v.t.broadcast_div(&scalar(s, &v.t)?)?, v.dtype)
    }

    fn add(&self, a: &Value, b: &Value) -> Result<Value, SchedulerError> {
        self.round((&a.t + &b.t)?, promote(a.dtype, b.dtype))
    }

    fn sub(&self, a: &Value, b: &Value) -> Result<Value, SchedulerError> {
        self.round((&a.t - &b.t)?, promote(a.dtype, b.dtype))
    }

    /// diffusers' `_threshold_sample`: per batch item, `s` = the `ratio` quantile of the
    /// magnitudes (torch.quantile, linear interpolation) clamped to `[1, max]`, then the
    /// sample clamped to `±s` and divided by `s`; in f32 (f64 for f64 samples). The quantile
    /// needs a sort of whole rows, which runs on the host.
    fn threshold(&self, x: &Value, ratio: f64, max: f64) -> Result<Value, SchedulerError> {
        let shape = x.t.shape().clone();
        if shape.rank() < 2 {
            return Err(candle_core::Error::Msg(format!(
                "thresholding needs a (batch, channels, ...) sample, not {shape:?}"
            ))
            .into());
        }
        let precision = Precision(x.dtype == DType::F64);
        let mut values: Vec<f64> = x.t.flatten_all()?.to_dtype(DType::F64)?.to_vec1()?;
        let row_len = shape.dims()[1..].iter().product::<usize>();
        if row_len > 0 {
            let max = precision.round(max);
            for row in values.chunks_mut(row_len) {
                let s = torch_clamp(precision.quantile_of_magnitudes(row, ratio), 1.0, max);
                for v in row.iter_mut() {
                    *v = precision.round(torch_clamp(*v, -s, s) / s);
                }
            }
        }
        let t = Tensor::from_vec(values, shape, x.t.device())?.to_dtype(self.work)?;
        self.round(t, x.dtype)
    }
}

/// torch's type promotion between two floating-point tensors.
fn promote(a: DType, b: DType) -> DType {
    match (a, b) {
        _ if a == b => a,
        (DType::F64, _) | (_, DType::F64) => DType::F64,
        _ => DType::F32,
    }
}

/// torch.clamp on a scalar: NaN stays NaN, and `min > max` gives `max`.
fn torch_clamp(x: f64, min: f64, max: f64) -> f64 {
    if x.is_nan() {
        x
    } else {
        x.max(min).min(max)
    }
}

/// f32 arithmetic replayed in f64 (each result rounded back to f32), or plain f64.
#[derive(Clone, Copy)]
struct Precision(bool);

impl Precision {
    fn round(self, x: f64) -> f64 {
        if self.0 {
            x
        } else {
            x as f32 as f64
        }
    }

    /// torch.quantile(|row|, q) with linear interpolation (NaN if the row has one).
    fn quantile_of_magnitudes(self, row: &[f64], q: f64) -> f64 {
        let mut sorted: Vec<f64> = row.iter().map(|v| v.abs()).collect();
        sorted.sort_by(f64::total_cmp);
        let last = sorted.len() - 1;
        let rank = if sorted.iter().any(|v| v.is_nan()) {
            last as f64
        } else {
            self.round(self.round(q) * last as f64)
        };
        let below = rank.floor();
        let weight = self.round(rank - below);
        let (low, high) = (sorted[below as usize], sorted[rank.ceil() as usize]);
        // torch's lerp, with the multiply-add fused as its CPU kernel compiles it.
        let diff = self.round(high - low);
        if weight.abs() < 0.5 {
            self.fma(weight, diff, low)
        } else {
            self.fma(-diff, self.round(1.0 - weight), high)
        }
    }

    fn fma(self, a: f64, b: f64, c: f64) -> f64 {
        if self.0 {
            a.mul_add(b, c)
        } else {
            (a as f32).mul_add(b as f32, c as f32) as f64
        }
    }
}
