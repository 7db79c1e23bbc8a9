//! The temporal GroupNorm (statistics over C/G, T, H, W) lowered as a mergeable statistics
//! reduction plus a pointwise apply matches torch, and stays exact under any slicing.

mod common;

use common::{fixture_dir, rel_l2};

use candle_core::{Device, Tensor};
use serde::Deserialize;
use streamline_ir::{Axis, Executor, Graph, Group, Layout, Plan, Request, ValueInfo};
use streamline_models::ops::{
    FrameLayout, FramesToPositions, GroupNormApply, GroupNormStats, PositionsToFrames, VideoDims,
};

#[derive(Deserialize)]
struct Config {
    batch: usize,
    channels: usize,
    groups: usize,
    frames: usize,
    height: usize,
    width: usize,
    eps: f64,
}

fn fixture() -> (Config, std::collections::HashMap<String, Tensor>) {
    let dir = fixture_dir("group_norm_video");
    let config =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let tensors =
        candle_core::safetensors::load(dir.join("tensors.safetensors"), &Device::Cpu).unwrap();
    (config, tensors)
}

/// `(B, C, T, H, W)` as diffusers' temporal blocks hold it -> frame-major `(B*T, C, H, W)`.
fn frame_major(x: &Tensor) -> Tensor {
    let (b, c, t, h, w) = x.dims5().unwrap();
    x.permute((0, 2, 1, 3, 4))
        .unwrap()
        .reshape((b * t, c, h, w))
        .unwrap()
}

fn graph(c: &Config, t: &std::collections::HashMap<String, Tensor>) -> (VideoDims, Graph) {
    let dims = VideoDims {
        batch: c.batch,
        frames: c.frames,
        height: c.height,
        width: c.width,
    };
    let mut g = Graph::new();
    let x = g
        .input(
            "x",
            ValueInfo::new(
                (dims.frames_len(), c.channels, c.height, c.width),
                candle_core::DType::F32,
                Layout::FRAME_MAJOR,
            ),
        )
        .unwrap();
    let p = g
        .push(
            "norm.in",
            FramesToPositions {
                dims,
                channels: c.channels,
                from: FrameLayout::ChannelsFirst,
            },
            &[x],
        )
        .unwrap();
    let s = g
        .push(
            "norm.stats",
            GroupNormStats::new(dims, c.channels, c.groups).unwrap(),
            &[p],
        )
        .unwrap();
    let apply = GroupNormApply::new(dims, c.groups, c.eps, &t["weight"], &t["bias"]).unwrap();
    let y = g.push("norm", apply, &[p, s]).unwrap();
    let f = g
        .push(
            "norm.out",
            PositionsToFrames {
                dims,
                channels: c.channels,
                to: FrameLayout::ChannelsFirst,
            },
            &[y],
        )
        .unwrap();
    g.set_outputs(&[f]);
    (dims, g)
}

#[test]
fn matches_torch_group_norm() {
    let (c, t) = fixture();
    let (_, g) = graph(&c, &t);
    let trivial = Plan::trivial(&g);
    let exec = Executor::new(&g, &trivial, &Device::Cpu).unwrap();
    let out = exec
        .run(vec![frame_major(&t["x"])], &Request::default())
        .unwrap();
    let err = rel_l2(&out.outputs[0], &frame_major(&t["y"]));
    assert!(err <= 1e-6, "relative L2 vs torch: {err}");
}

#[test]
fn every_slicing_is_exact() {
    let (c, t) = fixture();
    let (dims, g) = graph(&c, &t);
    let x = frame_major(&t["x"]);
    let trivial = Plan::trivial(&g);
    let reference = Executor::new(&g, &trivial, &Device::Cpu)
        .unwrap()
        .run(vec![x.clone()], &Request::default())
        .unwrap()
        .outputs
        .remove(0);
    let positions = dims.positions_len();
    for stats_chunks in 1..=positions {
        let apply_chunks = positions + 1 - stats_chunks;
        let frame_chunks = 1 + stats_chunks % dims.frames_len();
        let plan = Plan::new(vec![
            Group::sliced(0..2, Axis::Positions, stats_chunks),
            Group::sliced(2..3, Axis::Positions, apply_chunks),
            Group::sliced(3..4, Axis::Frames, frame_chunks),
        ]);
        let out = Executor::new(&g, &plan, &Device::Cpu)
            .unwrap()
            .run(vec![x.clone()], &Request::default())
            .unwrap();
        let err = rel_l2(&out.outputs[0], &reference);
        assert!(
            err <= 1e-6,
            "relative L2 {err} with plan\n{}",
            plan.dump(&g)
        );
    }
}

#[test]
fn statistics_cannot_be_read_in_their_own_group() {
    let (c, t) = fixture();
    let (_, g) = graph(&c, &t);
    let plan = Plan::new(vec![
        Group::sliced(0..3, Axis::Positions, 2),
        Group::whole(3..4),
    ]);
    let err = plan.validate(&g).unwrap_err().to_string();
    assert!(
        err.contains("`norm`") && err.contains("norm.stats"),
        "{err}"
    );
}
