//! The portable attention's declared workspace is the heap it really allocates.
//!
//! Measured = heap peak during one call (after a warm-up call, from a baseline taken once
//! the inputs exist) minus the output. It must be neither below the declared figure's
//! tolerance (the plan would be optimistic) nor far above it (the plan would be loose): the
//! tolerance of streamline-models' op workspace test, 10% + 64 KiB. Grouped rows in runs
//! shorter than a piece are only bounded: the sizes do not carry the run length.
//!
//! One test in its own binary with a counting global allocator, so nothing else allocates
//! while it measures.

use candle_core::{DType, Device, Tensor};
use streamline_ir::alloc::{peak_bytes, reset_peak, TrackingAllocator};
use streamline_kernels::portable::attention::{
    attention_tiled, attention_tiled_workspace, BLOCK_BYTES,
};
use streamline_kernels::{AttentionSizes, KvRows};

#[global_allocator]
static ALLOC: TrackingAllocator = TrackingAllocator;

/// Slack for small buffers no formula tracks (tensor headers, shape vectors, rayon jobs).
const SLACK: usize = 64 * 1024;

struct Case {
    name: &'static str,
    sizes: AttentionSizes,
    kv: KvRows,
    dtype: DType,
    block_bytes: usize,
    /// Grouped rows in runs shorter than a piece of own rows: the figure only bounds them.
    bound_only: bool,
}

fn case(name: &'static str, [rows, queries, kv_rows, keys, heads, dh]: [usize; 6]) -> Case {
    Case {
        name,
        sizes: AttentionSizes {
            rows,
            queries,
            kv_rows,
            keys,
            channels: heads * dh,
            heads,
        },
        kv: KvRows::Own,
        dtype: DType::F32,
        block_bytes: BLOCK_BYTES,
        bound_only: false,
    }
}

fn randn(dims: (usize, usize, usize), dtype: DType) -> Tensor {
    Tensor::randn(0f32, 1.0, dims, &Device::Cpu)
        .and_then(|t| t.to_dtype(dtype))
        .unwrap()
}

/// Declared and measured workspace of one call, in bytes.
fn measure(c: &Case) -> (usize, usize) {
    let s = c.sizes;
    let q = randn((s.rows, s.queries, s.channels), c.dtype);
    let k = randn((s.kv_rows, s.keys, s.channels), c.dtype);
    let v = randn((s.kv_rows, s.keys, s.channels), c.dtype);
    let scale = 1.0 / ((s.channels / s.heads) as f64).sqrt();
    let call = || attention_tiled(&q, &k, &v, s.heads, scale, c.kv, c.block_bytes).unwrap();
    // Warm up so thread pools and gemm's per-thread buffers are not charged to the call.
    drop(call());
    let base = reset_peak();
    let out = call();
    let output = out.elem_count() * out.dtype().size_in_bytes();
    let measured = (peak_bytes() - base).saturating_sub(output);
    let declared = attention_tiled_workspace(s, c.dtype, true, c.block_bytes);
    (declared, measured)
}

fn mib(b: usize) -> f64 {
    b as f64 / (1 << 20) as f64
}

#[test]
fn declared_workspace_matches_heap() {
    let cases = [
        // Temporal self-attention: many short rows batched into one piece.
        case("temporal, rows batched", [256, 14, 256, 14, 5, 64]),
        // Spatial self-attention: query tiles against all keys, no key blocks.
        Case {
            dtype: DType::F16,
            ..case("spatial, query tiles, f16", [1, 1280, 1, 1280, 6, 64])
        },
        // A 14k-token context: key blocks at the default bound.
        Case {
            dtype: DType::F16,
            ..case("14k keys, key blocks, f16", [1, 128, 1, 14000, 5, 64])
        },
        // Query tiles and more than two key blocks under a 1 MiB bound.
        Case {
            block_bytes: 1 << 20,
            ..case(
                "1 MiB blocks, tiles and key blocks",
                [1, 1024, 1, 1024, 5, 64],
            )
        },
        Case {
            block_bytes: 1 << 20,
            dtype: DType::F16,
            ..case(
                "1 MiB blocks, tiles and key blocks, f16",
                [1, 512, 1, 1024, 4, 40],
            )
        },
        // A VAE's single 512-wide head under a tight bound: key blocks shorter than the head,
        // so merging the online state is the peak.
        Case {
            block_bytes: 256 << 10,
            ..case("VAE head, 256 KiB blocks", [1, 1024, 1, 1024, 1, 512])
        },
        // Cross-attention of 28 frames to their batch item's 77 tokens, runs of 14 frames.
        Case {
            kv: KvRows::Grouped { first: 0, per: 14 },
            dtype: DType::F16,
            ..case("cross, grouped, f16", [28, 512, 2, 77, 8, 40])
        },
        Case {
            kv: KvRows::Grouped { first: 1, per: 4 },
            dtype: DType::F16,
            bound_only: true,
            ..case(
                "cross, grouped in runs of 4 (bound), f16",
                [28, 512, 8, 77, 8, 40],
            )
        },
    ];
    let mut failures = Vec::new();
    for c in &cases {
        let (declared, measured) = measure(c);
        let line = format!(
            "{:<42} declared {:>9.3} MiB  measured {:>9.3} MiB",
            c.name,
            mib(declared),
            mib(measured)
        );
        println!("{line}");
        let tight = measured <= declared + SLACK
            && (c.bound_only || declared as f64 <= 1.1 * measured as f64 + SLACK as f64);
        if !tight {
            failures.push(line);
        }
    }
    assert!(
        failures.is_empty(),
        "workspace off:\n{}",
        failures.join("\n")
    );
}
