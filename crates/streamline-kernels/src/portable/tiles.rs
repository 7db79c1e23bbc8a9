//! What the portable ops share: tiles of rows under a byte bound, tiles written into one
//! preallocated output, a ledger that replays an op's allocations to declare its workspace,
//! and the heap candle's CPU matmul takes inside gemm.
//!
//! candle's ops allocate their result and, on a GPU, nothing else, so an op built from them
//! holds exactly the tensors its code keeps alive. Each workspace function replays the
//! forward's allocations and frees in order on a [`Ledger`]; the figure is the high-water
//! mark, and it follows the code because it reads like it.

use std::ops::Range;

use candle_core::{DType, Device, Result, Shape, Tensor};

/// Bytes of the widest temporary one tile of a row-tiled op may hold. An op keeps at most
/// three such temporaries at once, so its workspace stays under 48 MiB whatever the rows (a
/// few percent of a 2 GiB activation budget), while a tile is still 4M f32 elements: enough
/// for each kernel a GPU runs on it to stream at full memory bandwidth.
pub const TILE_BYTES: usize = 16 << 20;

/// `rows` cut into tiles whose rows take at most [`TILE_BYTES`] at `row_bytes` each (at
/// least one row a tile), the rows shared evenly so that the last tile is not a sliver.
pub(crate) fn row_tiles(rows: usize, row_bytes: usize) -> Vec<Range<usize>> {
    even_split(rows, (TILE_BYTES / row_bytes.max(1)).max(1))
}

/// `len` cut into the fewest pieces of at most `max` (at least 1), their lengths within one
/// of each other.
pub(crate) fn even_split(len: usize, max: usize) -> Vec<Range<usize>> {
    let pieces = len.div_ceil(max.max(1)).max(1);
    (0..pieces)
        .map(|i| i * len / pieces..(i + 1) * len / pieces)
        .collect()
}

/// The longest tile [`row_tiles`] makes, and how many tiles there are.
pub(crate) fn largest_tile(rows: usize, row_bytes: usize) -> (usize, usize) {
    let tiles = row_tiles(rows, row_bytes);
    (
        tiles.iter().map(|t| t.len()).max().unwrap_or(0),
        tiles.len(),
    )
}

/// Where one tile's result goes: output rows `rows` (dim 0), at `offset` along `dim` of them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Place {
    pub rows: Range<usize>,
    pub dim: usize,
    pub offset: usize,
}

impl Place {
    /// Output rows `rows`, whole.
    pub fn rows(rows: Range<usize>) -> Self {
        Place {
            rows,
            dim: 0,
            offset: 0,
        }
    }
}

/// The output of `parts`, each computed by `run`: one part's result is the output itself
/// (no copy); more parts are each written into one preallocated output, so no concat copy
/// of the whole exists beside it.
pub(crate) fn assemble<T>(
    shape: Shape,
    dtype: DType,
    device: &Device,
    parts: &[T],
    place: impl Fn(&T) -> Place,
    run: impl Fn(&T) -> Result<Tensor>,
) -> Result<Tensor> {
    if let [only] = parts {
        return run(only);
    }
    let out = Tensor::zeros(shape, dtype, device)?;
    for part in parts {
        let Place { rows, dim, offset } = place(part);
        out.narrow(0, rows.start, rows.len())?
            .slice_set(&run(part)?, dim, offset)?;
    }
    Ok(out)
}

/// Live bytes of a sequence of allocations and frees, and their high-water mark.
#[derive(Clone, Debug, Default)]
pub(crate) struct Ledger {
    live: usize,
    peak: usize,
}

impl Ledger {
    pub fn alloc(&mut self, bytes: usize) {
        self.live += bytes;
        self.peak = self.peak.max(self.live);
    }

    pub fn free(&mut self, bytes: usize) {
        self.live -= bytes.min(self.live);
    }

    /// An allocation that is freed at once (scratch inside one candle op).
    pub fn transient(&mut self, bytes: usize) {
        self.alloc(bytes);
        self.free(bytes);
    }

    pub fn peak(&self) -> usize {
        self.peak
    }
}

/// Workspace of an op run as `tiles` tiles into an `out_bytes` output, where `tile` replays
/// one (the largest) tile on a ledger and leaves its result live: with one tile that result
/// is the output; with more, the output exists first and each result is copied into it.
pub(crate) fn tiled_workspace(out_bytes: usize, tiles: usize, tile: impl Fn(&mut Ledger)) -> usize {
    let mut ledger = Ledger::default();
    if tiles > 1 {
        ledger.alloc(out_bytes);
    }
    tile(&mut ledger);
    ledger.peak().saturating_sub(out_bytes)
}

