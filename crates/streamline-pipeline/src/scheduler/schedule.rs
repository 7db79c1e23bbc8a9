//! The numeric building blocks both schedulers share: training betas and their cumulative
//! product, the inference timestep spacings, and the torch / numpy routines they are made of.
//!
//! diffusers builds every schedule in torch f32 and numpy f64 on the CPU; each helper mirrors
//! the routine it replaces, rounding where that routine rounds, so that schedules agree to the
//! last bit, or to an ulp where torch's f32 square roots (MKL's, not correctly rounded) and
//! numpy's SIMD `log`/`pow` differ from Rust's.

use candle_core::{DType, Tensor};

use super::{BetaSchedule, SchedulerConfig, SchedulerError, TimestepSpacing};

/// `alphas_cumprod` of diffusers' constructors: `cumprod(1 - betas)` over the training betas,
/// rescaled to zero terminal SNR first when the config asks for it.
pub(super) fn alphas_cumprod(config: &SchedulerConfig) -> Vec<f32> {
    let betas = train_betas(config);
    let betas = if config.rescale_betas_zero_snr {
        rescale_zero_terminal_snr(&betas)
    } else {
        betas
    };
    cumprod(&betas)
}

/// The training betas in f32, as diffusers' constructors make them.
fn train_betas(config: &SchedulerConfig) -> Vec<f32> {
    let n = config.num_train_timesteps;
    match &config.betas {
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
    }
}

/// diffusers' `rescale_zero_terminal_snr` (Lin et al. 2023, Algorithm 1), op for op in f32:
/// shift sqrt(alphas_cumprod) so that its last value is 0, scale it back to its first value,
/// and undo the square root and the cumulative product.
///
/// torch's square roots here are an ulp off for about a fifth of the values (on x86 CPUs MKL
/// computes them, not correctly rounded), and the shift and the ratios amplify those ulps: the
/// alpha products come out within 4e-6 relative of diffusers' (and `1 - alpha` within 1.5e-5
/// near t = 0), not bit-equal.
fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let mut bar_sqrt: Vec<f32> = cumprod(betas).iter().map(|a| a.sqrt()).collect();
    let (first, last) = (bar_sqrt[0], bar_sqrt[bar_sqrt.len() - 1]);
    let scale = first / (first - last);
    for s in &mut bar_sqrt {
        *s = (*s - last) * scale;
    }
    let bar: Vec<f32> = bar_sqrt.iter().map(|s| s * s).collect();
    let alphas = std::iter::once(bar[0]).chain(bar.windows(2).map(|w| w[1] / w[0]));
    alphas.map(|a| 1.0 - a).collect()
}

/// torch.cumprod(1 - betas) on CPU: f32 factors, f64 running product, f32 results. It must be
/// bit-exact: near t = 0 the subtraction `1 - a` leaves ~10 bits, so one ulp of `a` would move
/// the smallest sigmas by 1e-3.
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

/// The inference timesteps of `timestep_spacing` for `n` steps, first (noisiest) first, before
/// each scheduler's final rounding: `linspace` values are numpy's f64 ones (Euler casts them to
/// f32, DDIM rounds them to integers); `leading` and `trailing` values are whole numbers.
///
/// With `trailing` spacing some step counts (61, 103, ... of 1000) yield one step more, ending
/// at timestep -1, because numpy's `arange` runs on a fractional stride; diffusers keeps it.
pub(super) fn spaced_timesteps(config: &SchedulerConfig, n: usize) -> Vec<f64> {
    let train = config.num_train_timesteps;
    match config.timestep_spacing {
        // np.linspace(0, T - 1, n)[::-1]
        TimestepSpacing::Linspace => numpy_linspace(0.0, (train - 1) as f64, n)
            .into_iter()
            .rev()
            .collect(),
        // (np.arange(0, n) * (T // n)).round()[::-1] + steps_offset
        TimestepSpacing::Leading => (0..n)
            .rev()
            .map(|i| (i * (train / n)) as f64 + config.steps_offset as f64)
            .collect(),
        // np.round(np.arange(T, 0, -T / n)) - 1
        TimestepSpacing::Trailing => numpy_arange(train as f64, 0.0, -(train as f64 / n as f64))
            .into_iter()
            .map(|t| t.round_ties_even() - 1.0)
            .collect(),
    }
}

/// torch.linspace in f32 on CPU (`steps >= 2`): the first half counts up from `start`, the
/// second down from `end`, each value one fused multiply-add (torch's kernel is compiled with
/// FMA contraction on AVX2 and newer CPUs, where the fixtures were made).
pub(super) fn torch_linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
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
pub(super) fn numpy_linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
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

/// The tensor's dtype, if the schedulers can work on it.
pub(super) fn float_dtype(t: &Tensor) -> Result<DType, SchedulerError> {
    match t.dtype() {
        d @ (DType::F16 | DType::BF16 | DType::F32 | DType::F64) => Ok(d),
        other => Err(SchedulerError::DType(other)),
    }
}

/// A rank-0 tensor of `like`'s dtype and device holding an f32 value: diffusers' per-step
/// scalars are 0-dim f32 tensors, which torch widens exactly when they meet f64 tensors.
pub(super) fn scalar(value: f32, like: &Tensor) -> candle_core::Result<Tensor> {
    Tensor::new(value, like.device())?.to_dtype(like.dtype())
}
