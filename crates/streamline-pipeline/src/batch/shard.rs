//! Which jobs a process runs: shard `I` of `N` owns job `i` exactly when `i mod N == I`, so `N`
//! processes with `I = 0..N` cover every job once, in any order and on any machines.
//!
//! The shard comes from `--shard I/N`, else from the scheduler that started the process:
//! a Slurm job array (`SLURM_ARRAY_TASK_ID`, `SLURM_ARRAY_TASK_COUNT`, and the array's
//! `SLURM_ARRAY_TASK_MIN` / `_STEP`, so `--array=1-8` or `--array=0-14:2` work too) or a
//! Kubernetes Indexed Job (`JOB_COMPLETION_INDEX`, with the Job's `completions` given as
//! `--shard-count` or [`SHARD_COUNT_ENV`], since Kubernetes does not export it).

use std::fmt;
use std::str::FromStr;

use thiserror::Error;

/// Where a Kubernetes Indexed Job's shard count is read when `--shard-count` is not given.
pub const SHARD_COUNT_ENV: &str = "STREAMLINE_SHARD_COUNT";

/// Shard `index` of `count` (0-based).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

/// A shard that cannot be, named by the flag or variable it came from.
#[derive(Debug, Error)]
#[error("{source_name}: {reason}")]
pub struct ShardError {
    /// `--shard 3/2`, `SLURM_ARRAY_TASK_ID=7`, ...
    pub source_name: String,
    pub reason: String,
}

impl Shard {
    /// Every job, for a run that is not sharded.
    pub const WHOLE: Shard = Shard { index: 0, count: 1 };

    pub fn new(index: usize, count: usize) -> Result<Shard, String> {
        if count == 0 {
            return Err("the shard count must be at least 1".into());
        }
        if index >= count {
            return Err(format!(
                "the shard index must be below the count (shards are numbered from 0: 0/{count} to {}/{count})",
                count - 1
            ));
        }
        Ok(Shard { index, count })
    }

    /// Whether job `job` (its place among the jobs, from 0) is this shard's.
    pub fn owns(&self, job: usize) -> bool {
        job % self.count == self.index
    }

    /// This shard's results file in the output folder.
    pub fn results_name(&self) -> String {
        format!("results.shard-{}-of-{}.jsonl", self.index, self.count)
    }

    /// The shard `--shard` names, else the one the scheduler's environment (`env`) gives,
    /// else [`Shard::WHOLE`]; with where it came from, for the log.
    pub fn resolve(
        flag: Option<Shard>,
        count_flag: Option<usize>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<(Shard, String), ShardError> {
        if let Some(shard) = flag {
            return Ok((shard, format!("--shard {shard}")));
        }
        if let Some(id) = env("SLURM_ARRAY_TASK_ID") {
            if let Some(count) = count_flag {
                return Err(ShardError {
                    source_name: format!("--shard-count {count}"),
                    reason: "is for Kubernetes Indexed Jobs; in a Slurm job array the count is SLURM_ARRAY_TASK_COUNT".into(),
                });
            }
            return slurm(&id, &env);
        }
        if let Some(index) = env("JOB_COMPLETION_INDEX") {
            return kubernetes(&index, count_flag, &env);
        }
        Ok((Shard::WHOLE, "no shard given: every job".into()))
    }
}

/// `NAME=value` parsed as a non-negative integer.
fn variable(name: &str, value: &str) -> Result<usize, ShardError> {
    value.trim().parse().map_err(|_| ShardError {
        source_name: format!("{name}={value}"),
        reason: "expected a non-negative integer".into(),
    })
}

fn slurm(
    id_text: &str,
    env: &impl Fn(&str) -> Option<String>,
) -> Result<(Shard, String), ShardError> {
    let id = variable("SLURM_ARRAY_TASK_ID", id_text)?;
    let named = |name: &str| env(name).map(|v| variable(name, &v)).transpose();
    let count = named("SLURM_ARRAY_TASK_COUNT")?.ok_or_else(|| ShardError {
        source_name: format!("SLURM_ARRAY_TASK_ID={id}"),
        reason: "is set but SLURM_ARRAY_TASK_COUNT is not (Slurm sets both in a job array)".into(),
    })?;
    let min = named("SLURM_ARRAY_TASK_MIN")?.unwrap_or(0);
    let step = named("SLURM_ARRAY_TASK_STEP")?.unwrap_or(1).max(1);
    let offset = id.checked_sub(min).filter(|o| o % step == 0);
    let source = format!("SLURM_ARRAY_TASK_ID={id} of SLURM_ARRAY_TASK_COUNT={count}");
    let shard = offset
        .ok_or_else(|| {
            format!(
                "is not in the array {min}, {}, ... (SLURM_ARRAY_TASK_MIN, _STEP)",
                min + step
            )
        })
        .and_then(|offset| Shard::new(offset / step, count))
        .map_err(|reason| ShardError {
            source_name: source.clone(),
            reason,
        })?;
    Ok((shard, source))
}

fn kubernetes(
    index_text: &str,
    count_flag: Option<usize>,
    env: &impl Fn(&str) -> Option<String>,
) -> Result<(Shard, String), ShardError> {
    let index = variable("JOB_COMPLETION_INDEX", index_text)?;
    let (count, count_source) = match count_flag {
        Some(count) => (count, format!("--shard-count {count}")),
        None => {
            let text = env(SHARD_COUNT_ENV).ok_or_else(|| ShardError {
                source_name: format!("JOB_COMPLETION_INDEX={index}"),
                reason: format!(
                    "a Kubernetes Indexed Job needs its shard count (the Job's `completions`): pass --shard-count N or set {SHARD_COUNT_ENV}"
                ),
            })?;
            let count = variable(SHARD_COUNT_ENV, &text)?;
            (count, format!("{SHARD_COUNT_ENV}={count}"))
        }
    };
    let source = format!("JOB_COMPLETION_INDEX={index} of {count_source}");
    let shard = Shard::new(index, count).map_err(|reason| ShardError {
        source_name: source.clone(),
        reason,
    })?;
    Ok((shard, source))
}

impl fmt::Display for Shard {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

/// `I/N`, as `--shard` takes it.
impl FromStr for Shard {
    type Err = String;

