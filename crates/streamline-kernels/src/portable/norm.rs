//! Normalizations with candle's ops, statistics in f32 on the device: LayerNorm, per-frame
//! GroupNorm, and temporal GroupNorm as mergeable moments plus a pointwise apply.
//!
//! Every statistic is a centered two-pass one: a first mean, the values centered on it, and
//! from those their sum (which corrects the first mean) and sum of squares. E[x^2]-E[x]^2,
//! which candle-nn's fused LayerNorm computes on the CPU and in its CUDA kernel, cancels when
//! the mean is large against the spread; the centered sums do not. Sums over many rows run
//! in two reductions, the last dim first, so that each f32 sum stays short.
//! Tiles of at most [`TILE_BYTES`](super::linear::TILE_BYTES) of f32 bound the full-size
//! temporaries (the f32 copy, the centered values, their squares, the affine steps).
//!
//! Temporal GroupNorm (statistics over (C/G, T, H, W) of each batch item) is split so that a
//! plan may slice it along positions: [`group_moments`] gives each slice's count, mean and
//! centered sum of squares per (batch item, group), [`merge_moments`] merges them (Chan et
//! al.'s parallel update, as tensor ops), and [`group_norm_apply`] normalizes rows with them.
//! Nothing is read back to the host and no tensor is f64.

use std::ops::Range;

use candle_core::{bail, DType, Result, Tensor, D};

use super::tiles::{
    assemble, bytes, even_split, largest_tile, row_tiles, tiled_workspace, widened, Ledger, Place,
    TILE_BYTES,
};

/// A statistics tile's sum over `last`, then (when given) over `outer`: short f32 sums each.
fn sum2(x: &Tensor, last: usize, outer: &[usize]) -> Result<Tensor> {
    let partial = x.sum_keepdim(last)?;
    if outer.is_empty() {
        return Ok(partial);
    }
    partial.sum_keepdim(outer)
}

/// Centered moments of an f32 tile over `count` values a statistic (reduced by [`sum2`]):
/// the values centered on a first mean, that mean, the correction to it (the centered
/// values' mean) and the centered sum of squares.
struct Centered {
    values: Tensor,
    shift: Tensor,
    correction: Tensor,
    squares: Tensor,
}

impl Centered {
    fn new(x32: Tensor, last: usize, outer: &[usize], count: usize) -> Result<Self> {
        let inv = 1.0 / count.max(1) as f64;
        let shift = sum2(&x32, last, outer)?.affine(inv, 0.0)?;
        let values = x32.broadcast_sub(&shift)?;
        drop(x32);
        let correction = sum2(&values, last, outer)?.affine(inv, 0.0)?;
        let squares = sum2(&values.sqr()?, last, outer)?;
        Ok(Centered {
            values,
            shift,
            correction,
            squares,
        })
    }

    /// The biased variance, `squares / count - correction^2`, never below 0.
    fn variance(&self, count: usize) -> Result<Tensor> {
        let mean_square = self.squares.affine(1.0 / count.max(1) as f64, 0.0)?;
        let bias = self.correction.sqr()?;
        (mean_square - bias)?.relu()
    }

    /// `1 / sqrt(variance + eps)`.
    fn rstd(&self, count: usize, eps: f64) -> Result<Tensor> {
        let var = self.variance(count)?;
        var.affine(1.0, eps)?.sqrt()?.recip()
    }
}

/// Sizes (in elements) of a statistics tile: the tile, the first sums over its last dim,
/// and the statistics (the same as the first sums when there is one reduction).
#[derive(Clone, Copy)]
struct TileSizes {
    elems: usize,
    partial: usize,
    stats: usize,
    two_level: bool,
}

