//! `streamline rehash search | evaluate`: Step Rehash schedules from calibration, and what
//! they cost in quality and gain in time against original inference.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Subcommand, ValueEnum};
use streamline_pipeline::quality::{psnr, ssim};
use streamline_pipeline::svd::{example_images, RunReport, SvdSettings};
use streamline_pipeline::video::FileOutput;
use streamline_rehash::{
    greedy, mean, optimal, similarity, CachePoint, Method, Metric, Rehash, RehashArg, Schedule,
};

use crate::checks::{positive, refuse_overwriting, Source};
use crate::session::{Checked, Inputs, SvdCommon};

#[derive(Subcommand, Debug)]
pub enum RehashCommand {
    /// Calibrate (original inference on each --image, recording the cached features at every
    /// step) and search the key steps; writes a schedule for `--rehash`.
    Search(SearchArgs),
    /// Run original inference and each --rehash schedule on each --image and report speedup,
    /// PSNR and SSIM against original inference (a Markdown table on stdout, or JSON).
    Evaluate(EvaluateArgs),
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum SearchMethod {
    /// The optimal dynamic program.
    Dp,
    /// The paper's greedy threshold walk (Algorithm 1).
    Greedy,
}

#[derive(Args, Debug)]
pub struct SearchArgs {
    #[command(flatten)]
    common: SvdCommon,
    /// Calibration image; repeat for several (their similarity matrices are averaged).
    /// Defaults to the built-in example images (examples/red.png, blue.png, green.png).
    #[arg(long = "image")]
    images: Vec<PathBuf>,
    /// Full UNet evaluations in the schedule (the first step is always one).
    #[arg(long, value_parser = positive)]
    key_steps: usize,
    #[arg(long, value_enum, default_value = "dp")]
    method: SearchMethod,
    /// Step-to-step similarity: `cosine` or `rel-l2` (one minus the relative L2 error).
    #[arg(long, default_value = "cosine")]
    metric: Metric,
    /// Where features are cached: `up_blocks.N`, the output of up block N (default: the last
    /// up-block boundary, which feeds the last up block).
    #[arg(long)]
    cache_point: Option<CachePoint>,
    /// The schedule file to write (TOML).
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args, Debug)]
pub struct EvaluateArgs {
    #[command(flatten)]
    common: SvdCommon,
    /// Evaluation image; repeat for several (figures are averaged).
    #[arg(long = "image", required = true)]
    images: Vec<PathBuf>,
    /// A schedule to evaluate: `uniform:K`, `auto:THRESHOLD` or a file, optionally with
    /// `@up_blocks.N`; repeat for several.
    #[arg(long = "rehash", required = true)]
    schedules: Vec<RehashArg>,
    /// Evaluate every schedule at this cache point (`up_blocks.N`) instead of its own; repeat
    /// to compare several.
    #[arg(long = "cache-point")]
    cache_points: Vec<CachePoint>,
    /// Run each schedule this many times per image and report the median denoising time.
    #[arg(long, default_value_t = 1, value_parser = positive)]
    repeat: usize,
    /// The choice: the fastest schedule (measured) whose PSNR is at least this.
    #[arg(long, default_value_t = 35.0)]
    min_psnr: f64,
    /// Print the figures as JSON (one object per schedule, original inference first).
    #[arg(long)]
    json: bool,
}

pub fn run(command: RehashCommand) -> Result<()> {
    match command {
        RehashCommand::Search(args) => search(args),
        RehashCommand::Evaluate(args) => evaluate(args),
    }
}

/// Each image's inputs, read (and so checked) before any weights load.
fn read_inputs(checked: &Checked, images: &[PathBuf], seed: u64) -> Result<Vec<Inputs>> {
    images
        .iter()
        .map(|image| checked.inputs(&checked.settings, image, seed, None))
        .collect()
}

