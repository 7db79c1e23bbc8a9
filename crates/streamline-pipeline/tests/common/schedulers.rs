//! What the scheduler tests share: the fixture's loop keys, config files written for one
//! case, and the pipeline's denoising loop replayed against diffusers'.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::Tensor;
use streamline_pipeline::scheduler::Scheduler;

use super::{io, rel_l2};

/// The key prefixes of `io` that carry `suffix`, sorted.
pub fn prefixes(io: &HashMap<String, Tensor>, suffix: &str) -> Vec<String> {
    let mut found: Vec<String> = io
        .keys()
        .filter_map(|k| k.strip_suffix(suffix).map(str::to_string))
        .collect();
    found.sort();
    found
}

/// `json` as the scheduler_config.json of case `name` of test `test`, in the target's tmp.
pub fn write_config(test: &str, name: &str, json: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(test).join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("scheduler_config.json");
    std::fs::write(&path, json).unwrap();
    path
}

/// The pipeline's loop on every loop of `fixture` (at least `min_loops`): scale, (fake)
/// model, step; each output compared with diffusers', the next step fed with our own
/// previous output. Loops named `*.eta` step DDIM with eta 0.5 and the fixture's noise.
pub fn loops_match(
    fixture: &str,
    min_loops: usize,
    scheduler_for: impl Fn(&str) -> Scheduler,
    tolerance: f64,
) {
    let io = io(fixture);
    let loops = prefixes(&io, ".latents");
    assert!(
        loops.len() >= min_loops,
        "fixture has {} loops",
        loops.len()
    );
    let mut failures = Vec::new();
    for prefix in &loops {
        let scheduler = scheduler_for(prefix);
        let get = |name: &str| &io[&format!("{prefix}.{name}")];
        let (scaled, outputs, prevs) = (get("scaled"), get("model_output"), get("prev"));
        let noise = prefix
            .ends_with(".eta")
            .then(|| get("variance_noise").clone());
        assert_eq!(scaled.dim(0).unwrap(), scheduler.num_steps(), "{prefix}");
        let mut x = get("latents").clone();
        let (mut worst_scaled, mut worst_prev) = (0.0f64, 0.0f64);
        for i in 0..scheduler.num_steps() {
            let input = scheduler.scale_model_input(&x, i).unwrap();
            assert_eq!(input.dtype(), x.dtype());
            worst_scaled = worst_scaled.max(rel_l2(&input, &scaled.get(i).unwrap()));
            let output = outputs.get(i).unwrap();
            x = match (&scheduler, &noise) {
                (Scheduler::Ddim(ddim), Some(noise)) => ddim
                    .step_with_noise(&output, i, &x, 0.5, &noise.get(i).unwrap())
                    .unwrap(),
                (_, None) => scheduler.step(&output, i, &x).unwrap(),
                (Scheduler::EulerDiscrete(_), Some(_)) => panic!("{prefix}: eta loop for Euler"),
            };
            assert_eq!(x.dtype(), output.dtype(), "{prefix}");
            worst_prev = worst_prev.max(rel_l2(&x, &prevs.get(i).unwrap()));
        }
        let line = format!(
            "{prefix}: scaled inputs within {worst_scaled:e}, prev samples within {worst_prev:e}"
        );
        println!("{line}");
        if worst_scaled > tolerance || worst_prev > tolerance {
            failures.push(line);
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
