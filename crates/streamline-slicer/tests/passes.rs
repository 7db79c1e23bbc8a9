//! The Feature Slicer passes alone, on random toy graphs: sliced plans compute what the
//! trivial plan computes, and budgets are met or refused with one smallest feasible peak.

use proptest::prelude::*;
use streamline_ir::testing::*;
use streamline_ir::{check_group, Axis, Executor, Graph, Kernels, Pass, Plan};
use streamline_slicer::{fit_budget, Coarsen, FitBudget, PaperSlicer};

fn slicer(temporal_chunks: usize, spatial_chunks: usize) -> PaperSlicer {
    PaperSlicer {
        temporal_chunks,
        spatial_chunks,
    }
}

/// Every node its own group, sliced along the axis it allows with one chunk: where the
/// budget search starts when no grouping runs.
fn one_chunk_plan(g: &Graph) -> Plan {
    slicer(1, 1).run(g.clone(), Plan::trivial(g)).unwrap().1
}

/// The smallest feasible peak budget fitting reaches from `plan`.
fn smallest(g: &Graph, plan: &Plan) -> usize {
    let err = fit_budget(g, plan.clone(), 0).unwrap_err();
    err.infeasible()
        .expect("a 0-byte budget is refused")
        .smallest
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    /// Any chunk counts, up to beyond the axis length, on the trivial plan or on a random
    /// plan's groups; the same plans coarsened too ([`coarsened_plan_holds`]).
    #[test]
    fn paper_plans_and_their_coarsening_match_the_trivial_plan(
        d in dims(),
        steps in steps(14),
        choices in prop::collection::vec(any::<u32>(), 1..48),
        t in 1usize..12,
        s in 1usize..20,
        seed in any::<u64>(),
    ) {
        let g = random_graph(d, &steps);
        for start in [Plan::trivial(&g), random_plan(&g, &choices)] {
            let groups = start.groups.len();
            let (g2, plan) = slicer(t, s).run(g.clone(), start).unwrap();
            plan.validate(&g2).unwrap();
            prop_assert_eq!(plan.groups.len(), groups, "the slicer keeps the groups");
            for group in &plan.groups {
                let len = check_group(&g2, group).unwrap();
                let want = match group.axis {
                    Some(Axis::Frames) => t.min(len),
                    Some(Axis::Positions) => s.min(len),
                    Some(Axis::Rows) => unreachable!("the paper slices no rows"),
                    None => 1,
                };
                prop_assert_eq!(group.chunks, want);
            }
            let err = error_vs_trivial(&g2, d, &plan, seed).unwrap();
            prop_assert!(err <= 1e-6, "relative L2 {err} for\n{}", plan.dump(&g2));
            coarsened_plan_holds(&g2, &plan, |p| error_vs_trivial(&g2, d, p, seed).unwrap());
        }
    }

    /// Below the smallest feasible peak every budget is refused with that same figure; at or
    /// above it the plan's planned peak fits and the plan stays exact.
    #[test]
    fn budgets_are_met_or_refused_with_one_floor(
        d in dims(),
        steps in steps(14),
        fraction in 0.0f64..1.5,
        seed in any::<u64>(),
    ) {
        let g = random_graph(d, &steps);
        budget_is_met_or_refused(&g, fraction, 1e-6, |plan| error_vs_trivial(&g, d, plan, seed));
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    /// Graphs that run on rows (halos, strides, upsampling, statistics): a budget below what
    /// frames and positions reach is met on bands of rows, exactly, or refused with the one
    /// floor rows reach.
    #[test]
    fn row_budgets_are_met_or_refused_with_one_floor(
        d in row_dims(),
        steps in steps(12),
        fraction in 0.0f64..1.2,
        seed in any::<u64>(),
    ) {
        let g = rows::random_row_graph(d, &steps);
        let inputs = || rows::row_tensors(d, seed);
        budget_is_met_or_refused(&g, fraction, 1e-5, |plan| error_on(&g, inputs(), plan));
    }
}

/// Coarsening the sliced plan `sliced` keeps its groups and axes, slices no group more than
/// before, never raises the planned peak, and keeps the plan exact (`error`).
fn coarsened_plan_holds(g: &Graph, sliced: &Plan, error: impl Fn(&Plan) -> f64) {
    let (g, plan) = Coarsen.run(g.clone(), sliced.clone()).unwrap();
    plan.validate(&g).unwrap();
    let peak = |p: &Plan| Executor::plan_stats(&g, p).unwrap().peak_bytes;
    assert!(
        peak(&plan) <= peak(sliced),
        "the peak rose:\n{}",
        plan.dump(&g)
    );
    assert_eq!(plan.groups.len(), sliced.groups.len());
    for (after, before) in plan.groups.iter().zip(&sliced.groups) {
        assert_eq!((&after.nodes, after.axis), (&before.nodes, before.axis));
        assert!(after.chunks <= before.chunks);
    }
    let err = error(&plan);
    assert!(err <= 1e-6, "relative L2 {err} for\n{}", plan.dump(&g));
}

/// A budget of `fraction` of original inference's peak, fitted from the one-chunk plan: met
/// (the planned peak within it, `error` of the plan within `tolerance`) at or above the
/// smallest feasible peak, refused below it with that one floor.
fn budget_is_met_or_refused(
    g: &Graph,
    fraction: f64,
    tolerance: f64,
    error: impl Fn(&Plan) -> streamline_ir::Result<f64>,
) {
    let start = one_chunk_plan(g);
    let floor = smallest(g, &start);
    let original = Executor::plan_stats(g, &Plan::trivial(g))
        .unwrap()
        .peak_bytes;
    let budget = (fraction * original as f64) as usize;
    match fit_budget(g, start, budget) {
        Ok(plan) => {
            assert!(
                budget >= floor,
                "budget {budget} met below the floor {floor}"
            );
            let planned = Executor::plan_stats(g, &plan).unwrap().peak_bytes;
            assert!(planned <= budget, "planned {planned} over budget {budget}");
            let err = error(&plan).unwrap();
            assert!(err <= tolerance, "relative L2 {err}\n{}", plan.dump(g));
        }
        Err(e) => {
            let refusal = e.infeasible().expect("only a budget refusal");
            assert!(budget < floor);
            assert_eq!(refusal.smallest, floor);
            assert_eq!(refusal.budget, budget);
        }
    }
}

fn row_dims() -> impl Strategy<Value = rows::RowDims> {
    (1usize..=2, 1usize..=3, 1usize..=2, 2usize..=12, 1usize..=4)
        .prop_map(|(b, t, c, h, w)| rows::RowDims { b, t, c, h, w })
}

/// Where frames and positions stop (every value between groups whole), rows go lower: a
/// decoder-like chain at the floor of frames and positions is planned on bands of rows.
#[test]
fn rows_go_below_the_floor_of_frames_and_positions() {
    let d = rows::RowDims {
        b: 1,
        t: 2,
        c: 2,
        h: 12,
        w: 4,
    };
    // 3x3 convs with per-frame norms between them, a temporal block, a skip.
    let steps = [
        (0, 0, 0),
        (4, 1, 0),
        (0, 2, 0),
        (7, 3, 0),
        (8, 1, 0),
        (9, 0, 1),
        (5, 4, 1),
        (0, 5, 0),
    ];
    let g = rows::random_row_graph(d, &steps);
    // The least frames and positions hold: every sliced group one index per slice, ops at
    // their smallest tiles.
    let frames_only = streamline_ir::Plan::new(
        one_chunk_plan(&g)
            .groups
            .into_iter()
            .map(|gr| {
                let len = check_group(&g, &gr).unwrap();
                streamline_ir::Group {
                    chunks: len.max(1),
                    workspace_limit: Some(0),
                    ..gr
                }
            })
            .collect(),
    );
    let floor = smallest(&g, &one_chunk_plan(&g));
    let plan = fit_budget(&g, one_chunk_plan(&g), floor).unwrap();
    assert!(
        plan.groups.iter().any(|gr| gr.axis == Some(Axis::Rows)),
        "{}",
        plan.dump(&g)
    );
    assert!(error_on(&g, rows::row_tensors(d, 3), &plan).unwrap() <= 1e-5);
    let without_rows = Executor::plan_stats(&g, &frames_only).unwrap().peak_bytes;
    assert!(
        floor < without_rows,
        "rows floor {floor}, whole-value floor {without_rows}"
    );
}

/// A frame-wise group whose middle cannot run on rows (a per-frame norm standing in for a
/// VAE's spatial attention) is split around it, and the convolutions on either side go to
/// bands of rows: below the floor of the group on whole frames, and exact.
#[test]
fn a_group_that_cannot_run_on_rows_whole_is_split_for_them() {
    let d = rows::RowDims {
        b: 1,
        t: 2,
        c: 2,
        h: 16,
        w: 4,
    };
    let conv = || rows::ToyConv {
        kernel: 3,
        stride: 1,
        pad: 1,
    };
    let mut g = Graph::new();
    let mut v = g.input("x", d.image_info()).unwrap();
    for (i, name) in ["conv0", "conv1", "norm", "conv2", "conv3"]
        .iter()
        .enumerate()
    {
        v = match i {
            2 => g.push(name, FrameNorm, &[v]).unwrap(),
            _ => g.push(name, conv(), &[v]).unwrap(),
        };
    }
    g.set_outputs(&[v]);
    let whole_frames = |chunks, limit| {
        Plan::new(vec![streamline_ir::Group {
            workspace_limit: limit,
            ..streamline_ir::Group::sliced(0..5, Axis::Frames, chunks)
        }])
    };
    let frames_floor = Executor::plan_stats(&g, &whole_frames(d.t, Some(0)))
        .unwrap()
        .peak_bytes;
    let floor = smallest(&g, &whole_frames(1, None));
    let plan = fit_budget(&g, whole_frames(1, None), floor).unwrap();
    assert!(
        plan.groups.iter().any(|gr| gr.axis == Some(Axis::Rows)),
        "{}",
        plan.dump(&g)
    );
    assert!(
        floor < frames_floor,
        "floor {floor}, on whole frames {frames_floor}"
    );
    assert!(error_on(&g, rows::row_tensors(d, 5), &plan).unwrap() <= 1e-5);
}

/// A graph big enough that slicing matters: the budget pass slices only as much as needed.
#[test]
fn a_budget_between_floor_and_original_forces_slicing() {
    let d = Dims::new(2, 4, 3, 64);
    let g = sample_graph(d);
    let original = Executor::plan_stats(&g, &Plan::trivial(&g))
        .unwrap()
        .peak_bytes;
    let floor = smallest(&g, &one_chunk_plan(&g));
    assert!(floor < original, "floor {floor}, original {original}");
    let budget = (floor + original) / 2;
    let (g2, plan) = FitBudget { bytes: budget }
        .run(g.clone(), one_chunk_plan(&g))
        .unwrap();
    let planned = Executor::plan_stats(&g2, &plan).unwrap().peak_bytes;
    assert!(planned <= budget && planned > floor / 2);
    assert!(plan.groups.iter().any(|gr| gr.chunks > 1));
    assert!(error_vs_trivial(&g2, d, &plan, 5).unwrap() <= 1e-6);
    // A budget original inference meets keeps original inference.
    let (_, plan) = FitBudget { bytes: original }
        .run(g.clone(), one_chunk_plan(&g))
        .unwrap();
    assert_eq!(plan, Plan::trivial(&g));
}

/// The refusal names the group at the peak and what earlier groups keep alive through it.
#[test]
fn a_refusal_names_the_group_at_the_floor() {
    let d = Dims::new(1, 3, 2, 8);
    let g = sample_graph(d);
    let err = fit_budget(&g, one_chunk_plan(&g), 1).unwrap_err();
    let refusal = err.infeasible().unwrap();
    let group = g.find(&refusal.first).unwrap();
    assert!(g.producer_node(group).is_some());
    assert!(refusal.held <= refusal.smallest);
    let text = err.to_string();
    assert!(
        text.contains(&refusal.first) && text.contains("cannot be met"),
        "{text}"
    );
}

/// A plan is made for one implementation of the ops: every pass keeps it, the budget's
/// shortcut to original inference included.
#[test]
fn passes_keep_the_plans_kernels() {
    let d = Dims::new(2, 4, 3, 64);
    let g = sample_graph(d);
    let portable = Kernels::Portable { gpu: true };
    let start = Plan::trivial(&g).with_kernels(portable);
    let (_, sliced) = slicer(3, 5).run(g.clone(), start.clone()).unwrap();
    assert_eq!(sliced.kernels, portable);
    let original = Executor::plan_stats(&g, &start).unwrap().peak_bytes;
    for budget in [original, original * 3 / 4] {
        let (_, fitted) = FitBudget { bytes: budget }
            .run(g.clone(), sliced.clone())
            .unwrap();
        assert_eq!(fitted.kernels, portable, "budget {budget}");
    }
}
