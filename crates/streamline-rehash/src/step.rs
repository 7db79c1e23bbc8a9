//! The per-step choice: a key step runs the whole plan and keeps the cached features, any
//! other step substitutes them, and the executor prunes every node they make unnecessary.

use std::collections::HashMap;

use candle_core::Tensor;
use streamline_ir::{Graph, Request, SHALLOW_MARK};

use crate::auto::{AutoRule, AutoState};
use crate::cache::{CacheError, CachePoint};
use crate::schedule::Schedule;

/// What the denoising loop does with one UNet call across steps.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum Rehash {
    /// Every step runs the whole UNet and nothing is cached.
    #[default]
    Off,
    /// Key steps of the schedule run the whole UNet; the others reuse their cache.
    Schedule(Schedule),
    /// Key steps chosen during the run ([`crate::auto`]).
    Auto(AutoRule),
    /// Calibration: every step runs the whole UNet and its features at the cache point are
    /// recorded (steps x the cached value's bytes are held).
    Record(CachePoint),
}

#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error("rehash schedule {key_steps:?} is for {planned} steps, the run has {steps}")]
    Steps {
        key_steps: Vec<usize>,
        planned: usize,
        steps: usize,
    },
    #[error("step {0} is not a key step but no key step ran before it")]
    NoCache(usize),
    #[error("the run did not return the cached value `{0}`")]
    NotKept(String),
    #[error("step rehash: {0}")]
    Tensor(#[from] candle_core::Error),
    #[error("--rehash auto: the UNet graph marks no shallow features (`{SHALLOW_MARK}`)")]
    NoShallow,
}

impl Rehash {
    /// Where the features are cached (`None` when off).
    pub fn cache_point(&self) -> Option<CachePoint> {
        match self {
            Rehash::Off => None,
            Rehash::Schedule(s) => Some(s.cache_point()),
            Rehash::Auto(rule) => Some(rule.cache_point),
            Rehash::Record(p) => Some(*p),
        }
    }
}

/// Step Rehash state of one UNet call (one graph and plan) over a denoising loop.
#[derive(Debug)]
pub struct StepRehash {
    mode: Rehash,
    /// The cached value's name in the graph (`None` when off).
    value: Option<String>,
    cache: Option<Tensor>,
    recorded: Vec<Tensor>,
    auto: Option<Watch>,
    /// The steps that ran the whole UNet, in order.
    key_steps: Vec<usize>,
    partial_steps: usize,
}

/// An auto schedule's rule and what it watches: the shallow features' value name in the
/// graph, and the copy the latest step kept.
#[derive(Debug)]
struct Watch {
    rule: AutoState,
    value: String,
    latest: Option<Tensor>,
}

impl StepRehash {
    /// Resolve `mode`'s cache point on `graph` (the graph the executor runs) for a loop of
    /// `steps` steps.
    pub fn new(mode: Rehash, graph: &Graph, steps: usize) -> Result<Self, StepError> {
        if let Rehash::Schedule(s) = &mode {
            if s.num_inference_steps != steps {
                return Err(StepError::Steps {
                    key_steps: s.key_steps.clone(),
                    planned: s.num_inference_steps,
                    steps,
                });
            }
        }
        let point = mode.cache_point();
        let auto = match &mode {
            Rehash::Auto(rule) => {
                let value = graph.marked(SHALLOW_MARK).ok_or(StepError::NoShallow)?;
                Some(Watch {
                    rule: AutoState::new(*rule, steps),
                    value: graph.value(value).name.clone(),
                    latest: None,
                })
            }
            _ => None,
        };
        let value = point.map(|p| p.value_name(graph)).transpose()?;
        Ok(StepRehash {
            mode,
            value,
            cache: None,
            recorded: Vec::new(),
            auto,
            key_steps: Vec::new(),
            partial_steps: 0,
        })
    }

