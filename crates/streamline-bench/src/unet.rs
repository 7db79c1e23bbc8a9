//! One UNet step of an svd-small-like model: the weights and inputs both implementations read,
//! and our measured run under one mode.

use std::collections::HashMap;
use std::fs;
use std::path::Path;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use streamline_ir::{Executor, Request};
use streamline_models::load::WeightSource;
use streamline_models::svd::{UNetConfig, UNetShape, UNetSpatioTemporalConditionModel};
use streamline_pipeline::svd::unit_noise;
use streamline_pipeline::{optimize, Optimization};
use streamline_rehash::{CachePoint, Rehash, StepRehash};
use streamline_slicer::naive::frame_chunks;

use crate::measure::{timed, Baseline, Measurement};
use crate::How;

/// The SVD noise levels of two adjacent mid-schedule steps, as the UNet sees them
/// (`c_noise = ln(sigma) / 4`): Step Rehash reuses the first step's features at the second.
const SIGMAS: [f64; 2] = [10.0, 8.5];

/// Write `dir/unet/{config.json, diffusion_pytorch_model.safetensors}` (random weights from
/// `seed`, in diffusers' names and layout) and `dir/inputs.safetensors`: `sample`
/// (B, T, 8, H, W), `timestep` (B,), `encoder_hidden_states` (B, 1, D), `added_time_ids`
/// (B, 3), and `sample_prev`, `timestep_prev` for the step before.
pub fn prepare(dir: &Path, config: &UNetConfig, shape: UNetShape, seed: u64) -> Result<()> {
    let dev = Device::Cpu;
    let unet_dir = dir.join("unet");
    fs::create_dir_all(&unet_dir)
        .with_context(|| format!("cannot create {}", unet_dir.display()))?;
    let source = WeightSource::random(seed);
    let usage = source.usage();
    UNetSpatioTemporalConditionModel::new(config, source.var_builder(DType::F32, &dev))?;
    let vb = WeightSource::random(seed).var_builder(DType::F32, &dev);
    let weights = usage
        .requested()
        .into_iter()
        .map(|(name, shape)| Ok((name.clone(), vb.get(shape, &name)?)))
        .collect::<Result<HashMap<_, _>>>()?;
    candle_core::safetensors::save(
        &weights,
        unet_dir.join("diffusion_pytorch_model.safetensors"),
    )?;
    let mut json = serde_json::to_value(config)?;
    json["_class_name"] = "UNetSpatioTemporalConditionModel".into();
    fs::write(
        unet_dir.join("config.json"),
        serde_json::to_string_pretty(&json)?,
    )?;

    let UNetShape {
        batch: b,
        frames: t,
        height: h,
        width: w,
        ..
    } = shape;
    let d = match config.cross_attention_dim {
        streamline_models::svd::PerBlock::One(d) => d,
        streamline_models::svd::PerBlock::Each(ref v) => v[0],
    };
    let prev = unit_noise((b, t, config.in_channels, h, w), seed + 1, &dev)?;
    // One Euler step later the input has moved a little: keep unit variance.
    let sample = ((&prev * 0.99)? + (unit_noise(prev.shape(), seed + 2, &dev)? * 0.14)?)?;
    let c_noise = |sigma: f64| Tensor::full(sigma.ln() as f32 / 4.0, b, &dev);
    let ids = Tensor::new(&[6f32, 127., 0.02], &dev)?
        .unsqueeze(0)?
        .repeat((b, 1))?;
    let inputs: HashMap<String, Tensor> = [
        ("sample", sample),
        ("sample_prev", prev),
        ("timestep", c_noise(SIGMAS[1])?),
        ("timestep_prev", c_noise(SIGMAS[0])?),
        (
            "encoder_hidden_states",
            unit_noise((b, 1, d), seed + 3, &dev)?,
        ),
        ("added_time_ids", ids),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    candle_core::safetensors::save(&inputs, dir.join("inputs.safetensors"))?;
    Ok(())
}

/// The executor's inputs for one step: sample in the frame-major (B*T, C, H, W) layout.
fn step_inputs(
    io: &HashMap<String, Tensor>,
    prev: bool,
    frames: std::ops::Range<usize>,
) -> Result<Vec<Tensor>> {
    let get = |name: &str| {
        let name = if prev {
            format!("{name}_prev")
        } else {
            name.to_string()
        };
        io.get(&name)
            .cloned()
            .with_context(|| format!("inputs.safetensors has no `{name}`"))
    };
    let sample = get("sample")?.narrow(1, frames.start, frames.len())?;
    let (b, t, c, h, w) = sample.dims5()?;
    Ok(vec![
        sample.reshape((b * t, c, h, w))?,
        get("timestep")?,
        io.get("encoder_hidden_states")
            .context("no `encoder_hidden_states`")?
            .clone(),
        io.get("added_time_ids")
            .context("no `added_time_ids`")?
            .clone(),
    ])
}

/// Run the step under `mode`: the first run is measured for memory, then `runs` timed runs.
/// Returns the measurement and the step's output (B, T, 4, H, W).
pub fn run(dir: &Path, how: &How) -> Result<(Measurement, Tensor)> {
    let dev = Device::Cpu;
    let unet = UNetSpatioTemporalConditionModel::load(&dir.join("unet"), DType::F32, &dev)?;
    let file = dir.join("inputs.safetensors");
    let io = candle_core::safetensors::load(&file, &dev)
        .with_context(|| format!("cannot read {}", file.display()))?;
    let (b, t, _, h, w) = io.get("sample").context("no `sample`")?.dims5()?;
    let optimization = how.optimization()?;
    // Naive slicing evaluates the UNet once per run of frames, each a video of its own.
    let chunks = match optimization {
        Optimization::Naive { temporal_chunks } => frame_chunks(t, temporal_chunks),
        _ => frame_chunks(t, 1),
    };
    let calls = chunks
        .iter()
        .map(|r| {
            let shape = UNetShape {
                batch: b,
                frames: r.len(),
                height: h,
                width: w,
                context_len: 1,
            };
            Ok(optimize(&unet.lower(shape)?, optimization)?)
        })
        .collect::<Result<Vec<_>>>()?;
    let execs = calls
        .iter()
        .map(|(g, p)| Ok(Executor::new(g, p, &dev)?))
        .collect::<Result<Vec<_>>>()?;
    let rehash = how.schedule()?;
    // A key step keeps the cached value to its end; a partial step starts from it.
    let cached = match &rehash {
        Some(schedule) => {
            let point: CachePoint = match &schedule.cache_point {
                Some(p) => p.parse()?,
                None => CachePoint::default(),
            };
            vec![point.value_name(&calls[0].0)?]
        }
        None => Vec::new(),
    };
    let mut planned = 0;
    for exec in &execs {
        planned = planned
            .max(exec.dry_run(&cached, &[])?.peak_bytes)
            .max(exec.dry_run(&[], &cached)?.peak_bytes);
    }

    // Step Rehash: a key step on the previous step's inputs fills the cache, the measured step
    // reuses it. The reported step time is the mean over a schedule of `keys` key steps.
    let step = |out: &mut Vec<Tensor>| -> Result<f64> {
        match &rehash {
            None => {
                let mut secs = 0.0;
                out.clear();
                for (range, exec) in chunks.iter().zip(&execs) {
                    let inputs = step_inputs(&io, false, range.clone())?;
                    let (mut o, s) = timed(|| Ok(exec.run(inputs, &Request::default())?))?;
                    secs += s;
                    out.push(o.outputs.remove(0).reshape((b, range.len(), (), h, w))?);
                }
                Ok(secs)
            }
            Some(schedule) => {
                let (graph, exec) = (&calls[0].0, &execs[0]);
                let mut state = StepRehash::new(
                    Rehash::Schedule(schedule.clone()),
                    graph,
                    schedule.num_inference_steps,
                )?;
                let partial = (0..schedule.num_inference_steps)
                    .find(|&i| !state.is_full(i))
                    .context("the rehash schedule has no partial step")?;
                let request = state.request(partial - 1)?;
                let (full, full_s) =
                    timed(|| Ok(exec.run(step_inputs(&io, true, 0..t)?, &request)?))?;
                state.absorb(full.kept)?;
                let request = state.request(partial)?;
                let (mut part, part_s) =
                    timed(|| Ok(exec.run(step_inputs(&io, false, 0..t)?, &request)?))?;
                *out = vec![part.outputs.remove(0).reshape((b, t, (), h, w))?];
                let keys = schedule.full_steps() as f64;
                let steps = schedule.num_inference_steps as f64;
                Ok((keys * full_s + (steps - keys) * part_s) / steps)
            }
        }
    };
    let mut out = Vec::new();
    let baseline = Baseline::take()?;
    step(&mut out)?;
    let (rss, live) = baseline.peaks()?;
    let output = Tensor::cat(&out, 1)?;
    let step_seconds = (0..how.runs)
        .map(|_| step(&mut out))
        .collect::<Result<_>>()?;
    // Step Rehash figures are per step of its schedule: the mean of key and partial steps.
    let (full_steps, partial_steps) = match &rehash {
        Some(s) => (s.full_steps(), s.num_inference_steps - s.full_steps()),
        None => (1, 0),
    };
    Ok((
        Measurement {
            step_seconds,
            full_steps,
            partial_steps,
            peak_rss_above_baseline_bytes: rss,
            live_peak_bytes: live,
            planned_peak_bytes: planned as u64,
            ..Measurement::default()
        },
        output,
    ))
}
