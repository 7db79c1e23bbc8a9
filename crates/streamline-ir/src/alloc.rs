//! A global allocator that counts heap bytes, for measuring what really lives during a run.
//!
//! The executor's ledger only sees tensors it holds; buffers inside candle ops (im2col columns,
//! attention scores, copies) are invisible to it. A test or benchmark binary that installs
//! [`TrackingAllocator`] as its `#[global_allocator]` sees every heap byte of every thread.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

/// Counts live heap bytes and their peak; forwards to the system allocator.
pub struct TrackingAllocator;

fn grow(bytes: usize) {
    let now = CURRENT.fetch_add(bytes, Ordering::Relaxed) + bytes;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

fn shrink(bytes: usize) {
    CURRENT.fetch_sub(bytes, Ordering::Relaxed);
}

// SAFETY: every call is forwarded unchanged to `System`; only counters are updated around it.
unsafe impl GlobalAlloc for TrackingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        if !p.is_null() {
            grow(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc_zeroed(layout);
        if !p.is_null() {
            grow(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
        shrink(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = System.realloc(ptr, layout, new_size);
        if !p.is_null() {
            shrink(layout.size());
            grow(new_size);
        }
        p
    }
}

/// Live heap bytes now.
pub fn current_bytes() -> usize {
    CURRENT.load(Ordering::Relaxed)
}

/// Start a new measurement: the peak restarts from the current live bytes, which are returned
/// as the baseline.
pub fn reset_peak() -> usize {
    let now = CURRENT.load(Ordering::Relaxed);
    PEAK.store(now, Ordering::Relaxed);
    now
}

/// Highest live heap bytes since the last [`reset_peak`].
pub fn peak_bytes() -> usize {
    PEAK.load(Ordering::Relaxed)
}

/// Serve big allocations from the heap and keep freed memory there for reuse (glibc on
/// Linux; elsewhere nothing changes).
///
/// glibc gives every allocation above 32 MiB a fresh `mmap`, whose pages the kernel faults
/// in and zeroes one by one on first touch, and unmaps it on free. A video UNet step makes
/// and frees gigabytes of same-sized feature maps, so without this a third of a step's time
/// is page faults. On the heap, a freed feature map's pages are reused by the next one.
/// Peak RSS stays honest: the heap grows only when live bytes (and fragmentation) need it.
/// One arena serves every thread: with an arena per thread, memory one thread frees (the run
/// on a rayon worker, see `streamline_kernels::on_worker`) is not reused by another, and
/// the svd-small 64x64 step's peak RSS grew from 387 to 519 MiB; with one it is 370 MiB.
/// Call it first thing in `main`, before threads start.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes glibc's allocation policy; called before other threads.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TOP_PAD, 0);
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// Give free heap memory back to the system, so that a peak-RSS baseline taken next does
/// not count pages a later run reuses (after [`keep_freed_memory`]).
pub fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free pages to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}
