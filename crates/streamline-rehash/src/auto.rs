//! Key steps chosen during the run, with no calibration: `--rehash auto:THRESHOLD`.
//!
//! Every step, full or partial, computes the UNet's shallow features (the first down block's
//! first layer, which the last up block reads as a skip), so the rule watches them: after
//! each step it adds their relative L1 change since the step before, and once the change
//! summed since the last key step, plus the latest change (about what the next step will
//! add), reaches the threshold, the next step is a key step and the sum starts again. The
//! first step is always one (there is nothing to reuse); the last never is, since a key step
//! pays for the steps that reuse its cache and none follow the last. A threshold of 0 makes
//! every step a key step: original inference. The rule reads only the run's own numbers, so a
//! run chooses the same key steps every time.
//!
//! On the default model the shallow features track the drift of the cached deep features
//! much as the dynamic program's calibration sees it; the UNet's output, tried first, changes
//! little early and much late and put the key steps a few steps too late
//! (docs/step-rehash.md).

use candle_core::{DType, Tensor};

use crate::cache::CachePoint;

/// The `auto:THRESHOLD` rule's parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AutoRule {
    /// Accumulated relative L1 change of the shallow features that calls for a key step.
    pub threshold: f64,
    /// Where the key steps' features are cached.
    pub cache_point: CachePoint,
}

impl AutoRule {
    /// The rule at the default cache point.
    pub fn new(threshold: f64) -> Self {
        AutoRule {
            threshold,
            cache_point: CachePoint::default(),
        }
    }
}

/// The rule's state over one denoising loop.
#[derive(Debug)]
pub(crate) struct AutoState {
    rule: AutoRule,
    /// The loop's last step.
    last: usize,
    previous: Option<Tensor>,
    accumulated: f64,
    due: bool,
}

impl AutoState {
    pub fn new(rule: AutoRule, steps: usize) -> Self {
        AutoState {
            rule,
            last: steps.saturating_sub(1),
            previous: None,
            accumulated: 0.0,
            due: false,
        }
    }

    pub fn is_key(&self, step: usize) -> bool {
        step == 0 || (self.due && (step != self.last || self.rule.threshold == 0.0))
    }

    /// Take a step's shallow `features` (`key`: whether the step ran the whole UNet) and
    /// decide whether the next step is a key step.
    pub fn observe(&mut self, key: bool, features: &Tensor) -> candle_core::Result<()> {
        let change = match &self.previous {
            Some(previous) => relative_l1(features, previous)?,
            None => 0.0,
        };
        // A key step refreshes the cache: only the change after it counts.
        self.accumulated = if key { 0.0 } else { self.accumulated + change };
        // A copy: `features` may view a larger buffer (both halves of the guidance batch).
        self.previous = Some(features.copy()?);
        // The next step will have drifted by about one more such change.
        self.due = self.accumulated + change >= self.rule.threshold;
        Ok(())
    }
}

/// `sum |a - b| / sum |b|` in f32 on the tensors' device (one scalar comes back).
fn relative_l1(a: &Tensor, b: &Tensor) -> candle_core::Result<f64> {
    let (a, b) = (a.to_dtype(DType::F32)?, b.to_dtype(DType::F32)?);
    let diff = (&a - &b)?.abs()?.sum_all()?.to_scalar::<f32>()?;
    let norm = b.abs()?.sum_all()?.to_scalar::<f32>()?;
    Ok(f64::from(diff) / f64::from(norm).max(f64::MIN_POSITIVE))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Features that change by `changes[i]` (relative L1) into step `i + 1`.
    fn keys(threshold: f64, changes: &[f64]) -> Vec<usize> {
        let steps = changes.len() + 1;
        let mut state = AutoState::new(AutoRule::new(threshold), steps);
        let mut value = 1.0f64;
        let mut keys = Vec::new();
        for step in 0..steps {
            let key = state.is_key(step);
            if key {
                keys.push(step);
            }
            if step > 0 {
                value *= 1.0 + changes[step - 1];
            }
            let output = Tensor::new(&[value as f32], &Device::Cpu).unwrap();
            state.observe(key, &output).unwrap();
        }
        keys
    }

    #[test]
    fn a_zero_threshold_makes_every_step_a_key_step() {
        assert_eq!(keys(0.0, &[0.0; 6]), (0..7).collect::<Vec<_>>());
    }

    #[test]
    fn key_steps_follow_the_accumulated_change() {
        // Changes of 0.1 each: two partial steps and the next one's change pass 0.28.
        assert_eq!(keys(0.28, &[0.1; 10]), vec![0, 3, 6, 9]);
        // The rule calls for the last step too, but nothing would reuse its cache.
        assert_eq!(keys(0.28, &[0.1; 9]), vec![0, 3, 6]);
        // Large early changes, small late ones (as a denoising loop runs): keys crowd early.
        let changes = [0.5, 0.3, 0.2, 0.1, 0.05, 0.05, 0.05, 0.05, 0.05];
        assert_eq!(keys(0.32, &changes), vec![0, 2, 4]);
        // A threshold above everything: the first step only.
        assert_eq!(keys(100.0, &changes), vec![0]);
    }
}
