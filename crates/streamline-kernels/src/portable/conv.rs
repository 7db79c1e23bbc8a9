//! 2D convolution with candle's conv2d, on bands of output rows so that im2col stays bounded.
//!
//! candle's conv2d on CUDA (without cudnn) and on Metal builds the whole im2col matrix of
//! its input, `C_in*k*k` values per output pixel: 1.27 GiB per frame in f16 for the VAE's
//! 128-channel 3x3 convolutions at 576x1024. Here each call covers either several whole
//! frames or one band of output rows of one frame, so that its columns stay under a bound
//! ([`COLUMN_BYTES`]), and each call's biased result is written into one preallocated output.
//!
//! A band reads its input rows with their halo. candle pads every call on all four sides,
//! which is right at the frame's edges (left, right, and the top or bottom of the first and
//! last band) but not between bands: there the band reads real rows instead, starting early
//! enough that the rows candle computes from its own padding are whole output rows above
//! and below the band, which are dropped (at most two rows a band).

use std::ops::Range;

use candle_core::{bail, DType, Result, Tensor};

use super::tiles::{assemble, bytes, cpu_matmul_scratch, even_split, Ledger, Place};
use crate::par::runs;
use crate::ConvGeometry;

/// Bytes of im2col columns one call may build. At 576x1024 in f16 the VAE's widest
/// full-resolution convolution (128 channels, 3x3) needs 2.25 MiB of columns per output row,
/// so a band is a dozen rows: products of 12k pixels x 1152 x 128, still large enough to
/// keep a GPU busy, for 1/40 of the whole frame's columns. A band is never less than one
/// output row, so the bound holds wherever three rows' columns fit in it: at 576x1024 no
/// convolution of SVD or AnimateDiff needs more than 2.25 MiB a row in f16 (4.5 in f32).
pub const COLUMN_BYTES: usize = 32 << 20;

/// `conv2d(x, weight) + bias` of `x` `(N, C_in, H, W)` and `weight` `(C_out, C_in, k, k)`
/// (contiguous), with each call's columns under [`COLUMN_BYTES`].
pub fn conv2d(x: &Tensor, weight: &Tensor, bias: &Tensor, g: ConvGeometry) -> Result<Tensor> {
    conv2d_bounded(x, weight, bias, g, COLUMN_BYTES)
}

/// [`conv2d`] with each call's im2col columns under `column_bytes` (one output row at least),
/// for a planner that needs a bound below the default.
pub fn conv2d_bounded(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    g: ConvGeometry,
    column_bytes: usize,
) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    let k = g.kernel;
    if c != g.in_channels
        || weight.dims() != [g.out_channels, c, k, k]
        || bias.dims() != [g.out_channels]
        || h + 2 * g.padding < k
        || w + 2 * g.padding < k
        || g.stride == 0
    {
        bail!(
            "conv2d {g:?}: input {:?}, weight {:?}, bias {:?}",
            x.shape(),
            weight.shape(),
            bias.shape()
        )
    }
    let (oh, ow) = (g.out_size(h), g.out_size(w));
    let calls = plan(&g, (n, h, w), x.dtype(), column_bytes);
    let bias = bias.reshape((1, g.out_channels, 1, 1))?;
    assemble(
        (n, g.out_channels, oh, ow).into(),
        x.dtype(),
        x.device(),
        &calls,
        |call| Place {
            rows: call.frames.clone(),
            dim: 2,
            offset: call.rows.start,
        },
        |call| {
            let input = x.narrow(0, call.frames.start, call.frames.len())?.narrow(
                2,
                call.input.start,
                call.input.len(),
            )?;
            input
                .conv2d(weight, g.padding, g.stride, 1, 1)?
                .narrow(2, call.skip, call.rows.len())?
                .broadcast_add(&bias)
        },
    )
}

/// Bytes [`conv2d`] on `frames` frames `h x w` allocates besides its output: per call, what
/// candle's conv2d makes (`cpu`: its CPU paths' copies, tiles and gemm packing; otherwise
/// CUDA's and Metal's im2col columns, their NHWC product and its NCHW copy) and the biased
/// band. With the `cudnn` feature candle hands the call to cudnn instead, which makes the
/// call's result and a workspace of its own algorithm's choosing (sized at run time, and
/// bounded by the band as well): the `cpu: false` figure then counts columns and a product
/// that do not exist, and not cudnn's workspace.
pub fn conv2d_workspace(
    g: &ConvGeometry,
    frames: usize,
    h: usize,
    w: usize,
    dtype: DType,
    cpu: bool,
) -> usize {
    conv2d_bounded_workspace(g, (frames, h, w), dtype, cpu, COLUMN_BYTES)
}

