//! The SVD pipeline end to end (image encoder, VAE encode, denoising loop, decode) under one
//! optimization, on a diffusers model folder.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::Result;
use candle_core::{DType, Tensor};
use clap::Args;
use streamline_pipeline::svd::{unit_noise, Planes, StableVideoDiffusion, SvdSettings};
use streamline_pipeline::video::load_image;
use streamline_pipeline::Optimization;
use streamline_rehash::Rehash;

use crate::device::DevicePeak;
use crate::measure::{Baseline, Measurement};
use crate::How;

#[derive(Args, Clone, Debug)]
pub struct SvdArgs {
    /// A diffusers SVD folder; the run uses its native size and frame count.
    #[arg(long)]
    model: PathBuf,
    #[arg(long)]
    image: PathBuf,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Also write the run's `latents` and `image_noise` here (the diffusers peer reads them).
    #[arg(long)]
    save_inputs: Option<PathBuf>,
}

pub fn run(args: &SvdArgs, how: &How) -> Result<(Measurement, Tensor)> {
    let dev = how.device()?;
    let kernels = how.kernels()?;
    let mut pipe = StableVideoDiffusion::load(&args.model, DType::F32, &dev)?;
    pipe.set_kernels(kernels)?;
    let (height, width) = pipe.native_size().ok_or_else(|| {
        anyhow::anyhow!(
            "{}: the UNet config has no sample_size to take the size from",
            args.model.display()
        )
    })?;
    let optimization = how.optimization()?;
    let settings = SvdSettings {
        height,
        width,
        num_inference_steps: how.num_inference_steps,
        rehash: how.schedule()?.map_or(Rehash::Off, Rehash::Schedule),
        ..SvdSettings::default()
    };
    let frames = pipe.num_frames(&settings);
    let s = pipe.scale_factor();
    let latent_channels = pipe.latent_channels();
    let latents = unit_noise(
        (1, frames, latent_channels, height / s, width / s),
        args.seed,
        &dev,
    )?;
    let image_noise = unit_noise((1, 3, height, width), args.seed.wrapping_add(1), &dev)?;
    if let Some(path) = &args.save_inputs {
        let tensors = HashMap::from([
            ("latents".to_string(), latents.clone()),
            ("image_noise".to_string(), image_noise.clone()),
        ]);
        candle_core::safetensors::save(&tensors, path)?;
    }
    let image = Planes::from_tensor(&load_image(&args.image, Some((height, width)))?)?;
    let plan = pipe.plan(&settings, optimization)?;
    let generate = |settings: &SvdSettings, optimization| {
        pipe.generate(
            &image,
            settings,
            &latents,
            &image_noise,
            optimization,
            &mut |_| {},
        )
    };

    let baseline = Baseline::take()?;
    let device_peak = DevicePeak::start(&dev)?;
    let (output, report) = generate(&settings, optimization)?;
    let device_peak_bytes = device_peak.map(DevicePeak::finish).transpose()?;
    let (rss, live) = baseline.peaks()?;
    // `--paired`: original inference (no Step Rehash) after each timed run.
    let original = SvdSettings {
        rehash: Rehash::Off,
        ..settings.clone()
    };
    let (mut denoise_seconds, mut original_denoise) = (Vec::new(), Vec::new());
    for _ in 0..how.runs {
        denoise_seconds.push(generate(&settings, optimization)?.1.denoise_seconds);
        if how.paired {
            original_denoise.push(
                generate(&original, Optimization::Original)?
                    .1
                    .denoise_seconds,
            );
        }
    }
    let steps = how.num_inference_steps as f64;
    Ok((
        Measurement {
            step_seconds: denoise_seconds.iter().map(|s| s / steps).collect(),
            original_step_seconds: original_denoise.iter().map(|s| s / steps).collect(),
            denoise_seconds,
            peak_rss_above_baseline_bytes: rss,
            live_peak_bytes: live,
            planned_peak_bytes: plan.unet.activations.max(plan.decoder.activations) as u64,
            device_peak_bytes,
            full_steps: report.full_steps,
            partial_steps: report.partial_steps,
            phases: report.phases,
        },
        output,
    ))
}
