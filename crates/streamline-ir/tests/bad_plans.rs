//! Plans that would change the numbers are rejected, naming the node.

use candle_core::Device;
use streamline_ir::testing::*;
use streamline_ir::{Axis, Executor, Graph, Group, Kernels, Plan, Request};

fn sample() -> (Dims, Graph) {
    let d = Dims::new(2, 3, 2, 5);
    (d, sample_graph(d))
}

fn rejected(g: &Graph, groups: Vec<Group>) -> String {
    let plan = Plan::new(groups);
    let err = plan.validate(g).unwrap_err().to_string();
    assert!(Executor::new(g, &plan, &Device::Cpu).is_err());
    err
}

fn rest(from: usize, g: &Graph) -> Vec<Group> {
    (from..g.nodes().len())
        .map(|i| Group::whole(i..i + 1))
        .collect()
}

#[test]
fn frame_wise_node_sliced_along_positions() {
    let (_, g) = sample();
    let mut groups = vec![Group::sliced(0..1, Axis::Positions, 2)];
    groups.extend(rest(1, &g));
    let err = rejected(&g, groups);
    assert!(
        err.contains("`down.norm`") && err.contains("not independent along positions"),
        "{err}"
    );
}

#[test]
fn position_wise_node_sliced_along_frames() {
    let (_, g) = sample();
    let mut groups = rest(0, &g);
    groups[5] = Group::sliced(5..6, Axis::Frames, 2);
    let err = rejected(&g, groups);
    assert!(
        err.contains("`temporal.mix`") && err.contains("frames"),
        "{err}"
    );
}

#[test]
fn reduction_read_inside_its_own_group() {
    let (_, g) = sample();
    let mut groups = rest(0, &g)[..2].to_vec();
    groups.push(Group::sliced(2..5, Axis::Positions, 2));
    groups.extend(rest(5, &g));
    let err = rejected(&g, groups);
    assert!(
        err.contains("`temporal.norm`") && err.contains("temporal.stats"),
        "{err}"
    );
}

#[test]
fn interleaved_input_to_an_op_that_cannot_gather_it() {
    // `up.skip` adds a frame-major value; sliced along positions it would need a gather.
    let (_, g) = sample();
    let mut groups = rest(0, &g);
    groups[8] = Group::sliced(8..9, Axis::Positions, 2);
    let err = rejected(&g, groups);
    assert!(err.contains("`up.skip`"), "{err}");
}

#[test]
fn more_chunks_than_the_axis_has() {
    let (d, g) = sample();
    let mut groups = rest(0, &g);
    groups[0] = Group::sliced(0..1, Axis::Frames, d.b * d.t + 1);
    let err = rejected(&g, groups);
    assert!(
        err.contains("`down.norm`") && err.contains("7 chunks"),
        "{err}"
    );
}

#[test]
fn unsliced_group_with_chunks() {
    let (_, g) = sample();
    let mut groups = rest(0, &g);
    groups[3] = Group {
        nodes: 3..4,
        axis: None,
        chunks: 3,
        workspace_limit: None,
    };
    let err = rejected(&g, groups);
    assert!(err.contains("`temporal.stats`"), "{err}");
}

#[test]
fn groups_that_skip_or_overlap_nodes() {
    let (_, g) = sample();
    let mut groups = rest(0, &g);
    groups.remove(4);
    let err = rejected(&g, groups);
    assert!(err.contains("group 4"), "{err}");
    let mut groups = rest(0, &g);
    groups.pop();
    let err = rejected(&g, groups);
    assert!(err.contains("graph has 10 nodes"), "{err}");
}

#[test]
fn wrong_input_shape_names_the_input() {
    let (d, g) = sample();
    let mut inputs = toy_tensors(d, 1);
    inputs[1] = inputs[1].narrow(0, 0, 1).unwrap();
    let trivial = Plan::trivial(&g);
    let exec = Executor::new(&g, &trivial, &Device::Cpu).unwrap();
    let err = exec
        .run(inputs.clone(), &Request::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("`emb`"), "{err}");
    let err = exec
        .run(inputs[..2].to_vec(), &Request::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("3 inputs"), "{err}");
}

#[test]
fn unknown_names_are_errors() {
    let (d, g) = sample();
    let trivial = Plan::trivial(&g);
    let exec = Executor::new(&g, &trivial, &Device::Cpu).unwrap();
    let request = Request {
        keep: vec!["no.such.layer".into()],
        ..Request::default()
    };
    let err = exec
        .run(toy_tensors(d, 1), &request)
        .unwrap_err()
        .to_string();
    assert!(err.contains("`no.such.layer`"), "{err}");
}

/// A plan is made for one implementation of the ops: one that cannot run on the device is
/// refused before anything runs, while its dry run needs no device at all.
#[test]
fn plans_run_only_where_their_kernels_do() {
    let (_, g) = sample();
    let plan = Plan::trivial(&g).with_kernels(Kernels::FlashAttn);
    let err = Executor::new(&g, &plan, &Device::Cpu)
        .err()
        .expect("flash-attn does not run on the CPU")
        .to_string();
    assert!(err.contains("flash-attn"), "{err}");
    let planned = Executor::plan_stats(&g, &plan).unwrap();
    assert_eq!(
        planned.peak_bytes,
        Executor::plan_stats(&g, &Plan::trivial(&g))
            .unwrap()
            .peak_bytes
    );
    let portable = |gpu| Plan::trivial(&g).with_kernels(Kernels::Portable { gpu });
    assert!(Executor::new(&g, &portable(false), &Device::Cpu).is_ok());
    assert!(Executor::new(&g, &portable(true), &Device::Cpu).is_err());
}
