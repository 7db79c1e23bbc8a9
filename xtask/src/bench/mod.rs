//! `cargo xtask bench`: every scenario x mode of bench/scenarios.toml in its own process
//! (streamline-bench), beside the diffusers peers on the same weights and inputs, then
//! target/bench/latest.json, the report's tables and its chart.

mod chart;
mod kernels;
mod planning;
mod report;
mod scenario;

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};

use report::{Error, Measurement, Record};
use scenario::{Paths, Scenario, Scenarios, PEER_MODES};

/// The release build of streamline-bench.
fn build(root: &Path) -> Result<PathBuf> {
    eprintln!("xtask: building streamline-bench (release)");
    crate::run(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args(["build", "--release", "--quiet", "-p", "streamline-bench"])
            .current_dir(root),
    )?;
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    Ok(root.join(target).join("release/streamline-bench"))
}

/// The fixtures venv's python, if it is installed with the pinned packages.
fn peers_python(root: &Path) -> Option<PathBuf> {
    let dir = root.join("target/fixtures-venv");
    let python = dir.join("bin/python");
    let wanted = fs::read_to_string(root.join("fixtures/requirements.txt")).ok()?;
    let installed = fs::read_to_string(dir.join("installed-requirements.txt")).ok()?;
    (python.exists() && installed == wanted).then_some(python)
}

/// Run `cmd` with its output in `log`; on failure, show the log's end.
fn run_logged(cmd: &mut Command, log: &Path) -> Result<()> {
    let file = File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
    let status = cmd
        .stdout(Stdio::from(file.try_clone()?))
        .stderr(Stdio::from(file))
        .status()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !status.success() {
        let text = fs::read_to_string(log).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(15).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        bail!(
            "{cmd:?} failed with {status}; end of {}:\n{}",
            log.display(),
            tail.join("\n")
        );
    }
    Ok(())
}

/// One measurement to take.
struct Job {
    implementation: &'static str,
    mode: String,
    cmd: Command,
}

/// The measurements of one scenario, in order: our original first (the reference of every
/// error), then the peers (the reference of every ratio), then our other modes.
fn jobs(
    bin: &Path,
    python: Option<&Path>,
    root: &Path,
    sc: &Scenario,
    paths: &Paths,
    quick: bool,
    runs: usize,
) -> Vec<Job> {
    let modes = sc.modes(quick);
    let ours = |mode: &String| Job {
        implementation: "streamline",
        mode: mode.clone(),
        cmd: scenario::ours(bin, root, sc, paths, mode, runs),
    };
    let mut jobs: Vec<Job> = modes.iter().take(1).map(ours).collect();
    if let Some(python) = python {
        let peer_modes = if quick {
            &PEER_MODES[..1]
        } else {
            &PEER_MODES[..]
        };
        jobs.extend(peer_modes.iter().map(|mode| Job {
            implementation: "diffusers",
            mode: mode.to_string(),
            cmd: scenario::peer(python, root, sc, paths, mode, runs),
        }));
    }
    jobs.extend(modes.iter().skip(1).map(ours));
    jobs
}

/// Run one of `job`'s processes and read what it measured.
fn run_once(paths: &Paths, job: &mut Job) -> Result<Measurement> {
    let log = paths
        .out
        .join(format!("{}-{}.log", job.implementation, job.mode));
    run_logged(&mut job.cmd, &log)?;
    let file = paths.measurement(job.implementation, &job.mode);
    serde_json::from_str(
        &fs::read_to_string(&file).with_context(|| format!("cannot read {}", file.display()))?,
    )
    .with_context(|| format!("{}: not a measurement", file.display()))
}

