//! The text dumps of graphs and plans, one line per node or group.

use streamline_ir::testing::*;
use streamline_ir::{Axis, Group, Plan};

#[test]
fn graph_dump() {
    let g = sample_graph(Dims::new(2, 3, 2, 5));
    insta::assert_snapshot!(g.to_string());
}

#[test]
fn plan_dump() {
    let g = sample_graph(Dims::new(2, 3, 2, 5));
    let plan = Plan::new(vec![
        Group::sliced(0..2, Axis::Frames, 4),
        Group::sliced(2..4, Axis::Positions, 3),
        Group::sliced(4..7, Axis::Positions, 7),
        Group::whole(7..8),
        Group::sliced(8..10, Axis::Frames, 5),
    ]);
    plan.validate(&g).unwrap();
    insta::assert_snapshot!(plan.dump(&g).to_string());
    insta::assert_snapshot!("trivial_plan_dump", Plan::trivial(&g).dump(&g).to_string());
}
