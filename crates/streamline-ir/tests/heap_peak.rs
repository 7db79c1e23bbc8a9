//! Every heap byte counts: with a tracking global allocator, the real peak of a run (buffers
//! inside candle ops included) stays within the dry run's planned peak.
//!
//! One test in its own binary, so no other test allocates while it measures.

use candle_core::Device;
use streamline_ir::alloc::{peak_bytes, reset_peak, TrackingAllocator};
use streamline_ir::testing::*;
use streamline_ir::{Axis, Executor, Group, Plan, Request};

#[global_allocator]
static ALLOC: TrackingAllocator = TrackingAllocator;

#[test]
fn heap_peak_within_planned_peak() {
    let d = Dims::new(2, 8, 16, 256);
    let g = sample_graph(d);
    let sliced = Plan::new(vec![
        Group::sliced(0..2, Axis::Frames, 7),
        Group::sliced(2..4, Axis::Positions, 5),
        Group::sliced(4..7, Axis::Positions, 9),
        Group::sliced(7..10, Axis::Frames, 3),
    ]);
    for plan in [Plan::trivial(&g), sliced] {
        let exec = Executor::new(&g, &plan, &Device::Cpu).unwrap();
        let planned = exec.dry_run(&[], &[]).unwrap().peak_bytes;
        // Warm up so lazily made thread pools and caches are not charged to the run.
        drop(exec.run(toy_tensors(d, 3), &Request::default()).unwrap());
        // The executor owns its inputs and frees them after their last use, as the plan says.
        let base = reset_peak();
        let out = exec.run(toy_tensors(d, 3), &Request::default()).unwrap();
        let measured = peak_bytes() - base;
        drop(out);
        let budget = planned;
        let slack = 16 * 1024;
        assert!(
            measured <= budget + slack,
            "heap peak {measured} above planned {budget} (+{slack}) for\n{}",
            plan.dump(&g)
        );
        assert!(
            measured * 2 > budget,
            "heap peak {measured} implausibly below planned {budget}"
        );
    }
}
