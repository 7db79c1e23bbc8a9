//! One UNet step of a small model (SVD's or AnimateDiff's UNet at a fifth of the width): the
//! weights and inputs both implementations read, and our measured run under one mode.

use std::collections::HashMap;
use std::fs;
use std::path::Path;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use serde::Serialize;
use streamline_ir::{Executor, Graph, Request};
use streamline_models::load::{PerBlock, Usage, WeightSource};
use streamline_models::sd::{MotionAdapterConfig, MotionUNetConfig, UNet2DConfig, UNetMotionModel};
use streamline_models::svd::{UNetConfig, UNetShape, UNetSpatioTemporalConditionModel};
use streamline_pipeline::svd::unit_noise;
use streamline_pipeline::{optimize_for, Kernels, Optimization};
use streamline_rehash::{Rehash, Schedule, StepRehash};

use crate::device::DevicePeak;
use crate::measure::{timed, Baseline, Measurement};
use crate::How;

/// Random weights from `seed` for every tensor a model requested through `usage`.
fn materialize(usage: &Usage, seed: u64) -> Result<HashMap<String, Tensor>> {
    let vb = WeightSource::random(seed).var_builder(DType::F32, &Device::Cpu);
    usage
        .requested()
        .into_iter()
        .map(|(name, shape)| Ok((name.clone(), vb.get(shape, &name)?)))
        .collect()
}

/// A diffusers model folder: `config.json` (with `_class_name`) and the weights.
fn save_folder(
    dir: &Path,
    class_name: &str,
    config: &impl Serialize,
    weights: &HashMap<String, Tensor>,
) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    candle_core::safetensors::save(weights, dir.join("diffusion_pytorch_model.safetensors"))?;
    let mut json = serde_json::to_value(config)?;
    json["_class_name"] = class_name.into();
    fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&json)?,
    )?;
    Ok(())
}

/// The UNet a benchmark model folder holds.
pub enum Config {
    Svd(Box<UNetConfig>),
    /// AnimateDiff: SD's UNet and a motion adapter (`unet/` and `motion_adapter/`).
    Motion(Box<(UNet2DConfig, MotionAdapterConfig)>),
}

/// "animatediff-small": SD 1.5's UNet and motion adapter v1-5-2 at a fifth of the width
/// (channels 64/128/256/256, 8 spatial and motion heads, cross-attention 256), as svd-small
/// is to SVD.
pub fn animatediff_small() -> (UNet2DConfig, MotionAdapterConfig) {
    let channels = vec![64, 128, 256, 256];
    let unet = UNet2DConfig {
        block_out_channels: channels.clone(),
        cross_attention_dim: PerBlock::One(256),
        ..UNet2DConfig::sd15()
    };
    let adapter = MotionAdapterConfig {
        block_out_channels: channels,
        ..MotionAdapterConfig::v1_5_2()
    };
    (unet, adapter)
}

