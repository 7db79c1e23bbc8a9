//! `streamline svd`: image-to-video with Stable Video Diffusion / SVD-XT.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use clap::Args;
use streamline_pipeline::video::VideoOutput;
use streamline_pipeline::Optimization;
use streamline_rehash::RehashArg;

use crate::checks::refuse_overwriting;
use crate::session::{summary, SvdCommon};
use crate::SingleVideoArgs;

#[derive(Args, Debug)]
pub struct SvdArgs {
    #[command(flatten)]
    common: SvdCommon,
    /// The conditioning image (PNG, JPEG, ...); resized to --height x --width.
    #[arg(long)]
    image: PathBuf,
    /// Unit-noise latents (safetensors, tensor `latents`, shape (1, F, C, H/s, W/s) with the
    /// VAE's latent channels C and scale s: 4 and 8 for SVD, 4 and 4 for the built-in model),
    /// used like diffusers' `latents` argument instead of noise from --seed.
    #[arg(long)]
    latents: Option<PathBuf>,
    #[command(flatten)]
    single: SingleVideoArgs,
    /// Step Rehash: `off`, `uniform:K` (K full UNet evaluations spread evenly, the first step
    /// included), `auto:THRESHOLD` (key steps chosen during the run: the next step runs the
    /// whole UNet once its output has changed by THRESHOLD, relative L1 summed, since the
    /// last one; e.g. auto:0.3) or a schedule from `streamline rehash search`.
    #[arg(long, default_value = "off")]
    rehash: RehashArg,
}

pub fn run(args: SvdArgs) -> Result<()> {
    let start = Instant::now();
    let checked = args.common.check()?;
    let mut optimization = checked.optimization;
    if args.single.naive_slicing {
        let temporal_chunks = args.common.optimization.temporal_chunks.unwrap_or(1);
        optimization = Optimization::Naive { temporal_chunks };
    }
    let rehash = args.rehash.rehash(args.common.num_inference_steps)?;
    let output = VideoOutput::create(&args.single.output, args.common.fps as f64)?;
    output.check_size(checked.settings.height, checked.settings.width)?;
    let inputs = [
        Some(("--image", args.image.as_path())),
        args.latents.as_deref().map(|l| ("--latents", l)),
    ];
    refuse_overwriting(
        ("--output", output.path()),
        |p| output.overwrites(p),
        inputs.into_iter().flatten(),
    )?;
    let inputs = checked.inputs(
        &checked.settings,
        &args.image,
        args.common.seed,
        args.latents.as_deref(),
    )?;
    let session = checked.load()?;
    let (video, report) = session.generate(&inputs, optimization, rehash, "")?;
    output.write(&video)?;
    let settings = &session.settings;
    eprintln!(
        "{}",
        summary(
            &args.single.output,
            (session.frames(), settings.height, settings.width),
            start.elapsed().as_secs_f64(),
            &report
        )
    );
    Ok(())
}
