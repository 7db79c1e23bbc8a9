//! `streamline plan`: a run's plan and memory, phase by phase, and its denoising loop's
//! UNet FLOPs, from configs alone (no weights, no device).

use std::fmt;

use anyhow::Result;
use clap::Args;
use serde::Serialize;
use streamline_pipeline::planner::{
    flop_text, group_listing, plan_report, ModelSpec, PlanReport, PlanRequest, RehashMemory,
};
use streamline_rehash::{Rehash, RehashArg};

use crate::{checks, DeviceArg, Dtype, OptimizationArgs, VideoSize};

#[derive(Args, Debug)]
pub struct PlanArgs {
    /// `svd`, `svd-xt`, `animatediff` (SD 1.5 + motion adapter v1-5-2), an SVD UNet
    /// config.json, or a diffusers SVD folder.
    #[arg(long, default_value = "svd")]
    model: String,
    #[command(flatten)]
    video: VideoSize,
    /// Videos generated at once.
    #[arg(long, default_value_t = 1, value_parser = checks::positive)]
    batch: usize,
    /// Plan without classifier-free guidance (UNet batch not doubled).
    #[arg(long)]
    no_cfg: bool,
    #[arg(long, value_enum, default_value = "f16")]
    dtype: Dtype,
    /// The device to plan for (no such device is needed to plan): `cpu`, `cuda[:N]`,
    /// `metal[:N]`.
    #[arg(long, default_value = "cpu")]
    device: DeviceArg,
    /// Frames per VAE decoder call.
    #[arg(long, default_value_t = 14, value_parser = checks::positive)]
    decode_chunk_size: usize,
    /// Also list every group of both plans.
    #[arg(long)]
    groups: bool,
    /// Plan Step Rehash with this schedule (`uniform:K`, `auto:T` or a file, optionally
    /// `@up_blocks.N`): its cache is counted in the denoise phase, and the denoising loop's
    /// UNet FLOPs are printed beside original inference's.
    #[arg(long)]
    rehash: Option<RehashArg>,
    /// Denoising steps, for the loop's FLOPs.
    #[arg(long, default_value_t = 25, value_parser = checks::positive)]
    num_inference_steps: usize,
    /// With --rehash: partial steps run only the conditional half of classifier-free
    /// guidance (`svd --reuse-guidance`).
    #[arg(long, requires = "rehash", conflicts_with = "no_cfg")]
    reuse_guidance: bool,
    /// Print the report as JSON (bytes as integers), for scripts.
    #[arg(long, conflicts_with = "groups")]
    json: bool,
    #[command(flatten)]
    optimization: OptimizationArgs,
}

pub fn run(args: PlanArgs) -> Result<()> {
    let steps = args.num_inference_steps;
    let rehash = match &args.rehash {
        Some(flag) => flag.rehash(steps)?,
        None => Rehash::Off,
    };
    let model = ModelSpec::parse(&args.model);
    let (height, width) = model.default_size();
    let report = plan_report(PlanRequest {
        model,
        height: args.video.height.unwrap_or(height),
        width: args.video.width.unwrap_or(width),
        num_frames: args.video.num_frames,
        batch: args.batch,
        cfg: !args.no_cfg,
        dtype: args.dtype.into(),
        optimization: args.optimization.optimization()?,
        kernels: args.optimization.kernels.kernels(args.device.kind)?,
        decode_chunk_size: args.decode_chunk_size,
        rehash: RehashMemory::of(&rehash),
    })?;
    let denoise = DenoiseLoop::new(&report, &rehash, steps, args.reuse_guidance);
    if args.json {
        let mut json = report.json();
        json["denoise_loop"] = serde_json::to_value(&denoise)?;
        println!("{}", serde_json::to_string_pretty(&json)?);
        return Ok(());
    }
    print!("{report}");
    println!("{denoise}");
    if args.groups {
        println!("\nUNet step groups:\n{}", group_listing(&report.unet));
        println!("VAE decode groups:\n{}", group_listing(&report.decoder));
    }
    Ok(())
}

/// The denoising loop's UNet FLOPs, original and with the planned Step Rehash schedule.
#[derive(Serialize)]
struct DenoiseLoop {
    steps: usize,
    original_flops: u64,
    /// The schedule's full and partial evaluations and FLOPs (`None` without one, and for an
    /// auto schedule, whose key steps are chosen during the run).
    full_evaluations: Option<usize>,
    partial_evaluations: Option<usize>,
    flops: Option<u64>,
    reuse_guidance: bool,
    #[serde(skip)]
    auto: bool,
}

impl DenoiseLoop {
    fn new(report: &PlanReport, rehash: &Rehash, steps: usize, reuse_guidance: bool) -> Self {
        let full = match rehash {
            Rehash::Schedule(s) => Some(s.full_steps()),
            _ => None,
        };
        let flops = full
            .zip(report.rehash.as_ref())
            .map(|(full, rh)| rh.loop_flops(report.unet.flops, (steps, full), reuse_guidance));
        DenoiseLoop {
            steps,
            original_flops: steps as u64 * report.unet.flops,
            full_evaluations: full,
            partial_evaluations: full.map(|f| steps - f),
            flops,
            reuse_guidance,
            auto: matches!(rehash, Rehash::Auto(_)),
        }
    }
}

impl fmt::Display for DenoiseLoop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "denoise loop  {} steps: UNet {} in original inference",
            self.steps,
            flop_text(self.original_flops)
        )?;
        let reuse = match self.reuse_guidance {
            true => ", partial steps on the conditional half",
            false => "",
        };
        match (self.full_evaluations, self.partial_evaluations, self.flops) {
            (Some(full), Some(partial), Some(flops)) => write!(
                f,
                "; with Step Rehash {full} full + {partial} partial{reuse}: {} ({:.0}%)",
                flop_text(flops),
                100.0 * flops as f64 / self.original_flops as f64
            ),
            _ if self.auto => write!(f, "; an auto schedule chooses its key steps during the run"),
            _ => Ok(()),
        }
    }
}
