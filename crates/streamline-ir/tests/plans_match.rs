//! Any valid plan computes what the trivial plan computes, within a planned peak that bounds
//! the measured one.

mod common;

use candle_core::Device;
use common::*;
use proptest::prelude::*;
use streamline_ir::{
    check_group, chunk_ranges, Axis, Executor, Graph, Group, Plan, Request, ValueId,
};

/// A random graph: each step applies one toy op to earlier values of the right layout.
fn build(d: Dims, steps: &[(u8, u16, u16)]) -> Graph {
    let mut g = Graph::new();
    let (x, emb, cond) = toy_inputs(&mut g, d);
    let (mut fs, mut ps): (Vec<ValueId>, Vec<ValueId>) = (vec![x], vec![]);
    let pick = |v: &[ValueId], r: u16| v[r as usize % v.len()];
    for (i, &(kind, a, b)) in steps.iter().enumerate() {
        let name = format!("n{i}");
        let kind = if ps.is_empty() && matches!(kind % 9, 2 | 3 | 6 | 8) {
            1
        } else {
            kind % 9
        };
        let both = |pf: bool| if pf { &ps } else { &fs };
        match kind {
            0 => fs.push(g.push(&name, FrameNorm, &[pick(&fs, a)]).unwrap()),
            1 => ps.push(g.push(&name, ToPositions(d), &[pick(&fs, a)]).unwrap()),
            2 => ps.push(g.push(&name, TimeMix, &[pick(&ps, a)]).unwrap()),
            3 => fs.push(g.push(&name, ToFrames(d), &[pick(&ps, a)]).unwrap()),
            4 | 5 => {
                let on_p = b % 2 == 1 && !ps.is_empty();
                let pool = both(on_p).clone();
                let v = if kind == 4 {
                    g.push(&name, Squash, &[pick(&pool, a)]).unwrap()
                } else {
                    g.push(&name, Add, &[pick(&pool, a), pick(&pool, b / 2)])
                        .unwrap()
                };
                if on_p {
                    ps.push(v)
                } else {
                    fs.push(v)
                }
            }
            6 => {
                let p = pick(&ps, a);
                let s = g.push(&format!("{name}.stats"), SumSq(d), &[p]).unwrap();
                ps.push(g.push(&name, Normalize(d), &[p, s]).unwrap());
            }
            7 => fs.push(g.push(&name, AddFrameEmb, &[pick(&fs, a), emb]).unwrap()),
            _ => ps.push(g.push(&name, AddCond(d), &[pick(&ps, a), cond]).unwrap()),
        }
    }
    let mut outputs = vec![*fs.last().unwrap()];
    outputs.extend(ps.last());
    g.set_outputs(&outputs);
    g
}

/// A random valid plan: groups grow while the next node can join on the same axis.
fn random_plan(g: &Graph, choices: &[u32]) -> Plan {
    let mut it = choices.iter().cycle();
    let mut next = || *it.next().unwrap() as usize;
    let n = g.nodes().len();
    let mut groups = Vec::new();
    let mut i = 0;
    while i < n {
        let ok = |nodes: std::ops::Range<usize>, axis: Option<Axis>| {
            check_group(
                g,
                &Group {
                    nodes,
                    axis,
                    chunks: 1,
                    workspace_limit: None,
                },
            )
            .is_ok()
        };
        let axes: Vec<Option<Axis>> = [None, Some(Axis::Frames), Some(Axis::Positions)]
            .into_iter()
            .filter(|&a| ok(i..i + 1, a))
            .collect();
        let axis = axes[next() % axes.len()];
        let mut end = i + 1;
        if axis.is_some() {
            while end < n && next() % 4 != 0 && ok(i..end + 1, axis) {
                end += 1;
            }
        }
        let len = check_group(
            g,
            &Group {
                nodes: i..end,
                axis,
                chunks: 1,
                workspace_limit: None,
            },
        )
        .unwrap();
        let chunks = if axis.is_some() { 1 + next() % len } else { 1 };
        groups.push(Group {
            nodes: i..end,
            axis,
            chunks,
            workspace_limit: None,
        });
        i = end;
    }
    Plan { groups }
}

fn dims() -> impl Strategy<Value = Dims> {
    (1usize..=2, 1usize..=4, 1usize..=3, 1usize..=7).prop_map(|(b, t, c, s)| Dims { b, t, c, s })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(192))]

    #[test]
    fn any_valid_plan_matches_the_trivial_plan(
        d in dims(),
        steps in prop::collection::vec((any::<u8>(), any::<u16>(), any::<u16>()), 1..14),
        choices in prop::collection::vec(any::<u32>(), 1..48),
        seed in any::<u64>(),
    ) {
        let g = build(d, &steps);
        let plan = random_plan(&g, &choices);
        plan.validate(&g).unwrap();
        let trivial = Plan::trivial(&g);
        let inputs = toy_tensors(d, seed);
        let dev = Device::Cpu;
        let reference = Executor::new(&g, &trivial, &dev).unwrap().run(inputs.clone(), &Request::default()).unwrap();
        let exec = Executor::new(&g, &plan, &dev).unwrap();
        let got = exec.run(inputs.clone(), &Request::default()).unwrap();
        for (a, b) in got.outputs.iter().zip(&reference.outputs) {
            let err = rel_l2(a, b);
            prop_assert!(err <= 1e-6, "relative L2 {err} for plan\n{}", plan.dump(&g));
        }
        let planned = exec.dry_run(&[], &[]).unwrap();
        prop_assert!(got.stats.peak_bytes <= planned.peak_bytes,
            "measured {} > planned {} for plan\n{}", got.stats.peak_bytes, planned.peak_bytes, plan.dump(&g));
        prop_assert_eq!(got.stats.flops, planned.flops);
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
    let d = Dims {
        b: 2,
        t: 3,
        c: 2,
        s: 5,
    };
    let g = sample_graph(d);
    let plan = Plan {
        groups: vec![
            Group::sliced(0..2, Axis::Frames, 4),
            Group::sliced(2..4, Axis::Positions, 3),
            Group::sliced(4..7, Axis::Positions, 7),
            Group::sliced(7..10, Axis::Frames, 5),
        ],
    };
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
    let d = Dims {
        b: 2,
        t: 4,
        c: 3,
        s: 64,
    };
    let g = sample_graph(d);
    let trivial_plan = Plan::trivial(&g);
    let trivial = Executor::new(&g, &trivial_plan, &Device::Cpu).unwrap();
    let plan = Plan {
        groups: vec![
            Group::sliced(0..2, Axis::Frames, 8),
            Group::sliced(2..4, Axis::Positions, 8),
            Group::sliced(4..7, Axis::Positions, 8),
            Group::sliced(7..10, Axis::Frames, 8),
        ],
    };
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
