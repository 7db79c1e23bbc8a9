//! Every kernel, and every op of the portable path, equals candle's reference op within
//! 1e-5 relative L2, on random shapes, strides, paddings, head counts and group counts, in
//! f32 and (inside the kernels, f32) for half inputs.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{config, layer_norm_f64, randn, rel_l2};
use proptest::prelude::*;
use streamline_kernels::*;

/// Queries `(rows, queries, H*dh)`, keys (scaled up, for peaked softmaxes) and values
/// `(kv rows, keys, H*dh)` with as many kv rows as `kv` reads.
fn attention_inputs(dims: [usize; 5], kv: KvRows, seed: u64) -> [Tensor; 3] {
    let [rows, queries, keys, heads, head_dim] = dims;
    let kv_rows = match kv {
        KvRows::Own => rows,
        KvRows::Grouped { first, per } => (first + rows - 1) / per + 1,
    };
    let c = heads * head_dim;
    [
        randn(&[rows, queries, c], seed),
        (randn(&[kv_rows, keys, c], seed + 1) * 2.0).unwrap(),
        randn(&[kv_rows, keys, c], seed + 2),
    ]
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn conv2d_matches_candle(
        frames in 1usize..4,
        cin in 1usize..20,
        cout in 1usize..20,
        kernel in prop::sample::select(vec![1usize, 3]),
        stride in 1usize..3,
        padding in 0usize..2,
        h in 3usize..23,
        w in 3usize..40,
        units in 0usize..70,
        seed in 0u64..1000,
    ) {
        let g = ConvGeometry { in_channels: cin, out_channels: cout, kernel, stride, padding };
        let x = randn(&[frames, cin, h, w], seed);
        let wt = randn(&[cout, cin, kernel, kernel], seed + 1);
        let b = randn(&[cout], seed + 2);
        let got = conv2d(&x, &wt, &b, g).unwrap();
        let want = conv2d_reference(&x, &wt, &b, g).unwrap();
        prop_assert!(rel_l2(&got, &want) <= 1e-5, "{g:?}: {:e}", rel_l2(&got, &want));
        // The portable path with `units` output rows' worth of columns as its bound: 0 makes
        // one-row bands, more than a frame's rows puts several whole frames in a call.
        let bound = units * 4 * cin * kernel * kernel * g.out_size(w);
        let banded = portable::conv::conv2d_bounded(&x, &wt, &b, g, bound).unwrap();
        prop_assert!(rel_l2(&banded, &want) <= 1e-5, "{g:?}: {:e}", rel_l2(&banded, &want));
    }

    #[test]
    fn group_norm_matches_candle(
        frames in 1usize..4,
        groups in 1usize..6,
        per_group in 1usize..5,
        h in 1usize..12,
        w in 1usize..30,
        offset in -3f32..3.0,
        seed in 0u64..1000,
    ) {
        let c = groups * per_group;
        // An offset tests the centered second moment: E[x^2] - E[x]^2 would lose it.
        let x = (randn(&[frames, c, h, w], seed) + f64::from(offset) * 10.0).unwrap();
        let wt = randn(&[c], seed + 1);
        let b = randn(&[c], seed + 2);
        let got = group_norm(&x, &wt, &b, groups, 1e-5).unwrap();
        let want = group_norm_reference(&x, &wt, &b, groups, 1e-5).unwrap();
        prop_assert!(rel_l2(&got, &want) <= 1e-5, "{:e}", rel_l2(&got, &want));
        // The portable path, judged in f64.
        let wide = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
        let exact = group_norm_reference(&wide(&x), &wide(&wt), &wide(&b), groups, 1e-5).unwrap();
        let portable = portable::norm::group_norm(&x, &wt, &b, groups, 1e-5).unwrap();
        prop_assert!(rel_l2(&portable, &exact) <= 1e-5, "{:e}", rel_l2(&portable, &exact));
    }

    #[test]
    fn group_sums_match_candle(
        rows in 1usize..40,
        t in 1usize..6,
        groups in 1usize..5,
        per_group in 1usize..20,
        cut in 0usize..40,
        centered in any::<bool>(),
        seed in 0u64..1000,
    ) {
        let x = randn(&[rows, t, groups * per_group], seed);
        let cut = cut.min(rows);
        let pieces = [0..cut, cut..rows];
        let centers: Vec<f32> = (0..2 * groups).map(|i| i as f32 * 0.1 - 0.3).collect();
        let centers = centered.then_some(centers.as_slice());
        let got = group_sums(&x, groups, &pieces, centers).unwrap();
        // The reference: candle's ops (the kernel's off-CPU path) on the same pieces.
        let mut want = Vec::new();
        for (p, r) in pieces.iter().enumerate() {
            let part = x.narrow(0, r.start, r.len()).unwrap()
                .reshape((r.len() * t, groups, per_group)).unwrap();
            let part = match centers {
                Some(m) => {
                    let m = Tensor::new(&m[p * groups..(p + 1) * groups], &Device::Cpu).unwrap();
                    part.broadcast_sub(&m.reshape((1, groups, 1)).unwrap()).unwrap().sqr().unwrap()
                }
                None => part,
            };
            want.push(part.to_dtype(DType::F64).unwrap().sum((0, 2)).unwrap());
        }
        let want = Tensor::stack(&want, 0).unwrap();
        let err = (&got - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
        let scale = want.abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap().max(1.0);
        prop_assert!(err <= 1e-5 * scale, "{err:e}");
    }

    #[test]
    fn attention_matches_candle(
        rows in 1usize..4,
        queries in 1usize..150,
        keys in 1usize..700,
        heads in 1usize..4,
        head_dim in 1usize..20,
        grouped in any::<bool>(),
        seed in 0u64..1000,
    ) {
        let kv = if grouped {
            // Rows 1.. of a call whose rows pair up per batch item.
            KvRows::Grouped { first: 1, per: 2 }
        } else {
            KvRows::Own
        };
        let [q, k, v] = attention_inputs([rows, queries, keys, heads, head_dim], kv, seed);
        let scale = 1.0 / (head_dim as f64).sqrt();
        let got = attention(&q, &k, &v, heads, scale, kv).unwrap();
        let want = attention_reference(&q, &k, &v, heads, scale, kv).unwrap();
        prop_assert!(rel_l2(&got, &want) <= 1e-5, "{:e}", rel_l2(&got, &want));
    }

    /// The portable path: budgets from one block of the whole call down to a few scores per
    /// block (many query tiles and key blocks, counts that do not divide), own and grouped
    /// rows (runs that cross tile boundaries), any head count.
    #[test]
    fn portable_attention_matches_candle(
        rows in 1usize..5,
        queries in 1usize..80,
        keys in 1usize..120,
        heads in 1usize..4,
        head_dim in 1usize..12,
        grouped in any::<bool>(),
        per in 1usize..4,
        first in 0usize..6,
        cut in prop::sample::select(vec![0usize, 1, 2, 3, 5, 8, 13, 21, 34]),
        seed in 0u64..1000,
    ) {
        let kv = if grouped { KvRows::Grouped { first, per } } else { KvRows::Own };
        let block_bytes = match cut {
            0 => portable::attention::BLOCK_BYTES,
            cut => (4 * rows * heads * queries * keys / cut).max(16),
        };
        let [q, k, v] = attention_inputs([rows, queries, keys, heads, head_dim], kv, seed);
        let scale = 1.0 / (head_dim as f64).sqrt();
        let got = portable::attention::attention_tiled(&q, &k, &v, heads, scale, kv, block_bytes).unwrap();
        let want = attention_reference(&q, &k, &v, heads, scale, kv).unwrap();
        prop_assert!(rel_l2(&got, &want) <= 1e-5, "{:e}", rel_l2(&got, &want));
    }

    #[test]
    fn linear_matches_candle(
        lead in prop::collection::vec(1usize..30, 1..3),
        in_dim in 1usize..40,
        out_dim in 1usize..40,
        bias in any::<bool>(),
        order in prop::sample::select(vec![WeightOrder::OutIn, WeightOrder::InOut]),
        seed in 0u64..1000,
    ) {
        let mut dims = lead.clone();
        dims.push(in_dim);
        let x = randn(&dims, seed);
        let w = order.arrange(&randn(&[out_dim, in_dim], seed + 1)).unwrap();
        let b = bias.then(|| randn(&[out_dim], seed + 2));
        let got = linear(&x, &w, b.as_ref()).unwrap();
        let want = linear_reference(&x, &w, b.as_ref()).unwrap();
        prop_assert!(rel_l2(&got, &want) <= 1e-5, "{:e}", rel_l2(&got, &want));
        let portable = portable::linear::linear(&x, &w, b.as_ref()).unwrap();
        prop_assert!(rel_l2(&portable, &want) <= 1e-5, "{:e}", rel_l2(&portable, &want));
    }

    #[test]
    fn temporal_conv_matches_candle(
        positions in 1usize..40,
        t in 1usize..20,
        cin in 1usize..12,
        cout in 1usize..12,
        kernel in prop::sample::select(vec![1usize, 3, 5]),
        seed in 0u64..1000,
    ) {
        let x = randn(&[positions, t, cin], seed);
        let taps = randn(&[kernel * cin, cout], seed + 1);
        let b = randn(&[cout], seed + 2);
        let got = temporal_conv(&x, &taps, &b, kernel).unwrap();
        let want = temporal_conv_reference(&x, &taps, &b, kernel).unwrap();
        prop_assert!(rel_l2(&got, &want) <= 1e-5, "{:e}", rel_l2(&got, &want));
        let portable = portable::linear::temporal_conv(&x, &taps, &b, kernel).unwrap();
        prop_assert!(rel_l2(&portable, &want) <= 1e-5, "{:e}", rel_l2(&portable, &want));
    }

    #[test]
    fn contiguous_copies_any_view(
        dims in prop::collection::vec(1usize..40, 3),
        perm in prop::sample::select(vec![(0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0)]),
        start in 0usize..3,
        seed in 0u64..1000,
    ) {
        let x = randn(&dims, seed);
        let start = start.min(dims[0] - 1);
        let view = x.narrow(0, start, dims[0] - start).unwrap().permute(perm).unwrap();
        let got = contiguous(&view).unwrap();
        prop_assert!(got.is_contiguous());
        prop_assert_eq!(got.dims(), view.dims());
        let (a, b) = (got.flatten_all().unwrap().to_vec1::<f32>().unwrap(), view.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        prop_assert_eq!(a, b);
    }

    /// Permuted views of one tensor, cut along dim 0 of the view, put back together.
    #[test]
    fn cat0_joins_views(
        dims in prop::collection::vec(1usize..30, 3),
        perm in prop::sample::select(vec![(0, 1, 2), (1, 2, 0), (2, 0, 1), (1, 0, 2)]),
        cuts in prop::collection::vec(0usize..30, 0..3),
        seed in 0u64..1000,
    ) {
        let view = randn(&dims, seed).permute(perm).unwrap();
        let rows = view.dim(0).unwrap();
        let mut bounds: Vec<usize> = cuts.into_iter().map(|c| c % rows).chain([0, rows]).collect();
        bounds.sort_unstable();
        bounds.dedup();
        let parts: Vec<Tensor> = bounds
            .windows(2)
            .map(|w| view.narrow(0, w[0], w[1] - w[0]).unwrap())
            .collect();
        let got = cat0(&parts).unwrap();
        prop_assert_eq!(got.dims(), view.dims());
        let (a, b) = (got.flatten_all().unwrap().to_vec1::<f32>().unwrap(), view.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        prop_assert_eq!(a, b);
    }

    #[test]
    fn layer_norm_matches_f64(
        rows in 1usize..400,
        dim in 1usize..300,
        shift in -5.0f64..5.0,
        seed in 0u64..1000,
    ) {
        let x = (randn(&[rows, dim], seed) + shift).unwrap();
        let (w, b) = (randn(&[dim], seed + 1), randn(&[dim], seed + 2));
        let got = layer_norm(&x, &w, &b, 1e-5).unwrap();
        let want = layer_norm_f64(&x, &w, &b, 1e-5);
        prop_assert!(rel_l2(&got, &want) <= 1e-5, "{:e}", rel_l2(&got, &want));
        let reference = layer_norm_reference(&x, &w, &b, 1e-5).unwrap();
        prop_assert!(rel_l2(&reference, &want) <= 1e-5, "{:e}", rel_l2(&reference, &want));
        let portable = portable::norm::layer_norm(&x, &w, &b, 1e-5).unwrap();
        prop_assert!(rel_l2(&portable, &want) <= 1e-5, "{:e}", rel_l2(&portable, &want));
    }

    #[test]
    fn silu_matches_candle(len in 1usize..40_000, scale in 0.1f64..30.0, seed in 0u64..1000) {
        let x = (randn(&[len], seed) * scale).unwrap();
        let got = silu(&x).unwrap();
        let want = x.silu().unwrap();
        prop_assert!(rel_l2(&got, &want) <= 1e-5, "{:e}", rel_l2(&got, &want));
    }

    #[test]
    fn geglu_matches_candle(
        rows in 1usize..300,
        width in 1usize..70,
        scale in 0.1f64..6.0,
        seed in 0u64..1000,
    ) {
        let h = randn(&[rows, width], seed);
        let g = (randn(&[rows, width], seed + 1) * scale).unwrap();
        let (bh, bg) = (randn(&[width], seed + 2), randn(&[width], seed + 3));
        let want = (h.broadcast_add(&bh).unwrap()
            * g.broadcast_add(&bg).unwrap().gelu_erf().unwrap()).unwrap();
        let got = geglu(h.copy().unwrap(), &g, Some(&bh), Some(&bg)).unwrap();
        prop_assert!(rel_l2(&got, &want) <= 1e-5, "{:e}", rel_l2(&got, &want));
    }

    #[test]
    fn pointwise_matches_candle(len in 1usize..70_000, alpha in -2.0f64..2.0, seed in 0u64..1000) {
        let (a, b) = (randn(&[len], seed), randn(&[len], seed + 1));
        let sum = add(&a, &b).unwrap();
        prop_assert!(rel_l2(&sum, &(&a + &b).unwrap()) == 0.0);
        let want = (((&a - &b).unwrap() * alpha).unwrap() + &b).unwrap();
        let got = blend(&a, &b, alpha).unwrap();
        prop_assert!(rel_l2(&got, &want) <= 1e-6, "{:e}", rel_l2(&got, &want));
    }

    /// Channels last (`inner` 1) or before `inner` elements, batch items cut anywhere.
    #[test]
    fn batch_affine_matches_candle(
        (batch, per_batch, first) in (1usize..4, 1usize..9).prop_flat_map(|(b, p)| (Just(b), Just(p), 0..b * p)),
        channels in 1usize..20,
        inner in prop::sample::select(vec![1usize, 3, 8]),
        reps in 1usize..4,
        scaled in any::<bool>(),
        seed in 0u64..1000,
    ) {
        let rows = batch * per_batch - first;
        let x = randn(&[rows, reps * channels, inner], seed);
        let (scale, shift) = (randn(&[batch, channels], seed + 1), randn(&[batch, channels], seed + 2));
        let (sv, tv) = (scale.flatten_all().unwrap().to_vec1::<f32>().unwrap(), shift.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        let tables = ChannelTables { scale: scaled.then_some(&sv[..]), shift: &tv, channels };
        let at = portable::norm::BatchRows { per_batch, first };
        let got = batch_affine(&x, tables, inner, at).unwrap().unwrap();
        let ids: Vec<u32> = (0..rows).map(|r| ((first + r) / per_batch) as u32).collect();
        let ids = Tensor::new(ids, &Device::Cpu).unwrap();
        let per_row = |t: &Tensor| {
            t.index_select(&ids, 0).unwrap().reshape((rows, 1, channels, 1)).unwrap()
                .repeat((1, reps, 1, 1)).unwrap().reshape((rows, reps * channels, 1)).unwrap()
        };
        let mut want = x.clone();
        if scaled {
            want = want.broadcast_mul(&per_row(&scale)).unwrap();
        }
        let want = want.broadcast_add(&per_row(&shift)).unwrap();
        prop_assert!(rel_l2(&got, &want) == 0.0, "{:e}", rel_l2(&got, &want));
    }

    /// Row counts past several 256-row tiles, the last one partial.
    #[test]
    fn linear_geglu_matches_candle(
        rows in 1usize..700,
        in_dim in 1usize..40,
        inner in 1usize..40,
        bias in any::<bool>(),
        order in prop::sample::select(vec![WeightOrder::OutIn, WeightOrder::InOut]),
        seed in 0u64..1000,
    ) {
        let x = randn(&[rows, in_dim], seed);
        let weight = |seed| order.arrange(&randn(&[inner, in_dim], seed)).unwrap();
        let (wh, wg) = (weight(seed + 1), weight(seed + 2));
        let (bh, bg) = (randn(&[inner], seed + 3), randn(&[inner], seed + 4));
        let (bh, bg) = (bias.then_some(&bh), bias.then_some(&bg));
        let h = linear_reference(&x, &wh, bh).unwrap();
        let g = linear_reference(&x, &wg, bg).unwrap();
        let want = (h * g.gelu_erf().unwrap()).unwrap();
        let got = linear_geglu(&x, [&wh, &wg], [bh, bg]).unwrap();
        prop_assert!(rel_l2(&got, &want) <= 1e-5, "{:e}", rel_l2(&got, &want));
        let portable = portable::linear::linear_geglu(&x, [&wh, &wg], [bh, bg]).unwrap();
        prop_assert!(rel_l2(&portable, &want) <= 1e-5, "{:e}", rel_l2(&portable, &want));
    }
}

/// Half inputs compute in f32 inside and round once: within the half type's precision of the
/// f32 kernel's result.
#[test]
fn half_inputs_compute_in_f32() {
    for dtype in [DType::F16, DType::BF16] {
        let tol = if dtype == DType::F16 { 2e-3 } else { 1e-2 };
        let half = |t: &Tensor| t.to_dtype(dtype).unwrap();
        let x = randn(&[2, 8, 9, 11], 1);
        let (wt, b) = (randn(&[6, 8, 3, 3], 2), randn(&[6], 3));
        let g = ConvGeometry {
            in_channels: 8,
            out_channels: 6,
            kernel: 3,
            stride: 2,
            padding: 1,
        };
        let want = conv2d(
            &half(&x).to_dtype(DType::F32).unwrap(),
            &half(&wt).to_dtype(DType::F32).unwrap(),
            &half(&b).to_dtype(DType::F32).unwrap(),
            g,
        )
        .unwrap();
        let got = conv2d(&half(&x), &half(&wt), &half(&b), g).unwrap();
        assert_eq!(got.dtype(), dtype);
        assert!(rel_l2(&got, &want) < tol, "conv2d {dtype:?}");

        let (gw, gb) = (randn(&[8], 4), randn(&[8], 5));
        let want = group_norm(&half(&x).to_dtype(DType::F32).unwrap(), &gw, &gb, 4, 1e-5).unwrap();
        let got = group_norm(&half(&x), &half(&gw), &half(&gb), 4, 1e-5).unwrap();
        assert_eq!(got.dtype(), dtype);
        assert!(rel_l2(&got, &want) < tol, "group_norm {dtype:?}");

        let q = randn(&[2, 30, 16], 6);
        let widened = |t: &Tensor| half(t).to_dtype(DType::F32).unwrap();
        let want = attention(
            &widened(&q),
            &widened(&q),
            &widened(&q),
            2,
            0.3,
            KvRows::Own,
        )
        .unwrap();
        let got = attention(&half(&q), &half(&q), &half(&q), 2, 0.3, KvRows::Own).unwrap();
        assert_eq!(got.dtype(), dtype);
        assert!(rel_l2(&got, &want) < tol, "attention {dtype:?}");
        // The portable path in one block, and in query tiles and key blocks.
        for block_bytes in [portable::attention::BLOCK_BYTES, 256] {
            let (q, kv) = (half(&q), KvRows::Own);
            let got =
                portable::attention::attention_tiled(&q, &q, &q, 2, 0.3, kv, block_bytes).unwrap();
            assert_eq!(got.dtype(), dtype);
            let err = rel_l2(&got, &want);
            eprintln!("portable attention {dtype:?}, {block_bytes} B blocks: relative L2 {err:e}");
            assert!(err < tol, "portable attention {dtype:?}: {err:e}");
        }

        let (h, gate) = (randn(&[5, 7], 7), randn(&[5, 7], 8));
        let want = geglu(widened(&h), &widened(&gate), None, None).unwrap();
        let got = geglu(half(&h), &half(&gate), None, None).unwrap();
        assert_eq!(got.dtype(), dtype);
        assert!(rel_l2(&got, &want) < tol, "geglu {dtype:?}");

        let x = randn(&[6, 9, 8], 9);
        let (taps, b) = (randn(&[24, 5], 10), randn(&[5], 11));
        let want = temporal_conv(&widened(&x), &widened(&taps), &widened(&b), 3).unwrap();
        let got = temporal_conv(&half(&x), &half(&taps), &half(&b), 3).unwrap();
        assert_eq!(got.dtype(), dtype);
        assert!(rel_l2(&got, &want) < tol, "temporal_conv {dtype:?}");
    }
}

/// The portable path on the shapes its tiling has to get right, each printed with its error:
/// one block of everything, many query tiles and key blocks that do not divide, a single
/// key, and grouped rows whose runs cross tile boundaries (runs of 1, 3, 3 and 1 rows in
/// tiles of 2).
#[test]
fn portable_attention_edge_cases() {
    let grouped = KvRows::Grouped { first: 2, per: 3 };
    let cases = [
        (
            "one block",
            [2, 30, 40, 2, 8],
            KvRows::Own,
            portable::attention::BLOCK_BYTES,
        ),
        ("tiles and blocks", [2, 37, 53, 3, 5], KvRows::Own, 300),
        ("one key", [3, 50, 1, 2, 4], KvRows::Own, 64),
        ("grouped runs", [8, 5, 9, 2, 3], grouped, 800),
        ("grouped blocks", [8, 5, 9, 2, 3], grouped, 40),
    ];
    for (name, dims, kv, block_bytes) in cases {
        let [q, k, v] = attention_inputs(dims, kv, 1);
        let (heads, scale) = (dims[3], 1.0 / (dims[4] as f64).sqrt());
        let got = portable::attention::attention_tiled(&q, &k, &v, heads, scale, kv, block_bytes)
            .unwrap();
        let want = attention_reference(&q, &k, &v, heads, scale, kv).unwrap();
        let err = rel_l2(&got, &want);
        eprintln!("portable attention, {name}: relative L2 {err:e}");
        assert!(err <= 1e-5, "{name}: {err:e}");
    }
}

/// Bad shapes are errors naming the op, never panics.
#[test]
fn mismatched_shapes_are_errors() {
    let x = randn(&[1, 4, 8, 8], 1);
    let g = ConvGeometry {
        in_channels: 3,
        out_channels: 2,
        kernel: 3,
        stride: 1,
        padding: 1,
    };
    let err = conv2d(&x, &randn(&[2, 3, 3, 3], 2), &randn(&[2], 3), g).unwrap_err();
    assert!(err.to_string().contains("conv2d"), "{err}");
    let q = randn(&[2, 5, 6], 4);
    let err = attention(
        &q,
        &randn(&[2, 5, 4], 5),
        &randn(&[2, 5, 4], 6),
        2,
        1.0,
        KvRows::Own,
    )
    .unwrap_err();
    assert!(err.to_string().contains("attention"), "{err}");
    let err = group_norm(&x, &randn(&[4], 7), &randn(&[4], 8), 3, 1e-5).unwrap_err();
    assert!(err.to_string().contains("group_norm"), "{err}");
}

/// The case that showed candle-nn's cancellation: 26 rows of 2 values, some nearly equal.
#[test]
fn layer_norm_of_nearly_equal_values() {
    let x = randn(&[26, 2], 712);
    let (w, b) = (randn(&[2], 713), randn(&[2], 714));
    let want = layer_norm_f64(&x, &w, &b, 1e-5);
    let got = layer_norm(&x, &w, &b, 1e-5).unwrap();
    assert!(rel_l2(&got, &want) <= 1e-5, "{:e}", rel_l2(&got, &want));
    let candle = candle_nn::ops::layer_norm(&x, &w, &b, 1e-5).unwrap();
    eprintln!(
        "relative L2 vs f64: ours {:e}, candle-nn {:e}",
        rel_l2(&got, &want),
        rel_l2(&candle, &want)
    );
}

/// Stand-in weights (zeros broadcast to a shape, as planning from a config makes them) stay
/// views when arranged; dense weights get the order asked for.
#[test]
fn weight_order_arranges_dense_weights_only() {
    let zeros = Tensor::zeros((), DType::F32, &Device::Cpu)
        .unwrap()
        .broadcast_as((64, 32))
        .unwrap();
    let kept = WeightOrder::InOut.arrange(&zeros).unwrap();
    assert_eq!(kept.stride(), zeros.stride());
    assert_eq!(WeightOrder::of(&kept), None);
    let w = randn(&[64, 32], 1);
    let t = WeightOrder::InOut.arrange(&w).unwrap();
    assert_eq!(WeightOrder::of(&t), Some(WeightOrder::InOut));
    assert_eq!(rel_l2(&t, &w), 0.0);
    let back = WeightOrder::OutIn.arrange(&t).unwrap();
    assert_eq!(WeightOrder::of(&back), Some(WeightOrder::OutIn));
}