    /// Whether `step` runs the whole UNet.
    pub fn is_full(&self, step: usize) -> bool {
        match &self.mode {
            Rehash::Schedule(s) => s.is_key(step),
            Rehash::Auto(_) => self.auto.as_ref().is_none_or(|w| w.rule.is_key(step)),
            Rehash::Off | Rehash::Record(_) => true,
        }
    }

    /// The executor request for `step`. A full step drops the previous cache first, so at
    /// most one copy of the cached features is alive.
    pub fn request(&mut self, step: usize) -> Result<Request, StepError> {
        let Some(value) = &self.value else {
            self.key_steps.push(step);
            return Ok(Request::default());
        };
        let value = value.clone();
        if self.is_full(step) {
            self.cache = None;
            self.key_steps.push(step);
            return Ok(Request {
                keep: std::iter::once(value).chain(self.watched()).collect(),
                substitute: Vec::new(),
            });
        }
        let cache = self.cache.clone().ok_or(StepError::NoCache(step))?;
        Ok(self.partial(value, cache))
    }

    /// The request for partial `step` when it runs only the conditional half of a
    /// classifier-free-guidance batch (guidance reuse): the cached features' second half
    /// along dim 0, where the lowerings put the conditional items.
    pub fn request_conditional(&mut self, step: usize) -> Result<Request, StepError> {
        let (Some(value), Some(cache)) = (&self.value, &self.cache) else {
            return Err(StepError::NoCache(step));
        };
        let half = cache.dim(0)? / 2;
        let (value, cache) = (value.clone(), cache.narrow(0, half, half)?);
        Ok(self.partial(value, cache))
    }

    /// A partial step's request: `cache` given as `value`, the watched features kept.
    fn partial(&mut self, value: String, cache: Tensor) -> Request {
        self.partial_steps += 1;
        Request {
            keep: self.watched(),
            substitute: vec![(value, cache)],
        }
    }

    /// The values an auto schedule has every step keep.
    fn watched(&self) -> Vec<String> {
        self.auto.iter().map(|w| w.value.clone()).collect()
    }

    /// Take what a full step kept.
    pub fn absorb(&mut self, mut kept: HashMap<String, Tensor>) -> Result<(), StepError> {
        if let Some(watch) = &mut self.auto {
            watch.latest = kept.remove(watch.value.as_str());
        }
        let Some(value) = &self.value else {
            return Ok(());
        };
        if kept.is_empty() {
            return Ok(());
        }
        let t = kept
            .remove(value)
            .ok_or_else(|| StepError::NotKept(value.clone()))?;
        if matches!(self.mode, Rehash::Record(_)) {
            self.recorded.push(t.clone());
        }
        self.cache = Some(t);
        Ok(())
    }

    /// After `step` (and [`Self::absorb`]): an auto schedule decides from the shallow
    /// features the step kept whether the next step is a key step. `conditional_half`: the
    /// step ran both halves of classifier-free guidance, and the rule watches the
    /// conditional one (which every step computes).
    pub fn observe(&mut self, step: usize, conditional_half: bool) -> Result<(), StepError> {
        let key = self.key_steps.last() == Some(&step);
        let Some(watch) = &mut self.auto else {
            return Ok(());
        };
        // Taken, not kept: the rule holds its own copy of what it compares with.
        let features = watch
            .latest
            .take()
            .ok_or_else(|| StepError::NotKept(watch.value.clone()))?;
        let n = features.dim(0)?;
        let watched = match conditional_half {
            true => features.narrow(0, n / 2, n / 2)?,
            false => features.clone(),
        };
        watch.rule.observe(key, &watched)?;
        Ok(())
    }

    /// (full, partial) UNet evaluations so far.
    pub fn counts(&self) -> (usize, usize) {
        (self.key_steps.len(), self.partial_steps)
    }

    /// The steps that ran the whole UNet so far, in order.
    pub fn key_steps(&self) -> &[usize] {
        &self.key_steps
    }

    /// Features recorded at every step (calibration), in step order.
    pub fn into_recorded(self) -> Vec<Tensor> {
        self.recorded
    }
}
