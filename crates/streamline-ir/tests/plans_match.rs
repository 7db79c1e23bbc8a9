//! Any valid plan computes what the trivial plan computes, within a planned peak that bounds
//! the measured one.

use candle_core::Device;
use proptest::prelude::*;
use streamline_ir::testing::*;
use streamline_ir::{chunk_ranges, Axis, Executor, Graph, Group, Plan, Request};

proptest! {
    #![proptest_config(ProptestConfig::with_cases(192))]

    #[test]
    fn any_valid_plan_matches_the_trivial_plan(
        d in dims(),
        steps in steps(14),
        choices in prop::collection::vec(any::<u32>(), 1..48),
        seed in any::<u64>(),
    ) {
        let g = random_graph(d, &steps);
        let plan = random_plan(&g, &choices);
        plan.validate(&g).unwrap();
        let err = error_vs_trivial(&g, d, &plan, seed).unwrap();
        prop_assert!(err <= 1e-6, "relative L2 {err} for plan\n{}", plan.dump(&g));
    }

    /// Re-costing one group alone gives what a dry run of the whole changed plan gives.
    #[test]
    fn one_group_costs_as_the_whole_plan_says(
        d in dims(),
        steps in steps(14),
        choices in prop::collection::vec(any::<u32>(), 1..48),
        pick in any::<usize>(),
        chunks in 1usize..64,
        limit in prop::option::of(0usize..4096),
    ) {
        let g = random_graph(d, &steps);
        check_recost(&g, &random_plan(&g, &choices), pick, chunks, limit);
    }

    #[test]
    fn chunks_cover_the_axis_evenly(len in 1usize..500, chunks in 1usize..500) {
        let ranges = chunk_ranges(len, chunks);
        prop_assert_eq!(ranges.len(), chunks.min(len));
        prop_assert_eq!(ranges[0].start, 0);
        prop_assert_eq!(ranges.last().unwrap().end, len);
        for w in ranges.windows(2) {
            prop_assert_eq!(w[0].end, w[1].start);
        }
        let (min, max) = ranges.iter().fold((usize::MAX, 0), |(lo, hi), r| (lo.min(r.len()), hi.max(r.len())));
        prop_assert!(max - min <= 1 && min >= 1);
    }
}

fn sliced_sample_plan() -> (Dims, Graph, Plan) {
    let d = Dims::new(2, 3, 2, 5);
    let g = sample_graph(d);
    let plan = Plan::new(vec![
        Group::sliced(0..2, Axis::Frames, 4),
        Group::sliced(2..4, Axis::Positions, 3),
        Group::sliced(4..7, Axis::Positions, 7),
        Group::sliced(7..10, Axis::Frames, 5),
    ]);
    (d, g, plan)
}

#[test]
fn substituted_values_skip_the_nodes_they_replace() {
    let (d, g, plan) = sliced_sample_plan();
    let inputs = toy_tensors(d, 7);
    let dev = Device::Cpu;
    for plan in [Plan::trivial(&g), plan] {
        let exec = Executor::new(&g, &plan, &dev).unwrap();
        let keep = Request {
            keep: vec!["temporal.cond".into()],
            ..Request::default()
        };
        let full = exec.run(inputs.clone(), &keep).unwrap();
        let cached = full.kept["temporal.cond"].clone();
        let partial = exec
            .run(
                inputs.clone(),
                &Request {
                    substitute: vec![("temporal.cond".into(), cached)],
                    ..Request::default()
                },
            )
            .unwrap();
        assert_eq!(rel_l2(&partial.outputs[0], &full.outputs[0]), 0.0);
        // The temporal chain (5 nodes) is pruned; the frame-wise part still feeds the skip.
        assert_eq!(full.stats.nodes_run, 10);
        assert_eq!(partial.stats.nodes_run, 5);
        assert!(partial.stats.flops < full.stats.flops);
        let planned = exec.dry_run(&[], &["temporal.cond".into()]).unwrap();
        assert_eq!(planned.flops, partial.stats.flops);
    }
}

#[test]
fn kept_values_equal_across_plans() {
    let (d, g, plan) = sliced_sample_plan();
    let inputs = toy_tensors(d, 11);
    let dev = Device::Cpu;
    let keep = Request {
        keep: vec!["temporal.mix".into(), "temporal.stats".into()],
        ..Request::default()
    };
    let trivial = Plan::trivial(&g);
    let a = Executor::new(&g, &trivial, &dev)
        .unwrap()
        .run(inputs.clone(), &keep)
        .unwrap();
    let b = Executor::new(&g, &plan, &dev)
        .unwrap()
        .run(inputs.clone(), &keep)
        .unwrap();
    for name in &keep.keep {
        assert!(rel_l2(&b.kept[name], &a.kept[name]) <= 1e-6, "{name}");
    }
}

#[test]
fn slicing_lowers_the_planned_peak() {
    let d = Dims::new(2, 4, 3, 64);
    let g = sample_graph(d);
    let trivial_plan = Plan::trivial(&g);
    let trivial = Executor::new(&g, &trivial_plan, &Device::Cpu).unwrap();
    let plan = Plan::new(vec![
        Group::sliced(0..2, Axis::Frames, 8),
        Group::sliced(2..4, Axis::Positions, 8),
        Group::sliced(4..7, Axis::Positions, 8),
        Group::sliced(7..10, Axis::Frames, 8),
    ]);
    let sliced = Executor::new(&g, &plan, &Device::Cpu).unwrap();
    let (a, b) = (
        trivial.dry_run(&[], &[]).unwrap(),
        sliced.dry_run(&[], &[]).unwrap(),
    );
    assert!(
        b.peak_bytes < a.peak_bytes,
        "sliced {} vs trivial {}",
        b.peak_bytes,
        a.peak_bytes
    );
    assert_eq!(a.flops, b.flops);
}
