//! The portable path beyond what tests/reference.rs checks op by op: temporal GroupNorm's
//! moments over random splits and merge orders against f64, inputs past the default tile
//! and band bounds, half inputs within the half types' tolerance of the f32 result, and
//! errors for bad shapes.

mod common;

use std::ops::Range;

use candle_core::{DType, Tensor};
use common::{config, layer_norm_f64, randn, rel_l2};
use proptest::prelude::*;
use streamline_kernels::portable::norm::{self, BatchRows};
use streamline_kernels::portable::{conv, linear};
use streamline_kernels::{
    conv2d_reference, group_norm_reference, linear_reference, temporal_conv_reference, ConvGeometry,
};

/// A cast of a test input: to the half type under test, or through it back to f32.
type Cast<'a> = &'a dyn Fn(&Tensor) -> Tensor;

fn f64_of(t: &Tensor) -> Tensor {
    t.to_dtype(DType::F64).unwrap()
}

/// diffusers' GEGLU from candle's products.
fn geglu_reference(x: &Tensor, w: [&Tensor; 2], b: [Option<&Tensor>; 2]) -> Tensor {
    let h = linear_reference(x, w[0], b[0]).unwrap();
    let g = linear_reference(x, w[1], b[1]).unwrap();
    (h * g.gelu_erf().unwrap()).unwrap()
}

/// Per-(batch item, group) count, mean and centered sum of squares of `x` `(n, T, C)` whose
/// batch items have `hw` rows each, on the host in f64.
fn moments_f64(x: &Tensor, hw: usize, groups: usize, batch: usize) -> Vec<[f64; 3]> {
    let (n, t, c) = x.dims3().unwrap();
    let v = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let per = c / groups;
    let slot = |i: usize| (i / (t * c) / hw) * groups + (i % c) / per;
    let mut sums = vec![[0f64; 3]; batch * groups];
    for (i, &x) in v.iter().enumerate().take(n * t * c) {
        sums[slot(i)][0] += 1.0;
        sums[slot(i)][1] += f64::from(x);
    }
    for s in sums.iter_mut() {
        s[1] /= s[0].max(1.0);
    }
    for (i, &x) in v.iter().enumerate() {
        let s = &mut sums[slot(i)];
        s[2] += (f64::from(x) - s[1]).powi(2);
    }
    sums
}

/// Temporal GroupNorm of `x` `(n, T, C)` in f64 from [`moments_f64`].
fn temporal_norm_f64(x: &Tensor, hw: usize, groups: usize, w: &Tensor, b: &Tensor) -> Tensor {
    let (n, t, c) = x.dims3().unwrap();
    let m = moments_f64(x, hw, groups, n.div_ceil(hw));
    let v = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let (w, b) = (w.to_vec1::<f32>().unwrap(), b.to_vec1::<f32>().unwrap());
    let y: Vec<f64> = v
        .iter()
        .enumerate()
        .map(|(i, &x)| {
            let ch = i % c;
            let [count, mean, m2] = m[(i / (t * c) / hw) * groups + ch / (c / groups)];
            let rstd = 1.0 / (m2 / count + 1e-5).sqrt();
            (f64::from(x) - mean) * rstd * f64::from(w[ch]) + f64::from(b[ch])
        })
        .collect();
    Tensor::from_vec(y, (n, t, c), x.device()).unwrap()
}

/// `0..len` cut at `cuts` (taken modulo `len + 1`), empty pieces dropped.
fn split(len: usize, cuts: &[usize]) -> Vec<Range<usize>> {
    let mut bounds: Vec<usize> = cuts.iter().map(|c| c % (len + 1)).chain([0, len]).collect();
    bounds.sort_unstable();
    bounds.dedup();
    bounds.windows(2).map(|w| w[0]..w[1]).collect()
}