fn search(args: SearchArgs) -> Result<()> {
    let checked = args.common.check()?;
    let steps = args.common.num_inference_steps;
    anyhow::ensure!(
        (1..=steps).contains(&args.key_steps),
        "--key-steps {}: need 1..={steps} (full UNet evaluations out of --num-inference-steps)",
        args.key_steps
    );
    let metric = args.metric;
    let point = args.cache_point.unwrap_or_default();
    let images = if args.images.is_empty() {
        example_images()
    } else {
        args.images.clone()
    };
    let out = FileOutput::create(&args.out)?;
    let inputs = images.iter().map(|i| ("--image", i.as_path()));
    refuse_overwriting(("--out", out.path()), |p| out.overwrites(p), inputs)?;
    let all_inputs = read_inputs(&checked, &images, args.common.seed)?;
    let session = checked.load()?;
    let mut runs = Vec::new();
    for (n, inputs) in all_inputs.iter().enumerate() {
        let label = format!("calib {}/{} ", n + 1, images.len());
        let (_, report) =
            session.generate(inputs, session.optimization, Rehash::Record(point), &label)?;
        runs.push(similarity(&report.recorded, metric)?);
    }
    let sim = mean(&runs)?;
    let (method, keys) = match args.method {
        SearchMethod::Dp => (Method::Dp, optimal(&sim, args.key_steps)?),
        SearchMethod::Greedy => (Method::Greedy, greedy(&sim, args.key_steps)?),
    };
    let schedule = Schedule {
        num_inference_steps: steps,
        score: Some(sim.score(&keys)),
        key_steps: keys,
        method,
        cache_point: args.cache_point,
        metric: Some(metric),
    };
    schedule.validate(None)?;
    out.write(schedule.to_toml().as_bytes())?;
    let adjacent: Vec<String> = (1..steps)
        .map(|j| format!("{:.4}", sim.get(j - 1, j)))
        .collect();
    eprintln!(
        "{metric} similarity of adjacent steps: {}\nwrote {}: key steps {:?} ({} of {steps} steps run the whole UNet), score {:.4}",
        adjacent.join(" "),
        args.out.display(),
        schedule.key_steps,
        schedule.full_steps(),
        schedule.score.unwrap_or_default()
    );
    Ok(())
}

/// Sums over the evaluation images for one schedule.
#[derive(Default)]
struct Tally {
    /// Median denoising seconds of each image's runs, summed.
    seconds: f64,
    flops: u64,
    full: usize,
    partial: usize,
    psnr: f64,
    ssim: f64,
    /// The key steps each image's run took (an auto schedule's may differ between images).
    key_steps: Vec<Vec<usize>>,
}

/// The schedules `evaluate` runs, each with its flag as named in the report.
fn evaluated(args: &EvaluateArgs) -> Result<Vec<(String, Rehash)>> {
    let steps = args.common.num_inference_steps;
    let flags: Vec<RehashArg> = match args.cache_points.as_slice() {
        [] => args.schedules.clone(),
        points => args
            .schedules
            .iter()
            .flat_map(|s| {
                points.iter().map(|&p| RehashArg {
                    cache_point: Some(p),
                    ..s.clone()
                })
            })
            .collect(),
    };
    flags
        .iter()
        .map(|s| match s.rehash(steps)? {
            Rehash::Off => anyhow::bail!("--rehash off: original inference is the reference"),
            rehash => Ok((s.to_string(), rehash)),
        })
        .collect()
}

fn evaluate(args: EvaluateArgs) -> Result<()> {
    let checked = args.common.check()?;
    let schedules = evaluated(&args)?;
    for (_, rehash) in &schedules {
        let settings = SvdSettings {
            rehash: rehash.clone(),
            ..checked.settings.clone()
        };
        checked.check_settings(settings, Source::Flags)?;
    }
    let all_inputs = read_inputs(&checked, &args.images, args.common.seed)?;
    let session = checked.load()?;
    let mut reference = Tally::default();
    let mut tallies: Vec<Tally> = schedules.iter().map(|_| Tally::default()).collect();
    let runs = |rehash: &Rehash, inputs: &Inputs, label: &str| {
        let mut seconds = Vec::with_capacity(args.repeat);
        let mut last = None;
        for _ in 0..args.repeat {
            let (frames, report) =
                session.generate(inputs, session.optimization, rehash.clone(), label)?;
            seconds.push(report.denoise_seconds);
            last = Some((frames, report));
        }
        let (frames, mut report) = last.expect("--repeat is at least 1");
        report.denoise_seconds = median(seconds);
        anyhow::Ok((frames, report))
    };
    for (n, inputs) in all_inputs.iter().enumerate() {
        let label = format!("{}/{} ", n + 1, args.images.len());
        let (original, report) = runs(&Rehash::Off, inputs, &label)?;
        reference.add(&report);
        for ((_, rehash), tally) in schedules.iter().zip(&mut tallies) {
            let (frames, report) = runs(rehash, inputs, &label)?;
            tally.add(&report);
            tally.psnr += psnr(&frames, &original)?;
            tally.ssim += ssim(&frames, &original)?;
        }
    }
    let n = args.images.len() as f64;
    let mut rows: Vec<serde_json::Value> =
        std::iter::once(reference.json("original", n, &reference))
            .chain(
                schedules
                    .iter()
                    .zip(&tallies)
                    .map(|((name, _), t)| t.json(name, n, &reference)),
            )
            .collect();
    let chosen = choose(&mut rows, args.min_psnr);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    print_table(&rows);
    match chosen {
        Some(row) => println!(
            "\nchosen: {} (the fastest measured at PSNR >= {} dB)",
            row, args.min_psnr
        ),
        None => println!("\nchosen: none reaches PSNR {} dB", args.min_psnr),
    }
    Ok(())
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    match values.len() % 2 {
        0 => (values[mid - 1] + values[mid]) / 2.0,
        _ => values[mid],
    }
}

