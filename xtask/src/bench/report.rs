//! Records (target/bench/latest.json) and the tables of docs/benchmarks.md.

use std::fmt::Write;

use serde::{Deserialize, Serialize};

/// What one process wrote (streamline-bench and the diffusers peer write the same fields).
#[derive(Debug, Deserialize)]
pub struct Measurement {
    pub step_seconds: Vec<f64>,
    /// Ours, `--paired`: the original plan's step time right after each timed run.
    #[serde(default)]
    pub original_step_seconds: Vec<f64>,
    #[serde(default)]
    pub denoise_seconds: Vec<f64>,
    pub peak_rss_above_baseline_bytes: u64,
    #[serde(default)]
    pub live_peak_bytes: Option<u64>,
    #[serde(default)]
    pub planned_peak_bytes: Option<u64>,
    #[serde(default)]
    pub full_steps: Option<usize>,
    #[serde(default)]
    pub partial_steps: Option<usize>,
    /// Ours, end to end on the CPU: each phase's planned and measured whole-run peak.
    #[serde(default)]
    pub phases: Vec<PhaseFigures>,
}

impl Measurement {
    /// Another process's measurement of the same scenario x mode (a later round): its timed
    /// runs join these; memory keeps the highest peak seen, so a round cannot hide one.
    pub fn pool(&mut self, next: Measurement) {
        self.step_seconds.extend(next.step_seconds);
        self.original_step_seconds
            .extend(next.original_step_seconds);
        self.denoise_seconds.extend(next.denoise_seconds);
        self.peak_rss_above_baseline_bytes = self
            .peak_rss_above_baseline_bytes
            .max(next.peak_rss_above_baseline_bytes);
        self.live_peak_bytes = self.live_peak_bytes.max(next.live_peak_bytes);
    }
}

/// One phase of an end-to-end run (streamline-bench's `PhaseMeasure`).
#[derive(Debug, Deserialize, Serialize)]
pub struct PhaseFigures {
    pub phase: String,
    pub planned: u64,
    pub measured: Option<u64>,
}

/// Error of an output against our original inference's.
#[derive(Debug, Deserialize)]
pub struct Error {
    pub rel_l2: f64,
    pub psnr: Option<f64>,
}

/// One scenario x mode x implementation.
#[derive(Debug, Serialize)]
pub struct Record {
    pub scenario: String,
    pub mode: String,
    pub implementation: String,
    pub runs: usize,
    pub step_seconds_median: f64,
    pub step_seconds_min: f64,
    pub step_seconds_max: f64,
    /// Ours, paired runs: the median over pairs of this mode's step time over the original
    /// plan's step time right after it, in the same process. A slow spell of the machine
    /// lasting seconds slows both halves of a pair, so this ratio is steadier than the ratio
    /// of two medians taken minutes apart.
    pub time_over_original_paired: Option<f64>,
    /// End to end: the whole denoising loop.
    pub denoise_seconds_median: Option<f64>,
    pub peak_rss_above_baseline_bytes: u64,
    /// Ours only: heap bytes live at the peak (tracking allocator) and the plan's dry run.
    pub live_peak_bytes: Option<u64>,
    pub planned_peak_bytes: Option<u64>,
    pub rel_l2_vs_original: f64,
    /// End to end: PSNR (dB) of the frames against original inference's.
    pub psnr_vs_original: Option<f64>,
    /// UNet evaluations that ran the whole network, and partial ones (Step Rehash).
    pub full_steps: Option<usize>,
    pub partial_steps: Option<usize>,
    pub phases: Vec<PhaseFigures>,
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The median of `steps[i] / originals[i]`; none without pairs.
fn paired_ratio(steps: &[f64], originals: &[f64]) -> Option<f64> {
    let ratios: Vec<f64> = steps.iter().zip(originals).map(|(s, o)| s / o).collect();
    (!ratios.is_empty()).then(|| median(&ratios))
}

impl Record {
    pub fn new(
        scenario: &str,
        mode: &str,
        implementation: &str,
        m: Measurement,
        error: Error,
    ) -> Self {
        let fold = |init: f64, f: fn(f64, f64) -> f64| m.step_seconds.iter().copied().fold(init, f);
        Record {
            scenario: scenario.into(),
            mode: mode.into(),
            implementation: implementation.into(),
            runs: m.step_seconds.len(),
            step_seconds_median: median(&m.step_seconds),
            step_seconds_min: fold(f64::INFINITY, f64::min),
            step_seconds_max: fold(0.0, f64::max),
            time_over_original_paired: paired_ratio(&m.step_seconds, &m.original_step_seconds),
            denoise_seconds_median: (!m.denoise_seconds.is_empty())
                .then(|| median(&m.denoise_seconds)),
            peak_rss_above_baseline_bytes: m.peak_rss_above_baseline_bytes,
            live_peak_bytes: m.live_peak_bytes,
            planned_peak_bytes: m.planned_peak_bytes,
            rel_l2_vs_original: error.rel_l2,
            psnr_vs_original: error.psnr,
            full_steps: m.full_steps,
            partial_steps: m.partial_steps,
            phases: m.phases,
        }
    }