/// `job`'s record: its pooled measurement, and its output's error against our original's.
fn record(bin: &Path, sc: &Scenario, paths: &Paths, job: &Job, m: Measurement) -> Result<Record> {
    let mut compare = Command::new(bin);
    compare
        .arg("compare")
        .arg("--output")
        .arg(paths.output(job.implementation, &job.mode))
        .arg("--reference")
        .arg(paths.output("streamline", "original"));
    if sc.is_end_to_end() {
        compare.arg("--frames");
    }
    let out = compare
        .output()
        .context("cannot run streamline-bench compare")?;
    if !out.status.success() {
        bail!("{compare:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    let error: Error = serde_json::from_slice(&out.stdout)?;
    Ok(Record::new(
        &sc.name,
        &job.mode,
        job.implementation,
        m,
        error,
    ))
}

/// Every job of one scenario, `rounds` processes each, in turns; their records in job order.
fn measure_scenario(
    bin: &Path,
    sc: &Scenario,
    paths: &Paths,
    jobs: &mut [Job],
    rounds: usize,
    bar: &ProgressBar,
) -> Result<Vec<Record>> {
    let mut pooled: Vec<Option<Measurement>> = jobs.iter().map(|_| None).collect();
    for round in 1..=rounds {
        for (job, pool) in jobs.iter_mut().zip(&mut pooled) {
            bar.set_message(format!(
                "{} {} {} (round {round}/{rounds})",
                sc.name, job.implementation, job.mode
            ));
            let m = run_once(paths, job)?;
            match pool {
                Some(p) => p.pool(m),
                None => *pool = Some(m),
            }
            bar.inc(1);
        }
    }
    let mut records: Vec<Record> = Vec::new();
    for (job, m) in jobs.iter().zip(pooled) {
        let m = m.context("a scenario runs at least one round")?;
        let record = record(bin, sc, paths, job, m)?;
        let peer = records
            .iter()
            .find(|p| p.implementation == "diffusers" && p.mode == "original");
        bar.suspend(|| eprintln!("{}", summary(&record, peer)));
        records.push(record);
    }
    Ok(records)
}

/// A one-line summary, with ratios to diffusers' original when it ran.
fn summary(r: &Record, peer: Option<&Record>) -> String {
    let ratio = |a: f64, b: f64| format!(" ({:.2}x diffusers)", a / b);
    format!(
        "{} {} {}: step {:.3} s{}, peak RSS {:.1} MiB{}, rel. L2 vs original {:.1e}{}{}",
        r.scenario,
        r.implementation,
        r.mode,
        r.step_seconds_median,
        peer.map_or(String::new(), |p| ratio(
            r.step_seconds_median,
            p.step_seconds_median
        )),
        r.peak_rss_above_baseline_bytes as f64 / (1u64 << 20) as f64,
        peer.map_or(String::new(), |p| ratio(
            r.peak_rss_above_baseline_bytes as f64,
            p.peak_rss_above_baseline_bytes as f64
        )),
        r.rel_l2_vs_original,
        r.psnr_vs_original
            .map_or(String::new(), |p| format!(", PSNR {p:.1} dB")),
        r.time_over_original_paired
            .map_or(String::new(), |p| format!(", {p:.2}x original (paired)")),
    )
}

/// `only`: the scenarios to run (all when empty).
pub fn bench(quick: bool, only: &[String]) -> Result<()> {
    let root = crate::root();
    let scenarios = Scenarios::read(&root.join("bench/scenarios.toml"))?;
    if let Some(name) = only
        .iter()
        .find(|n| !scenarios.scenarios.iter().any(|s| &s.name == *n))
    {
        let names: Vec<&str> = scenarios
            .scenarios
            .iter()
            .map(|s| s.name.as_str())
            .collect();
        bail!(
            "--scenario {name}: bench/scenarios.toml has {}",
            names.join(", ")
        );
    }
    let bin = build(&root)?;
    let python = peers_python(&root);
    if python.is_none() {
        eprintln!(
            "xtask: diffusers peers skipped: target/fixtures-venv is missing or out of date (`cargo xtask fixtures` creates it)"
        );
    }
    let selected: Vec<&Scenario> = scenarios
        .scenarios
        .iter()
        .filter(|s| !s.modes(quick).is_empty())
        .filter(|s| only.is_empty() || only.contains(&s.name))
        .collect();
    let mut plans = Vec::new();
    for sc in &selected {
        let paths = Paths::new(&root, sc);
        let runs = if quick { scenarios.quick_runs } else { sc.runs };
        let jobs = jobs(&bin, python.as_deref(), &root, sc, &paths, quick, runs);
        plans.push((*sc, paths, jobs));
    }
    let rounds = |sc: &Scenario| if quick { 1 } else { sc.rounds };
    let total: usize = plans.iter().map(|p| p.2.len() * rounds(p.0)).sum();
    let bar = ProgressBar::new(total as u64).with_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} {msg}")?
            .progress_chars("=> "),
    );
    bar.enable_steady_tick(Duration::from_millis(500));
    let mut records: Vec<Record> = Vec::new();
    for (sc, paths, jobs) in &mut plans {
        if paths.out.exists() {
            fs::remove_dir_all(&paths.out)?;
        }
        fs::create_dir_all(&paths.out)?;
        if let Some(unet) = &sc.unet {
            bar.set_message(format!("{}: writing weights and inputs", sc.name));
            run_logged(
                &mut scenario::prepare(&bin, unet, paths),
                &paths.out.join("prepare.log"),
            )?;
        }
        records.extend(measure_scenario(&bin, sc, paths, jobs, rounds(sc), &bar)?);
    }
    let sections = match only.is_empty() {
        true => {
            bar.set_message("kernel micro-benchmarks");
            let kernel_runs = if quick {
                scenarios.quick_runs
            } else {
                scenarios.kernel_runs
            };
            let kernels = kernels::run(&root, &bin, python.as_deref(), kernel_runs)?;
            bar.set_message("planning times");
            let planning = planning::run(&root, &bin)?;
            Sections { kernels, planning }
        }
        false => Sections {
            kernels: "(not run: `--scenario`)".into(),
            planning: "(not run: `--scenario`)".into(),
        },
    };
    bar.finish_with_message("done");
    write_reports(
        &root,
        &selected,
        &records,
        &sections,
        quick || !only.is_empty(),
    )
}