/// Mark the fastest row with PSNR >= `min_psnr` as `"chosen": true` (every other row
/// `false`) and return its schedule.
fn choose(rows: &mut [serde_json::Value], min_psnr: f64) -> Option<String> {
    let best = rows
        .iter()
        .enumerate()
        .filter(|(_, r)| r["psnr_db"].as_f64().is_some_and(|p| p >= min_psnr))
        .max_by(|(_, a), (_, b)| {
            let speed = |r: &serde_json::Value| r["speedup"].as_f64().unwrap_or_default();
            speed(a).total_cmp(&speed(b))
        })
        .map(|(i, _)| i);
    for (i, row) in rows.iter_mut().enumerate() {
        row["chosen"] = serde_json::json!(Some(i) == best);
    }
    best.map(|i| rows[i]["schedule"].as_str().unwrap_or_default().to_string())
}

fn print_table(rows: &[serde_json::Value]) {
    println!(
        "| schedule | key steps | full + partial UNet evaluations | UNet GFLOP | denoising s | speedup | PSNR dB | SSIM |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for row in rows {
        let quality = match (row["psnr_db"].as_f64(), row["ssim"].as_f64()) {
            (Some(p), Some(s)) => format!("{p:.2} | {s:.4}"),
            _ => "reference | 1".into(),
        };
        println!(
            "| {} | {} | {} + {} | {:.2} | {:.2} | {:.2}x | {quality} |",
            row["schedule"].as_str().unwrap_or_default(),
            row["key_steps"],
            row["full_evaluations"].as_f64().unwrap_or_default(),
            row["partial_evaluations"].as_f64().unwrap_or_default(),
            row["unet_gflop"].as_f64().unwrap_or_default(),
            row["denoising_seconds"].as_f64().unwrap_or_default(),
            row["speedup"].as_f64().unwrap_or_default(),
        );
    }
}

impl Tally {
    fn add(&mut self, report: &RunReport) {
        self.seconds += report.denoise_seconds;
        self.flops += report.unet_flops;
        self.full += report.full_steps;
        self.partial += report.partial_steps;
        self.key_steps.push(report.key_steps.clone());
    }

    /// One schedule's figures, per image over `n` images, with speedup against original
    /// inference's `reference` (quality is null for the reference itself).
    fn json(&self, name: &str, n: f64, reference: &Tally) -> serde_json::Value {
        let quality = !std::ptr::eq(self, reference);
        let keys = match self.key_steps.split_first() {
            Some((first, rest)) if rest.iter().all(|k| k == first) => serde_json::json!(first),
            _ => serde_json::json!(self.key_steps),
        };
        serde_json::json!({
            "schedule": name,
            "key_steps": keys,
            "full_evaluations": self.full as f64 / n,
            "partial_evaluations": self.partial as f64 / n,
            "unet_gflop": self.flops as f64 / 1e9 / n,
            "denoising_seconds": self.seconds / n,
            "speedup": reference.seconds / self.seconds,
            "psnr_db": quality.then(|| self.psnr / n),
            "ssim": quality.then(|| self.ssim / n),
        })
    }
}
