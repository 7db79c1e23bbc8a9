//! Both VAE decoders on bands of rows: every row plan computes what the unoptimized plan
//! computes (relative L2 <= 1e-5 in f32), on the CPU kernels and the portable path, with
//! band counts that do not divide the rows, bands of one row, and per-frame and temporal
//! GroupNorm statistics inside the row groups; its planned peak bounds the measured one and
//! one group's re-costing gives the whole plan's figure.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use streamline_ir::testing::rows::longest_row_groups;
use streamline_ir::{Axis, Executor, Graph, Plan, PlanCost, Request};
use streamline_models::sd::AutoencoderKL;
use streamline_models::svd::AutoencoderKLTemporalDecoder;

/// The fixture's decoder graph (2 videos of 3 frames, 8x12 latents, 16x24 frames) and its
/// latents.
fn svd_decoder() -> (Graph, Tensor) {
    let dir = fixture_dir("svd_vae").join("vae");
    let vae = AutoencoderKLTemporalDecoder::load(&dir, DType::F32, &Device::Cpu).unwrap();
    let io = load_io("svd_vae");
    (
        vae.lower_decoder(2, 3, 8, 12).unwrap(),
        io["latents"].clone(),
    )
}

fn sd_decoder() -> (Graph, Tensor) {
    let dir = fixture_dir("sd_vae").join("vae");
    let vae = AutoencoderKL::load(&dir, DType::F32, &Device::Cpu).unwrap();
    let io = load_io("sd_vae");
    (
        vae.lower_decoder(2, 3, 8, 12).unwrap(),
        io["latents"].clone(),
    )
}

/// Row plans of `g` at each band count against the trivial plan, for every kernel set.
fn row_plans_are_exact(name: &str, (g, latents): (Graph, Tensor), full_res_node: &str) {
    for k in KERNELS {
        let trivial = Plan::trivial(&g).with_kernels(k);
        let reference = Executor::new(&g, &trivial, &Device::Cpu)
            .unwrap()
            .run(vec![latents.clone()], &Request::default())
            .unwrap()
            .outputs
            .remove(0);
        for chunks in [2, 3, 5, 16] {
            let plan = longest_row_groups(&g, chunks).with_kernels(k);
            let banded = plan.groups.iter().find(|gr| {
                gr.axis == Some(Axis::Rows)
                    && gr.nodes.clone().any(|n| g.node(n).name == full_res_node)
            });
            let banded =
                banded.unwrap_or_else(|| panic!("{name}: no row group:\n{}", plan.dump(&g)));
            assert!(banded.nodes.len() > 20, "{name}: {:?}", banded.nodes);
            let exec = Executor::new(&g, &plan, &Device::Cpu).unwrap();
            let got = exec
                .run(vec![latents.clone()], &Request::default())
                .unwrap();
            let planned = exec.dry_run(&[], &[]).unwrap();
            let err = rel_l2(&got.outputs[0], &reference);
            eprintln!(
                "{name} {k} {chunks} bands: relative L2 {err:.2e}, planned {} B, measured {} B",
                planned.peak_bytes, got.stats.peak_bytes
            );
            assert!(err <= 1e-5, "{name} {k} {chunks} bands: relative L2 {err}");
            assert!(got.stats.peak_bytes <= planned.peak_bytes);
            assert_eq!(got.stats.flops, planned.flops);
            let cost = PlanCost::new(&g, plan.clone()).unwrap();
            assert_eq!(cost.peak(), planned.peak_bytes);
        }
    }
}

#[test]
fn svd_temporal_decoder_row_plans_equal_the_unoptimized_plan() {
    row_plans_are_exact(
        "svd",
        svd_decoder(),
        "decoder.up_blocks.1.resnets.2.temporal_res_block.norm2",
    );
}

#[test]
fn sd_decoder_row_plans_equal_the_unoptimized_plan() {
    row_plans_are_exact("sd", sd_decoder(), "decoder.up_blocks.1.resnets.1.norm2");
}