    pub fn label(&self) -> String {
        format!("{} {}", self.implementation, self.mode)
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / (1u64 << 20) as f64)
}

fn seconds(s: f64) -> String {
    if s < 1.0 {
        format!("{:.3}", s)
    } else {
        format!("{:.2}", s)
    }
}

/// The record diffusers' original inference gives for `scenario`, when the peers ran.
fn peer<'a>(records: &'a [Record], scenario: &str) -> Option<&'a Record> {
    records
        .iter()
        .find(|r| r.scenario == scenario && r.implementation == "diffusers" && r.mode == "original")
}

/// One scenario's table: every record with its time, memory and error side by side, and the
/// ratios to diffusers' original inference.
pub fn table(records: &[Record], scenario: &str, end_to_end: bool) -> String {
    let base = peer(records, scenario);
    let mut t = String::new();
    let time = if end_to_end {
        "denoise s (median)"
    } else {
        "step s"
    };
    writeln!(
        t,
        "| implementation | mode | {time} | min-max | time / diffusers | time / original (paired) | peak RSS MiB | RSS / diffusers | live peak MiB | planned MiB | UNet evals full+partial | rel. L2 vs original |{}",
        if end_to_end { " PSNR dB | phases: planned / measured MiB |" } else { "" }
    )
    .unwrap();
    writeln!(
        t,
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|{}",
        if end_to_end { "---:|---|" } else { "" }
    )
    .unwrap();
    for r in records.iter().filter(|r| r.scenario == scenario) {
        let scale = r
            .denoise_seconds_median
            .map_or(1.0, |d| d / r.step_seconds_median);
        let ratio = |ours: f64, theirs: f64| format!("{:.2}x", ours / theirs);
        let evals = match (r.full_steps, r.partial_steps) {
            (Some(f), Some(p)) => format!("{f}+{p}"),
            _ if end_to_end => "25+0".into(),
            _ => "1+0".into(),
        };
        write!(
            t,
            "| {} | {} | {} | {}-{} | {} | {} | {} | {} | {} | {} | {} | {:.1e} |",
            r.implementation,
            r.mode,
            seconds(r.denoise_seconds_median.unwrap_or(r.step_seconds_median)),
            seconds(r.step_seconds_min * scale),
            seconds(r.step_seconds_max * scale),
            base.map_or("-".into(), |b| ratio(
                r.step_seconds_median,
                b.step_seconds_median
            )),
            r.time_over_original_paired
                .map_or("-".into(), |p| format!("{p:.2}x")),
            mib(r.peak_rss_above_baseline_bytes),
            base.map_or("-".into(), |b| ratio(
                r.peak_rss_above_baseline_bytes as f64,
                b.peak_rss_above_baseline_bytes as f64
            )),
            r.live_peak_bytes.map_or("-".into(), mib),
            r.planned_peak_bytes.map_or("-".into(), mib),
            evals,
            r.rel_l2_vs_original,
        )
        .unwrap();
        if end_to_end {
            let psnr = r.psnr_vs_original.map_or("-".into(), |p| {
                if p >= 200.0 {
                    "identical".into()
                } else {
                    format!("{p:.1}")
                }
            });
            write!(t, " {psnr} | {} |", phases(&r.phases)).unwrap();
        }
        t.push('\n');
    }
    t
}