impl TileSizes {
    /// One [`sum2`] and the affine step after it, on a ledger: the statistic is left live.
    fn replay_sum(&self, l: &mut Ledger, scaled: bool) {
        let (partial, stats) = (4 * self.partial, 4 * self.stats);
        l.alloc(partial);
        if self.two_level {
            l.alloc(stats);
            l.free(partial);
        }
        if scaled {
            l.alloc(stats);
            l.free(if self.two_level { stats } else { partial });
        }
    }

    /// [`Centered::new`] on a ledger for a tile of `dtype`: the f32 copy (half types), the
    /// centered values (left live with the three statistics), their squares, and the sums.
    fn replay_centered(&self, l: &mut Ledger, dtype: DType) {
        let (copy, full) = (widened(self.elems, dtype), 4 * self.elems);
        l.alloc(copy);
        self.replay_sum(l, true);
        l.alloc(full);
        l.free(copy);
        self.replay_sum(l, true);
        l.alloc(full);
        self.replay_sum(l, false);
        l.free(full);
    }

    /// [`Centered::rstd`] on a ledger: four statistics at once in each of its two steps,
    /// one left live.
    fn replay_rstd(&self, l: &mut Ledger) {
        let stats = 4 * self.stats;
        l.alloc(4 * stats);
        l.free(3 * stats);
        l.alloc(3 * stats);
        l.free(3 * stats);
    }
}

/// The affine end of a normalization on a ledger, its input live: the scaled values, the
/// shifted ones, and their narrowing to `dtype`, each freeing the one before.
fn replay_affine(l: &mut Ledger, elems: usize, dtype: DType) {
    let full = 4 * elems;
    l.alloc(full);
    l.free(full);
    l.alloc(full);
    l.free(full);
    if widened(elems, dtype) > 0 {
        l.alloc(bytes(elems, dtype));
        l.free(full);
    }
}

/// `values * scale + shift` in f32, narrowed to `dtype`, each step freeing the one before.
fn affine_into(values: Tensor, scale: &Tensor, shift: &Tensor, dtype: DType) -> Result<Tensor> {
    let scaled = values.broadcast_mul(scale)?;
    drop(values);
    let shifted = scaled.broadcast_add(shift)?;
    drop(scaled);
    shifted.to_dtype(dtype)
}

/// LayerNorm of `x` over its last dim with `weight` and `bias`, in f32 (half types widened a
/// tile at a time), exact to float rounding on every device.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let dim = weight.dim(0)?;
    if dim == 0 || x.rank() == 0 || x.dim(D::Minus1)? != dim || bias.dims() != [dim] {
        bail!(
            "layer_norm: input {:?}, weight {:?}, bias {:?}",
            x.shape(),
            weight.shape(),
            bias.shape()
        )
    }
    let rows = x.elem_count() / dim;
    let x2 = x.reshape((rows, dim))?;
    let (w, b) = (weight.to_dtype(DType::F32)?, bias.to_dtype(DType::F32)?);
    let tiles = row_tiles(rows, 4 * dim);
    let y = assemble(
        (rows, dim).into(),
        x.dtype(),
        x.device(),
        &tiles,
        |t| Place::rows(t.clone()),
        |t| {
            let x32 = x2.narrow(0, t.start, t.len())?.to_dtype(DType::F32)?;
            let c = Centered::new(x32, 1, &[], dim)?;
            let rstd = c.rstd(dim, eps)?;
            let normed = c.values.broadcast_mul(&rstd)?;
            drop((c, rstd));
            affine_into(normed, &w, &b, x.dtype())
        },
    )?;
    y.reshape(x.dims())
}

