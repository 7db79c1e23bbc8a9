//! The Operator Grouping passes alone, on toy graphs: grouped plans compute what the trivial
//! plan computes, groups are maximal, grouping lowers the planned peak, and hoisting joins the
//! runs a per-batch node would split.

use proptest::prelude::*;
use streamline_grouping::{HoistWhole, OperatorGrouping};
use streamline_ir::testing::*;
use streamline_ir::{check_group, Executor, Graph, Group, Kernels, Pass, PassPipeline, Plan};
use streamline_slicer::PaperSlicer;

fn sliced(t: usize, s: usize) -> PaperSlicer {
    PaperSlicer {
        temporal_chunks: t,
        spatial_chunks: s,
    }
}

fn peak(g: &Graph, plan: &Plan) -> usize {
    Executor::plan_stats(g, plan).unwrap().peak_bytes
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn grouped_plans_match_the_trivial_plan_and_are_maximal(
        d in dims(),
        steps in steps(14),
        t in 1usize..12,
        s in 1usize..20,
        seed in any::<u64>(),
    ) {
        let g = random_graph(d, &steps);
        let passes = PassPipeline::new().then(HoistWhole).then(sliced(t, s)).then(OperatorGrouping);
        let (g2, plan) = passes.optimize(g).unwrap();
        let err = error_vs_trivial(&g2, d, &plan, seed).unwrap();
        prop_assert!(err <= 1e-6, "relative L2 {err} for\n{}", plan.dump(&g2));
        for pair in plan.groups.windows(2) {
            let (a, b) = (&pair[0], &pair[1]);
            let same = a.axis.is_some() && a.axis == b.axis && a.chunks == b.chunks;
            let merged = Group { nodes: a.nodes.start..b.nodes.end, ..a.clone() };
            prop_assert!(!(same && check_group(&g2, &merged).is_ok()),
                "groups {:?} and {:?} could be one\n{}", a.nodes, b.nodes, plan.dump(&g2));
        }
    }
}

/// Residual blocks: unsliced, every intermediate exists at full size beside the block's
/// input (kept for the residual add); grouped, only the input and output do.
#[test]
fn grouping_lowers_the_planned_peak() {
    let d = Dims::new(2, 4, 3, 64);
    let mut g = Graph::new();
    let (mut x, _, _) = toy_inputs(&mut g, d);
    for block in 0..3 {
        let a = g.push(&format!("b{block}.norm"), FrameNorm, &[x]).unwrap();
        let a = g.push(&format!("b{block}.act"), Squash, &[a]).unwrap();
        x = g.push(&format!("b{block}.add"), Add, &[a, x]).unwrap();
    }
    g.set_outputs(&[x]);
    let (g, slicer_only) = sliced(8, 8).run(g.clone(), Plan::trivial(&g)).unwrap();
    let (g, grouped) = OperatorGrouping.run(g, slicer_only.clone()).unwrap();
    assert_eq!(grouped.groups.len(), 1);
    let (a, b) = (peak(&g, &slicer_only), peak(&g, &grouped));
    let full = d.frame_info().bytes();
    assert!(
        a >= 3 * full,
        "slicer only {a}: input, kept input and output"
    );
    assert!(b < a - full / 2, "grouped {b} vs slicer only {a}");
    assert!(error_vs_trivial(&g, d, &grouped, 1).unwrap() <= 1e-6);
}

/// A per-batch node in the middle of a temporal chain: hoisted, the chain is one group.
#[test]
fn hoisting_joins_the_runs_a_per_batch_node_splits() {
    let d = Dims::new(2, 3, 2, 6);
    let mut g = Graph::new();
    let (x, _, cond) = toy_inputs(&mut g, d);
    let f = g.push("norm", FrameNorm, &[x]).unwrap();
    let p = g
        .push("to_positions", Relayout::to_positions(d), &[f])
        .unwrap();
    let p = g.push("mix", TimeMix, &[p]).unwrap();
    let c = g.push("cond.proj", Squash, &[cond]).unwrap();
    let p = g.push("cond.add", AddCond(d), &[p, c]).unwrap();
    let p = g.push("mix.2", TimeMix, &[p]).unwrap();
    g.set_outputs(&[p]);
    let grouped = |hoist: bool| {
        let passes = if hoist {
            PassPipeline::new().then(HoistWhole)
        } else {
            PassPipeline::new()
        };
        passes
            .then(sliced(2, 4))
            .then(OperatorGrouping)
            .optimize(g.clone())
            .unwrap()
    };
    let (plain_graph, plain) = grouped(false);
    let (hoisted_graph, hoisted) = grouped(true);
    assert_eq!(hoisted_graph.node(0).name, "cond.proj");
    assert_eq!(hoisted.groups.len() + 1, plain.groups.len());
    assert!(error_vs_trivial(&plain_graph, d, &plain, 2).unwrap() <= 1e-6);
    assert!(error_vs_trivial(&hoisted_graph, d, &hoisted, 2).unwrap() <= 1e-6);
    // Hoisting moves single-node groups; a plan of merged groups it refuses, naming itself.
    let err = PassPipeline::new()
        .then(sliced(2, 4))
        .then(OperatorGrouping)
        .then(HoistWhole)
        .optimize(g.clone())
        .unwrap_err()
        .to_string();
    assert!(err.contains("pass `hoist-whole`"), "{err}");
}

/// Grouping and hoisting keep the implementation a plan is made for.
#[test]
fn passes_keep_the_plans_kernels() {
    let d = Dims::new(2, 3, 2, 6);
    let g = sample_graph(d);
    let portable = Kernels::Portable { gpu: false };
    let start = Plan::trivial(&g).with_kernels(portable);
    let passes = PassPipeline::new()
        .then(HoistWhole)
        .then(sliced(2, 3))
        .then(OperatorGrouping);
    let (_, plan) = passes.run(g, start).unwrap();
    assert_eq!(plan.kernels, portable);
}
