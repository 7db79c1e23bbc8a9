//! Rehash schedules: which steps are key steps, as the `--rehash` flag and TOML files give them.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::auto::AutoRule;
use crate::cache::{CacheError, CachePoint};
use crate::calibrate::Metric;
use crate::search::{uniform, Method, SearchError};
use crate::step::Rehash;

/// A Step Rehash schedule for one number of inference steps.
///
/// ```toml
/// num_inference_steps = 25
/// key_steps = [0, 1, 2, 3, 5, 7, 9, 11, 13, 15, 18, 21, 24]
/// method = "dp"
/// # optional: the calibration's similarity measure and the search's score
/// metric = "cosine"
/// score = 11.93
/// # optional: where the cached features are taken (default: the model's default cache point)
/// cache_point = "up_blocks.1"
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Schedule {
    pub num_inference_steps: usize,
    pub key_steps: Vec<usize>,
    pub method: Method,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_point: Option<String>,
    /// The similarity the search maximized (searched schedules only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metric: Option<Metric>,
    /// Score of the search (total similarity of non-key steps to the features they reuse).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub score: Option<f64>,
}

#[derive(Debug, thiserror::Error)]
pub enum ScheduleError {
    #[error("--rehash {0:?}: expected `off`, `uniform:K`, `auto:THRESHOLD` (a number >= 0) or a .toml schedule file")]
    Flag(String),
    /// Causes are told in the message, so they are not also a `source()` (a reported chain
    /// would print them twice).
    #[error("cannot read rehash schedule {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("rehash schedule {path}: {error}")]
    Parse {
        path: PathBuf,
        error: toml::de::Error,
    },
    #[error("rehash schedule{}: {reason}", origin.as_ref().map(|p| format!(" {}", p.display())).unwrap_or_default())]
    Invalid {
        origin: Option<PathBuf>,
        reason: String,
    },
    #[error(transparent)]
    Search(#[from] SearchError),
}

impl Schedule {
    /// Every step a key step: original inference.
    pub fn every_step(steps: usize) -> Self {
        Schedule {
            num_inference_steps: steps,
            key_steps: (0..steps).collect(),
            method: Method::Uniform,
            cache_point: None,
            metric: None,
            score: None,
        }
    }

    pub fn uniform(steps: usize, keys: usize) -> Result<Self, ScheduleError> {
        Ok(Schedule {
            key_steps: uniform(steps, keys)?,
            ..Self::every_step(steps)
        })
    }

    pub fn is_key(&self, step: usize) -> bool {
        self.key_steps.binary_search(&step).is_ok()
    }

    /// Full UNet evaluations per image.
    pub fn full_steps(&self) -> usize {
        self.key_steps.len()
    }

    /// Key steps sorted, unique, starting at 0, inside the schedule.
    pub fn validate(&self, origin: Option<&Path>) -> Result<(), ScheduleError> {
        let invalid = |reason: String| ScheduleError::Invalid {
            origin: origin.map(Path::to_path_buf),
            reason,
        };
        let n = self.num_inference_steps;
        if self.key_steps.first() != Some(&0) {
            return Err(invalid(
                "`key_steps` must start with step 0 (the first step has nothing to reuse)".into(),
            ));
        }
        if !self.key_steps.windows(2).all(|w| w[0] < w[1]) {
            return Err(invalid("`key_steps` must be strictly increasing".into()));
        }
        if let Some(s) = self.key_steps.iter().find(|s| **s >= n) {
            return Err(invalid(format!(
                "key step {s} is outside a {n}-step schedule (steps are 0..{n})"
            )));
        }
        self.cache_point().map_err(|e| invalid(e.to_string()))?;
        Ok(())
    }

    /// Where this schedule caches features: its `cache_point`, or the default.
    pub fn cache_point(&self) -> Result<CachePoint, CacheError> {
        self.cache_point
            .as_deref()
            .map_or(Ok(CachePoint::default()), str::parse)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a schedule always serializes")
    }

    pub fn read(path: &Path) -> Result<Self, ScheduleError> {
        let text = std::fs::read_to_string(path).map_err(|error| ScheduleError::Read {
            path: path.to_path_buf(),
            error,
        })?;
        let schedule: Schedule = toml::from_str(&text).map_err(|error| ScheduleError::Parse {
            path: path.to_path_buf(),
            error,
        })?;
        schedule.validate(Some(path))?;
        Ok(schedule)
    }
}

/// The `--rehash` flag: `off`, `uniform:K`, `auto:THRESHOLD` or a schedule file.
#[derive(Clone, Debug, PartialEq)]
pub enum RehashArg {
    Off,
    Uniform(usize),
    Auto(f64),
    File(PathBuf),
}

impl std::str::FromStr for RehashArg {
    type Err = ScheduleError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "off" {
            return Ok(RehashArg::Off);
        }
        if let Some(k) = s.strip_prefix("uniform:") {
            return k
                .parse()
                .map(RehashArg::Uniform)
                .map_err(|_| ScheduleError::Flag(s.into()));
        }
        if let Some(t) = s.strip_prefix("auto:") {
            return match t.parse::<f64>() {
                Ok(t) if t.is_finite() && t >= 0.0 => Ok(RehashArg::Auto(t)),
                _ => Err(ScheduleError::Flag(s.into())),
            };
        }
        if s.ends_with(".toml") {
            return Ok(RehashArg::File(s.into()));
        }
        Err(ScheduleError::Flag(s.into()))
    }
}

