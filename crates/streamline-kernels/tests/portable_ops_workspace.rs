//! Every portable op declares the heap it really allocates on the CPU (`cpu: true`): the
//! peak during one call, after a warm-up call and from a baseline taken once the inputs
//! exist, minus the output, is within 10% + 64 KiB of the declared workspace, for shapes of
//! SVD's layers in f32 and f16.
//!
//! One test in its own binary with a counting global allocator, so nothing else allocates
//! while it measures.

use candle_core::{DType, Device, Tensor};
use streamline_ir::alloc::{peak_bytes, reset_peak, TrackingAllocator};
use streamline_kernels::portable::norm::{self, BatchRows};
use streamline_kernels::portable::{conv, linear};
use streamline_kernels::ConvGeometry;

#[global_allocator]
static ALLOC: TrackingAllocator = TrackingAllocator;

/// Slack for small buffers no formula tracks (tensor headers, shape vectors, rayon jobs).
const SLACK: usize = 64 * 1024;

fn randn(dims: &[usize], dtype: DType) -> Tensor {
    Tensor::randn(0f32, 1.0, dims, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

fn mib(b: usize) -> f64 {
    b as f64 / (1 << 20) as f64
}

/// One call to measure, with the workspace its function declares.
struct Case {
    name: String,
    declared: usize,
    run: Box<dyn Fn() -> Tensor>,
}

fn case(name: &str, dtype: DType, declared: usize, run: impl Fn() -> Tensor + 'static) -> Case {
    Case {
        name: format!("{name} {dtype:?}"),
        declared,
        run: Box::new(run),
    }
}

/// Heap peak of one call beyond its inputs and output, after a warm-up call (so that
/// rayon's threads and gemm's per-thread buffers are not charged to it).
fn measure(c: &Case) -> usize {
    drop((c.run)());
    let base = reset_peak();
    let out = (c.run)();
    let out_bytes = out.elem_count() * out.dtype().size_in_bytes();
    (peak_bytes() - base).saturating_sub(out_bytes)
}

/// Convolutions: VAE-width frames in bands (stride 1 and 2), frames several to a call, and
/// a 1x1 shortcut.
fn conv_cases(dt: DType) -> Vec<Case> {
    let shapes = [
        ((128, 64, 3, 1), [1, 128, 96, 160]),
        ((128, 32, 3, 2), [1, 128, 192, 320]),
        ((128, 32, 3, 1), [4, 128, 48, 80]),
        ((512, 64, 1, 1), [2, 512, 96, 160]),
    ];
    shapes
        .into_iter()
        .map(|((cin, cout, kernel, stride), dims)| {
            let g = ConvGeometry {
                in_channels: cin,
                out_channels: cout,
                kernel,
                stride,
                padding: kernel / 2,
            };
            let [n, _, h, w] = dims;
            let x = randn(&dims, dt);
            let wt = randn(&[cout, cin, kernel, kernel], dt);
            let b = randn(&[cout], dt);
            let declared = conv::conv2d_workspace(&g, n, h, w, dt, true);
            let name = format!("conv {cin}->{cout} {kernel}x{kernel} s{stride} {dims:?}");
            case(&name, dt, declared, move || {
                conv::conv2d(&x, &wt, &b, g).unwrap()
            })
        })
        .collect()
}

/// Products: a projection past one tile, one without bias, GEGLU, the temporal convolution.
fn product_cases(dt: DType) -> Vec<Case> {
    let (rows, c) = (14 * 1152, 320);
    let (x, w, b) = (randn(&[rows, c], dt), randn(&[c, c], dt), randn(&[c], dt));
    let (x2, w2) = (x.clone(), w.clone());
    let (xg, wh, wg) = (
        randn(&[3300, c], dt),
        randn(&[4 * c, c], dt),
        randn(&[4 * c, c], dt),
    );
    let (bh, bg) = (randn(&[4 * c], dt), randn(&[4 * c], dt));
    let (xt, taps, bt) = (
        randn(&[700, 14, c], dt),
        randn(&[3 * c, c], dt),
        randn(&[c], dt),
    );
    vec![
        case(
            "linear 320->320 biased",
            dt,
            linear::linear_workspace(rows, c, c, true, dt, true),
            move || linear::linear(&x, &w, Some(&b)).unwrap(),
        ),
        case(
            "linear 320->320",
            dt,
            linear::linear_workspace(rows, c, c, false, dt, true),
            move || linear::linear(&x2, &w2, None).unwrap(),
        ),
        case(
            "geglu 320->1280",
            dt,
            linear::linear_geglu_workspace(3300, c, 4 * c, true, dt, true),
            move || linear::linear_geglu(&xg, [&wh, &wg], [Some(&bh), Some(&bg)]).unwrap(),
        ),
        case(
            "temporal conv 320->320 k3",
            dt,
            linear::temporal_conv_workspace(700, 14, c, c, 3, dt, true),
            move || linear::temporal_conv(&xt, &taps, &bt, 3).unwrap(),
        ),
    ]
}

/// Norms: LayerNorm of transformer rows, per-frame GroupNorm by frames and by groups,
/// temporal moments and their apply on two batch items, and SiLU (declared nothing).
fn norm_cases(dt: DType) -> Vec<Case> {
    let (rows, c) = (14 * 1152, 320);
    let (x, w, b) = (randn(&[rows, c], dt), randn(&[c], dt), randn(&[c], dt));
    let xs = x.clone();
    let (wf, bf) = (randn(&[128], dt), randn(&[128], dt));
    let (wf2, bf2) = (wf.clone(), bf.clone());
    let frames = randn(&[2, 128, 96, 160], dt);
    let frame = randn(&[1, 128, 192, 320], dt);
    let hw = 1152;
    let xt = randn(&[2 * hw, 14, c], dt);
    let xa = xt.clone();
    let (wt, bt) = (w.clone(), b.clone());
    let at = BatchRows {
        per_batch: hw,
        first: 0,
    };
    let pieces = at.pieces(2 * hw);
    let moments = norm::group_moments(&xt, 32, &pieces, 2).unwrap();
    let moments_declared = norm::moments_workspace(&pieces, 14, c, 32, dt);
    vec![
        case(
            "layer_norm 320",
            dt,
            norm::layer_norm_workspace(rows, c, dt),
            move || norm::layer_norm(&x, &w, &b, 1e-5).unwrap(),
        ),
        case(
            "group_norm 128 ch by frames",
            dt,
            norm::group_norm_workspace(frames.dims(), 32, dt),
            move || norm::group_norm(&frames, &wf, &bf, 32, 1e-6).unwrap(),
        ),
        case(
            "group_norm 128 ch by groups",
            dt,
            norm::group_norm_workspace(frame.dims(), 32, dt),
            move || norm::group_norm(&frame, &wf2, &bf2, 32, 1e-6).unwrap(),
        ),
        case("group_moments 320 ch", dt, moments_declared, move || {
            norm::group_moments(&xt, 32, &pieces, 2).unwrap()
        }),
        case(
            "group_norm_apply 320 ch",
            dt,
            norm::group_norm_apply_workspace(2 * hw, at, 14, c, 2, dt),
            move || norm::group_norm_apply(&xa, &moments, &wt, &bt, 1e-5, at).unwrap(),
        ),
        case("silu", dt, 0, move || linear::silu(&xs).unwrap()),
    ]
}

#[test]
fn declared_workspace_matches_heap() {
    let cases: Vec<Case> = [DType::F32, DType::F16]
        .into_iter()
        .flat_map(|dt| {
            let mut cases = conv_cases(dt);
            cases.extend(product_cases(dt));
            cases.extend(norm_cases(dt));
            cases
        })
        .collect();
    let mut failures = Vec::new();
    for c in &cases {
        let measured = measure(c);
        let line = format!(
            "{:<48} declared {:>9.3} MiB  measured {:>9.3} MiB",
            c.name,
            mib(c.declared),
            mib(measured)
        );
        println!("{line}");
        let tight = measured <= c.declared + SLACK
            && c.declared as f64 <= 1.1 * measured as f64 + SLACK as f64;
        if !tight {
            failures.push(line);
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}
