//! One memory budget for the whole run (design.md, "Memory"): a run has three phases (encode
//! the conditioning, denoise, decode), each holding some models' weights, what earlier phases
//! handed on (encoder outputs, latents, the Step Rehash cache, decoded frames) and its calls'
//! activations. A budget bounds the largest phase, not the activations alone.
//!
//! Residency is the one lever besides slicing: every model stays on the device when the
//! budget allows it (nothing is read twice), otherwise each model is there only in the phases
//! that run it. Frames are bit-identical either way, since the plans of the calls do not
//! depend on where the weights were between calls.

use std::fmt;

use serde::Serialize;
use streamline_ir::{human, Infeasible};
use thiserror::Error;

use crate::optimize::{CallError, CallKind, Optimization};

/// A phase of a run, in order.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// The conditioning: SVD's CLIP image embedding and VAE encode, AnimateDiff's prompts.
    Encode,
    /// The denoising loop: one UNet call per step.
    Denoise,
    /// The VAE decode of the final latents, chunk by chunk.
    Decode,
}

impl Phase {
    pub const ALL: [Phase; 3] = [Phase::Encode, Phase::Denoise, Phase::Decode];

    pub fn index(self) -> usize {
        self as usize
    }

    /// The IR call a phase plans (the encode phase's VAE encode; AnimateDiff's encode phase
    /// has none).
    pub fn call(self) -> CallKind {
        match self {
            Phase::Encode => CallKind::Encode,
            Phase::Denoise => CallKind::UNetStep,
            Phase::Decode => CallKind::Decode,
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Phase::Encode => "encode",
            Phase::Denoise => "denoise",
            Phase::Decode => "decode",
        })
    }
}

/// Where the weights are between phases.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Residency {
    /// Every model stays on the device for the whole run.
    #[default]
    Resident,
    /// A model is on the device only in the phases that run it: read again from its
    /// safetensors file when a later phase (or the next video) needs it.
    PerPhase,
}

impl fmt::Display for Residency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Residency::Resident => "every model resident for the whole run",
            Residency::PerPhase => "each model on the device only in the phases that run it",
        })
    }
}

/// One model's weights and the phases that run it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ModelWeights {
    pub model: &'static str,
    pub bytes: usize,
    pub phases: Vec<Phase>,
}

/// What each phase holds besides its calls' activations: the models' weights and the values
/// handed from phase to phase (`held`, indexed by [`Phase::index`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Footprint {
    pub models: Vec<ModelWeights>,
    pub held: [usize; 3],
}

impl Footprint {
    /// The models on the device during `phase`.
    pub fn resident(&self, phase: Phase, residency: Residency) -> Vec<&ModelWeights> {
        self.models
            .iter()
            .filter(|m| residency == Residency::Resident || m.phases.contains(&phase))
            .collect()
    }

    pub fn weights(&self, phase: Phase, residency: Residency) -> usize {
        self.resident(phase, residency)
            .iter()
            .map(|m| m.bytes)
            .sum()
    }

    /// Weights and held values: what no plan of the phase's calls can lower.
    pub fn fixed(&self, phase: Phase, residency: Residency) -> usize {
        self.weights(phase, residency) + self.held[phase.index()]
    }
}

/// How every call of a run is planned, and where the weights are between phases.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RunPlan {
    /// Per phase ([`Phase::index`]); a whole-run budget becomes each phase's activation budget.
    pub calls: [Optimization; 3],
    pub residency: Residency,
}

impl RunPlan {
    /// `optimization` for the UNet and the decoder, every model resident. The VAE encode of
    /// one conditioning image runs unsliced (there is no axis to slice).
    pub fn uniform(optimization: Optimization) -> Self {
        RunPlan {
            calls: [Optimization::Original, optimization, optimization],
            residency: Residency::Resident,
        }
    }

    pub fn call(&self, phase: Phase) -> Optimization {
        self.calls[phase.index()]
    }
}

/// A whole-run budget no residency and no plan meets, told with the smallest whole-run peak
/// and the phase that sets it.
#[derive(Debug, Error)]
pub enum BudgetError {
    #[error(
        "a memory budget of {} cannot be met: the smallest whole-run peak is {}, set by the {phase} phase ({}); {remedy}",
        human(*budget), human(*smallest), parts.join(", ")
    )]
    Refused {
        budget: usize,
        smallest: usize,
        phase: Phase,
        /// What the figure is made of, for the message.
        parts: Vec<String>,
        remedy: &'static str,
    },
    /// Planning a call failed for another reason than the budget.
    #[error(transparent)]
    Call(Box<CallError>),
}