/// [`conv2d_workspace`] of [`conv2d_bounded`] on `(frames, h, w)`.
pub fn conv2d_bounded_workspace(
    g: &ConvGeometry,
    (frames, h, w): (usize, usize, usize),
    dtype: DType,
    cpu: bool,
    column_bytes: usize,
) -> usize {
    let (oh, ow) = (g.out_size(h), g.out_size(w));
    let out = bytes(frames * g.out_channels * oh * ow, dtype);
    let calls = plan(g, (frames, h, w), dtype, column_bytes);
    let mut ledger = Ledger::default();
    if calls.len() > 1 {
        ledger.alloc(out);
    }
    for call in &calls {
        replay_call(&mut ledger, g, call, w, dtype, cpu);
        ledger.free(bytes(
            call.frames.len() * g.out_channels * call.rows.len() * ow,
            dtype,
        ));
    }
    ledger.peak().saturating_sub(out)
}

/// One candle conv2d call: output rows `rows` of `frames`, from input rows `input`; candle
/// computes `computed` rows of which the first `skip` are dropped (and any past the band).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Call {
    frames: Range<usize>,
    rows: Range<usize>,
    input: Range<usize>,
    skip: usize,
    computed: usize,
}

/// The calls of a convolution of `frames` frames `h x w`: chunks of whole frames when one
/// frame's columns fit in `column_bytes`, otherwise bands of each frame, as even as they can be.
fn plan(
    g: &ConvGeometry,
    (frames, h, w): (usize, usize, usize),
    dtype: DType,
    column_bytes: usize,
) -> Vec<Call> {
    let (oh, ow) = (g.out_size(h), g.out_size(w));
    let row_columns = bytes(g.in_channels * g.kernel * g.kernel * ow, dtype).max(1);
    if row_columns * oh <= column_bytes {
        let per_call = column_bytes / (row_columns * oh).max(1);
        return even_split(frames, per_call)
            .into_iter()
            .map(|frames| Call {
                frames,
                rows: 0..oh,
                input: 0..h,
                skip: 0,
                computed: oh,
            })
            .collect();
    }
    let max_rows = (column_bytes / row_columns)
        .saturating_sub(extra_rows(g))
        .max(1);
    let bands = even_split(oh, max_rows);
    (0..frames)
        .flat_map(|f| bands.iter().map(move |rows| band(g, h, f, rows.clone())))
        .collect()
}

/// Most rows candle computes beyond a band: whole output rows from its top and bottom
/// padding.
fn extra_rows(g: &ConvGeometry) -> usize {
    2 * g.padding.div_ceil(g.stride)
}

/// The call for output rows `rows` of frame `frame` of height `h`.
fn band(g: &ConvGeometry, h: usize, frame: usize, rows: Range<usize>) -> Call {
    let (k, s, p) = (g.kernel, g.stride, g.padding);
    // At the top edge candle's padding is the frame's; below it, start whole output rows
    // early so that the rows computed from candle's padding are dropped. A band that reads
    // nothing but the bottom padding (a padded 1x1 kernel's last row) starts on the last
    // input row it can align with. Any multiple of the stride aligns with the band.
    let start = if rows.start * s < p {
        0
    } else {
        (rows.start - p.div_ceil(s)) * s
    };
    let start = start.min((h - 1) / s * s);
    let skip = rows.start - start / s;
    // One past the last input row the band reads; past the frame, candle's padding is right.
    let end = ((rows.end - 1) * s + k)
        .saturating_sub(p)
        .min(h)
        .max(start + 1);
    Call {
        frames: frame..frame + 1,
        computed: (end - start + 2 * p - k) / s + 1,
        rows,
        input: start..end,
        skip,
    }
}

/// One call on a ledger: what candle's conv2d makes, then the biased band (left live) with
/// candle's result freed.
fn replay_call(l: &mut Ledger, g: &ConvGeometry, call: &Call, w: usize, dtype: DType, cpu: bool) {
    let (nf, ow) = (call.frames.len(), g.out_size(w));
    let pixels = call.computed * ow;
    let depth = g.in_channels * g.kernel * g.kernel;
    let result = bytes(nf * g.out_channels * pixels, dtype);
    if cpu {
        replay_cpu_conv(l, g, (nf, call.input.len(), w), pixels, dtype);
    } else {
        // im2col's columns and the NHWC product stay live until the NCHW copy exists.
        let scratch = bytes(nf * pixels * (depth + g.out_channels), dtype);
        l.alloc(scratch);
        l.alloc(result);
        l.free(scratch);
    }
    l.alloc(bytes(nf * g.out_channels * call.rows.len() * ow, dtype));
    l.free(result);
}