/// Bytes [`layer_norm`] on `rows` rows of `dim` allocates besides its output (the same on
/// every device: candle's reductions and elementwise ops allocate only their results), its
/// f32 weights included.
pub fn layer_norm_workspace(rows: usize, dim: usize, dtype: DType) -> usize {
    let (tile, tiles) = largest_tile(rows, 4 * dim);
    let sizes = TileSizes {
        elems: tile * dim,
        partial: tile,
        stats: tile,
        two_level: false,
    };
    let params = 2 * widened(dim, dtype);
    params
        + tiled_workspace(bytes(rows * dim, dtype), tiles, |l| {
            sizes.replay_centered(l, dtype);
            sizes.replay_rstd(l);
            // The normalized values, then the centered ones, their statistics and rstd freed.
            l.alloc(4 * sizes.elems);
            l.free(4 * (sizes.elems + 4 * sizes.stats));
            replay_affine(l, sizes.elems, dtype);
        })
}

/// Per-frame GroupNorm of `x` `(N, C, ...)` (contiguous) over `(C/groups, ...)`, with
/// per-channel `weight` and `bias`, statistics in f32. A tile is several whole frames, or
/// some groups of one frame when a frame passes the tile bound.
pub fn group_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    groups: usize,
    eps: f64,
) -> Result<Tensor> {
    let dims = x.dims();
    let view = FrameGroups::of(dims, groups)
        .filter(|v| weight.dims() == [v.channels()] && bias.dims() == [v.channels()]);
    let Some(v) = view else {
        bail!(
            "group_norm: input {:?} in {groups} groups, weight {:?}, bias {:?}",
            x.shape(),
            weight.shape(),
            bias.shape()
        )
    };
    let x5 = x.reshape(v.shape())?;
    let per_group = |t: &Tensor| t.to_dtype(DType::F32)?.reshape((1, groups, v.per, 1, 1));
    let (w, b) = (per_group(weight)?, per_group(bias)?);
    let count = v.per * v.inner * v.last;
    let y = assemble(
        v.shape().into(),
        x.dtype(),
        x.device(),
        &v.tiles(),
        |(frames, g)| Place {
            rows: frames.clone(),
            dim: 1,
            offset: g.start,
        },
        |(frames, g)| {
            let tile = x5
                .narrow(0, frames.start, frames.len())?
                .narrow(1, g.start, g.len())?;
            let c = Centered::new(tile.to_dtype(DType::F32)?, 4, &[2, 3], count)?;
            let rstd = c.rstd(count, eps)?;
            let scale = rstd.broadcast_mul(&w.narrow(1, g.start, g.len())?)?;
            // The first mean's correction folds into the shift: it is rounding-sized.
            let shift = b
                .narrow(1, g.start, g.len())?
                .broadcast_sub(&c.correction.broadcast_mul(&scale)?)?;
            affine_into(c.values, &scale, &shift, x.dtype())
        },
    )?;
    y.reshape(dims)
}

/// Bytes [`group_norm`] on `dims` `(N, C, ...)` allocates besides its output (the same on
/// every device), its f32 weights included.
pub fn group_norm_workspace(dims: &[usize], groups: usize, dtype: DType) -> usize {
    let Some(v) = FrameGroups::of(dims, groups) else {
        return 0;
    };
    let tiles = v.tiles();
    let (frames, g) = tiles
        .iter()
        .max_by_key(|(f, g)| f.len() * g.len())
        .cloned()
        .unwrap_or((0..0, 0..0));
    let elems = frames.len() * g.len() * v.per * v.inner * v.last;
    let sizes = TileSizes {
        elems,
        partial: elems / v.last.max(1),
        stats: frames.len() * g.len(),
        two_level: true,
    };
    let params = 2 * widened(v.channels(), dtype);
    let out = bytes(dims.iter().product(), dtype);
    params
        + tiled_workspace(out, tiles.len(), |l| {
            sizes.replay_centered(l, dtype);
            replay_affine(l, elems, dtype);
        })
}

/// `(N, C, ...)` viewed as `(N, groups, C/groups, inner, last)`: statistics reduce `last`
/// (the input's last dim), then the channels of a group and `inner` (the dims between).
struct FrameGroups {
    frames: usize,
    groups: usize,
    per: usize,
    inner: usize,
    last: usize,
}