/// Plan the calls of a run under a whole-run `budget`: every model resident when that fits,
/// else each model only in its phases. `plan(phase, optimization)` plans the phase's calls and
/// returns them with their activation peak (returned beside them); a refused budget comes back
/// from it as a [`CallError`] whose source is [`streamline_ir::IrError::Infeasible`].
pub fn fit_run<T: Send>(
    budget: usize,
    footprint: &Footprint,
    plan: impl Fn(Phase, Optimization) -> Result<(T, usize), CallError> + Sync,
) -> Result<(RunPlan, Vec<(T, usize)>), BudgetError> {
    if let Ok(fits) = attempt(budget, footprint, Residency::Resident, &plan)? {
        return Ok(fits);
    }
    attempt(budget, footprint, Residency::PerPhase, &plan)?
        .map_err(|floors| refusal(budget, footprint, floors))
}

/// A phase's smallest activations, and the refusal that told it (none when the phase's call
/// planned but above what the budget left).
type Floor = (Phase, usize, Option<(CallKind, Infeasible)>);

/// One phase under a residency: planned within what it leaves, or its floor.
enum Outcome<T> {
    Fits(Optimization, T, usize),
    Over(Floor),
}

/// Plan `phase` within `left` (none: its weights and held values alone exceed the budget,
/// and it is planned at a zero budget for its floor).
fn try_phase<T>(
    phase: Phase,
    left: Option<usize>,
    plan: &impl Fn(Phase, Optimization) -> Result<(T, usize), CallError>,
) -> Result<Outcome<T>, BudgetError> {
    let optimization = Optimization::Budget {
        bytes: left.unwrap_or(0),
    };
    Ok(match plan(phase, optimization) {
        Ok((t, activations)) if left.is_some_and(|l| activations <= l) => {
            Outcome::Fits(optimization, t, activations)
        }
        Ok((_, activations)) => Outcome::Over((phase, activations, None)),
        Err(e) => match e.source.infeasible() {
            Some(i) => Outcome::Over((phase, i.smallest, Some((e.call, i.clone())))),
            None => return Err(BudgetError::Call(Box::new(e))),
        },
    })
}

/// The run under one residency, or the floors of the phases that do not fit. With every
/// model resident the first phase that does not fit ends the attempt (its floor is not
/// needed: only per-phase floors make a refusal); per phase, the phases are planned side by
/// side on threads, each to its floor where it does not fit (a refusal's smallest figure holds
/// for every budget, so no phase is planned twice).
#[allow(clippy::type_complexity)]
fn attempt<T: Send>(
    budget: usize,
    footprint: &Footprint,
    residency: Residency,
    plan: &(impl Fn(Phase, Optimization) -> Result<(T, usize), CallError> + Sync),
) -> Result<Result<(RunPlan, Vec<(T, usize)>), Vec<Floor>>, BudgetError> {
    let left = |phase| budget.checked_sub(footprint.fixed(phase, residency));
    let outcomes = match residency {
        Residency::Resident => {
            let mut outcomes = Vec::new();
            for phase in Phase::ALL {
                let outcome = match left(phase) {
                    None => Outcome::Over((phase, 0, None)),
                    Some(l) => try_phase(phase, Some(l), plan)?,
                };
                let over = matches!(outcome, Outcome::Over(_));
                outcomes.push(outcome);
                if over {
                    break;
                }
            }
            outcomes
        }
        Residency::PerPhase => std::thread::scope(|scope| {
            let runs: Vec<_> = Phase::ALL
                .map(|phase| scope.spawn(move || try_phase(phase, left(phase), plan)))
                .into_iter()
                .collect();
            runs.into_iter()
                .map(|run| run.join().expect("a planning thread panicked"))
                .collect::<Result<Vec<_>, _>>()
        })?,
    };
    let (mut planned, mut floors) = (Vec::new(), Vec::new());
    let mut calls = [Optimization::Original; 3];
    for (phase, outcome) in Phase::ALL.iter().zip(outcomes) {
        match outcome {
            Outcome::Fits(optimization, t, activations) => {
                calls[phase.index()] = optimization;
                planned.push((t, activations));
            }
            Outcome::Over(floor) => floors.push(floor),
        }
    }
    Ok(
        match floors.is_empty() && planned.len() == Phase::ALL.len() {
            true => Ok((RunPlan { calls, residency }, planned)),
            false => Err(floors),
        },
    )
}

