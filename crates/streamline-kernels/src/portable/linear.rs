//! Products with candle's ops, in tiles of rows: linear layers, GEGLU, the `(k, 1, 1)`
//! temporal convolution, and SiLU.
//!
//! candle's matmul writes the product and `broadcast_add` a biased copy of it: two buffers
//! of the output's size. Here each tile of rows (at most [`TILE_BYTES`] of product) makes its
//! product and biased copy and is written into the output, so the extra buffers are a
//! tile's, however many rows there are; one tile is the output itself.

use candle_core::{bail, DType, Result, Tensor, D};

pub use super::tiles::TILE_BYTES;
use super::tiles::{
    assemble, bytes, cpu_matmul_scratch, largest_tile, row_tiles, tiled_workspace, Ledger, Place,
};

/// `x @ w^T + b` over the last dim of `x` (any rank; a strided `x` is copied first), `w`
/// `(out, in)`, in the dtype of `x`, a tile of rows at a time.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let (out_dim, in_dim) = w.dims2()?;
    let rows = rows_of(x, in_dim, "linear")?;
    let (x2, wt) = (x.reshape((rows, in_dim))?, w.t()?);
    let tiles = row_tiles(rows, bytes(out_dim, x.dtype()));
    let y = assemble(
        (rows, out_dim).into(),
        x.dtype(),
        x.device(),
        &tiles,
        |t| Place::rows(t.clone()),
        |t| biased_product(&x2.narrow(0, t.start, t.len())?, &wt, b),
    )?;
    y.reshape(with_last(x.dims(), out_dim))
}

/// Bytes [`linear`] allocates on `rows` rows besides its output, with a bias (`biased`) or
/// not: per tile the product and its biased copy, and on the CPU gemm's packing.
pub fn linear_workspace(
    rows: usize,
    in_dim: usize,
    out_dim: usize,
    biased: bool,
    dtype: DType,
    cpu: bool,
) -> usize {
    let (tile, tiles) = largest_tile(rows, bytes(out_dim, dtype));
    tiled_workspace(bytes(rows * out_dim, dtype), tiles, |l| {
        replay_biased_product(l, (tile, in_dim, out_dim), biased, dtype, cpu)
    })
}

/// The rows of `x` over a last dim of `in_dim`, refused (naming `op`) when it has another.
fn rows_of(x: &Tensor, in_dim: usize, op: &str) -> Result<usize> {
    if x.rank() == 0 || x.dim(D::Minus1)? != in_dim {
        bail!("{op}: input {:?} for weights of {in_dim} inputs", x.shape())
    }
    Ok(x.elem_count() / in_dim.max(1))
}

fn with_last(dims: &[usize], last: usize) -> Vec<usize> {
    let mut dims = dims.to_vec();
    if let Some(l) = dims.last_mut() {
        *l = last;
    }
    dims
}

/// `x @ wt + b` of one tile, `wt` the transposed weight (a view).
fn biased_product(x: &Tensor, wt: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let product = x.matmul(wt)?;
    match b {
        Some(b) => product.broadcast_add(b),
        None => Ok(product),
    }
}

/// [`biased_product`] of `rows` rows on a ledger, its result left live.
fn replay_biased_product(
    l: &mut Ledger,
    (rows, in_dim, out_dim): (usize, usize, usize),
    biased: bool,
    dtype: DType,
    cpu: bool,
) {
    let product = bytes(rows * out_dim, dtype);
    l.alloc(product);
    if cpu {
        // x is row-major, the weight's transpose column-major.
        l.transient(cpu_matmul_scratch(
            (rows, out_dim, in_dim),
            1,
            in_dim,
            dtype,
        ));
    }
    if biased {
        l.alloc(product);
        l.free(product);
    }
}

/// diffusers' GEGLU over the last dim of `x`: `(x @ w_h^T + b_h) * gelu_erf(x @ w_g^T +
/// b_g)`, `w_h` and `w_g` `(inner, in)`, a tile of rows at a time, so the hidden half, the
/// gate and its GELU are a tile's each.
pub fn linear_geglu(
    x: &Tensor,
    [w_h, w_g]: [&Tensor; 2],
    [b_h, b_g]: [Option<&Tensor>; 2],
) -> Result<Tensor> {
    let (inner, in_dim) = w_h.dims2()?;
    if w_g.dims2()? != (inner, in_dim) {
        bail!("geglu: weights {:?} and {:?}", w_h.shape(), w_g.shape())
    }
    let rows = rows_of(x, in_dim, "geglu")?;
    let (x2, wht, wgt) = (x.reshape((rows, in_dim))?, w_h.t()?, w_g.t()?);
    let tiles = row_tiles(rows, bytes(inner, x.dtype()));
    let y = assemble(
        (rows, inner).into(),
        x.dtype(),
        x.device(),
        &tiles,
        |t| Place::rows(t.clone()),
        |t| {
            let xt = x2.narrow(0, t.start, t.len())?;
            let h = biased_product(&xt, &wht, b_h)?;
            let gate = biased_product(&xt, &wgt, b_g)?.gelu_erf()?;
            h * gate
        },
    )?;
    y.reshape(with_last(x.dims(), inner))
}