/// `encode 7.1 / 7.3, denoise ...`: each phase's planned and measured whole-run peak.
fn phases(phases: &[PhaseFigures]) -> String {
    if phases.is_empty() {
        return "-".into();
    }
    let one = |p: &PhaseFigures| {
        let measured = p.measured.map_or("-".into(), mib);
        format!("{} {} / {measured}", p.phase, mib(p.planned))
    };
    phases.iter().map(one).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn measurement(steps: Vec<f64>, rss: u64) -> Measurement {
        Measurement {
            step_seconds: steps,
            original_step_seconds: Vec::new(),
            denoise_seconds: Vec::new(),
            peak_rss_above_baseline_bytes: rss,
            live_peak_bytes: None,
            planned_peak_bytes: None,
            full_steps: None,
            phases: Vec::new(),
            partial_steps: None,
        }
    }

    fn record(mode: &str, implementation: &str, steps: Vec<f64>, rss: u64) -> Record {
        let m = measurement(steps, rss);
        let error = Error {
            rel_l2: 0.0,
            psnr: None,
        };
        Record::new("s", mode, implementation, m, error)
    }

    #[test]
    fn median_and_spread_of_runs() {
        let r = record("original", "streamline", vec![3.0, 1.0, 2.0, 10.0], 0);
        assert_eq!(r.step_seconds_median, 2.5);
        assert_eq!((r.step_seconds_min, r.step_seconds_max), (1.0, 10.0));
        assert_eq!(r.runs, 4);
        assert_eq!(
            record("x", "y", vec![5.0, 1.0, 2.0], 0).step_seconds_median,
            2.0
        );
    }

    #[test]
    fn rounds_pool_runs_and_keep_the_highest_peak() {
        let m = |steps, rss, live| Measurement {
            live_peak_bytes: live,
            planned_peak_bytes: Some(7),
            ..measurement(steps, rss)
        };
        let mut first = m(vec![1.0, 2.0], 10, Some(5));
        first.pool(m(vec![3.0], 30, Some(4)));
        first.pool(m(vec![4.0], 20, Some(6)));
        assert_eq!(first.step_seconds, [1.0, 2.0, 3.0, 4.0]);
        assert_eq!(first.peak_rss_above_baseline_bytes, 30);
        assert_eq!(first.live_peak_bytes, Some(6));
        assert_eq!(first.planned_peak_bytes, Some(7));
    }

    #[test]
    fn paired_runs_give_the_median_ratio_of_each_pair() {
        let m = Measurement {
            original_step_seconds: vec![1.0, 4.0, 2.0],
            ..measurement(vec![1.1, 4.0, 3.0], 0)
        };
        let error = Error {
            rel_l2: 0.0,
            psnr: None,
        };
        let r = Record::new("s", "paper", "streamline", m, error);
        // Pairs 1.1, 1.0 and 1.5: their median, not 3.0 / 2.0 of the medians.
        assert_eq!(r.time_over_original_paired, Some(1.1));
        let t = table(&[r], "s", false);
        assert!(t.contains("| 1.10x |"), "{t}");
        assert_eq!(
            record("x", "y", vec![1.0], 0).time_over_original_paired,
            None
        );
    }

    #[test]
    fn tables_give_ratios_to_diffusers_original() {
        let records = [
            record("original", "streamline", vec![3.0], 100 << 20),
            record("original", "diffusers", vec![2.0], 400 << 20),
        ];
        let t = table(&records, "s", false);
        let ours = t.lines().find(|l| l.starts_with("| streamline")).unwrap();
        assert!(
            ours.contains("| 1.50x |") && ours.contains("| 0.25x |"),
            "{t}"
        );
        let without_peer = table(&records[..1], "s", false);
        assert!(without_peer.lines().last().unwrap().contains("| - |"));
    }
}
