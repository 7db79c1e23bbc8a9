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
    /// `None`: the default cache point.
    #[serde(default, with = "point_text", skip_serializing_if = "Option::is_none")]
    pub cache_point: Option<CachePoint>,
    /// The similarity the search maximized (searched schedules only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metric: Option<Metric>,
    /// Score of the search (total similarity of non-key steps to the features they reuse).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub score: Option<f64>,
}

#[derive(Debug, thiserror::Error)]
pub enum ScheduleError {
    #[error("--rehash {0:?}: expected `off`, `uniform:K`, `auto:THRESHOLD` (a number >= 0) or a .toml schedule file, optionally followed by `@up_blocks.N` (the cache point)")]
    Flag(String),
    #[error("--rehash {flag:?}: {error}")]
    CachePoint { flag: String, error: CacheError },
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
        Ok(())
    }

    /// The same key steps with the features cached at `point`.
    pub fn at(self, point: CachePoint) -> Self {
        Schedule {
            cache_point: (point != CachePoint::default()).then_some(point),
            ..self
        }
    }

    /// Where this schedule caches features: its `cache_point`, or the default.
    pub fn cache_point(&self) -> CachePoint {
        self.cache_point.unwrap_or_default()
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

/// A schedule file's `cache_point` as its `up_blocks.N` text.
mod point_text {
    use serde::{de::Error, Deserialize, Deserializer, Serializer};

    use crate::cache::CachePoint;

    pub fn serialize<S: Serializer>(point: &Option<CachePoint>, s: S) -> Result<S::Ok, S::Error> {
        match point {
            Some(p @ CachePoint::UpBlock(_)) => s.serialize_str(&p.to_string()),
            Some(CachePoint::LastBoundary) | None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<CachePoint>, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map(Some).map_err(D::Error::custom)
    }
}

/// The `--rehash` flag: `off`, `uniform:K`, `auto:THRESHOLD` or a schedule file, optionally
/// followed by `@up_blocks.N`, the cache point (which overrides a file's).
#[derive(Clone, Debug, PartialEq)]
pub struct RehashArg {
    pub keys: KeySteps,
    pub cache_point: Option<CachePoint>,
}

/// Which steps of a `--rehash` flag run the whole UNet.
#[derive(Clone, Debug, PartialEq)]
pub enum KeySteps {
    Off,
    Uniform(usize),
    Auto(f64),
    File(PathBuf),
}

impl From<KeySteps> for RehashArg {
    fn from(keys: KeySteps) -> Self {
        RehashArg {
            keys,
            cache_point: None,
        }
    }
}

impl std::str::FromStr for KeySteps {
    type Err = ScheduleError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let flag = || ScheduleError::Flag(s.into());
        if s == "off" {
            return Ok(KeySteps::Off);
        }
        if let Some(k) = s.strip_prefix("uniform:") {
            return k.parse().map(KeySteps::Uniform).map_err(|_| flag());
        }
        if let Some(t) = s.strip_prefix("auto:") {
            return match t.parse::<f64>() {
                Ok(t) if t.is_finite() && t >= 0.0 => Ok(KeySteps::Auto(t)),
                _ => Err(flag()),
            };
        }
        if s.ends_with(".toml") {
            return Ok(KeySteps::File(s.into()));
        }
        Err(flag())
    }
}

impl std::str::FromStr for RehashArg {
    type Err = ScheduleError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let Some((keys, point)) = s.rsplit_once('@') else {
            return Ok(s.parse::<KeySteps>()?.into());
        };
        let keys: KeySteps = keys.parse()?;
        if keys == KeySteps::Off {
            return Err(ScheduleError::Flag(s.into()));
        }
        let point = point.parse().map_err(|error| ScheduleError::CachePoint {
            flag: s.into(),
            error,
        })?;
        Ok(RehashArg {
            keys,
            cache_point: Some(point),
        })
    }
}

