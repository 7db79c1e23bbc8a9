//! Every optimization computes what original inference computes, on the SVD fixtures (UNet
//! and temporal VAE decoder), AnimateDiff's motion UNet (at latents that are not multiples of
//! 2^levels too), motion module and SD VAE decoder, for frame chunk counts 1, 2, 3, 7 and B*T
//! and position chunk counts that do not divide H*W, with streamline's CPU kernels and with the
//! portable path GPUs run. The naive baseline is measurably not exact.

mod common;

use std::collections::HashMap;
use std::path::Path;

use common::{fixture, io, rel_l2};

use candle_core::{DType, Device, Tensor};
use streamline_ir::{Executor, Graph, Kernels, Pass, Plan, Request};
use streamline_models::load::WeightSource;
use streamline_models::sd::{AutoencoderKL, MotionModule, UNetMotionModel};
use streamline_models::svd::{
    AutoencoderKLTemporalDecoder, UNetShape, UNetSpatioTemporalConditionModel,
};
use streamline_pipeline::{optimize, optimize_for, paper_passes, Optimization};

fn run(graph: &Graph, plan: &Plan, inputs: &[Tensor]) -> (Tensor, usize) {
    let exec = Executor::new(graph, plan, &Device::Cpu).unwrap();
    let mut out = exec.run(inputs.to_vec(), &Request::default()).unwrap();
    (out.outputs.remove(0), out.stats.peak_bytes)
}

/// [`check_kernels`] with streamline's CPU kernels and with the portable path GPUs run.
fn check_all(graph: &Graph, inputs: &[Tensor], frames_len: usize) {
    for kernels in [Kernels::Cpu, Kernels::Portable { gpu: false }] {
        check_kernels(graph, inputs, frames_len, kernels);
    }
}

/// Original, slicer-only, slicer + grouping at several chunk counts, and the tightest budget
/// budget mode can meet, all run by `kernels`: all within 1e-5 of original.
fn check_kernels(graph: &Graph, inputs: &[Tensor], frames_len: usize, kernels: Kernels) {
    let optimize = |opt| optimize_for(graph, opt, kernels);
    let (g0, p0) = optimize(Optimization::Original).unwrap();
    let (reference, _) = run(&g0, &p0, inputs);
    for t in [1, 2, 3, 7, frames_len] {
        for s in [7, 11, 13] {
            // The paper's counts on every group, as Paper runs before coarsening them.
            let fixed = paper_passes(t, s)
                .run(graph.clone(), Plan::trivial(graph).with_kernels(kernels))
                .unwrap();
            let paper = Optimization::Paper {
                temporal_chunks: t,
                spatial_chunks: s,
            };
            let slicer_only = Optimization::SlicerOnly {
                temporal_chunks: t,
                spatial_chunks: s,
            };
            let plans = [
                (format!("{slicer_only:?}"), optimize(slicer_only).unwrap()),
                (format!("{paper:?} uncoarsened"), fixed.clone()),
                (format!("{paper:?}"), optimize(paper).unwrap()),
            ];
            for (name, (g, p)) in &plans {
                let (out, _) = run(g, p, inputs);
                let err = rel_l2(&out, &reference);
                assert!(err <= 1e-5, "{kernels} {name}: relative L2 {err}");
            }
            let peak = |(g, p): &(Graph, Plan)| Executor::plan_stats(g, p).unwrap().peak_bytes;
            assert!(
                peak(&plans[2].1) <= peak(&fixed),
                "{kernels} {paper:?}: coarsening raised the planned peak"
            );
        }
    }
    // The tightest budget budget mode can meet forces the most slicing; it must stay exact.
    let smallest = match optimize(Optimization::Budget { bytes: 1 }) {
        Err(e) => e.infeasible().expect("a budget refusal").smallest,
        Ok(_) => panic!("a 1-byte budget cannot be met"),
    };
    let budget = smallest;
    let (g, p) = optimize(Optimization::Budget { bytes: budget }).unwrap();
    assert!(
        p.groups.iter().any(|g| g.chunks > 1),
        "the budget forced no slicing"
    );
    let (out, measured) = run(&g, &p, inputs);
    let err = rel_l2(&out, &reference);
    assert!(err <= 1e-5, "{kernels} budget {budget}: relative L2 {err}");
    let planned = Executor::plan_stats(&g, &p).unwrap().peak_bytes;
    assert!(
        planned <= budget && measured <= planned,
        "budget {budget}, planned {planned}, measured {measured}"
    );
}

fn unet_inputs(io: &HashMap<String, Tensor>, frames: std::ops::Range<usize>) -> Vec<Tensor> {
    let s = io["sample"].narrow(1, frames.start, frames.len()).unwrap();
    let (b, f, c, h, w) = s.dims5().unwrap();
    vec![
        s.reshape((b * f, c, h, w)).unwrap(),
        io["timestep"].clone(),
        io["encoder_hidden_states"].clone(),
        io["added_time_ids"].clone(),
    ]
}