/// The report's tables that are not per scenario.
struct Sections {
    kernels: String,
    planning: String,
}

fn write_reports(
    root: &Path,
    selected: &[&Scenario],
    records: &[Record],
    sections: &Sections,
    partial: bool,
) -> Result<()> {
    let dir = root.join("target/bench");
    let json = dir.join("latest.json");
    fs::write(&json, serde_json::to_string_pretty(records)?)?;
    // A quick or partial run is a smoke test: its report stays under target/.
    let (md, png) = if partial {
        (dir.join("benchmarks.md"), dir.join("benchmarks.png"))
    } else {
        (
            root.join("docs/benchmarks.md"),
            root.join("docs/benchmarks.png"),
        )
    };
    let per_scenario: Vec<(String, Vec<&Record>)> = selected
        .iter()
        .map(|sc| {
            let rs = records.iter().filter(|r| r.scenario == sc.name).collect();
            (sc.name.clone(), rs)
        })
        .collect();
    chart::draw(&png, &per_scenario)?;
    let tables: String = selected
        .iter()
        .map(|sc| {
            format!(
                "### {}\n\n{}.\n\n{}\n",
                sc.name,
                sc.about,
                report::table(records, &sc.name, sc.is_end_to_end())
            )
        })
        .collect();
    let template = root.join("bench/report.md");
    let text = fs::read_to_string(&template)
        .with_context(|| format!("cannot read {}", template.display()))?
        .replace("{hardware}", &hardware())
        .replace("{run}", if partial { "quick or partial" } else { "full" })
        .replace("{tables}", tables.trim_end())
        .replace("{kernels}", sections.kernels.trim_end())
        .replace("{planning}", sections.planning.trim_end());
    fs::write(&md, text)?;
    eprintln!(
        "xtask: wrote {}, {} and {}",
        json.display(),
        md.display(),
        png.display()
    );
    Ok(())
}

/// The value of the first `name: value` line of a /proc/cpuinfo text whose key is `name`
/// itself ("model" is not "model name").
fn cpuinfo_field(cpuinfo: &str, name: &str) -> Option<String> {
    cpuinfo.lines().find_map(|l| {
        let (key, value) = l.split_once(':')?;
        (key.trim() == name).then(|| value.trim().to_string())
    })
}

/// The machine in words: CPU model and the vector features the kernels dispatch on (ratios
/// move 10-30% between machine kinds), cores and memory.
fn hardware() -> String {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |name: &str| cpuinfo_field(&cpuinfo, name);
    let cpu = field("model name").unwrap_or_else(|| "unknown CPU".into());
    // A VM's model name can be as vague as "Intel(R) Xeon(R) Processor"; family and model
    // tell the generations apart, and ratios move between them.
    let cpu = match (field("cpu family"), field("model")) {
        (Some(family), Some(model)) => format!("{cpu}, family {family} model {model}"),
        _ => cpu,
    };
    let flags = field("flags").unwrap_or_default();
    let has = |f: &str| flags.split_whitespace().any(|x| x == f);
    let features: Vec<&str> = [
        ("avx2", "AVX2"),
        ("fma", "FMA"),
        ("avx512f", "AVX-512"),
        ("avx512_bf16", "AVX-512 BF16"),
        ("amx_tile", "AMX"),
    ]
    .into_iter()
    .filter(|(flag, _)| has(flag))
    .map(|(_, name)| name)
    .collect();
    let features = match features.is_empty() {
        true => "no AVX2".to_string(),
        false => features.join(", "),
    };
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem = fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("MemTotal"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or("unknown".into(), |kb| {
            format!("{:.0} GiB", kb / (1u64 << 20) as f64)
        });
    format!("{cpu} ({features}), {cores} cores available, {mem} RAM, no GPU (CPU only)")
}

#[cfg(test)]
mod tests {
    use super::cpuinfo_field;

    #[test]
    fn cpuinfo_fields_match_whole_keys() {
        let text = "cpu family\t: 6\nmodel\t\t: 207\nmodel name\t: Intel(R) Xeon(R) Processor\n";
        assert_eq!(cpuinfo_field(text, "model").as_deref(), Some("207"));
        assert_eq!(
            cpuinfo_field(text, "model name").as_deref(),
            Some("Intel(R) Xeon(R) Processor")
        );
        assert_eq!(cpuinfo_field(text, "cpu family").as_deref(), Some("6"));
        assert_eq!(cpuinfo_field(text, "flags"), None);
    }
}