/// candle 0.11's CPU conv2d on `nf` frames of `rows x w` input making `pixels` output pixels
/// each, its result left live. 1x1 stride-1 unpadded convolutions copy each frame to a
/// `(C_in, pixels)` matrix and take its product, frames in parallel; other 1x1 convolutions
/// build the full im2col matrix, its NHWC product and the NCHW copy; larger kernels copy the
/// input to NHWC and the weight to `(C_out, k*k*C_in)`, then run 512-pixel tiles in parallel,
/// each with its columns, coordinates and product.
fn replay_cpu_conv(
    l: &mut Ledger,
    g: &ConvGeometry,
    (nf, rows, w): (usize, usize, usize),
    pixels: usize,
    dtype: DType,
) {
    let (ci, co) = (g.in_channels, g.out_channels);
    let depth = ci * g.kernel * g.kernel;
    let result = bytes(nf * co * pixels, dtype);
    if g.kernel == 1 && g.stride == 1 && g.padding == 0 {
        l.alloc(result);
        let gemm = cpu_matmul_scratch((co, pixels, ci), 1, 1, dtype);
        l.transient(runs(nf) * (bytes((ci + co) * pixels, dtype) + gemm));
    } else if g.kernel == 1 {
        let (columns, product) = (bytes(nf * pixels * depth, dtype), result);
        l.alloc(columns + product);
        // The weight enters transposed: column-major.
        l.transient(cpu_matmul_scratch(
            (nf * pixels, co, depth),
            1,
            depth,
            dtype,
        ));
        l.alloc(result);
        l.free(columns + product);
    } else {
        const TILE: usize = 512;
        let tile = pixels.min(TILE);
        let copies = bytes(nf * ci * rows * w + co * depth, dtype);
        let gemm = cpu_matmul_scratch((co, tile, depth), 1, 1, dtype);
        let coordinates = tile * std::mem::size_of::<(usize, usize)>();
        let task = coordinates + bytes((depth + co) * tile, dtype) + gemm;
        l.alloc(result);
        l.alloc(copies);
        l.transient(runs(nf * pixels.div_ceil(TILE)) * task);
        l.free(copies);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geometry(kernel: usize, stride: usize, padding: usize) -> ConvGeometry {
        ConvGeometry {
            in_channels: 4,
            out_channels: 4,
            kernel,
            stride,
            padding,
        }
    }

    /// Bands cover every output row once, read only rows of the frame, and candle's rows
    /// line up: the band's first output row is `skip` rows into what candle computes.
    #[test]
    fn bands_tile_the_output_and_align() {
        for (k, s, p) in [
            (3, 1, 1),
            (3, 2, 1),
            (3, 1, 0),
            (3, 2, 0),
            (1, 1, 0),
            (1, 1, 1),
            (1, 2, 1),
        ] {
            let g = geometry(k, s, p);
            for h in [1, 2, 5, 8, 9, 31].into_iter().filter(|h| h + 2 * p >= k) {
                let oh = g.out_size(h);
                for max_rows in 1..oh + 1 {
                    let bands = even_split(oh, max_rows);
                    let calls: Vec<Call> =
                        bands.iter().map(|r| band(&g, h, 0, r.clone())).collect();
                    for c in &calls {
                        assert!(c.input.end <= h && c.input.start < c.input.end, "{c:?}");
                        assert!(c.skip + c.rows.len() <= c.computed, "{g:?} h {h}: {c:?}");
                        // Output row `o` of the frame reads from virtual row o*s - p; candle's
                        // row j of the call reads from input.start - p + j*s.
                        let first = (c.input.start + c.skip * s) as isize - p as isize;
                        assert_eq!(first, (c.rows.start * s) as isize - p as isize, "{c:?}");
                        assert!(c.computed - c.rows.len() <= extra_rows(&g), "{c:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn calls_keep_columns_under_the_bound() {
        let g = ConvGeometry {
            in_channels: 128,
            out_channels: 128,
            kernel: 3,
            stride: 1,
            padding: 1,
        };
        let (h, w) = (576, 1024);
        let calls = plan(&g, (2, h, w), DType::F16, COLUMN_BYTES);
        assert!(calls.len() > 2 * 40);
        for c in &calls {
            let columns = bytes(c.computed * w * 128 * 9, DType::F16);
            assert!(columns <= COLUMN_BYTES, "{c:?}: {columns}");
        }
        // Small frames go several to a call.
        let calls = plan(&g, (14, 8, 8), DType::F16, COLUMN_BYTES);
        assert_eq!(calls.len(), 1);
    }
}