impl std::fmt::Display for RehashArg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.keys {
            KeySteps::Off => f.write_str("off")?,
            KeySteps::Uniform(k) => write!(f, "uniform:{k}")?,
            KeySteps::Auto(t) => write!(f, "auto:{t}")?,
            KeySteps::File(path) => write!(f, "{}", path.display())?,
        }
        match self.cache_point {
            Some(point) => write!(f, "@{point}"),
            None => Ok(()),
        }
    }
}

impl RehashArg {
    /// What the denoising loop of a run of `steps` inference steps does.
    pub fn rehash(&self, steps: usize) -> Result<Rehash, ScheduleError> {
        Ok(match &self.keys {
            KeySteps::Off => Rehash::Off,
            KeySteps::Auto(threshold) => Rehash::Auto(AutoRule {
                threshold: *threshold,
                cache_point: self.cache_point.unwrap_or_default(),
            }),
            KeySteps::Uniform(_) | KeySteps::File(_) => {
                self.schedule(steps)?.map_or(Rehash::Off, Rehash::Schedule)
            }
        })
    }

    /// The schedule for a run of `steps` inference steps; `None` for `off` and `auto`,
    /// which have none before the run.
    pub fn schedule(&self, steps: usize) -> Result<Option<Schedule>, ScheduleError> {
        let schedule = match &self.keys {
            KeySteps::Off | KeySteps::Auto(_) => return Ok(None),
            KeySteps::Uniform(k) => Schedule::uniform(steps, *k)?,
            KeySteps::File(path) => {
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
        Ok(Some(match self.cache_point {
            Some(point) => schedule.at(point),
            None => schedule,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flag(s: &str) -> RehashArg {
        s.parse().unwrap()
    }

    #[test]
    fn flag_forms() {
        assert_eq!(flag("off"), KeySteps::Off.into());
        assert_eq!(flag("uniform:13"), KeySteps::Uniform(13).into());
        assert_eq!(flag("s.toml"), KeySteps::File("s.toml".into()).into());
        assert_eq!(flag("auto:0.2"), KeySteps::Auto(0.2).into());
        assert_eq!(
            flag("auto:0.2").rehash(25).unwrap(),
            Rehash::Auto(AutoRule::new(0.2))
        );
        for bad in [
            "uniform:",
            "uniform:x",
            "on",
            "13",
            "auto:",
            "auto:-1",
            "auto:nan",
            "off@up_blocks.1",
            "uniform:5@",
        ] {
            assert!(bad.parse::<RehashArg>().is_err(), "{bad}");
        }
        let every = flag("uniform:25").schedule(25).unwrap().unwrap();
        assert_eq!(every, Schedule::every_step(25));
        assert!(flag("uniform:26").schedule(25).is_err());
        assert_eq!(flag("off").schedule(25).unwrap(), None);
    }

    #[test]
    fn a_cache_point_suffix_moves_the_cache() {
        let point = CachePoint::UpBlock(1);
        let uniform = flag("uniform:5@up_blocks.1");
        assert_eq!(uniform.to_string(), "uniform:5@up_blocks.1");
        let schedule = uniform.schedule(10).unwrap().unwrap();
        assert_eq!(schedule.cache_point(), point);
        assert_eq!(
            schedule.key_steps,
            flag("uniform:5").schedule(10).unwrap().unwrap().key_steps
        );
        assert_eq!(
            flag("auto:0.3@up_blocks.1").rehash(10).unwrap(),
            Rehash::Auto(AutoRule {
                threshold: 0.3,
                cache_point: point
            })
        );
        let err = "auto:0.3@mid".parse::<RehashArg>().unwrap_err().to_string();
        assert!(
            err.contains("auto:0.3@mid") && err.contains("up_blocks.N"),
            "{err}"
        );
        // Moving a schedule to the default point drops its recorded point.
        assert_eq!(schedule.at(CachePoint::LastBoundary).cache_point, None);
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
            cache_point: Some(CachePoint::UpBlock(1)),
            ..Schedule::uniform(25, 13).unwrap()
        };
        std::fs::write(&path, s.to_toml()).unwrap();
        assert_eq!(Schedule::read(&path).unwrap(), s);
        let err = RehashArg::from(KeySteps::File(path.clone()))
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
