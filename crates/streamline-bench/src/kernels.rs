//! Kernel micro-benchmarks: streamline's CPU kernels against candle's reference ops on the
//! shapes of a UNet step, each case's median over timed runs after a warm-up. PyTorch runs
//! the same cases in `bench/diffusers_peer.py kernels`.

use std::fs;
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use streamline_kernels as k;

use crate::measure::timed;

/// One case of `[[kernel]]` in bench/scenarios.toml.
#[derive(Clone, Debug, Deserialize)]
pub struct Case {
    pub name: String,
    pub op: String,
    pub input: Vec<usize>,
    #[serde(default)]
    pub out_channels: usize,
    #[serde(default)]
    pub kernel: usize,
    #[serde(default = "one")]
    pub stride: usize,
    #[serde(default)]
    pub padding: usize,
    #[serde(default = "one")]
    pub heads: usize,
    #[serde(default)]
    pub groups: usize,
    #[serde(default)]
    pub inner: usize,
}

fn one() -> usize {
    1
}

#[derive(Deserialize)]
struct Cases {
    kernel: Vec<Case>,
}

#[derive(Serialize)]
pub struct Timing {
    pub name: String,
    pub streamline_seconds: f64,
    pub candle_seconds: f64,
    pub rel_l2: f64,
}

fn randn(dims: &[usize]) -> Result<Tensor> {
    Ok(Tensor::randn(0f32, 1.0, dims, &Device::Cpu)?)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn rel_l2(a: &Tensor, b: &Tensor) -> Result<f64> {
    let diff = (a - b)?.sqr()?.sum_all()?.to_scalar::<f32>()?;
    let norm = b.sqr()?.sum_all()?.to_scalar::<f32>()?;
    Ok(f64::from(diff / norm).sqrt())
}

type Run<'a> = Box<dyn Fn() -> Result<Tensor> + 'a>;

/// The kernel and its reference on the case's random inputs.
fn calls(c: &Case) -> Result<(Run<'static>, Run<'static>)> {
    let x = randn(&c.input)?;
    Ok(match c.op.as_str() {
        "conv2d" => {
            let g = k::ConvGeometry {
                in_channels: c.input[1],
                out_channels: c.out_channels,
                kernel: c.kernel,
                stride: c.stride,
                padding: c.padding,
            };
            let w = (randn(&[c.out_channels, c.input[1], c.kernel, c.kernel])? * 0.05)?;
            let b = randn(&[c.out_channels])?;
            let (x2, w2, b2) = (x.clone(), w.clone(), b.clone());
            (
                Box::new(move || Ok(k::conv2d(&x, &w, &b, g)?)),
                Box::new(move || Ok(k::conv2d_reference(&x2, &w2, &b2, g)?)),
            )
        }
        "group_norm" => {
            let w = randn(&[c.input[1]])?;
            let b = randn(&[c.input[1]])?;
            let (x2, w2, b2, g) = (x.clone(), w.clone(), b.clone(), c.groups);
            (
                Box::new(move || Ok(k::group_norm(&x, &w, &b, g, 1e-5)?)),
                Box::new(move || Ok(k::group_norm_reference(&x2, &w2, &b2, g, 1e-5)?)),
            )
        }
        "attention" => {
            let (kk, v) = (randn(&c.input)?, randn(&c.input)?);
            let scale = 1.0 / ((c.input[2] / c.heads) as f64).sqrt();
            let (x2, k2, v2, h) = (x.clone(), kk.clone(), v.clone(), c.heads);
            (
                Box::new(move || Ok(k::attention(&x, &kk, &v, h, scale, k::KvRows::Own)?)),
                Box::new(move || {
                    Ok(k::attention_reference(
                        &x2,
                        &k2,
                        &v2,
                        h,
                        scale,
                        k::KvRows::Own,
                    )?)
                }),
            )
        }
        "geglu" => {
            let w = (randn(&[2 * c.inner, c.input[1]])? * 0.1)?;
            let b = randn(&[2 * c.inner])?;
            let half = |t: &Tensor, i: usize| t.narrow(0, i * c.inner, c.inner)?.contiguous();
            let (wh, wg, bh, bg) = (half(&w, 0)?, half(&w, 1)?, half(&b, 0)?, half(&b, 1)?);
            let (x2, wh2, wg2, bh2, bg2) =
                (x.clone(), wh.clone(), wg.clone(), bh.clone(), bg.clone());
            (
                Box::new(move || Ok(k::linear_geglu(&x, [&wh, &wg], [Some(&bh), Some(&bg)])?)),
                Box::new(move || {
                    let h = k::linear_reference(&x2, &wh2, Some(&bh2))?;
                    let g = k::linear_reference(&x2, &wg2, Some(&bg2))?;
                    Ok((h * g.gelu_erf()?)?)
                }),
            )
        }
        other => bail!("kernel case {}: unknown op {other}", c.name),
    })
}

/// Time every case of `cases` (a TOML file with `[[kernel]]` tables), or those named in
/// `only`, and write the timings as JSON to `out`.
pub fn run(cases: &Path, only: &[String], runs: usize, out: &Path) -> Result<()> {
    let text =
        fs::read_to_string(cases).with_context(|| format!("cannot read {}", cases.display()))?;
    let cases: Cases =
        toml::from_str(&text).with_context(|| format!("cannot parse {}", cases.display()))?;
    let mut timings = Vec::new();
    for c in cases
        .kernel
        .iter()
        .filter(|c| only.is_empty() || only.contains(&c.name))
    {
        let (ours, reference) = calls(c)?;
        let time = |f: &Run| -> Result<(Tensor, f64)> {
            let (out, _) = timed(f)?;
            let mut secs = Vec::new();
            for _ in 0..runs.max(1) {
                secs.push(timed(f)?.1);
            }
            Ok((out, median(secs)))
        };
        let (a, ours_s) = time(&ours)?;
        let (b, ref_s) = time(&reference)?;
        let t = Timing {
            name: c.name.clone(),
            streamline_seconds: ours_s,
            candle_seconds: ref_s,
            rel_l2: rel_l2(&a, &b)?,
        };
        eprintln!(
            "{:<24} streamline {:>9.4} s  candle {:>9.4} s  rel L2 {:.1e}",
            t.name, t.streamline_seconds, t.candle_seconds, t.rel_l2
        );
        timings.push(t);
    }
    fs::write(out, serde_json::to_string_pretty(&timings)?)
        .with_context(|| format!("cannot write {}", out.display()))
}
