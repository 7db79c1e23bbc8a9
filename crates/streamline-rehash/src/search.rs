//! Key-step search: which denoising steps run the whole UNet.
//!
//! A non-key step reuses the cached features of the latest key step before it, so a choice of
//! key steps is worth the total similarity between every non-key step's own features and the
//! features it reuses. [`optimal`] maximizes that total exactly (a dynamic program over segment
//! boundaries); [`greedy`] is the paper's threshold walk (Algorithm 1), kept as the baseline.

use serde::{Deserialize, Serialize};

/// How a key step was chosen; recorded in schedules.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// The optimal dynamic program.
    Dp,
    /// The paper's greedy threshold walk.
    Greedy,
    /// Evenly spread key steps, no calibration.
    Uniform,
}

/// Step-to-step similarity of cached features, larger = more alike. Only `get(i, j)` with
/// `i < j` is used: features of key step `i` reused at step `j`.
#[derive(Clone, Debug, PartialEq)]
pub struct Similarity {
    steps: usize,
    values: Vec<f64>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SearchError {
    #[error("{keys} key steps asked for a {steps}-step schedule: need 1..={steps}")]
    KeyCount { keys: usize, steps: usize },
    #[error("similarity matrix for {steps} steps needs {} values, got {got}", steps * steps)]
    Shape { steps: usize, got: usize },
    #[error("similarity ({i}, {j}) is {value}, not a finite number")]
    NotFinite { i: usize, j: usize, value: f64 },
}

impl Similarity {
    /// `values` row-major, `steps x steps`.
    pub fn new(steps: usize, values: Vec<f64>) -> Result<Self, SearchError> {
        if values.len() != steps * steps {
            return Err(SearchError::Shape {
                steps,
                got: values.len(),
            });
        }
        if let Some(at) = values.iter().position(|v| !v.is_finite()) {
            return Err(SearchError::NotFinite {
                i: at / steps,
                j: at % steps,
                value: values[at],
            });
        }
        Ok(Similarity { steps, values })
    }

    pub fn from_fn(steps: usize, f: impl Fn(usize, usize) -> f64) -> Result<Self, SearchError> {
        let values = (0..steps * steps)
            .map(|k| f(k / steps, k % steps))
            .collect();
        Self::new(steps, values)
    }

    pub fn steps(&self) -> usize {
        self.steps
    }

    pub fn get(&self, i: usize, j: usize) -> f64 {
        self.values[i * self.steps + j]
    }

    /// Total similarity of a key-step set: each non-key step scores its similarity to the
    /// latest key step before it. `keys` must be sorted and start at 0.
    pub fn score(&self, keys: &[usize]) -> f64 {
        let mut total = 0.0;
        for (n, &key) in keys.iter().enumerate() {
            let end = keys.get(n + 1).copied().unwrap_or(self.steps);
            total += (key + 1..end).map(|j| self.get(key, j)).sum::<f64>();
        }
        total
    }

