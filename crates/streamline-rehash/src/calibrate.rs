//! Calibration: step-to-step similarity of the features recorded at a cache point.
//!
//! Original inference on a calibration input records the cached value at every step
//! ([`crate::Rehash::Record`]); the matrices here say how well step `i`'s features stand in for
//! step `j`'s. Several inputs are averaged entry by entry.

use std::fmt;
use std::str::FromStr;

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use crate::search::{SearchError, Similarity};

/// How alike two steps' features are.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Metric {
    /// Cosine similarity of the flattened features.
    #[default]
    Cosine,
    /// `1 - ||f_i - f_j|| / ||f_j||`: one minus the relative L2 error of reusing `f_i` at `j`.
    RelL2,
}

impl FromStr for Metric {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "cosine" => Ok(Metric::Cosine),
            "rel-l2" => Ok(Metric::RelL2),
            other => Err(format!("unknown metric `{other}` (cosine, rel-l2)")),
        }
    }
}

impl fmt::Display for Metric {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Metric::Cosine => "cosine",
            Metric::RelL2 => "rel-l2",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CalibrationError {
    #[error("calibration recorded no steps")]
    Empty,
    #[error("calibration runs recorded {0} and {1} steps; every run needs the same schedule")]
    Steps(usize, usize),
    #[error("step {step}: features have shape {got:?}, step 0 had {expected:?}")]
    Shape {
        step: usize,
        expected: Vec<usize>,
        got: Vec<usize>,
    },
    #[error(transparent)]
    Search(#[from] SearchError),
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
}

/// The Gram matrix `<f_i, f_j>` of the recorded steps, in f64.
fn gram(features: &[Tensor]) -> Result<Vec<Vec<f64>>, CalibrationError> {
    let first = features.first().ok_or(CalibrationError::Empty)?;
    let flat = features
        .iter()
        .enumerate()
        .map(|(step, f)| {
            if f.dims() != first.dims() {
                return Err(CalibrationError::Shape {
                    step,
                    expected: first.dims().to_vec(),
                    got: f.dims().to_vec(),
                });
            }
            Ok(f.flatten_all()?.to_dtype(DType::F64)?)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let n = flat.len();
    let mut g = vec![vec![0.0; n]; n];
    for i in 0..n {
        for j in i..n {
            let dot = (&flat[i] * &flat[j])?.sum_all()?.to_scalar::<f64>()?;
            g[i][j] = dot;
            g[j][i] = dot;
        }
    }
    Ok(g)
}

/// The similarity matrix of one calibration run's recorded features (one tensor per step).
pub fn similarity(features: &[Tensor], metric: Metric) -> Result<Similarity, CalibrationError> {
    let g = gram(features)?;
    let norm = |i: usize| g[i][i].sqrt();
    Ok(Similarity::from_fn(g.len(), |i, j| match metric {
        Metric::Cosine => g[i][j] / (norm(i) * norm(j)).max(f64::MIN_POSITIVE),
        // ||f_i - f_j||^2 expanded; clamped at 0 against rounding.
        Metric::RelL2 => {
            let diff = (g[i][i] + g[j][j] - 2.0 * g[i][j]).max(0.0).sqrt();
            1.0 - diff / norm(j).max(f64::MIN_POSITIVE)
        }
    })?)
}

/// Entry-by-entry mean of several calibration runs' matrices.
pub fn mean(runs: &[Similarity]) -> Result<Similarity, CalibrationError> {
    let first = runs.first().ok_or(CalibrationError::Empty)?;
    let n = first.steps();
    if let Some(r) = runs.iter().find(|r| r.steps() != n) {
        return Err(CalibrationError::Steps(n, r.steps()));
    }
    Ok(Similarity::from_fn(n, |i, j| {
        runs.iter().map(|r| r.get(i, j)).sum::<f64>() / runs.len() as f64
    })?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn t(v: &[f32]) -> Tensor {
        Tensor::new(v, &Device::Cpu).unwrap()
    }

    #[test]
    fn metrics_on_known_vectors() {
        let f = [t(&[1.0, 0.0]), t(&[0.0, 2.0]), t(&[2.0, 0.0])];
        let cos = similarity(&f, Metric::Cosine).unwrap();
        assert!((cos.get(0, 1)).abs() < 1e-12);
        assert!((cos.get(0, 2) - 1.0).abs() < 1e-12);
        let l2 = similarity(&f, Metric::RelL2).unwrap();
        // ||f0 - f2|| / ||f2|| = 1 / 2; ||f2 - f0|| / ||f0|| = 1.
        assert!((l2.get(0, 2) - 0.5).abs() < 1e-12);
        assert!((l2.get(2, 0) - 0.0).abs() < 1e-12);
        assert!((l2.get(1, 1) - 1.0).abs() < 1e-12);
        let avg = mean(&[cos.clone(), l2.clone()]).unwrap();
        assert!((avg.get(0, 2) - 0.75).abs() < 1e-12);
    }

    #[test]
    fn bad_recordings_are_errors() {
        assert!(matches!(
            similarity(&[], Metric::Cosine),
            Err(CalibrationError::Empty)
        ));
        let err = similarity(&[t(&[1.0, 0.0]), t(&[1.0])], Metric::Cosine).unwrap_err();
        assert!(err.to_string().contains("step 1"), "{err}");
        let a = similarity(&[t(&[1.0])], Metric::Cosine).unwrap();
        let b = similarity(&[t(&[1.0]), t(&[2.0])], Metric::Cosine).unwrap();
        assert!(matches!(mean(&[a, b]), Err(CalibrationError::Steps(1, 2))));
        assert_eq!("rel-l2".parse::<Metric>().unwrap(), Metric::RelL2);
        assert!("l1".parse::<Metric>().is_err());
    }
}