/// Write the model folder(s) under `dir` (random weights from `seed`, diffusers' names and
/// layout) and `dir/inputs.safetensors`: `sample` (B, T, C, H, W), `timestep` (B,),
/// `encoder_hidden_states` (B, L, D), SVD's `added_time_ids` (B, 3), and `sample_prev`,
/// `timestep_prev` for the step before (Step Rehash caches there).
pub fn prepare(dir: &Path, config: &Config, shape: UNetShape, seed: u64) -> Result<()> {
    let dev = Device::Cpu;
    let random = |seed| {
        let source = WeightSource::random(seed);
        (source.usage(), source.var_builder(DType::F32, &dev))
    };
    let (in_channels, context_dim, timesteps) = match config {
        Config::Svd(c) => {
            let (usage, vb) = random(seed);
            UNetSpatioTemporalConditionModel::new(c, vb)?;
            let w = materialize(&usage, seed)?;
            save_folder(&dir.join("unet"), "UNetSpatioTemporalConditionModel", c, &w)?;
            let d = match &c.cross_attention_dim {
                PerBlock::One(d) => *d,
                PerBlock::Each(v) => v[0],
            };
            // SVD's noise levels of two adjacent mid-schedule steps, as the UNet sees them
            // (`c_noise = ln(sigma) / 4`).
            (c.in_channels, d, [10f64.ln() / 4.0, 8.5f64.ln() / 4.0])
        }
        Config::Motion(configs) => {
            let (unet, adapter) = configs.as_ref();
            let unet_path = dir.join("unet/config.json");
            let adapter_path = dir.join("motion_adapter/config.json");
            let full =
                MotionUNetConfig::new(unet.clone(), &unet_path, adapter.clone(), &adapter_path)?;
            let ((u_usage, u_vb), (a_usage, a_vb)) = (random(seed), random(seed + 100));
            UNetMotionModel::new(&full, u_vb, a_vb)?;
            let (u_w, a_w) = (
                materialize(&u_usage, seed)?,
                materialize(&a_usage, seed + 100)?,
            );
            save_folder(&dir.join("unet"), "UNet2DConditionModel", unet, &u_w)?;
            save_folder(&dir.join("motion_adapter"), "MotionAdapter", adapter, &a_w)?;
            let d = match &unet.cross_attention_dim {
                PerBlock::One(d) => *d,
                PerBlock::Each(v) => v[0],
            };
            // Two adjacent DDIM timesteps of a 25-step AnimateDiff schedule.
            (unet.in_channels, d, [521.0, 481.0])
        }
    };
    let UNetShape {
        batch: b,
        frames: t,
        height: h,
        width: w,
        context_len,
    } = shape;
    let prev = unit_noise((b, t, in_channels, h, w), seed + 1, &dev)?;
    // One step later the input has moved a little: keep unit variance.
    let sample = ((&prev * 0.99)? + (unit_noise(prev.shape(), seed + 2, &dev)? * 0.14)?)?;
    let step = |v: f64| Tensor::full(v as f32, b, &dev);
    let mut inputs: HashMap<String, Tensor> = [
        ("sample", sample),
        ("sample_prev", prev),
        ("timestep", step(timesteps[1])?),
        ("timestep_prev", step(timesteps[0])?),
        (
            "encoder_hidden_states",
            unit_noise((b, context_len, context_dim), seed + 3, &dev)?,
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    if let Config::Svd(_) = config {
        let ids = Tensor::new(&[6f32, 127., 0.02], &dev)?
            .unsqueeze(0)?
            .repeat((b, 1))?;
        inputs.insert("added_time_ids".into(), ids);
    }
    candle_core::safetensors::save(&inputs, dir.join("inputs.safetensors"))?;
    Ok(())
}

/// A prepared model, loaded back from its folder(s).
enum Model {
    Svd(Box<UNetSpatioTemporalConditionModel>),
    Motion(Box<UNetMotionModel>),
}

impl Model {
    fn load(dir: &Path, dev: &Device) -> Result<Self> {
        let adapter = dir.join("motion_adapter");
        Ok(if adapter.is_dir() {
            Model::Motion(Box::new(UNetMotionModel::load(
                &dir.join("unet"),
                &adapter,
                DType::F32,
                dev,
            )?))
        } else {
            Model::Svd(Box::new(UNetSpatioTemporalConditionModel::load(
                &dir.join("unet"),
                DType::F32,
                dev,
            )?))
        })
    }

    fn lower(&self, shape: UNetShape) -> Result<Graph> {
        Ok(match self {
            Model::Svd(m) => m.lower(shape)?,
            Model::Motion(m) => m.lower(shape)?,
        })
    }
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
    let mut inputs = vec![
        sample.reshape((b * t, c, h, w))?,
        get("timestep")?,
        io.get("encoder_hidden_states")
            .context("no `encoder_hidden_states`")?
            .clone(),
    ];
    // SVD's UNet also takes the added time ids; AnimateDiff's does not.
    inputs.extend(io.get("added_time_ids").cloned());
    Ok(inputs)
}

/// The UNet calls of one step under `optimization`, each lowered and planned: one call per
/// run of frames (naive slicing evaluates each run as a video of its own).
struct Calls {
    chunks: Vec<std::ops::Range<usize>>,
    planned: Vec<(Graph, streamline_ir::Plan)>,
    /// (B, H, W) of the output.
    bhw: (usize, usize, usize),
}

impl Calls {
    fn new(
        unet: &Model,
        io: &HashMap<String, Tensor>,
        optimization: Optimization,
        kernels: Kernels,
    ) -> Result<Self> {
        let (b, t, _, h, w) = io.get("sample").context("no `sample`")?.dims5()?;
        let context_len = io
            .get("encoder_hidden_states")
            .context("no `encoder_hidden_states`")?
            .dim(1)?;
        let chunks = optimization.frame_runs(t);
        let planned = chunks
            .iter()
            .map(|r| {
                let shape = UNetShape {
                    batch: b,
                    frames: r.len(),
                    height: h,
                    width: w,
                    context_len,
                };
                Ok(optimize_for(&unet.lower(shape)?, optimization, kernels)?)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Calls {
            chunks,
            planned,
            bhw: (b, h, w),
        })
    }
}

/// One UNet step's executors (and Step Rehash schedule), ready to run again and again on the
/// prepared inputs.
struct Stepper<'a> {
    calls: &'a Calls,
    execs: Vec<Executor<'a>>,
    rehash: Option<Schedule>,
    dev: Device,
}

impl<'a> Stepper<'a> {
    fn new(calls: &'a Calls, rehash: Option<Schedule>, dev: &Device) -> Result<Self> {
        let execs = calls
            .planned
            .iter()
            .map(|(g, p)| Ok(Executor::new(g, p, dev)?))
            .collect::<Result<Vec<_>>>()?;
        Ok(Stepper {
            calls,
            execs,
            rehash,
            dev: dev.clone(),
        })
    }

    /// The plan's peak, over a key step that keeps the rehash cache and a partial one.
    fn planned(&self) -> Result<usize> {
        // A key step keeps the cached value to its end; a partial step starts from it.
        let cached = match &self.rehash {
            Some(schedule) => vec![schedule
                .cache_point()
                .value_name(&self.calls.planned[0].0)?],
            None => Vec::new(),
        };
        let mut planned = 0;
        for exec in &self.execs {
            planned = planned
                .max(exec.dry_run(&cached, &[])?.peak_bytes)
                .max(exec.dry_run(&[], &cached)?.peak_bytes);
        }
        Ok(planned)
    }

    /// Seconds of one step, its output in `out` (one tensor per call).
    fn step(&self, io: &HashMap<String, Tensor>, out: &mut Vec<Tensor>) -> Result<f64> {
        match &self.rehash {
            None => self.whole(io, out),
            Some(schedule) => self.rehashed(schedule, io, out),
        }
    }

    fn whole(&self, io: &HashMap<String, Tensor>, out: &mut Vec<Tensor>) -> Result<f64> {
        let (b, h, w) = self.calls.bhw;
        let mut secs = 0.0;
        out.clear();
        for (range, exec) in self.calls.chunks.iter().zip(&self.execs) {
            let inputs = step_inputs(io, false, range.clone())?;
            let (mut o, s) = timed(|| {
                let o = exec.run(inputs, &Request::default())?;
                self.dev.synchronize()?;
                Ok(o)
            })?;
            secs += s;
            out.push(o.outputs.remove(0).reshape((b, range.len(), (), h, w))?);
        }
        Ok(secs)
    }

    /// Step Rehash: a key step on the previous step's inputs fills the cache, the measured step
    /// reuses it. The step time is the mean over a schedule of `keys` key steps.
    fn rehashed(
        &self,
        schedule: &Schedule,
        io: &HashMap<String, Tensor>,
        out: &mut Vec<Tensor>,
    ) -> Result<f64> {
        let (b, h, w) = self.calls.bhw;
        let t = self.calls.chunks.iter().map(|r| r.len()).sum();
        let (graph, exec) = (&self.calls.planned[0].0, &self.execs[0]);
        let mut state = StepRehash::new(
            Rehash::Schedule(schedule.clone()),
            graph,
            schedule.num_inference_steps,
        )?;
        let partial = (0..schedule.num_inference_steps)
            .find(|&i| !state.is_full(i))
            .context("the rehash schedule has no partial step")?;
        let request = state.request(partial - 1)?;
        let (full, full_s) = timed(|| Ok(exec.run(step_inputs(io, true, 0..t)?, &request)?))?;
        state.absorb(full.kept)?;
        let request = state.request(partial)?;
        let (mut part, part_s) = timed(|| Ok(exec.run(step_inputs(io, false, 0..t)?, &request)?))?;
        *out = vec![part.outputs.remove(0).reshape((b, t, (), h, w))?];
        let keys = schedule.full_steps() as f64;
        let steps = schedule.num_inference_steps as f64;
        Ok((keys * full_s + (steps - keys) * part_s) / steps)
    }
}

/// Run the step under `mode`: the first run is measured for memory, then `runs` timed runs,
/// each followed by a run of the original plan when `how.paired`.
/// Returns the measurement and the step's output (B, T, 4, H, W).
pub fn run(dir: &Path, how: &How) -> Result<(Measurement, Tensor)> {
    let dev = how.device()?;
    let kernels = how.kernels()?;
    let unet = Model::load(dir, &dev)?;
    let file = dir.join("inputs.safetensors");
    let io = candle_core::safetensors::load(&file, &dev)
        .with_context(|| format!("cannot read {}", file.display()))?;
    let rehash = how.schedule()?;
    let calls = Calls::new(&unet, &io, how.optimization()?, kernels)?;
    let stepper = Stepper::new(&calls, rehash.clone(), &dev)?;
    let planned = stepper.planned()?;
    let mut out = Vec::new();
    let baseline = Baseline::take()?;
    let device_peak = DevicePeak::start(&dev)?;
    stepper.step(&io, &mut out)?;
    let device_peak_bytes = device_peak.map(DevicePeak::finish).transpose()?;
    let (rss, live) = baseline.peaks()?;
    let output = Tensor::cat(&out, 1)?;
    let original_calls = how
        .paired
        .then(|| Calls::new(&unet, &io, Optimization::Original, kernels))
        .transpose()?;
    let original = original_calls
        .as_ref()
        .map(|calls| Stepper::new(calls, None, &dev))
        .transpose()?;
    let (mut step_seconds, mut original_step_seconds) = (Vec::new(), Vec::new());
    for _ in 0..how.runs {
        step_seconds.push(stepper.step(&io, &mut out)?);
        if let Some(original) = &original {
            original_step_seconds.push(original.step(&io, &mut out)?);
        }
    }
    // Step Rehash figures are per step of its schedule: the mean of key and partial steps.
    let (full_steps, partial_steps) = match &rehash {
        Some(s) => (s.full_steps(), s.num_inference_steps - s.full_steps()),
        None => (1, 0),
    };
    Ok((
        Measurement {
            step_seconds,
            original_step_seconds,
            full_steps,
            partial_steps,
            peak_rss_above_baseline_bytes: rss,
            live_peak_bytes: live,
            planned_peak_bytes: planned as u64,
            device_peak_bytes,
            ..Measurement::default()
        },
        output,
    ))
}