    fn check(&self, keys: usize) -> Result<(), SearchError> {
        check_keys(self.steps, keys)
    }
}

/// A schedule of `steps` steps has 1..=steps key steps.
fn check_keys(steps: usize, keys: usize) -> Result<(), SearchError> {
    if keys == 0 || keys > steps {
        return Err(SearchError::KeyCount { keys, steps });
    }
    Ok(())
}

/// The `keys` key steps (step 0 always one of them) with the highest [`Similarity::score`].
///
/// `best[c][e]`: the best score of steps `0..e` when `e` is the `c`-th key step (0-based), so a
/// key step at `i` followed by one at `e` earns the segment sum `i+1..e` of row `i`. O(keys *
/// steps^2) with prefix sums; ties go to the earliest key steps, so results are deterministic.
pub fn optimal(sim: &Similarity, keys: usize) -> Result<Vec<usize>, SearchError> {
    sim.check(keys)?;
    let n = sim.steps();
    // prefix[i][m] = sum of row i over columns i+1..m, so a key step at i followed by the
    // next at e earns prefix[i][e] - prefix[i][i+1].
    let prefix: Vec<Vec<f64>> = (0..n)
        .map(|i| {
            let mut row = vec![0.0; n + 1];
            for m in 0..n {
                row[m + 1] = row[m] + if m > i { sim.get(i, m) } else { 0.0 };
            }
            row
        })
        .collect();
    let segment = |i: usize, end: usize| prefix[i][end] - prefix[i][i + 1];
    let mut best = vec![vec![f64::NEG_INFINITY; n]; keys];
    let mut from = vec![vec![0usize; n]; keys];
    best[0][0] = 0.0;
    for c in 1..keys {
        for e in c..n {
            for i in c - 1..e {
                let v = best[c - 1][i] + segment(i, e);
                if v > best[c][e] {
                    best[c][e] = v;
                    from[c][e] = i;
                }
            }
        }
    }
    let last = first_max((keys - 1..n).map(|i| (i, best[keys - 1][i] + segment(i, n))))
        .expect("keys <= steps leaves a last key step");
    let mut chosen = vec![last];
    for c in (1..keys).rev() {
        chosen.push(from[c][*chosen.last().expect("non-empty")]);
    }
    chosen.reverse();
    Ok(chosen)
}

/// The paper's Algorithm 1, as a threshold walk: the current key step is reused while its
/// similarity to the next step stays at or above `tau`; the first step below becomes the next
/// key step. `tau` is chosen among the matrix's values so the walk yields `keys` key steps
/// (the best-scoring such walk); where no threshold gives exactly `keys`, the walk with the
/// most key steps below `keys` is topped up one key step at a time by the largest score gain.
pub fn greedy(sim: &Similarity, keys: usize) -> Result<Vec<usize>, SearchError> {
    sim.check(keys)?;
    let n = sim.steps();
    let walk = |tau: f64| {
        let mut chosen = vec![0];
        for j in 1..n {
            if sim.get(*chosen.last().expect("step 0"), j) < tau {
                chosen.push(j);
            }
        }
        chosen
    };
    let mut taus: Vec<f64> = (0..n)
        .flat_map(|i| (i + 1..n).map(move |j| (i, j)))
        .map(|(i, j)| sim.get(i, j))
        .collect();
    taus.push(f64::INFINITY);
    taus.sort_by(f64::total_cmp);
    taus.dedup();
    let mut exact: Option<Vec<usize>> = None;
    let mut fewer: Vec<usize> = vec![0];
    for tau in taus {
        let w = walk(tau);
        if w.len() == keys && exact.as_ref().is_none_or(|e| sim.score(&w) > sim.score(e)) {
            exact = Some(w);
        } else if w.len() < keys && w.len() > fewer.len() {
            fewer = w;
        }
    }
    Ok(exact.unwrap_or_else(|| top_up(sim, fewer, keys)))
}

/// Add key steps one by one, each the step whose promotion raises the score most.
fn top_up(sim: &Similarity, mut chosen: Vec<usize>, keys: usize) -> Vec<usize> {
    while chosen.len() < keys {
        let best = first_max((1..sim.steps()).filter(|s| !chosen.contains(s)).map(|s| {
            let mut with = chosen.clone();
            with.push(s);
            with.sort_unstable();
            (s, sim.score(&with))
        }))
        .expect("fewer key steps than steps leaves a candidate");
        chosen.push(best);
        chosen.sort_unstable();
    }
    chosen
}

/// The item with the largest value, the first one on ties (deterministic choices).
fn first_max(items: impl Iterator<Item = (usize, f64)>) -> Option<usize> {
    items
        .fold(None, |acc: Option<(usize, f64)>, (i, v)| match acc {
            Some((_, best)) if v <= best => acc,
            _ => Some((i, v)),
        })
        .map(|(i, _)| i)
}

/// `keys` key steps spread evenly over `steps`, the first included: step `floor(m * steps /
/// keys)` for `m` in `0..keys`. `uniform(n, n)` is every step.
pub fn uniform(steps: usize, keys: usize) -> Result<Vec<usize>, SearchError> {
    check_keys(steps, keys)?;
    Ok((0..keys).map(|m| m * steps / keys).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Every key-step set of size `keys` containing 0, best score (earliest on ties).
    fn exhaustive(sim: &Similarity, keys: usize) -> f64 {
        let n = sim.steps();
        let mut best = f64::NEG_INFINITY;
        for mask in 0u32..(1 << (n - 1)) {
            if mask.count_ones() as usize + 1 != keys {
                continue;
            }
            let mut set = vec![0];
            set.extend((1..n).filter(|s| mask & (1 << (s - 1)) != 0));
            best = best.max(sim.score(&set));
        }
        best
    }

    fn matrix() -> impl Strategy<Value = (Similarity, usize)> {
        (1usize..=9).prop_flat_map(|n| {
            (
                proptest::collection::vec(-1.0f64..1.0, n * n),
                1..=n,
                Just(n),
            )
                .prop_map(|(v, k, n)| (Similarity::new(n, v).unwrap(), k))
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        #[test]
        fn dp_matches_exhaustive_search((sim, keys) in matrix()) {
            let chosen = optimal(&sim, keys).unwrap();
            prop_assert_eq!(chosen.len(), keys);
            prop_assert_eq!(chosen[0], 0);
            prop_assert!(chosen.windows(2).all(|w| w[0] < w[1]));
            let best = exhaustive(&sim, keys);
            prop_assert!((sim.score(&chosen) - best).abs() <= 1e-9 * (1.0 + best.abs()),
                "dp {} vs exhaustive {best}", sim.score(&chosen));
        }

        #[test]
        fn greedy_is_a_valid_schedule_no_better_than_dp((sim, keys) in matrix()) {
            let chosen = greedy(&sim, keys).unwrap();
            prop_assert_eq!(chosen.len(), keys);
            prop_assert_eq!(chosen[0], 0);
            prop_assert!(chosen.windows(2).all(|w| w[0] < w[1]));
            prop_assert!(sim.score(&chosen) <= sim.score(&optimal(&sim, keys).unwrap()) + 1e-9);
        }
    }

    #[test]
    fn uniform_spreads_keys_and_all_keys_is_every_step() {
        assert_eq!(uniform(25, 25).unwrap(), (0..25).collect::<Vec<_>>());
        assert_eq!(uniform(10, 4).unwrap(), vec![0, 2, 5, 7]);
        assert_eq!(uniform(25, 1).unwrap(), vec![0]);
        assert!(uniform(5, 0).is_err() && uniform(5, 6).is_err());
    }

    #[test]
    fn greedy_reuses_while_similar() {
        // Steps 0-2 alike, 3-4 alike, the two groups unlike: two keys at 0 and 3.
        let group = |s: usize| usize::from(s >= 3);
        let sim =
            Similarity::from_fn(5, |i, j| if group(i) == group(j) { 0.9 } else { 0.1 }).unwrap();
        assert_eq!(greedy(&sim, 2).unwrap(), vec![0, 3]);
        assert_eq!(optimal(&sim, 2).unwrap(), vec![0, 3]);
    }

    #[test]
    fn bad_requests_are_errors() {
        let sim = Similarity::from_fn(3, |_, _| 1.0).unwrap();
        assert_eq!(
            optimal(&sim, 4),
            Err(SearchError::KeyCount { keys: 4, steps: 3 })
        );
        assert!(Similarity::new(2, vec![1.0; 3]).is_err());
        assert!(Similarity::new(1, vec![f64::NAN]).is_err());
    }
}