impl FrameGroups {
    fn of(dims: &[usize], groups: usize) -> Option<Self> {
        let (&frames, rest) = dims.split_first()?;
        let (&channels, spatial) = rest.split_first()?;
        if groups == 0 || channels % groups != 0 {
            return None;
        }
        let last = spatial.last().copied().unwrap_or(1);
        Some(FrameGroups {
            frames,
            groups,
            per: channels / groups,
            inner: spatial.iter().product::<usize>() / last.max(1),
            last,
        })
    }

    fn channels(&self) -> usize {
        self.groups * self.per
    }

    fn shape(&self) -> (usize, usize, usize, usize, usize) {
        (self.frames, self.groups, self.per, self.inner, self.last)
    }

    /// Whole frames while a frame's f32 copy fits in a tile, else groups of one frame.
    fn tiles(&self) -> Vec<(Range<usize>, Range<usize>)> {
        let group_bytes = 4 * self.per * self.inner * self.last;
        let frame_bytes = self.groups * group_bytes;
        if frame_bytes <= TILE_BYTES {
            let per_tile = TILE_BYTES / frame_bytes.max(1);
            return even_split(self.frames, per_tile)
                .into_iter()
                .map(|f| (f, 0..self.groups))
                .collect();
        }
        let groups = even_split(self.groups, TILE_BYTES / group_bytes.max(1));
        (0..self.frames)
            .flat_map(|f| groups.iter().map(move |g| (f..f + 1, g.clone())))
            .collect()
    }
}

/// Where the rows of a position-major `(rows, T, C)` slice sit in the whole feature: batch
/// items of `per_batch` rows each (their H*W positions), the slice starting at row `first`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchRows {
    pub per_batch: usize,
    pub first: usize,
}

impl BatchRows {
    /// The batch item of row `r` of the slice.
    pub fn batch_of(&self, r: usize) -> usize {
        (self.first + r) / self.per_batch.max(1)
    }

    /// Rows `0..rows` of the slice cut where batch items change: (batch item, rows of the
    /// slice), the form [`group_moments`] takes.
    pub fn pieces(&self, rows: usize) -> Vec<(usize, Range<usize>)> {
        let per = self.per_batch.max(1);
        let mut pieces = Vec::new();
        let mut r = 0;
        while r < rows {
            let item = (self.first + r) / per;
            let end = ((item + 1) * per - self.first).min(rows);
            pieces.push((item, r..end));
            r = end;
        }
        pieces
    }
}

/// Per-(batch item, group) moments of position-major `x` `(n, T, C)`: for each piece
/// `(item, rows)` of `pieces` (rows of `x`; several pieces may share an item), the moments
/// of those rows' frames and channels of each group, merged per item. Returns a `(batch,
/// groups, 3)` f32 tensor on `x`'s device whose last axis is (count, mean, centered sum of
/// squares); items in no piece are zeros (count 0, which [`merge_moments`] treats as empty).
/// Counts are f32, exact up to 2^24 values per (item, group) and rounded beyond.
pub fn group_moments(
    x: &Tensor,
    groups: usize,
    pieces: &[(usize, Range<usize>)],
    batch: usize,
) -> Result<Tensor> {
    let (n, t, c) = x.dims3()?;
    if groups == 0 || c % groups != 0 || pieces.iter().any(|(b, r)| *b >= batch || r.end > n) {
        bail!(
            "group_moments: input {:?} in {groups} groups, pieces {pieces:?} of {batch} items",
            x.shape()
        )
    }
    let per = c / groups;
    let mut items: Vec<Option<Tensor>> = vec![None; batch];
    for (item, rows) in moment_tiles(pieces, t * c) {
        let tile = x.narrow(0, rows.start, rows.len())?;
        let tile = tile.reshape((rows.len() * t, groups, per))?;
        let count = rows.len() * t * per;
        let m = Centered::new(tile.to_dtype(DType::F32)?, 2, &[0], count)?;
        let counts = Tensor::full(count as f32, (1, groups, 1), x.device())?;
        let mean = (&m.shift + &m.correction)?;
        let m2 = m.variance(count)?.affine(count as f64, 0.0)?;
        drop(m);
        let moments = Tensor::cat(&[counts, mean, m2], 2)?.reshape((groups, 3))?;
        items[item] = Some(match items[item].take() {
            Some(acc) => merge_moments(&acc, &moments)?,
            None => moments,
        });
    }
    let zeros = Tensor::zeros((groups, 3), DType::F32, x.device())?;
    let items: Vec<Tensor> = items
        .into_iter()
        .map(|m| m.unwrap_or_else(|| zeros.clone()))
        .collect();
    Tensor::stack(&items, 0)
}