fn unet(name: &str) -> (UNetSpatioTemporalConditionModel, HashMap<String, Tensor>) {
    let unet = UNetSpatioTemporalConditionModel::load(
        &fixture(name).join("unet"),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    (unet, io(name))
}

fn unet_graph(
    unet: &UNetSpatioTemporalConditionModel,
    io: &HashMap<String, Tensor>,
    frames: usize,
) -> Graph {
    let (b, _, _, h, w) = io["sample"].dims5().unwrap();
    unet.lower(UNetShape {
        batch: b,
        frames,
        height: h,
        width: w,
        context_len: 1,
    })
    .unwrap()
}

#[test]
fn unet_plans_are_exact() {
    for name in ["svd_unet_a", "svd_unet_b"] {
        let (unet, io) = unet(name);
        let (b, f, ..) = io["sample"].dims5().unwrap();
        check_all(&unet_graph(&unet, &io, f), &unet_inputs(&io, 0..f), b * f);
    }
}

#[test]
fn temporal_decoder_plans_are_exact() {
    let io = io("svd_vae");
    let vae = AutoencoderKLTemporalDecoder::load(
        &fixture("svd_vae").join("vae"),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let (n, _, h, w) = io["latents"].dims4().unwrap();
    let frames = 3;
    let g = vae.lower_decoder(n / frames, frames, h, w).unwrap();
    check_all(&g, &[io["latents"].clone()], n);
}

#[test]
fn sd_decoder_plans_are_exact() {
    let io = io("sd_vae");
    let vae =
        AutoencoderKL::load(&fixture("sd_vae").join("vae"), DType::F32, &Device::Cpu).unwrap();
    let (n, _, h, w) = io["latents"].dims4().unwrap();
    let g = vae.lower_decoder(2, n / 2, h, w).unwrap();
    check_all(&g, &[io["latents"].clone()], n);
}

/// Plans of the motion UNet in `dir` (`unet`, `adapter` below it) on the fixture `io`'s
/// tensors `{prefix}sample`, `{prefix}timestep` and `{prefix}encoder_hidden_states`.
fn check_motion_unet(
    dir: &Path,
    [unet, adapter]: [&str; 2],
    io: &HashMap<String, Tensor>,
    prefix: &str,
) {
    let model = UNetMotionModel::load(
        &dir.join(unet),
        &dir.join(adapter),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let t = |name: &str| io[&format!("{prefix}{name}")].clone();
    let (b, c, f, h, w) = t("sample").dims5().unwrap();
    let shape = UNetShape {
        batch: b,
        frames: f,
        height: h,
        width: w,
        context_len: t("encoder_hidden_states").dim(1).unwrap(),
    };
    let sample = t("sample")
        .permute((0, 2, 1, 3, 4))
        .unwrap()
        .reshape((b * f, c, h, w))
        .unwrap();
    let inputs = [sample, t("timestep"), t("encoder_hidden_states")];
    check_all(&model.lower(shape).unwrap(), &inputs, b * f);
}

#[test]
fn motion_unet_plans_are_exact() {
    let dir = fixture("animatediff_unet");
    check_motion_unet(
        &dir,
        ["unet", "motion_adapter"],
        &io("animatediff_unet"),
        "",
    );
}

/// 18x10 latents: the upsamplers resize 5x3 to 9x5 and 9x5 to 18x10, frame by frame.
#[test]
fn motion_unet_plans_are_exact_at_latents_it_cannot_halve() {
    let dir = fixture("animatediff_odd_size");
    let io = io("animatediff_odd_size");
    check_motion_unet(&dir, ["model/unet", "motion_adapter"], &io, "unet_");
}

/// Position slices must merge the motion module's GroupNorm statistics across chunks.
#[test]
fn motion_module_plans_are_exact() {
    let io = io("animatediff_motion");
    let file = fixture("animatediff_motion").join("module.safetensors");
    let vb = WeightSource::open(&file)
        .unwrap()
        .var_builder(DType::F32, &Device::Cpu);
    let module = MotionModule::new(64, 2, 2, 8, vb).unwrap();
    let (n, _, h, w) = io["hidden_states"].dims4().unwrap();
    let g = module.lower_alone(2, n / 2, h, w).unwrap();
    check_all(&g, &[io["hidden_states"].clone()], n);
}

/// The paper's naive baseline denoises each chunk of frames as a video of its own; temporal
/// layers then miss the other chunks' frames, and the output changes.
#[test]
fn naive_slicing_is_not_exact() {
    let (unet, io) = unet("svd_unet_b");
    let (b, f, ..) = io["sample"].dims5().unwrap();
    let g = unet_graph(&unet, &io, f);
    let (g0, p0) = optimize(&g, Optimization::Original).unwrap();
    let (reference, _) = run(&g0, &p0, &unet_inputs(&io, 0..f));
    let reference = reference.reshape(io["out"].dims()).unwrap();
    let chunks: Vec<Tensor> = Optimization::Naive { temporal_chunks: 2 }
        .frame_runs(f)
        .into_iter()
        .map(|frames| {
            let g = unet_graph(&unet, &io, frames.len());
            let (g, p) = optimize(&g, Optimization::Original).unwrap();
            let (out, _) = run(&g, &p, &unet_inputs(&io, frames.clone()));
            let (_, c, h, w) = out.dims4().unwrap();
            out.reshape((b, frames.len(), c, h, w)).unwrap()
        })
        .collect();
    let naive = Tensor::cat(&chunks, 1).unwrap();
    let err = rel_l2(&naive, &reference);
    assert!(
        err > 1e-2,
        "naive slicing should break temporal layers, relative L2 only {err}"
    );
    eprintln!("naive slicing (2 frame chunks) vs original: relative L2 {err:.3}");
}