proptest! {
    #![proptest_config(config())]

    /// Slices of the rows at random cuts (across batch items or not), each slice's pieces
    /// cut again at random, moments merged in a random order: the same as f64 on the host,
    /// and the rows normalized with them the same as an f64 temporal GroupNorm.
    #[test]
    fn moments_merge_in_any_order(
        batch in 1usize..4,
        hw in 1usize..30,
        t in 1usize..6,
        groups in 1usize..5,
        per_group in 1usize..8,
        slice_cuts in prop::collection::vec(0usize..120, 0..5),
        piece_cuts in prop::collection::vec(0usize..120, 0..5),
        order in any::<u64>(),
        offset in -30f64..30.0,
        seed in 0u64..1000,
    ) {
        let (n, c) = (batch * hw, groups * per_group);
        let x = (randn(&[n, t, c], seed) * 2.0).unwrap().affine(1.0, offset).unwrap();
        let slices = split(n, &slice_cuts);
        let mut partials = Vec::new();
        for s in &slices {
            let rows = BatchRows { per_batch: hw, first: s.start };
            let pieces: Vec<(usize, Range<usize>)> = rows
                .pieces(s.len())
                .into_iter()
                .flat_map(|(item, r)| {
                    split(r.len(), &piece_cuts)
                        .into_iter()
                        .map(move |p| (item, r.start + p.start..r.start + p.end))
                })
                .collect();
            let xs = x.narrow(0, s.start, s.len()).unwrap();
            partials.push(norm::group_moments(&xs, groups, &pieces, batch).unwrap());
        }
        // A random merge order: a seeded rotation and reversal of the partials.
        let turn = order as usize % partials.len();
        partials.rotate_left(turn);
        if order & (1 << 40) != 0 {
            partials.reverse();
        }
        let merged = partials
            .iter()
            .skip(1)
            .fold(partials[0].clone(), |acc, p| norm::merge_moments(&acc, p).unwrap());
        let got = merged.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (g, want) in got.chunks(3).zip(moments_f64(&x, hw, groups, batch)) {
            let std = (want[2] / want[0]).sqrt();
            prop_assert_eq!(f64::from(g[0]), want[0]);
            prop_assert!((f64::from(g[1]) - want[1]).abs() <= 1e-5 * std, "{g:?} {want:?}");
            prop_assert!((f64::from(g[2]) - want[2]).abs() <= 1e-5 * want[2], "{g:?} {want:?}");
        }
        let (w, b) = (randn(&[c], seed + 1), randn(&[c], seed + 2));
        let normed: Vec<Tensor> = slices
            .iter()
            .map(|s| {
                let rows = BatchRows { per_batch: hw, first: s.start };
                let xs = x.narrow(0, s.start, s.len()).unwrap();
                norm::group_norm_apply(&xs, &merged, &w, &b, 1e-5, rows).unwrap()
            })
            .collect();
        let got = Tensor::cat(&normed, 0).unwrap();
        let want = temporal_norm_f64(&x, hw, groups, &w, &b);
        prop_assert!(rel_l2(&got, &want) <= 1e-5, "{:e}", rel_l2(&got, &want));
    }
}