/// The refusal of `budget`: of the phases that do not fit, the one whose floor (its fixed
/// bytes with per-phase residency plus its smallest activations) is largest, named.
fn refusal(budget: usize, footprint: &Footprint, floors: Vec<Floor>) -> BudgetError {
    let residency = Residency::PerPhase;
    let total = |(phase, activations, _): &Floor| footprint.fixed(*phase, residency) + activations;
    let worst = floors
        .iter()
        .max_by_key(|f| total(f))
        .expect("a refused run has a phase that does not fit");
    let (phase, activations, detail) = worst;
    let mut parts: Vec<String> = footprint
        .resident(*phase, residency)
        .iter()
        .map(|m| format!("{} weights {}", m.model, human(m.bytes)))
        .collect();
    let held = footprint.held[phase.index()];
    if held > 0 {
        parts.push(format!("{} handed on from earlier phases", human(held)));
    }
    parts.push(match detail {
        Some((call, i)) => activation_floor(*call, i),
        None => format!("activations {}", human(*activations)),
    });
    BudgetError::Refused {
        budget,
        smallest: total(worst),
        phase: *phase,
        parts,
        remedy: phase.call().remedy(),
    }
}

fn activation_floor(call: CallKind, i: &Infeasible) -> String {
    format!(
        "smallest feasible activations {}, set by the {call} in group {} ({}), {} of it values kept for later groups",
        human(i.smallest),
        i.group,
        i.nodes(),
        human(i.held)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use streamline_ir::IrError;

    const MIB: usize = 1 << 20;

    fn footprint() -> Footprint {
        let model = |model, mib, phases: &[Phase]| ModelWeights {
            model,
            bytes: mib * MIB,
            phases: phases.to_vec(),
        };
        Footprint {
            models: vec![
                model("image encoder", 100, &[Phase::Encode]),
                model("UNet", 300, &[Phase::Denoise]),
                model("VAE", 20, &[Phase::Encode, Phase::Decode]),
            ],
            held: [0, 2 * MIB, 10 * MIB],
        }
    }

    /// A call whose activations shrink to `floor` MiB under a budget and are `whole` MiB
    /// unsliced.
    fn call(
        phase: Phase,
        optimization: Optimization,
        floor: usize,
        whole: usize,
    ) -> Result<((), usize), CallError> {
        let Optimization::Budget { bytes } = optimization else {
            unreachable!()
        };
        if bytes >= whole * MIB {
            return Ok(((), whole * MIB));
        }
        if bytes >= floor * MIB {
            return Ok(((), bytes));
        }
        Err(CallError {
            call: phase.call(),
            source: Box::new(IrError::Infeasible(Box::new(Infeasible {
                budget: bytes,
                smallest: floor * MIB,
                group: 7,
                first: "a".into(),
                last: "b".into(),
                held: MIB,
            }))),
        })
    }

    fn run(budget_mib: usize) -> Result<RunPlan, BudgetError> {
        let (floor, whole) = ([5, 50, 80], [5, 200, 400]);
        fit_run(budget_mib * MIB, &footprint(), |p, o| {
            call(p, o, floor[p.index()], whole[p.index()])
        })
        .map(|(plan, _)| plan)
    }

    /// Everything resident when the budget allows it, each model in its phases when it needs
    /// it; each phase's activation budget is what its weights and held values leave.
    #[test]
    fn residency_follows_the_budget_and_calls_get_what_is_left() {
        let cases = [
            (2000, Residency::Resident, Phase::Decode, 2000 - 420 - 10),
            (400, Residency::PerPhase, Phase::Denoise, 400 - 300 - 2),
        ];
        for (budget, residency, phase, left) in cases {
            let plan = run(budget).unwrap();
            assert_eq!(plan.residency, residency, "{budget} MiB");
            let bytes = left * MIB;
            assert_eq!(
                plan.call(phase),
                Optimization::Budget { bytes },
                "{budget} MiB"
            );
        }
    }

    #[test]
    fn a_budget_below_every_phase_floor_names_the_largest() {
        let err = run(340).unwrap_err().to_string();
        // Denoise: 300 MiB of UNet + 2 MiB held + 50 MiB of activations = 352 MiB.
        assert!(
            err.starts_with("a memory budget of 340.0 MiB cannot be met: the smallest whole-run peak is 352.0 MiB, set by the denoise phase (UNet weights 300.0 MiB, 2.0 MiB handed on from earlier phases, smallest feasible activations 50.0 MiB, set by the UNet step in group 7 (`a` .. `b`)"),
            "{err}"
        );
        assert!(err.ends_with(CallKind::UNetStep.remedy()), "{err}");
    }
}