/// Bytes [`linear_geglu`] allocates on `rows` rows besides its output, with biases
/// (`biased`) or not: per tile both biased products, the GELU of the gate and the gated
/// result, and on the CPU gemm's packing.
pub fn linear_geglu_workspace(
    rows: usize,
    in_dim: usize,
    inner: usize,
    biased: bool,
    dtype: DType,
    cpu: bool,
) -> usize {
    let (tile, tiles) = largest_tile(rows, bytes(inner, dtype));
    tiled_workspace(bytes(rows * inner, dtype), tiles, |l| {
        let half = bytes(tile * inner, dtype);
        replay_biased_product(l, (tile, in_dim, inner), biased, dtype, cpu);
        replay_biased_product(l, (tile, in_dim, inner), biased, dtype, cpu);
        // GELU of the gate, the gate freed; the gated result, both halves freed.
        l.alloc(half);
        l.free(half);
        l.alloc(half);
        l.free(2 * half);
    })
}

/// The `(k, 1, 1)` convolution over the frames of position-major `x` `(P, T, C_in)`, zero
/// padded by `k / 2` frames, with `taps` `(k * C_in, C_out)` (row `j * C_in + ci` holds tap
/// `j` of input channel `ci`) and `bias` `(C_out)`, all of `x`'s dtype. A tile of positions
/// at a time gathers its rows `[x(t - k/2) .. x(t + k/2)]` side by side from a padded copy
/// and takes one product, so the padded copy, those rows and the product are a tile's. (A
/// concatenation of the shifted frames would not do: their positions are not contiguous, so
/// candle would concatenate transposed and copy the result once more.)
pub fn temporal_conv(x: &Tensor, taps: &Tensor, bias: &Tensor, kernel: usize) -> Result<Tensor> {
    let (p, t, cin) = x.dims3()?;
    let cout = bias.dim(0)?;
    if kernel == 0 || taps.dims2()? != (kernel * cin, cout) {
        bail!(
            "temporal_conv: input {:?}, taps {:?}, kernel {kernel}, {cout} biases",
            x.shape(),
            taps.shape()
        )
    }
    let pad = kernel / 2;
    // Frame `t + j` of the padded copy is tap `j` of output frame `t`.
    let frames: Vec<u32> = (0..t)
        .flat_map(|f| (f..f + kernel).map(|i| i as u32))
        .collect();
    let frames = Tensor::from_vec(frames, t * kernel, x.device())?;
    let tiles = row_tiles(p, temporal_row_bytes(t, cin, cout, kernel, x.dtype()));
    assemble(
        (p, t, cout).into(),
        x.dtype(),
        x.device(),
        &tiles,
        |r| Place::rows(r.clone()),
        |r| {
            let padded = x
                .narrow(0, r.start, r.len())?
                .pad_with_zeros(1, pad, kernel - 1 - pad)?;
            let cols = padded.index_select(&frames, 1)?;
            drop(padded);
            let product = cols.reshape((r.len() * t, kernel * cin))?.matmul(taps)?;
            drop(cols);
            product.reshape((r.len(), t, cout))?.broadcast_add(bias)
        },
    )
}

/// Bytes per position of [`temporal_conv`]'s widest temporary: its rows side by side, or
/// its product.
fn temporal_row_bytes(t: usize, cin: usize, cout: usize, kernel: usize, dtype: DType) -> usize {
    bytes(t * cin * kernel.max(1), dtype).max(bytes(t * cout, dtype))
}

/// Bytes [`temporal_conv`] on `positions` positions of `t` frames allocates besides its
/// output: the gathered frames' indices, and per tile the zero frames and the padded copy,
/// the rows side by side, the product and its biased copy, and on the CPU gemm's packing.
pub fn temporal_conv_workspace(
    positions: usize,
    t: usize,
    in_channels: usize,
    out_channels: usize,
    kernel: usize,
    dtype: DType,
    cpu: bool,
) -> usize {
    let (cin, cout) = (in_channels, out_channels);
    let (tile, tiles) = largest_tile(positions, temporal_row_bytes(t, cin, cout, kernel, dtype));
    let indices = bytes(t * kernel, DType::U32);
    indices
        + tiled_workspace(bytes(positions * t * cout, dtype), tiles, |l| {
            let frames = |n: usize| bytes(tile * n * cin, dtype);
            let (before, after) = (kernel / 2, kernel.saturating_sub(1 + kernel / 2));
            let (padded, cols) = (frames(t + before + after), frames(t * kernel));
            if kernel > 1 {
                // pad_with_zeros makes the zero frames of each end, then their concatenation.
                l.alloc(frames(before) + frames(after));
                l.alloc(padded);
                l.free(frames(before) + frames(after));
            }
            l.alloc(cols);
            if kernel > 1 {
                l.free(padded);
            }
            let product = bytes(tile * t * cout, dtype);
            l.alloc(product);
            if cpu {
                let dims = (tile * t, cout, kernel * cin);
                l.transient(cpu_matmul_scratch(dims, 1, 1, dtype));
            }
            l.free(cols);
            l.alloc(product);
            l.free(product);
        })
}

/// `x * sigmoid(x)`: candle's unary op, which allocates its output and nothing else.
pub fn silu(x: &Tensor) -> Result<Tensor> {
    x.silu()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tiles bound the extra buffers: past one tile the workspace stops growing with rows.
    #[test]
    fn tiled_workspace_is_bounded() {
        let ws = |rows| linear_workspace(rows, 320, 320, true, DType::F16, false);
        let tile_rows = TILE_BYTES / (320 * 2);
        assert_eq!(ws(10), 2 * 10 * 320 * 2 - 10 * 320 * 2);
        assert!(ws(100 * tile_rows) <= 2 * TILE_BYTES);
        assert_eq!(ws(100 * tile_rows), ws(200 * tile_rows));
    }
}