/// Bytes of `elems` elements of `dtype`.
pub(crate) fn bytes(elems: usize, dtype: DType) -> usize {
    elems * dtype.size_in_bytes()
}

/// The dtype statistics are computed in: f32 for every float type narrower than f32.
pub(crate) fn wide(dtype: DType) -> DType {
    match dtype {
        DType::F16 | DType::BF16 => DType::F32,
        d => d,
    }
}

/// Bytes of an f32 copy of `elems` elements of `dtype` (none when it already is f32).
pub(crate) fn widened(elems: usize, dtype: DType) -> usize {
    if wide(dtype) == dtype {
        0
    } else {
        bytes(elems, wide(dtype))
    }
}

/// Heap gemm allocates inside one candle CPU matmul of an `(m, k)` left side with a `(k, n)`
/// right side into a row-major result, given the operands' column strides (1 for a
/// row-major operand, its rows for a transposed one).
///
/// gemm first transposes the problem (the result is row-major and its kernels want a
/// column-major one), so its left side is candle's right. f32 products then pack the right
/// side (one depth block `kc` by a column block `nc`) when it is strided or tall, and
/// prepack the left side when it spans at most two row blocks `mc` and is strided or not a
/// whole number of SIMD registers tall; half products always pack the right side and widen
/// both to f32. The block sizes come from gemm's own cache model, so the figure follows the
/// machine. Scratch that gemm keeps per thread (its L2 slab) is made once and not counted.
pub(crate) fn cpu_matmul_scratch(
    (m, n, k): (usize, usize, usize),
    lhs_cs: usize,
    rhs_cs: usize,
    dtype: DType,
) -> usize {
    if m <= 1 || n <= 1 || k <= 2 {
        // gemm's vector-vector and matrix-vector paths pack nothing.
        return 0;
    }
    // The transposed problem gemm solves, (n, k) x (k, m), and its operands' row strides.
    let (m, n, lhs_rs, rhs_rs) = (n, m, rhs_cs, lhs_cs);
    let (mr, nr, lanes) = crate::linear::gemm_f32_kernel();
    let half = dtype != DType::F32;
    let params = if !half && m <= 64 && n <= 64 {
        let kc = k.min(512);
        let l2 = gemm_common::cache::CACHE_INFO[1].cache_bytes;
        gemm_common::cache::KernelParams {
            kc,
            mc: l2 / 4 / kc / mr * mr,
            nc: n.next_multiple_of(nr),
        }
    } else {
        gemm_common::cache::kernel_params(m, n, k, mr, nr, 4)
    };
    let nc = if params.nc > 0 {
        params.nc
    } else {
        n.next_multiple_of(nr)
    };
    let threshold = gemm_common::gemm::get_rhs_packing_threshold();
    let pack_rhs = half || (rhs_rs != 1 && m > 2 * mr) || (rhs_rs == 1 && m > threshold * mr);
    let prepack_lhs = m <= 2 * params.mc && (m % lanes != 0 || lhs_rs != 1);
    let packed_rhs = if pack_rhs { params.kc * nc } else { 0 };
    let packed_lhs = if prepack_lhs {
        params.kc * m.next_multiple_of(mr)
    } else {
        0
    };
    4 * (packed_rhs + packed_lhs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn even_split_covers_the_rows_in_near_equal_tiles() {
        for (len, max) in [(10, 3), (9, 3), (1, 5), (7, 1), (0, 4)] {
            let tiles = even_split(len, max);
            assert_eq!(tiles.first().map(|t| t.start), Some(0));
            assert_eq!(tiles.last().map(|t| t.end), Some(len));
            assert!(tiles.windows(2).all(|w| w[0].end == w[1].start));
            let (lo, hi) = (
                tiles.iter().map(|t| t.len()).min().unwrap(),
                tiles.iter().map(|t| t.len()).max().unwrap(),
            );
            assert!(
                hi <= max.max(1) && hi - lo <= 1,
                "{len} by {max}: {tiles:?}"
            );
        }
    }

    #[test]
    fn ledger_keeps_the_high_water_mark() {
        let mut l = Ledger::default();
        l.alloc(10);
        l.transient(5);
        l.free(10);
        l.alloc(12);
        assert_eq!(l.peak(), 15);
    }
}
