//! Every op's declared workspace is the heap its forward really allocates, and tiled ops keep
//! their workspace within a limit with unchanged results.
//!
//! Measured workspace = heap peak during one forward call (after a warm-up call, from a
//! baseline taken once the inputs exist) minus the output's bytes. The planner adds the
//! declared figure on top of the live tensors while the op runs, so it must be neither below
//! what is measured (the plan would be optimistic) nor far above it (the plan would be loose).
//!
//! One test in its own binary with a counting global allocator, so nothing else allocates
//! while it measures.

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use std::ops::Range;
use streamline_ir::alloc::{peak_bytes, reset_peak, TrackingAllocator};

use streamline_ir::testing::rel_l2;
use streamline_ir::{Axis, Layout, Op, RowBand, SliceCtx, ValueInfo};
use streamline_models::ops::*;

#[global_allocator]
static ALLOC: TrackingAllocator = TrackingAllocator;

/// Slack for small buffers no formula tracks (tensor headers, shape vectors, rayon jobs).
const SLACK: usize = 64 * 1024;

/// Random weights of whatever shape a layer asks for, scaled by fan-in.
struct RandomWeights;

impl SimpleBackend for RandomWeights {
    fn get(
        &self,
        s: Shape,
        _: &str,
        _: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let fan_in: usize = s.dims().iter().skip(1).product::<usize>().max(1);
        Tensor::randn(0f32, (1.0 / fan_in as f32).sqrt(), s, dev)?.to_dtype(dtype)
    }
    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("no shape for {name}")
    }
    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

fn vb(dtype: DType) -> VarBuilder<'static> {
    VarBuilder::from_backend(Box::new(RandomWeights), dtype, Device::Cpu)
}