/// The tiles [`group_moments`] reduces: each piece's rows cut under the tile bound.
fn moment_tiles(pieces: &[(usize, Range<usize>)], row_elems: usize) -> Vec<(usize, Range<usize>)> {
    pieces
        .iter()
        .flat_map(|(item, rows)| {
            row_tiles(rows.len(), 4 * row_elems)
                .into_iter()
                .filter(|t| !t.is_empty())
                .map(move |t| (*item, rows.start + t.start..rows.start + t.end))
        })
        .collect()
}

/// Bytes [`group_moments`] on `pieces` of rows of `t` frames of `channels` allocates besides
/// its output (the same on every device): for the largest tile, its f32 copy (half types),
/// the centered values and their squares, and per-group sums.
pub fn moments_workspace(
    pieces: &[(usize, Range<usize>)],
    t: usize,
    channels: usize,
    groups: usize,
    dtype: DType,
) -> usize {
    let rows = moment_tiles(pieces, t * channels)
        .iter()
        .map(|(_, r)| r.len())
        .max()
        .unwrap_or(0);
    let sizes = TileSizes {
        elems: rows * t * channels,
        partial: rows * t * groups,
        stats: groups,
        two_level: true,
    };
    let mut l = Ledger::default();
    sizes.replay_centered(&mut l, dtype);
    l.peak()
}

/// Chan et al.'s parallel merge of two moment tensors `(..., 3)` of (count, mean, centered
/// sum of squares), elementwise: count `na + nb`, mean `ma + d * nb / n`, sum of squares
/// `qa + qb + d^2 * na * nb / n` with `d = mb - ma`. A count of 0 on either side (or both)
/// leaves the other unchanged and never divides by 0.
pub fn merge_moments(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if a.dims() != b.dims() || a.dims().last() != Some(&3) {
        bail!("merge_moments: {:?} and {:?}", a.shape(), b.shape())
    }
    let part = |t: &Tensor, i| t.narrow(D::Minus1, i, 1);
    let (na, ma, qa) = (part(a, 0)?, part(a, 1)?, part(a, 2)?);
    let (nb, mb, qb) = (part(b, 0)?, part(b, 1)?, part(b, 2)?);
    let n = (&na + &nb)?;
    // nb / n, where a tiny offset (far below a count's rounding) keeps 0 / 0 at 0.
    let share = nb.broadcast_div(&n.affine(1.0, 1e-30)?)?;
    let delta = (&mb - &ma)?;
    let mean = (&ma + (&delta * &share)?)?;
    let cross = ((delta.sqr()? * &na)? * &share)?;
    let m2 = ((&qa + &qb)? + cross)?;
    Tensor::cat(&[n, mean, m2], D::Minus1)
}

