//! Cache points on a lowered UNet: a partial step computes less, and with the cache of the
//! same step it computes exactly what the full step did.
//!
//! Fixture UNet `b` (three levels, cross-attention in the first two) has up-block boundaries
//! 0 and 1; the default is 1 (the output of up block 1, which feeds the last up block).

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use streamline_ir::{Executor, Graph, Plan};
use streamline_models::svd::{UNetShape, UNetSpatioTemporalConditionModel};
use streamline_rehash::{similarity, CachePoint, Metric, Rehash, Schedule, StepRehash};

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/data/svd_unet_b")
}

fn unet() -> (Graph, Vec<Tensor>) {
    let dev = Device::Cpu;
    let io = candle_core::safetensors::load(fixture().join("io.safetensors"), &dev).unwrap();
    let unet =
        UNetSpatioTemporalConditionModel::load(&fixture().join("unet"), DType::F32, &dev).unwrap();
    let (b, f, c, h, w) = io["sample"].dims5().unwrap();
    let ehs = &io["encoder_hidden_states"];
    let graph = unet
        .lower(UNetShape {
            batch: b,
            frames: f,
            height: h,
            width: w,
            context_len: ehs.dim(1).unwrap(),
        })
        .unwrap();
    let inputs = vec![
        io["sample"].reshape((b * f, c, h, w)).unwrap(),
        io["timestep"].clone(),
        ehs.clone(),
        io["added_time_ids"].clone(),
    ];
    (graph, inputs)
}

#[test]
fn cache_points_resolve_on_up_block_boundaries() {
    let (graph, _) = unet();
    assert_eq!(CachePoint::boundaries(&graph), vec![0, 1]);
    assert_eq!(CachePoint::LastBoundary.block(&graph).unwrap(), 1);
    assert_eq!(
        CachePoint::LastBoundary.value_name(&graph).unwrap(),
        CachePoint::UpBlock(1).value_name(&graph).unwrap()
    );
    // Up block 1 ends in an upsampler.
    assert_eq!(
        CachePoint::UpBlock(1).value_name(&graph).unwrap(),
        "up_blocks.1.upsamplers.0.conv"
    );
    let err = CachePoint::UpBlock(2)
        .block(&graph)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("up_blocks.2") && err.contains("up_blocks.0 ..= up_blocks.1"),
        "{err}"
    );
    assert!("mid_block".parse::<CachePoint>().is_err());
}

#[test]
fn partial_steps_compute_less_and_deeper_points_less_still() {
    let (graph, _) = unet();
    let plan = Plan::trivial(&graph);
    let exec = Executor::new(&graph, &plan, &Device::Cpu).unwrap();
    let full = exec.dry_run(&[], &[]).unwrap();
    let mut last = full.flops;
    // The deeper the boundary, the more of the UNet a partial step still runs.
    for block in [0, 1] {
        let value = CachePoint::UpBlock(block).value_name(&graph).unwrap();
        let kept = exec.dry_run(std::slice::from_ref(&value), &[]).unwrap();
        let partial = exec.dry_run(&[], std::slice::from_ref(&value)).unwrap();
        assert_eq!(
            kept.flops, full.flops,
            "keeping a value computes nothing more"
        );
        assert!(
            partial.flops < last,
            "up_blocks.{block}: partial {} FLOPs, expected fewer than {last}",
            partial.flops
        );
        assert!(partial.nodes_run < full.nodes_run);
        // The cache adds at most its own bytes to the peak, on full and partial steps.
        let bytes = graph.info(graph.find(&value).unwrap()).bytes();
        assert!(kept.peak_bytes <= full.peak_bytes + bytes);
        assert!(partial.peak_bytes <= full.peak_bytes + bytes);
        last = partial.flops;
    }
}

#[test]
fn a_partial_step_with_its_own_cache_reproduces_the_full_step() {
    let (graph, inputs) = unet();
    let plan = Plan::trivial(&graph);
    let exec = Executor::new(&graph, &plan, &Device::Cpu).unwrap();
    let schedule = Schedule {
        key_steps: vec![0],
        ..Schedule::every_step(2)
    };
    let mut rehash = StepRehash::new(Rehash::Schedule(schedule), &graph, 2).unwrap();
    assert!(rehash.is_full(0) && !rehash.is_full(1));
    let full = exec
        .run(inputs.clone(), &rehash.request(0).unwrap())
        .unwrap();
    rehash.absorb(full.kept).unwrap();
    let request = rehash.request(1).unwrap();
    assert_eq!(request.substitute.len(), 1);
    let partial = exec.run(inputs, &request).unwrap();
    assert_eq!(rehash.counts(), (1, 1));
    assert!(partial.stats.flops < full.stats.flops);
    let values = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!(
        values(&partial.outputs[0]) == values(&full.outputs[0]),
        "same inputs and the same cache give the same output"
    );
}

#[test]
fn recording_keeps_every_step_and_off_keeps_nothing() {
    let (graph, inputs) = unet();
    let plan = Plan::trivial(&graph);
    let exec = Executor::new(&graph, &plan, &Device::Cpu).unwrap();
    let mut record = StepRehash::new(Rehash::Record(CachePoint::UpBlock(0)), &graph, 3).unwrap();
    let mut off = StepRehash::new(Rehash::Off, &graph, 3).unwrap();
    for step in 0..3 {
        let out = exec
            .run(inputs.clone(), &record.request(step).unwrap())
            .unwrap();
        record.absorb(out.kept).unwrap();
        assert!(off.request(step).unwrap().keep.is_empty());
    }
    assert_eq!(record.counts(), (3, 0));
    assert_eq!(off.counts(), (3, 0));
    let features = record.into_recorded();
    assert_eq!(features.len(), 3);
    let sim = similarity(&features, Metric::Cosine).unwrap();
    assert!(
        (sim.get(0, 2) - 1.0).abs() < 1e-9,
        "same inputs, same features"
    );
}