/// Moments with an empty side, or two, merge without NaN and leave the other side as it is.
#[test]
fn merging_empty_moments_is_the_identity() {
    let x = randn(&[6, 3, 4], 5);
    let pieces = [(1, 0..6)];
    let m = norm::group_moments(&x, 2, &pieces, 3).unwrap();
    let zeros = Tensor::zeros((3, 2, 3), DType::F32, x.device()).unwrap();
    for merged in [
        norm::merge_moments(&m, &zeros).unwrap(),
        norm::merge_moments(&zeros, &m).unwrap(),
    ] {
        let (a, b) = (
            merged.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            m.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        assert_eq!(a, b);
    }
    let both = norm::merge_moments(&zeros, &zeros).unwrap();
    let both = both.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!(both.iter().all(|v| *v == 0.0), "{both:?}");
}

/// Shapes past the default bounds, so that tiles (their last one shorter) and bands run.
#[test]
fn default_bounds_split_large_inputs_exactly() {
    let check = |what: &str, got: Tensor, want: Tensor| {
        let err = rel_l2(&got, &want);
        assert!(err <= 1e-5, "{what}: {err:e}");
    };
    let g = ConvGeometry {
        in_channels: 64,
        out_channels: 8,
        kernel: 3,
        stride: 1,
        padding: 1,
    };
    let (x, wt, b) = (
        randn(&[1, 64, 101, 200], 1),
        randn(&[8, 64, 3, 3], 2),
        randn(&[8], 3),
    );
    check(
        "conv2d",
        conv::conv2d(&x, &wt, &b, g).unwrap(),
        conv2d_reference(&x, &wt, &b, g).unwrap(),
    );
    let (x, w, b) = (
        randn(&[20001, 32], 4),
        randn(&[300, 32], 5),
        randn(&[300], 6),
    );
    check(
        "linear",
        linear::linear(&x, &w, Some(&b)).unwrap(),
        linear_reference(&x, &w, Some(&b)).unwrap(),
    );
    let wg = randn(&[300, 32], 7);
    check(
        "geglu",
        linear::linear_geglu(&x, [&w, &wg], [Some(&b), None]).unwrap(),
        geglu_reference(&x, [&w, &wg], [Some(&b), None]),
    );
    let (x, taps, b) = (
        randn(&[2500, 14, 96], 8),
        randn(&[288, 16], 9),
        randn(&[16], 10),
    );
    check(
        "temporal_conv",
        linear::temporal_conv(&x, &taps, &b, 3).unwrap(),
        temporal_conv_reference(&x, &taps, &b, 3).unwrap(),
    );
    let x = (randn(&[30001, 160], 11) + 7.0).unwrap();
    let (w, b) = (randn(&[160], 12), randn(&[160], 13));
    check(
        "layer_norm",
        norm::layer_norm(&x, &w, &b, 1e-5).unwrap(),
        layer_norm_f64(&x, &w, &b, 1e-5),
    );
    let x = (randn(&[1, 32, 400, 401], 14) - 5.0).unwrap();
    let (w, b) = (randn(&[32], 15), randn(&[32], 16));
    check(
        "group_norm",
        norm::group_norm(&x, &w, &b, 2, 1e-6).unwrap(),
        group_norm_reference(&f64_of(&x), &f64_of(&w), &f64_of(&b), 2, 1e-6).unwrap(),
    );
    let (hw, groups) = (3000, 4);
    let x = (randn(&[2 * hw, 14, 128], 17) + 3.0).unwrap();
    let (w, b) = (randn(&[128], 18), randn(&[128], 19));
    let rows = BatchRows {
        per_batch: hw,
        first: 0,
    };
    let m = norm::group_moments(&x, groups, &rows.pieces(2 * hw), 2).unwrap();
    check(
        "group_norm_apply",
        norm::group_norm_apply(&x, &m, &w, &b, 1e-5, rows).unwrap(),
        temporal_norm_f64(&x, hw, groups, &w, &b),
    );
}

/// Per-frame GroupNorm of any rank past (N, C), offset far from 0, against f64.
#[test]
fn group_norm_of_any_rank_matches_f64() {
    for (i, dims) in [vec![4, 6], vec![3, 6, 50], vec![2, 6, 3, 4, 5]]
        .iter()
        .enumerate()
    {
        let seed = 10 * i as u64;
        let x = (randn(dims, seed) + 40.0).unwrap();
        let (w, b) = (randn(&[6], seed + 1), randn(&[6], seed + 2));
        let got = norm::group_norm(&x, &w, &b, 3, 1e-5).unwrap();
        let want = group_norm_reference(&f64_of(&x), &f64_of(&w), &f64_of(&b), 3, 1e-5).unwrap();
        assert!(
            rel_l2(&got, &want) <= 1e-5,
            "{dims:?}: {:e}",
            rel_l2(&got, &want)
        );
    }
}

/// Half inputs: within the half type's precision of the f32 result on the same (rounded)
/// values. candle's CPU matmul has no bf16, so bf16 is checked on the norms alone.
#[test]
fn half_inputs_within_half_precision() {
    let g = ConvGeometry {
        in_channels: 8,
        out_channels: 6,
        kernel: 3,
        stride: 2,
        padding: 1,
    };
    for dtype in [DType::F16, DType::BF16] {
        let tol = if dtype == DType::F16 { 2e-3 } else { 1e-2 };
        let half = |t: &Tensor| t.to_dtype(dtype).unwrap();
        let wide = |t: &Tensor| half(t).to_dtype(DType::F32).unwrap();
        let check = |what: &str, run: &dyn Fn(Cast) -> Tensor| {
            let (got, want) = (run(&half), run(&wide));
            assert_eq!(got.dtype(), dtype, "{what}");
            let err = rel_l2(&got, &want);
            assert!(err < tol, "{what} {dtype:?}: {err:e}");
        };
        let (x, w, b) = (randn(&[2, 8, 19, 11], 1), randn(&[8], 2), randn(&[8], 3));
        check("group_norm", &|h| {
            norm::group_norm(&h(&x), &h(&w), &h(&b), 4, 1e-5).unwrap()
        });
        let (xr, wr, br) = (randn(&[50, 3, 8], 4), randn(&[8], 5), randn(&[8], 6));
        check("layer_norm", &|h| {
            norm::layer_norm(&h(&xr), &h(&wr), &h(&br), 1e-5).unwrap()
        });
        check("group_moments and apply", &|h| {
            let rows = BatchRows {
                per_batch: 25,
                first: 0,
            };
            let m = norm::group_moments(&h(&xr), 2, &rows.pieces(50), 2).unwrap();
            norm::group_norm_apply(&h(&xr), &m, &h(&wr), &h(&br), 1e-5, rows).unwrap()
        });
        if dtype == DType::BF16 {
            continue;
        }
        let (wt, bc) = (randn(&[6, 8, 3, 3], 7), randn(&[6], 8));
        check("conv2d", &|h| {
            conv::conv2d_bounded(&h(&x), &h(&wt), &h(&bc), g, 0).unwrap()
        });
        let (wl, wg, bl) = (randn(&[12, 8], 9), randn(&[12, 8], 10), randn(&[12], 13));
        check("linear", &|h| {
            linear::linear(&h(&xr), &h(&wl), Some(&h(&bl))).unwrap()
        });
        check("geglu", &|h| {
            linear::linear_geglu(&h(&xr), [&h(&wl), &h(&wg)], [None, None]).unwrap()
        });
        let (taps, bt) = (randn(&[24, 5], 11), randn(&[5], 12));
        check("temporal_conv", &|h| {
            linear::temporal_conv(&h(&xr), &h(&taps), &h(&bt), 3).unwrap()
        });
    }
}

/// Bad shapes are errors naming the op, never panics.
#[test]
fn mismatched_shapes_are_errors() {
    let x = randn(&[2, 5, 6], 1);
    let named = |what: &str, err: candle_core::Error| {
        assert!(err.to_string().contains(what), "{what}: {err}");
    };
    named(
        "linear",
        linear::linear(&x, &randn(&[3, 5], 2), None).unwrap_err(),
    );
    named(
        "geglu",
        linear::linear_geglu(&x, [&randn(&[3, 6], 2), &randn(&[4, 6], 3)], [None, None])
            .unwrap_err(),
    );
    named(
        "temporal_conv",
        linear::temporal_conv(&x, &randn(&[17, 2], 4), &randn(&[2], 5), 3).unwrap_err(),
    );
    named(
        "layer_norm",
        norm::layer_norm(&x, &randn(&[5], 6), &randn(&[5], 7), 1e-5).unwrap_err(),
    );
    named(
        "group_norm",
        norm::group_norm(&x, &randn(&[5], 6), &randn(&[5], 7), 2, 1e-5).unwrap_err(),
    );
    named(
        "group_moments",
        norm::group_moments(&x, 4, &[(0, 0..2)], 1).unwrap_err(),
    );
    named(
        "merge_moments",
        norm::merge_moments(&randn(&[2, 3], 8), &randn(&[3, 3], 9)).unwrap_err(),
    );
    let g = ConvGeometry {
        in_channels: 4,
        out_channels: 2,
        kernel: 3,
        stride: 1,
        padding: 1,
    };
    let frames = randn(&[1, 5, 8, 8], 10);
    named(
        "conv2d",
        conv::conv2d(&frames, &randn(&[2, 4, 3, 3], 11), &randn(&[2], 12), g).unwrap_err(),
    );
}
