//! Residency at run time (see [`crate::phases`]): a model on the device only in the phases
//! the run plan keeps it there, read again from its safetensors file when a later phase needs
//! it; and each phase's peak measured beside the planned one.

use std::sync::{Arc, Mutex, MutexGuard};

use serde::Serialize;
use streamline_ir::alloc;

use crate::phases::{Phase, Residency, RunPlan};
use crate::planner::PlanReport;
use crate::run::PipelineError;

type Loader<T> = Box<dyn Fn() -> Result<T, PipelineError> + Send + Sync>;

/// One model of a pipeline and the phases that run it.
pub(crate) struct Slot<T> {
    name: &'static str,
    phases: &'static [Phase],
    model: Mutex<Option<Arc<T>>>,
    load: Loader<T>,
}

impl<T> Slot<T> {
    /// Loads the model now, so that every weight is checked when the pipeline loads; `load`
    /// reads it again whenever a released model is needed.
    pub fn new(
        name: &'static str,
        phases: &'static [Phase],
        load: impl Fn() -> Result<T, PipelineError> + Send + Sync + 'static,
    ) -> Result<Self, PipelineError> {
        let model = Arc::new(load()?);
        Ok(Slot {
            name,
            phases,
            model: Mutex::new(Some(model)),
            load: Box::new(load),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Option<Arc<T>>> {
        self.model.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The model, read again from its file if it was released. A caller holds the weights
    /// as long as it holds the `Arc` (and every graph lowered from it).
    pub fn get(&self) -> Result<Arc<T>, PipelineError> {
        let mut slot = self.lock();
        if let Some(model) = slot.as_ref() {
            return Ok(model.clone());
        }
        tracing::info!("reading the {} weights again", self.name);
        let model = Arc::new((self.load)()?);
        *slot = Some(model.clone());
        Ok(model)
    }

    /// Whether the run keeps this model on the device during `phase`.
    fn needed(&self, phase: Phase, residency: Residency) -> bool {
        residency == Residency::Resident || self.phases.contains(&phase)
    }
}

/// Start `phase`: close the last phase's measurement, release every model `phase` does not
/// need, start measuring, then load every model it needs (their reading counts in the phase).
pub(crate) fn enter(
    slots: &[&dyn SlotControl],
    phase: Phase,
    residency: Residency,
    meter: &mut PhaseMeter,
) -> Result<(), PipelineError> {
    meter.close();
    for slot in slots {
        slot.release(phase, residency);
    }
    meter.open(phase);
    for slot in slots {
        slot.load(phase, residency)?;
    }
    Ok(())
}

/// A [`Slot`] seen without its model type.
pub(crate) trait SlotControl {
    /// Drops the model if `phase` does not need it: its memory is freed once no caller holds
    /// it any more.
    fn release(&self, phase: Phase, residency: Residency);
    /// Reads the model again if `phase` needs it and it was released.
    fn load(&self, phase: Phase, residency: Residency) -> Result<(), PipelineError>;
    /// The model's name, when it is loaded.
    fn loaded(&self) -> Option<&'static str>;
}

impl<T> SlotControl for Slot<T> {
    fn loaded(&self) -> Option<&'static str> {
        self.lock().is_some().then_some(self.name)
    }

    fn release(&self, phase: Phase, residency: Residency) {
        if !self.needed(phase, residency) {
            self.lock().take();
        }
    }

    fn load(&self, phase: Phase, residency: Residency) -> Result<(), PipelineError> {
        if self.needed(phase, residency) {
            self.get()?;
        }
        Ok(())
    }
}

/// One phase of a run: its planned peak and, on the CPU with the tracking allocator installed
/// (the `streamline` binary and the memory tests install it), its measured one: the highest
/// heap bytes during the phase above the heap before the run's first weights.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PhaseMeasure {
    pub phase: Phase,
    pub planned: usize,
    pub measured: Option<usize>,
}

/// What a run needs of its plan: the run plan, and what [`PhaseMeter`] compares against.
pub(crate) struct Planned {
    pub run: RunPlan,
    /// Each phase's planned peak.
    phases: Vec<(Phase, usize)>,
    /// Each model's weight bytes, by the name its [`Slot`] has.
    weights: Vec<(&'static str, usize)>,
}

impl Planned {
    /// The parts of `plan` a run keeps; the report itself (its graphs) is dropped, before a
    /// run measures its baseline.
    pub fn new(plan: PlanReport) -> Self {
        Planned {
            run: plan.run,
            phases: plan.phases.iter().map(|p| (p.phase, p.peak())).collect(),
            weights: plan
                .footprint
                .models
                .iter()
                .map(|m| (m.model, m.bytes))
                .collect(),
        }
    }
}

/// Measures each phase's peak as the run goes.
pub(crate) struct PhaseMeter {
    planned: Vec<(Phase, usize)>,
    /// Heap bytes that are not the run's: `None` when nothing is measured.
    baseline: Option<usize>,
    current: Option<Phase>,
    done: Vec<PhaseMeasure>,
}

impl PhaseMeter {
    /// The run's baseline is the heap now without the weights of the models `slots` hold
    /// (their tensors' bytes: what the weights take wherever they came from).
    pub fn new(planned: &Planned, slots: &[&dyn SlotControl], on_cpu: bool) -> Self {
        let tracking = on_cpu && alloc::current_bytes() > 0;
        let resident: usize = slots
            .iter()
            .filter_map(|s| s.loaded())
            .filter_map(|name| planned.weights.iter().find(|(m, _)| *m == name))
            .map(|(_, bytes)| bytes)
            .sum();
        PhaseMeter {
            planned: planned.phases.clone(),
            baseline: tracking.then(|| alloc::current_bytes().saturating_sub(resident)),
            current: None,
            done: Vec::new(),
        }
    }

    fn open(&mut self, phase: Phase) {
        alloc::reset_peak();
        self.current = Some(phase);
    }

    fn close(&mut self) {
        let Some(phase) = self.current.take() else {
            return;
        };
        let planned = self
            .planned
            .iter()
            .find(|(p, _)| *p == phase)
            .map_or(0, |(_, b)| *b);
        self.done.push(PhaseMeasure {
            phase,
            planned,
            measured: self
                .baseline
                .map(|base| alloc::peak_bytes().saturating_sub(base)),
        });
    }

    pub fn finish(mut self) -> Vec<PhaseMeasure> {
        self.close();
        self.done
    }
}