fn randn(dims: &[usize], dtype: DType) -> Tensor {
    Tensor::randn(0f32, 1.0, dims, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

fn bytes(t: &Tensor) -> usize {
    t.elem_count() * t.dtype().size_in_bytes()
}

fn info(t: &Tensor) -> ValueInfo {
    ValueInfo::new(t.shape().clone(), t.dtype(), Layout::WHOLE)
}

fn mib(b: usize) -> f64 {
    b as f64 / (1 << 20) as f64
}

/// One op call to measure: inputs as the executor hands them over, and the slice context.
struct Case {
    name: String,
    op: Box<dyn Op>,
    inputs: Vec<Tensor>,
    ctx: SliceCtx,
}

fn case(name: &str, op: impl Op + 'static, inputs: Vec<Tensor>) -> Case {
    Case {
        name: name.to_string(),
        op: Box::new(op),
        inputs,
        ctx: SliceCtx::whole(),
    }
}

/// The same call run slice `range` of an axis of length `len`: the first input narrowed, the
/// others whole (per-batch values, statistics), unless `gathers` (the op reads it whole).
fn sliced(
    mut c: Case,
    axis: Axis,
    range: std::ops::Range<usize>,
    len: usize,
    gathers: bool,
) -> Case {
    if !gathers {
        c.inputs[0] = c.inputs[0]
            .narrow(0, range.start, range.len())
            .unwrap()
            .contiguous()
            .unwrap();
    }
    c.name = format!("{} [{}..{} of {len}]", c.name, range.start, range.end);
    c.ctx = SliceCtx {
        axis: Some(axis),
        range,
        len,
        ..SliceCtx::whole()
    };
    c
}

/// The same call on a band of rows: output rows `out` of `out_len`, from input rows `input`
/// of `input_len` (the inputs are already the band's).
fn banded(
    mut c: Case,
    (out, out_len): (Range<usize>, usize),
    (input, input_len): (Range<usize>, usize),
) -> Case {
    c.name = format!("{} on rows {}..{} of {out_len}", c.name, out.start, out.end);
    c.ctx = SliceCtx {
        axis: Some(Axis::Rows),
        range: out.clone(),
        len: out_len,
        band: Some(RowBand {
            out,
            out_len,
            input,
            input_len,
        }),
        ..SliceCtx::whole()
    };
    c
}

struct Measured {
    declared: usize,
    measured: usize,
    out: Tensor,
}

fn measure(c: &Case) -> Measured {
    let refs: Vec<&Tensor> = c.inputs.iter().collect();
    // Warm up so thread pools and gemm's per-thread buffers are not charged to the call.
    drop(c.op.forward(&refs, &c.ctx).unwrap());
    let base = reset_peak();
    // The executor makes every output contiguous.
    let out = c.op.forward(&refs, &c.ctx).unwrap().contiguous().unwrap();
    let measured = (peak_bytes() - base).saturating_sub(bytes(&out));
    let infos: Vec<ValueInfo> = c.inputs.iter().map(info).collect();
    let in_refs: Vec<&ValueInfo> = infos.iter().collect();
    let declared =
        c.op.workspace_bytes(&in_refs, &info(&out), c.ctx.workspace());
    Measured {
        declared,
        measured,
        out,
    }
}

/// Declared and measured workspace agree: never below, at most 10% above.
fn check(c: &Case, m: &Measured, failures: &mut Vec<String>) {
    let line = format!(
        "{:<58} declared {:>10.3} MiB  measured {:>10.3} MiB",
        c.name,
        mib(m.declared),
        mib(m.measured)
    );
    println!("{line}");
    let tight = m.measured <= m.declared + SLACK
        && m.declared as f64 <= 1.1 * m.measured as f64 + SLACK as f64;
    if !tight {
        failures.push(line);
    }
}

/// Run `c` untiled and under each of `limits`: the tiled declarations stay within their
/// limits, every declaration is honest, and the tiled results equal the untiled one.
fn check_tiled(mut c: Case, limits: impl Fn(usize) -> Vec<usize>, failures: &mut Vec<String>) {
    let whole = measure(&c);
    check(&c, &whole, failures);
    let name = c.name.clone();
    for limit in limits(whole.declared) {
        c.ctx.workspace_limit = Some(limit);
        c.name = format!("{name} ws<={:.2}MiB", mib(limit));
        let tiled = measure(&c);
        check(&c, &tiled, failures);
        if tiled.declared > limit {
            failures.push(format!(
                "{}: tiled workspace {} above the limit {limit}",
                c.name, tiled.declared
            ));
        }
        let err = rel_l2(&tiled.out, &whole.out);
        if err > 1e-6 {
            failures.push(format!("{}: tiled result differs by {err:e}", c.name));
        }
    }
}

fn attention(q: usize, heads: usize, dh: usize, ctx: Context, bias: bool, dt: DType) -> Attention {
    Attention::new(q, heads, dh, ctx, bias, vb(dt)).unwrap()
}

fn per_batch(rows_per_batch: usize, context_dim: usize) -> Context {
    Context::PerBatch {
        rows_per_batch,
        context_dim,
    }
}

#[test]
fn declared_workspace_matches_heap() {
    let f32_ = DType::F32;
    let dims = VideoDims {
        batch: 2,
        frames: 14,
        height: 64,
        width: 64,
    };
    let (frames, positions) = (dims.frames_len(), dims.positions_len());
    let feat = randn(&[frames, 64, 64, 64], f32_);
    let feat128 = randn(&[frames, 128, 32, 32], f32_);
    let tokens = randn(&[frames, 4096, 64], f32_);
    let pos = randn(&[positions, 14, 64], f32_);
    let pos_f16 = pos.to_dtype(DType::F16).unwrap();
    let context = randn(&[2, 1, 256], f32_);
    let emb = randn(&[2, 64], f32_);
    let stats_op = GroupNormStats::new(dims, 64, 32).unwrap();
    let stats = stats_op.forward(&[&pos], &SliceCtx::whole()).unwrap();
    let norm_apply =
        GroupNormApply::new(dims, 32, 1e-6, &randn(&[64], f32_), &randn(&[64], f32_)).unwrap();
    let conv = |i: usize, o: usize, k: usize, s: usize, p: usize| {
        Conv2d::new(i, o, k, s, p, vb(f32_)).unwrap()
    };
    let mut failures = Vec::new();

    // Ops measured untiled.
    let plain = vec![
        case(
            "conv2d 8->64 k3 (28,8,64,64)",
            conv(8, 64, 3, 1, 1),
            vec![randn(&[frames, 8, 64, 64], f32_)],
        ),
        case("silu (28,64,64,64)", Silu, vec![feat.clone()]),
        case(
            "upsample_nearest 2x (28,128,32,32)",
            UpsampleNearest::new((32, 32), 64, 64),
            vec![feat128.clone()],
        ),
        case(
            "upsample_nearest to a skip's odd size (28,128,32,32)",
            UpsampleNearest::new((32, 32), 63, 61),
            vec![feat128.clone()],
        ),
        case("add", Add, vec![feat.clone(), feat.clone()]),
        case("concat", ConcatChannels, vec![feat.clone(), feat.clone()]),
        case(
            "to_tokens",
            Tokens {
                height: 64,
                width: 64,
                to_tokens: true,
            },
            vec![feat.clone()],
        ),
        case(
            "from_tokens",
            Tokens {
                height: 64,
                width: 64,
                to_tokens: false,
            },
            vec![tokens.clone()],
        ),
        case(
            "layer_norm (28,4096,64)",
            LayerNorm::new(64, 1e-5, vb(f32_)).unwrap(),
            vec![tokens.clone()],
        ),
        case(
            "frames_to_positions",
            FramesToPositions {
                dims,
                channels: 64,
                from: FrameLayout::ChannelsFirst,
            },
            vec![feat.clone()],
        ),
        sliced(
            case(
                "frames_to_positions",
                FramesToPositions {
                    dims,
                    channels: 64,
                    from: FrameLayout::ChannelsFirst,
                },
                vec![feat.clone()],
            ),
            Axis::Positions,
            3000..6000,
            positions,
            true,
        ),
        case(
            "positions_to_frames",
            PositionsToFrames {
                dims,
                channels: 64,
                to: FrameLayout::ChannelsFirst,
            },
            vec![pos.clone()],
        ),
        case(
            "positions_to_frames tokens",
            PositionsToFrames {
                dims,
                channels: 64,
                to: FrameLayout::Tokens,
            },
            vec![pos.clone()],
        ),
        case(
            "add_broadcast (8192,14,64)+(14,64)",
            AddBroadcast,
            vec![pos.clone(), randn(&[14, 64], f32_)],
        ),
        case(
            "linear 320->1280 (2,320)",
            Linear::new(320, 1280, true, vb(f32_)).unwrap(),
            vec![randn(&[2, 320], f32_)],
        ),
        case(
            "sinusoid (2,3)x256",
            Sinusoid {
                dim: 256,
                flip_sin_to_cos: true,
                downscale_freq_shift: 0.0,
                dtype: f32_,
            },
            vec![randn(&[2, 3], f32_)],
        ),
        case("const", Const::arange(14, &Device::Cpu).unwrap(), vec![]),
        // On f32 the CPU kernels need only per-batch tables, whatever the rows: nothing to
        // tile (the half-type cases below tile).
        sliced(
            case(
                "add_batch_emb positions",
                AddBatchEmb {
                    rows_per_batch: 4096,
                    channel_dim: 2,
                },
                vec![pos.clone(), emb.clone()],
            ),
            Axis::Positions,
            3000..6000,
            positions,
            false,
        ),
        case(
            "group_norm_apply (8192,14,64)",
            norm_apply.clone(),
            vec![pos.clone(), stats.clone()],
        ),
        sliced(
            case(
                "group_norm_apply",
                norm_apply.clone(),
                vec![pos.clone(), stats.clone()],
            ),
            Axis::Positions,
            3000..6000,
            positions,
            false,
        ),
        case(
            "add_batch_emb frames",
            AddBatchEmb {
                rows_per_batch: 14,
                channel_dim: 1,
            },
            vec![feat.clone(), emb.clone()],
        ),
        // An f32 linear (or GEGLU) on the CPU allocates only gemm's packed weight (and one
        // tile's gate) per thread, whatever the rows: nothing to tile (half types take
        // candle's path, tiled below).
        case(
            "geglu 64->256 (28,4096,64)",
            Geglu::new(64, 256, vb(f32_)).unwrap(),
            vec![tokens.clone()],
        ),
        case(
            "linear 64->64 (28,4096,64)",
            Linear::new(64, 64, true, vb(f32_)).unwrap(),
            vec![tokens.clone()],
        ),
        case(
            "linear 64->64 (8192,14,64)",
            Linear::new(64, 64, true, vb(f32_)).unwrap(),
            vec![pos.clone()],
        ),
        case(
            "linear 256->64 (28,4096,256)",
            Linear::new(256, 64, true, vb(f32_)).unwrap(),
            vec![randn(&[frames, 4096, 256], f32_)],
        ),
        // GroupNorm's kernel needs at most one (frame, group) block per thread, whatever
        // the chunk: nothing to tile.
        case(
            "group_norm (28,64,64,64)",
            GroupNormFrames::new(32, 64, 1e-5, vb(f32_)).unwrap(),
            vec![feat.clone()],
        ),
        case(
            "group_norm (28,128,32,32)",
            GroupNormFrames::new(32, 128, 1e-5, vb(f32_)).unwrap(),
            vec![feat128.clone()],
        ),
        case(
            "group_norm f16 (28,64,64,64)",
            GroupNormFrames::new(32, 64, 1e-5, vb(DType::F16)).unwrap(),
            vec![feat.to_dtype(DType::F16).unwrap()],
        ),
    ];
    for c in &plain {
        check(c, &measure(c), &mut failures);
    }

    // Ops that tile, each untiled and under a limit a quarter of its workspace.
    let tiled = vec![
        case("pad_end (28,128,32,32)", PadEnd, vec![feat128.clone()]),
        case(
            "blend",
            Blend::learned(false, vb(f32_)).unwrap(),
            vec![feat.clone(), feat.clone()],
        ),
        sliced(
            case(
                "add_batch_emb positions f16",
                AddBatchEmb {
                    rows_per_batch: 4096,
                    channel_dim: 2,
                },
                vec![pos_f16.clone(), emb.to_dtype(DType::F16).unwrap()],
            ),
            Axis::Positions,
            3000..6000,
            positions,
            false,
        ),
        case(
            "linear f16 64->64 (28,4096,64)",
            Linear::new(64, 64, true, vb(DType::F16)).unwrap(),
            vec![tokens.to_dtype(DType::F16).unwrap()],
        ),
        case(
            "geglu f16 64->256 (28,4096,64)",
            Geglu::new(64, 256, vb(DType::F16)).unwrap(),
            vec![tokens.to_dtype(DType::F16).unwrap()],
        ),
        case(
            "temporal_conv 64->64 k3",
            TemporalConv::new(64, 64, 3, vb(f32_)).unwrap(),
            vec![pos.clone()],
        ),
        case(
            "group_norm_stats (8192,14,64)",
            stats_op.clone(),
            vec![pos.clone()],
        ),
        sliced(
            case("group_norm_stats", stats_op.clone(), vec![pos.clone()]),
            Axis::Positions,
            3000..6000,
            positions,
            false,
        ),
        case(
            "group_norm_apply f16 (8192,14,64)",
            norm_apply.clone(),
            vec![pos_f16.clone(), stats.clone()],
        ),
        sliced(
            case(
                "group_norm_apply f16",
                norm_apply.clone(),
                vec![pos_f16.clone(), stats.clone()],
            ),
            Axis::Positions,
            3000..6000,
            positions,
            false,
        ),
        case(
            "temporal self-attn 1x64 (8192,14,64)",
            attention(64, 1, 64, Context::SelfAttention, false, f32_),
            vec![pos.clone()],
        ),
        case(
            "temporal self-attn 2x32 (8192,14,64)",
            attention(64, 2, 32, Context::SelfAttention, false, f32_),
            vec![pos.clone()],
        ),
        case(
            "temporal self-attn 2x32 f16",
            attention(64, 2, 32, Context::SelfAttention, false, DType::F16),
            vec![pos.to_dtype(DType::F16).unwrap()],
        ),
        case(
            "temporal cross-attn (8192,14,64) ctx (2,1,256)",
            attention(64, 1, 64, per_batch(4096, 256), false, f32_),
            vec![pos.clone(), context.clone()],
        ),
        sliced(
            case(
                "temporal cross-attn",
                attention(64, 2, 32, per_batch(4096, 256), false, f32_),
                vec![pos.clone(), context.clone()],
            ),
            Axis::Positions,
            3000..6000,
            positions,
            false,
        ),
        case(
            "spatial cross-attn (28,4096,64) ctx (2,1,256)",
            attention(64, 1, 64, per_batch(14, 256), false, f32_),
            vec![tokens.clone(), context.clone()],
        ),
        case(
            "vae self-attn 1x128 qkv bias (4,1024,128)",
            attention(128, 1, 128, Context::SelfAttention, true, f32_),
            vec![randn(&[4, 1024, 128], f32_)],
        ),
    ];
    for c in tiled {
        check_tiled(c, |ws| vec![ws / 4], &mut failures);
    }

    // Convolutions, down to bands of output rows of one frame.
    let convs = vec![
        case(
            "conv2d 64->64 k3 (28,64,64,64)",
            conv(64, 64, 3, 1, 1),
            vec![feat.clone()],
        ),
        case(
            "conv2d 128->128 k3 (28,128,32,32)",
            conv(128, 128, 3, 1, 1),
            vec![feat128.clone()],
        ),
        case(
            "conv2d 64->64 k3 s2",
            conv(64, 64, 3, 2, 1),
            vec![feat.clone()],
        ),
        case(
            "conv2d 64->128 k1",
            conv(64, 128, 1, 1, 0),
            vec![feat.clone()],
        ),
    ];
    for c in convs {
        check_tiled(c, |ws| vec![ws / 4, 2 << 20, 1 << 20], &mut failures);
    }

    // Ops on bands of rows: a convolution's window padded at one edge or at none, upsampling
    // cut to an odd first row, per-frame statistics and their application, temporal
    // statistics of a band of positions.
    let band = |rows: usize| randn(&[frames, 64, rows, 64], f32_);
    let (frame_stats, frame_apply) = GroupNormFrames::new(32, 64, 1e-6, vb(f32_))
        .unwrap()
        .split();
    let moments = frame_stats
        .forward(&[&band(8)], &SliceCtx::whole())
        .unwrap();
    let banded_plain = vec![
        banded(
            case(
                "conv2d 64->64 k3 band",
                conv(64, 64, 3, 1, 1),
                vec![band(10)],
            ),
            (4..12, 64),
            (3..13, 64),
        ),
        banded(
            case(
                "conv2d 64->64 k3 top band",
                conv(64, 64, 3, 1, 1),
                vec![band(9)],
            ),
            (0..8, 64),
            (0..9, 64),
        ),
        banded(
            case(
                "conv2d 64->64 k3 s2 bottom band",
                conv(64, 64, 3, 2, 1),
                vec![band(9)],
            ),
            (28..32, 32),
            (55..64, 64),
        ),
        banded(
            case(
                "upsample_nearest 2x band",
                UpsampleNearest::new((32, 32), 64, 64),
                vec![randn(&[frames, 128, 4, 32], f32_)],
            ),
            (5..12, 64),
            (2..6, 32),
        ),
    ];
    let banded_tiled = vec![
        banded(
            case("group_norm_frame_stats band", frame_stats, vec![band(8)]),
            (8..16, 64),
            (8..16, 64),
        ),
        banded(
            case(
                "group_norm_frame_apply band",
                frame_apply,
                vec![band(8), moments],
            ),
            (8..16, 64),
            (8..16, 64),
        ),
        banded(
            case(
                "group_norm_stats band (2*8*64,14,64)",
                stats_op.clone(),
                vec![randn(&[2 * 8 * 64, 14, 64], f32_)],
            ),
            (8..16, 64),
            (8..16, 64),
        ),
    ];
    // Untiled only: a band's convolution tiles whole frames alone (one frame's band is its
    // smallest call), and upsampling never tiles.
    for c in banded_plain {
        check(&c, &measure(&c), &mut failures);
    }
    for c in banded_tiled {
        check_tiled(c, |ws| vec![ws / 4], &mut failures);
    }

    // Spatial self-attention at full size: a 1.9 GB score tensor untiled. Tiled to a quarter
    // (row chunks), then below one row's need (query chunks of one row).
    let c = case(
        "spatial self-attn 1x64 (28,4096,64)",
        attention(64, 1, 64, Context::SelfAttention, false, f32_),
        vec![tokens.clone()],
    );
    check_tiled(c, |ws| vec![ws / 4, 48 << 20], &mut failures);

    assert!(
        failures.is_empty(),
        "workspace mismatches:\n{}",
        failures.join("\n")
    );
}
