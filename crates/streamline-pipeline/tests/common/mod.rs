//! Helpers shared by the pipeline tests: fixture paths and error measures.

#![allow(dead_code, unused_imports)]

pub mod schedulers;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use streamline_ir::{human, Axis};
use streamline_pipeline::phases::{BudgetError, Phase, Residency};
use streamline_pipeline::planner::{PlanError, PlanReport};
use streamline_pipeline::run::PipelineError;
use streamline_pipeline::svd::{
    default_model_dir, unit_noise, Planes, RunReport, StableVideoDiffusion, SvdSettings,
};
use streamline_pipeline::video::load_image;
use streamline_pipeline::Optimization;
use streamline_rehash::Rehash;

/// A fresh folder under the system temp dir, removed when the test ends.
pub struct Scratch(PathBuf);

impl Scratch {
    pub fn new(test: &str) -> Scratch {
        let dir =
            std::env::temp_dir().join(format!("streamline-pipeline-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// Writes `text` to the file `name`; returns its path.
    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.path(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    /// The names in the folder, sorted.
    pub fn entries(&self) -> Vec<String> {
        names_in(&self.0)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The names in `dir`, sorted.
pub fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/data")
        .join(name)
}

pub fn io(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture(name).join("io.safetensors"), &Device::Cpu).unwrap()
}

pub use streamline_ir::testing::rel_l2;

pub fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    streamline_pipeline::quality::max_abs(a, b).unwrap()
}

/// The built-in default model (docs/default-model.md), f32 on the CPU.
pub fn default_model() -> StableVideoDiffusion {
    StableVideoDiffusion::load(&default_model_dir(), DType::F32, &Device::Cpu).unwrap_or_else(|e| {
        panic!(
            "the default model at {}: {e}",
            default_model_dir().display()
        )
    })
}

/// An example image (examples/NAME.png) at the default model's size: `(3, H, W)` and planes.
pub fn example(pipe: &StableVideoDiffusion, name: &str) -> (Tensor, Planes) {
    let (h, w) = pipe
        .native_size()
        .expect("the default model records its size");
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples")
        .join(format!("{name}.png"));
    let image = load_image(&path, Some((h, w))).unwrap();
    let planes = Planes::from_tensor(&image).unwrap();
    (image, planes)
}

/// A run of the default model at its size and defaults, noise from `seed` as the CLI makes it.
pub fn generate(
    pipe: &StableVideoDiffusion,
    image: &Planes,
    seed: u64,
    optimization: Optimization,
    rehash: Rehash,
) -> (Tensor, RunReport) {
    let (h, w) = pipe
        .native_size()
        .expect("the default model records its size");
    let settings = SvdSettings {
        height: h,
        width: w,
        rehash,
        ..SvdSettings::default()
    };
    let frames = pipe.num_frames(&settings);
    let s = pipe.scale_factor();
    let latents = unit_noise((1, frames, 4, h / s, w / s), seed, &Device::Cpu).unwrap();
    let image_noise = unit_noise((1, 3, h, w), seed + 1, &Device::Cpu).unwrap();
    pipe.generate(
        image,
        &settings,
        &latents,
        &image_noise,
        optimization,
        &mut |_| {},
    )
    .unwrap()
}

/// The smallest whole-run peak any plan of a run reaches: the figure a refusal names.
/// `plan` is a pipeline's `plan` for one run.
pub fn smallest_peak(plan: impl Fn(Optimization) -> Result<PlanReport, PipelineError>) -> usize {
    match plan(Optimization::Budget { bytes: 0 }) {
        Err(PipelineError::Planning(e)) => match *e {
            PlanError::Budget(b) => match *b {
                BudgetError::Refused { smallest, .. } => smallest,
                other => panic!("{other}"),
            },
            other => panic!("{other}"),
        },
        other => panic!("a zero budget was not refused: {:?}", other.err()),
    }
}

/// A whole-run budget halfway between the smallest whole-run peak and what original
/// inference needs with each model only in its phases (or the smallest peak itself, where
/// the midpoint fits every model resident): it slices the calls and keeps the models out of
/// the phases that do not run them. `plan` is a pipeline's `plan` for one run.
pub fn per_phase_budget(
    plan: impl Fn(Optimization) -> Result<PlanReport, PipelineError>,
) -> Optimization {
    let original = plan(Optimization::Original).unwrap();
    let per_phase = per_phase_peak(&original);
    let floor = smallest_peak(&plan);
    assert!(floor < per_phase && per_phase < original.total());
    // Row bands can make the midpoint fit with every model resident; the floor itself never
    // does (it is per-phase residency's smallest peak).
    [(floor + per_phase) / 2, floor]
        .map(|bytes| Optimization::Budget { bytes })
        .into_iter()
        .find(|&budget| plan(budget).unwrap().run.residency == Residency::PerPhase)
        .expect("the smallest whole-run peak needs per-phase residency")
}

/// The budget at the smallest whole-run peak, checked to keep each model only in its phases
/// and to decode on row bands.
pub fn smallest_peak_on_rows(
    plan: impl Fn(Optimization) -> Result<PlanReport, PipelineError>,
) -> Optimization {
    let budget = Optimization::Budget {
        bytes: smallest_peak(&plan),
    };
    let report = plan(budget).unwrap();
    assert_eq!(report.run.residency, Residency::PerPhase);
    let rows = calls_on_rows(&report);
    assert!(rows.contains(&"decode"), "the decode runs on no row bands");
    budget
}

/// The calls of `report` with a group on row bands.
pub fn calls_on_rows(report: &PlanReport) -> Vec<&'static str> {
    let calls = [
        ("encode", report.encode.as_ref()),
        ("unet", Some(&report.unet)),
        ("decode", Some(&report.decoder)),
    ];
    calls
        .into_iter()
        .filter(|(_, call)| {
            call.is_some_and(|c| c.plan.groups.iter().any(|g| g.axis == Some(Axis::Rows)))
        })
        .map(|(name, _)| name)
        .collect()
}

/// The whole-run peak of `report`'s calls with each model only in its phases.
pub fn per_phase_peak(report: &PlanReport) -> usize {
    report
        .phases
        .iter()
        .map(|p| report.footprint.fixed(p.phase, Residency::PerPhase) + p.activations)
        .max()
        .unwrap()
}

/// Every phase of `report` measured within 10% of its plan.
pub fn assert_phases_within_ten_percent(label: &str, report: &RunReport) {
    let phases: Vec<Phase> = report.phases.iter().map(|p| p.phase).collect();
    assert_eq!(phases, Phase::ALL, "{label}");
    for p in &report.phases {
        let measured = p.measured.expect("the tracking allocator measures the CPU");
        let ratio = measured as f64 / p.planned as f64;
        let (planned, measured) = (human(p.planned), human(measured));
        eprintln!(
            "{label} {}: planned {planned} measured {measured} ({ratio:.3})",
            p.phase
        );
        assert!(
            (0.9..=1.1).contains(&ratio),
            "{label} {}: planned {planned} but measured {measured}",
            p.phase
        );
    }
}

/// `frames` equal to `expected` bit for bit.
pub fn assert_same_frames(label: &str, frames: &Tensor, expected: &Tensor) {
    let values = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!(
        values(frames) == values(expected),
        "{label}: frames differ from original inference"
    );
}

/// A plan's frames against original inference's: the exactness contract's relative L2
/// (design.md; row bands and slices sum in another order).
pub fn assert_plan_frames(label: &str, frames: &Tensor, original: &Tensor) {
    let err = rel_l2(frames, original);
    assert!(
        err <= 1e-5,
        "{label}: frames relative L2 {err:.2e} vs original inference"
    );
}