impl std::fmt::Display for RehashArg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RehashArg::Off => f.write_str("off"),
            RehashArg::Uniform(k) => write!(f, "uniform:{k}"),
            RehashArg::Auto(t) => write!(f, "auto:{t}"),
            RehashArg::File(path) => write!(f, "{}", path.display()),
        }
    }
}

impl RehashArg {
    /// What the denoising loop of a run of `steps` inference steps does.
    pub fn rehash(&self, steps: usize) -> Result<Rehash, ScheduleError> {
        Ok(match self {
            RehashArg::Off => Rehash::Off,
            RehashArg::Auto(threshold) => Rehash::Auto(AutoRule {
                threshold: *threshold,
            }),
            RehashArg::Uniform(_) | RehashArg::File(_) => match self.schedule(steps)? {
                Some(schedule) => Rehash::Schedule(schedule),
                None => Rehash::Off,
            },
        })
    }

    /// The schedule for a run of `steps` inference steps; `None` for `off` and `auto`,
    /// which have none before the run.
    pub fn schedule(&self, steps: usize) -> Result<Option<Schedule>, ScheduleError> {
        let schedule = match self {
            RehashArg::Off | RehashArg::Auto(_) => return Ok(None),
            RehashArg::Uniform(k) => Schedule::uniform(steps, *k)?,
            RehashArg::File(path) => {
                let s = Schedule::read(path)?;
                if s.num_inference_steps != steps {
                    return Err(ScheduleError::Invalid {
                        origin: Some(path.clone()),
                        reason: format!(
                            "made for {} inference steps, this run has {steps} (pass --num-inference-steps {} or search a new schedule)",
                            s.num_inference_steps, s.num_inference_steps
                        ),
                    });
                }
                s
            }
        };
        Ok(Some(schedule))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flag_forms() {
        assert_eq!("off".parse::<RehashArg>().unwrap(), RehashArg::Off);
        assert_eq!(
            "uniform:13".parse::<RehashArg>().unwrap(),
            RehashArg::Uniform(13)
        );
        assert_eq!(
            "s.toml".parse::<RehashArg>().unwrap(),
            RehashArg::File("s.toml".into())
        );
        assert_eq!(
            "auto:0.2".parse::<RehashArg>().unwrap(),
            RehashArg::Auto(0.2)
        );
        assert_eq!(
            RehashArg::Auto(0.2).rehash(25).unwrap(),
            Rehash::Auto(AutoRule { threshold: 0.2 })
        );
        for bad in [
            "uniform:",
            "uniform:x",
            "on",
            "13",
            "auto:",
            "auto:-1",
            "auto:nan",
        ] {
            assert!(bad.parse::<RehashArg>().is_err(), "{bad}");
        }
        let every = RehashArg::Uniform(25).schedule(25).unwrap().unwrap();
        assert_eq!(every, Schedule::every_step(25));
        assert!(RehashArg::Uniform(26).schedule(25).is_err());
        assert_eq!(RehashArg::Off.schedule(25).unwrap(), None);
    }

    #[test]
    fn toml_round_trip_and_validation() {
        let dir = std::env::temp_dir().join(format!("rehash-schedule-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.toml");
        let s = Schedule {
            method: Method::Dp,
            score: Some(11.5),
            metric: Some(Metric::RelL2),
            cache_point: Some("up_blocks.1".into()),
            ..Schedule::uniform(25, 13).unwrap()
        };
        std::fs::write(&path, s.to_toml()).unwrap();
        assert_eq!(Schedule::read(&path).unwrap(), s);
        let err = RehashArg::File(path.clone())
            .schedule(20)
            .unwrap_err()
            .to_string();
        assert!(err.contains("s.toml") && err.contains("25"), "{err}");

        for (text, needle) in [
            (
                "num_inference_steps = 5\nkey_steps = [1, 2]\nmethod = \"dp\"\n",
                "start with step 0",
            ),
            (
                "num_inference_steps = 5\nkey_steps = [0, 2, 2]\nmethod = \"dp\"\n",
                "increasing",
            ),
            (
                "num_inference_steps = 5\nkey_steps = [0, 5]\nmethod = \"dp\"\n",
                "outside",
            ),
            (
                "num_inference_steps = 5\nkey_steps = [0]\nmethod = \"best\"\n",
                "method",
            ),
            (
                "num_inference_steps = 5\nkey_steps = [0]\nmethod = \"dp\"\ncache_point = \"mid\"\n",
                "up_blocks.N",
            ),
        ] {
            std::fs::write(&path, text).unwrap();
            let err = Schedule::read(&path).unwrap_err().to_string();
            assert!(err.contains(needle) && err.contains("s.toml"), "{err}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