/// GroupNorm's normalization of position-major rows `x` `(n, T, C)` sitting at `rows` in the
/// whole feature, with the merged `moments` `(batch, groups, 3)` of [`group_moments`]:
/// `(x - mean) / sqrt(var + eps) * weight + bias` per (batch item, group), in f32 (half types
/// widened a tile at a time) and narrowed to the dtype of `x`. Pointwise per row, so any
/// slice of rows can run alone.
pub fn group_norm_apply(
    x: &Tensor,
    moments: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    rows: BatchRows,
) -> Result<Tensor> {
    let (n, t, c) = x.dims3()?;
    let (batch, groups, three) = moments.dims3()?;
    let covered = rows.pieces(n).iter().all(|(item, _)| *item < batch);
    if three != 3 || groups == 0 || c % groups != 0 || !covered || weight.dims() != [c] {
        bail!(
            "group_norm_apply: input {:?} at {rows:?}, moments {:?}, weight {:?}",
            x.shape(),
            moments.shape(),
            weight.shape()
        )
    }
    let tables = ApplyTables::new(moments, weight, bias, eps)?;
    let tiles = apply_tiles(n, rows, t * c);
    assemble(
        (n, t, c).into(),
        x.dtype(),
        x.device(),
        &tiles,
        |(_, r)| Place::rows(r.clone()),
        |(item, r)| {
            let x32 = x.narrow(0, r.start, r.len())?.to_dtype(DType::F32)?;
            let centered = x32.broadcast_sub(&tables.mean.narrow(0, *item, 1)?)?;
            drop(x32);
            let scale = tables.scale.narrow(0, *item, 1)?;
            affine_into(centered, &scale, &tables.bias, x.dtype())
        },
    )
}

/// The tiles [`group_norm_apply`] runs: rows of one batch item each, under the tile bound.
fn apply_tiles(n: usize, rows: BatchRows, row_elems: usize) -> Vec<(usize, Range<usize>)> {
    moment_tiles(&rows.pieces(n), row_elems)
}

/// Per-(batch item, channel) tables of [`group_norm_apply`], `(batch, 1, C)` f32: each
/// channel's group mean and `weight * rstd`; and the bias `(1, 1, C)`.
struct ApplyTables {
    mean: Tensor,
    scale: Tensor,
    bias: Tensor,
}

impl ApplyTables {
    fn new(moments: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Self> {
        let (batch, groups, _) = moments.dims3()?;
        let c = weight.dim(0)?;
        let per = c / groups;
        let part = |i| moments.narrow(2, i, 1);
        let (count, mean, m2) = (part(0)?, part(1)?, part(2)?);
        let var = m2.broadcast_div(&count.affine(1.0, 1e-30)?)?;
        let rstd = var.affine(1.0, eps)?.sqrt()?.recip()?;
        let w = weight.to_dtype(DType::F32)?.reshape((1, groups, per))?;
        let per_channel = |t: Tensor| t.reshape((batch, 1, c));
        Ok(ApplyTables {
            mean: per_channel(mean.broadcast_as((batch, groups, per))?.contiguous()?)?,
            scale: per_channel(rstd.broadcast_mul(&w)?)?,
            bias: bias.to_dtype(DType::F32)?.reshape((1, 1, c))?,
        })
    }
}

/// Bytes [`group_norm_apply`] on `n` rows at `rows` of `t` frames of `channels` allocates
/// besides its output (the same on every device): its tables, and per tile the f32 copy
/// (half types), the centered values, and the affine steps.
pub fn group_norm_apply_workspace(
    n: usize,
    rows: BatchRows,
    t: usize,
    channels: usize,
    batch: usize,
    dtype: DType,
) -> usize {
    let tiles = apply_tiles(n, rows, t * channels);
    let tile = tiles.iter().map(|(_, r)| r.len()).max().unwrap_or(0);
    let tables = 4 * channels * (2 * batch + 1);
    tables
        + tiled_workspace(bytes(n * t * channels, dtype), tiles.len(), |l| {
            let elems = tile * t * channels;
            l.alloc(widened(elems, dtype));
            l.alloc(4 * elems);
            l.free(widened(elems, dtype));
            replay_affine(l, elems, dtype);
        })
}
