//! Plans along the rows compute what the trivial plan computes: halos at the image edges,
//! band counts that do not divide H, strides and upsampling inside one group, statistics
//! and their consumers in one group (several passes), within a planned peak that bounds the
//! measured one and that one group's re-costing reproduces.

use proptest::prelude::*;
use streamline_ir::testing::rows::*;
use streamline_ir::testing::{check_recost, error_on, random_plan, steps};
use streamline_ir::{Axis, Executor, Graph, Group, Plan};

fn row_dims() -> impl Strategy<Value = RowDims> {
    (1usize..=2, 1usize..=3, 1usize..=2, 1usize..=9, 1usize..=4)
        .prop_map(|(b, t, c, h, w)| RowDims { b, t, c, h, w })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(160))]

    #[test]
    fn random_row_plans_match_the_trivial_plan(
        d in row_dims(),
        steps in steps(12),
        choices in prop::collection::vec(any::<u32>(), 1..48),
        seed in any::<u64>(),
    ) {
        let g = random_row_graph(d, &steps);
        let plan = random_plan(&g, &choices);
        plan.validate(&g).unwrap();
        let err = error_on(&g, row_tensors(d, seed), &plan).unwrap();
        prop_assert!(err <= 1e-5, "relative L2 {err} for plan\n{}\n{g}", plan.dump(&g));
    }

    /// Long row groups: statistics and their consumers in one group, every band count.
    #[test]
    fn long_row_groups_match_the_trivial_plan(
        d in row_dims(),
        steps in steps(12),
        chunks in 1usize..40,
        seed in any::<u64>(),
    ) {
        let g = random_row_graph(d, &steps);
        let plan = longest_row_groups(&g, chunks);
        let err = error_on(&g, row_tensors(d, seed), &plan).unwrap();
        prop_assert!(err <= 1e-5, "relative L2 {err} for plan\n{}\n{g}", plan.dump(&g));
    }

    /// Re-costing one row group alone gives what a dry run of the whole changed plan gives.
    #[test]
    fn one_row_group_costs_as_the_whole_plan_says(
        d in row_dims(),
        steps in steps(12),
        chunks in 1usize..40,
        pick in any::<usize>(),
        rechunk in 1usize..40,
        limit in prop::option::of(0usize..4096),
    ) {
        let g = random_row_graph(d, &steps);
        check_recost(&g, &longest_row_groups(&g, chunks), pick, rechunk, limit);
    }
}

/// A decoder-like chain: conv, per-frame norm, stride-2 conv, upsampling, a temporal block
/// with per-video statistics, and a skip connection, on 8 rows.
fn decoder_like(d: RowDims) -> Graph {
    // (kind, a, b): see `random_row_graph`; `a` and `b` index the images and the
    // position-major values made so far.
    let steps = [
        (0, 0, 0), // 3x3 conv of x
        (4, 1, 0), // per-frame norm of it
        (2, 2, 0), // stride-2 conv: 4 rows
        (3, 3, 0), // upsampled: 8 rows
        (7, 4, 0), // to positions
        (8, 1, 0), // per-video norm
        (8, 0, 1), // time mix
        (9, 0, 2), // back to images
        (5, 5, 1), // + the upsampled image
        (4, 6, 0), // per-frame norm
        (0, 7, 0), // 3x3 conv
    ];
    random_row_graph(d, &steps)
}

#[test]
fn a_decoder_like_chain_on_any_band_count_is_exact_and_holds_less() {
    let d = RowDims {
        b: 2,
        t: 3,
        c: 2,
        h: 8,
        w: 3,
    };
    let g = decoder_like(d);
    let trivial = Executor::plan_stats(&g, &Plan::trivial(&g))
        .unwrap()
        .peak_bytes;
    for chunks in 1..=8 {
        let plan = longest_row_groups(&g, chunks);
        assert!(
            plan.groups.iter().any(|gr| gr.nodes.len() > 4),
            "the chain forms a long row group:\n{}",
            plan.dump(&g)
        );
        let err = error_on(&g, row_tensors(d, chunks as u64), &plan).unwrap();
        assert!(err <= 1e-5, "{chunks} bands: relative L2 {err}");
        if chunks == 8 {
            let peak = Executor::plan_stats(&g, &plan).unwrap().peak_bytes;
            assert!(
                peak < trivial,
                "8 bands plan {peak} B, unsliced {trivial} B"
            );
        }
    }
}

#[test]
fn a_row_group_over_a_whole_frame_op_is_refused_naming_it() {
    let d = streamline_ir::testing::Dims::new(1, 2, 2, 5);
    let g = streamline_ir::testing::sample_graph(d);
    let plan = Plan::new(
        std::iter::once(Group::sliced(0..1, Axis::Rows, 2))
            .chain((1..g.nodes().len()).map(|i| Group::whole(i..i + 1)))
            .collect(),
    );
    let err = plan.validate(&g).unwrap_err().to_string();
    assert!(
        err.contains("down.norm") && err.contains("bands of rows"),
        "{err}"
    );
}

#[test]
fn a_row_group_on_a_value_without_rows_is_refused_naming_it() {
    let d = streamline_ir::testing::Dims::new(1, 2, 2, 5);
    let g = streamline_ir::testing::sample_graph(d);
    // `up.act` is pointwise and may run on rows, but its input flattens H and W.
    let last = g.nodes().len() - 1;
    let mut groups: Vec<Group> = (0..last).map(|i| Group::whole(i..i + 1)).collect();
    groups.push(Group::sliced(last..last + 1, Axis::Rows, 2));
    let err = Plan::new(groups).validate(&g).unwrap_err().to_string();
    assert!(err.contains("up.act") && err.contains("rows tag"), "{err}");
}
