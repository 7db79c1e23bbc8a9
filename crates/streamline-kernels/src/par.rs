//! Work split across rayon's threads in as many contiguous runs as there are threads.
//!
//! Each run makes its scratch once, so a kernel's scratch is exactly `runs x per-run
//! scratch`, a figure the planner can count (rayon's adaptive splitting would make it per
//! split, an unknown number of times).

use rayon::prelude::*;

/// `f` run on one of rayon's worker threads (directly, when called on one), its panics
/// carried back to the caller.
///
/// A run's code (the executor, the pipeline) calls one kernel after another. Called from a
/// thread outside the pool, each kernel hands its runs to the workers and sleeps until they
/// finish, and the idle workers sleep between kernels: two wake-ups a kernel, which the small
/// kernels of a sliced plan or of a small model pay thousands of times a step. On a worker,
/// a kernel runs one share of its work itself while the others steal theirs.
pub fn on_worker<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        return f();
    }
    rayon::scope(|_| f())
}

/// Runs [`for_each_run`] cuts `tasks` into: one per thread, never more than the tasks.
pub fn runs(tasks: usize) -> usize {
    rayon::current_num_threads().max(1).min(tasks)
}

/// Items per task when `items` are cut into tasks of at most `max`: fewer where that would
/// leave a thread without a task (a sliced plan's small calls would otherwise run on one).
pub fn per_task(items: usize, max: usize) -> usize {
    max.min(items.div_ceil(rayon::current_num_threads().max(1)))
        .max(1)
}

/// Call `f(scratch, task)` for every task in `0..tasks`, the tasks cut into [`runs`]
/// contiguous runs that run in parallel, each with its own `init()` scratch.
pub fn for_each_run<S, I, F>(tasks: usize, init: I, f: F)
where
    I: Fn() -> S + Sync,
    F: Fn(&mut S, usize) + Sync,
{
    let runs = runs(tasks);
    if runs <= 1 {
        let mut scratch = init();
        (0..tasks).for_each(|t| f(&mut scratch, t));
        return;
    }
    (0..runs).into_par_iter().for_each(|r| {
        let mut scratch = init();
        let (start, end) = (r * tasks / runs, (r + 1) * tasks / runs);
        (start..end).for_each(|t| f(&mut scratch, t));
    });
}

/// Call `f(scratch, row, out_row)` for every `width`-wide row of `out`, `per_task` rows a
/// task, the tasks cut into [`for_each_run`]'s runs: each row goes to one call alone, so a
/// row-wise kernel writes its output without an unsafe split of its own.
pub fn for_each_row<T, S, I, F>(out: &mut [T], width: usize, per_task: usize, init: I, f: F)
where
    I: Fn() -> S + Sync,
    F: Fn(&mut S, usize, &mut [T]) + Sync,
{
    let rows = out.len().checked_div(width).unwrap_or(0);
    let per_task = per_task.max(1);
    let dst = Out::new(out);
    for_each_run(rows.div_ceil(per_task), init, |scratch, task| {
        let start = task * per_task;
        for r in start..rows.min(start + per_task) {
            // SAFETY: row r lies in `out` (r < rows), and only this call gets it.
            f(scratch, r, unsafe { dst.slice(r * width, width) });
        }
    });
}

/// A new `len`-element output that `fill` writes in full, through the [`Out`] it is given
/// (typically from [`for_each_run`]'s tasks). Nothing zeroes it first: a zeroed buffer is one
/// more pass over the output, on the calling thread alone while the other threads wait, and
/// the tasks' own writes are the only pass here.
///
/// # Safety
/// `fill` must write every element of `0..len` before it returns.
pub unsafe fn written_by<T: Copy>(len: usize, fill: impl FnOnce(Out<T>)) -> Vec<T> {
    let mut out = Vec::with_capacity(len);
    fill(Out(out.as_mut_ptr()));
    // SAFETY: `fill` wrote all `len` elements (the caller's promise) into the capacity.
    unsafe { out.set_len(len) };
    out
}

/// A pointer to an output that tasks write disjoint parts of.
#[derive(Clone, Copy)]
pub struct Out<T>(*mut T);

// SAFETY: tasks only write disjoint elements (each kernel's indexing guarantees it).
unsafe impl<T> Send for Out<T> {}
// SAFETY: as above.
unsafe impl<T> Sync for Out<T> {}

impl<T> Out<T> {
    pub fn new(v: &mut [T]) -> Self {
        Out(v.as_mut_ptr())
    }

    /// # Safety
    /// `offset..offset + len` lies in the output, and no other task touches it meanwhile.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slice(&self, offset: usize, len: usize) -> &mut [T] {
        std::slice::from_raw_parts_mut(self.0.add(offset), len)
    }

    pub fn ptr(&self) -> *mut T {
        self.0
    }
}