    fn from_str(text: &str) -> Result<Shard, String> {
        let (index, count) = text
            .split_once('/')
            .and_then(|(i, n)| Some((i.trim().parse().ok()?, n.trim().parse().ok()?)))
            .ok_or_else(|| "expected I/N (shard I of N, from 0), e.g. 0/4".to_string())?;
        Shard::new(index, count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(vars: &'a [(&str, &str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| {
            vars.iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.to_string())
        }
    }

    /// Every job lands in exactly one of N shards.
    #[test]
    fn shards_partition_the_jobs() {
        for count in 1..6 {
            for job in 0..23 {
                let owners = (0..count).filter(|&i| Shard::new(i, count).unwrap().owns(job));
                assert_eq!(owners.count(), 1, "job {job} of {count} shards");
            }
        }
    }

    #[test]
    fn the_flag_parses_and_refuses_impossible_shards() {
        assert_eq!(
            "1/4".parse::<Shard>().unwrap(),
            Shard { index: 1, count: 4 }
        );
        for (text, needle) in [
            ("3/2", "below the count"),
            ("0/0", "at least 1"),
            ("2", "expected I/N"),
            ("a/b", "expected I/N"),
            ("-1/2", "expected I/N"),
        ] {
            let err = text.parse::<Shard>().unwrap_err();
            assert!(err.contains(needle), "{text}: {err}");
        }
    }

    #[test]
    fn slurm_arrays_give_the_shard_from_their_task_id() {
        let vars = [
            ("SLURM_ARRAY_TASK_ID", "2"),
            ("SLURM_ARRAY_TASK_COUNT", "4"),
        ];
        let (shard, from) = Shard::resolve(None, None, env(&vars)).unwrap();
        assert_eq!(shard, Shard { index: 2, count: 4 });
        assert!(from.contains("SLURM_ARRAY_TASK_ID=2"), "{from}");
        // --array=1-4 and --array=0-6:2
        let one_based = [
            ("SLURM_ARRAY_TASK_ID", "4"),
            ("SLURM_ARRAY_TASK_COUNT", "4"),
            ("SLURM_ARRAY_TASK_MIN", "1"),
        ];
        let (shard, _) = Shard::resolve(None, None, env(&one_based)).unwrap();
        assert_eq!(shard, Shard { index: 3, count: 4 });
        let stepped = [
            ("SLURM_ARRAY_TASK_ID", "4"),
            ("SLURM_ARRAY_TASK_COUNT", "4"),
            ("SLURM_ARRAY_TASK_STEP", "2"),
        ];
        let (shard, _) = Shard::resolve(None, None, env(&stepped)).unwrap();
        assert_eq!(shard, Shard { index: 2, count: 4 });
        let flag = Shard { index: 0, count: 2 };
        let (shard, from) = Shard::resolve(Some(flag), None, env(&vars)).unwrap();
        assert_eq!(
            (shard, from.as_str()),
            (flag, "--shard 0/2"),
            "the flag wins"
        );
    }

    #[test]
    fn kubernetes_indexed_jobs_need_a_count() {
        let vars = [("JOB_COMPLETION_INDEX", "1")];
        let err = Shard::resolve(None, None, env(&vars)).unwrap_err();
        assert!(err.to_string().contains("--shard-count"), "{err}");
        let (shard, _) = Shard::resolve(None, Some(3), env(&vars)).unwrap();
        assert_eq!(shard, Shard { index: 1, count: 3 });
        let with_count = [("JOB_COMPLETION_INDEX", "1"), (SHARD_COUNT_ENV, "2")];
        let (shard, _) = Shard::resolve(None, None, env(&with_count)).unwrap();
        assert_eq!(shard, Shard { index: 1, count: 2 });
    }

    #[test]
    fn bad_environments_name_the_variable() {
        let cases: [(&[(&str, &str)], &str); 5] = [
            (
                &[
                    ("SLURM_ARRAY_TASK_ID", "x"),
                    ("SLURM_ARRAY_TASK_COUNT", "2"),
                ],
                "SLURM_ARRAY_TASK_ID=x",
            ),
            (
                &[("SLURM_ARRAY_TASK_ID", "1")],
                "SLURM_ARRAY_TASK_COUNT is not",
            ),
            (
                &[
                    ("SLURM_ARRAY_TASK_ID", "5"),
                    ("SLURM_ARRAY_TASK_COUNT", "2"),
                ],
                "below the count",
            ),
            (
                &[("JOB_COMPLETION_INDEX", "3"), (SHARD_COUNT_ENV, "3")],
                "JOB_COMPLETION_INDEX=3",
            ),
            (
                &[("JOB_COMPLETION_INDEX", "0"), (SHARD_COUNT_ENV, "zero")],
                "STREAMLINE_SHARD_COUNT=zero",
            ),
        ];
        for (vars, needle) in cases {
            let err = Shard::resolve(None, None, env(vars))
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "{vars:?}: {err}");
        }
        assert_eq!(
            Shard::resolve(None, None, env(&[])).unwrap().0,
            Shard::WHOLE
        );
    }
}
