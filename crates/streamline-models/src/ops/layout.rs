//! Layout changes between frame-major and position-major video features, spatial resampling
//! of frames, and the row chunking the tiling ops share.

use std::ops::Range;

use candle_core::{DType, Device, Tensor};
use streamline_ir::op_contract;
use streamline_ir::{
    chunk_ranges, Axis, AxisTag, Independence, IrError, Kernels, Layout, Op, Result, RowRule,
    SliceCtx, ValueInfo, Workspace,
};

use super::kernels;
use super::rows::{band_dims, unbanded};

/// The video extent a layout change needs to know: batch, frames and the spatial size.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct VideoDims {
    pub batch: usize,
    pub frames: usize,
    pub height: usize,
    pub width: usize,
}

impl VideoDims {
    pub fn hw(&self) -> usize {
        self.height * self.width
    }

    /// Length of the frames axis, B*T.
    pub fn frames_len(&self) -> usize {
        self.batch * self.frames
    }

    /// Length of the positions axis, B*H*W.
    pub fn positions_len(&self) -> usize {
        self.batch * self.hw()
    }
}

/// Split `range` of a batch-major index space (`per_batch` indices per batch item) into
/// `(batch item, range inside that item)` pieces.
pub(crate) fn batch_pieces(range: Range<usize>, per_batch: usize) -> Vec<(usize, Range<usize>)> {
    let mut pieces = Vec::new();
    let mut start = range.start;
    while start < range.end {
        let b = start / per_batch;
        let end = range.end.min((b + 1) * per_batch);
        pieces.push((b, start - b * per_batch..end - b * per_batch));
        start = end;
    }
    pieces
}

/// Concatenate per-batch views along dim 0 into one new tensor.
///
/// The views may be strided (permuted gathers): the kernel copies each straight into the
/// result, so no per-piece copy exists and the result is the only allocation, whichever way
/// the rows fall across batch items.
pub(crate) fn cat_views(parts: Vec<Tensor>, k: Kernels) -> Result<Tensor> {
    Ok(match parts.len() {
        1 => kernels::contiguous(k, &parts.into_iter().next().expect("one part"))?,
        _ => kernels::cat0(k, &parts)?,
    })
}

/// The batch item of each row in `rows` (a batch-major index space, `per_batch` rows per
/// item), as a `u32` tensor for `index_select`: per-batch values become per-row values with
/// one small gather, the same whatever batch boundaries the rows cross.
pub(crate) fn batch_ids(rows: Range<usize>, per_batch: usize, device: &Device) -> Result<Tensor> {
    let ids: Vec<u32> = rows.map(|r| (r / per_batch) as u32).collect();
    let n = ids.len();
    Ok(Tensor::from_vec(ids, n, device)?)
}

/// How one call is cut: `outer` dim-0 rows per chunk and, when one row is too much, `inner`
/// sub-rows (queries, output rows) per chunk of one row.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(crate) struct Tiles {
    pub outer: usize,
    pub inner: usize,
}

/// The tiles one call runs in, and the workspace that costs.
///
/// `peak(o, i)`: the most transient bytes live while computing a chunk of `o` rows of `i`
/// sub-rows, that chunk's result included. Run whole, the result is the output, so the
/// workspace is `peak(outer, inner)` minus `out_bytes`; run in chunks, each chunk's result is
/// an extra buffer copied into the output made up front, so it is the chunk's peak. Under a
/// limit: the largest chunks of whole rows that fit, else one row in the largest chunks of
/// sub-rows that fit, else single sub-rows if that is smaller than running whole. Chunk sizes
/// are balanced (`chunk_ranges`) and the workspace is that of the largest. `peak` must grow
/// with both arguments.
pub(crate) fn tiles(
    outer: usize,
    inner: usize,
    out_bytes: usize,
    limit: Option<usize>,
    peak: impl Fn(usize, usize) -> usize,
) -> (Tiles, usize) {
    let whole = Tiles { outer, inner };
    let whole_ws = peak(outer, inner).saturating_sub(out_bytes);
    let Some(limit) = limit else {
        return (whole, whole_ws);
    };
    if whole_ws <= limit {
        return (whole, whole_ws);
    }
    // Largest n in 1..=max with fits(n), balanced over `len`.
    let largest = |len: usize, max: usize, fits: &dyn Fn(usize) -> bool| -> Option<usize> {
        if max == 0 || !fits(1) {
            return None;
        }
        let (mut lo, mut hi) = (1, max);
        while lo < hi {
            let mid = (lo + hi).div_ceil(2);
            if fits(mid) {
                lo = mid;
            } else {
                hi = mid - 1;
            }
        }
        Some(len.div_ceil(len.div_ceil(lo)))
    };
    let tiles = if let Some(o) = largest(outer, outer - 1, &|o| peak(o, inner) <= limit) {
        Tiles { outer: o, inner }
    } else if let Some(i) = largest(inner, inner - 1, &|i| peak(1, i) <= limit) {
        Tiles { outer: 1, inner: i }
    } else {
        Tiles { outer: 1, inner: 1 }
    };
    let ws = peak(tiles.outer, tiles.inner);
    if ws < whole_ws {
        (tiles, ws)
    } else {
        (whole, whole_ws)
    }
}

/// [`tiles`] over dim-0 rows alone: the rows per chunk, and the workspace.
pub(crate) fn row_chunk(
    rows: usize,
    out_bytes: usize,
    limit: Option<usize>,
    peak: impl Fn(usize) -> usize,
) -> (usize, usize) {
    let (t, ws) = tiles(rows, 1, out_bytes, limit, |o, _| peak(o));
    (t.outer, ws)
}

/// Run `f` on dim-0 row ranges of at most `chunk` rows and write each result into an output
/// of `out_dims` made first; a chunk covering every row returns `f`'s result as it is.
pub(crate) fn by_row_chunks(
    out_dims: &[usize],
    dtype: DType,
    device: &Device,
    chunk: usize,
    mut f: impl FnMut(Range<usize>) -> Result<Tensor>,
) -> Result<Tensor> {
    let rows = out_dims[0];
    if chunk >= rows {
        return f(0..rows);
    }
    let out = Tensor::zeros(out_dims, dtype, device)?;
    for range in chunk_ranges(rows, rows.div_ceil(chunk.max(1))) {
        let start = range.start;
        out.slice_set(&f(range)?.contiguous()?, 0, start)?;
    }
    Ok(out)
}

/// The info of a tensor, for ops that size their tiles in `forward` with the same shape
/// functions the planner calls.
pub(crate) fn info_of(t: &Tensor) -> ValueInfo {
    ValueInfo::new(t.shape().clone(), t.dtype(), Layout::WHOLE)
}

fn expect_rank(info: &ValueInfo, dims: &[usize], what: &str) -> Result<()> {
    if info.shape.dims() != dims {
        return Err(IrError::Plan(format!(
            "{what} expects an input of shape {dims:?}, got {:?}",
            info.shape.dims()
        )));
    }
    Ok(())
}

/// How frame-major features hold channels: `(B*T, C, H, W)` between blocks, or
/// channels-last tokens `(B*T, H*W, C)` inside transformers.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum FrameLayout {
    ChannelsFirst,
    Tokens,
}

impl FrameLayout {
    fn shape(self, d: VideoDims, c: usize) -> Vec<usize> {
        match self {
            FrameLayout::ChannelsFirst => vec![d.frames_len(), c, d.height, d.width],
            FrameLayout::Tokens => vec![d.frames_len(), d.hw(), c],
        }
    }
}

/// Frame-major features -> position-major `(B*H*W, T, C)`, the layout temporal layers work in.
///
/// Sliced along positions, it reads the frame-major input whole and gathers only the
/// positions of its slice, so the full transposed copy never exists. The gathered views are
/// copied straight into the output: no workspace.
#[derive(Debug, Clone)]
pub struct FramesToPositions {
    pub dims: VideoDims,
    pub channels: usize,
    pub from: FrameLayout,
}

impl Op for FramesToPositions {
    op_contract!("frames_to_positions", Positions);

    fn gathers_input(&self, input: usize, axis: Axis) -> bool {
        input == 0 && axis == Axis::Positions
    }

    /// A band of images is the video of the band's height: row for row.
    fn rows(&self) -> Option<RowRule> {
        (self.from == FrameLayout::ChannelsFirst).then_some(RowRule::Same)
    }

    fn infer(&self, inputs: &[&ValueInfo]) -> Result<ValueInfo> {
        let d = self.dims;
        let c = self.channels;
        expect_rank(inputs[0], &self.from.shape(d, c), self.kind())?;
        let layout = match inputs[0].layout.rows {
            AxisTag::Dim(_) => Layout::positions_of(d.batch, d.width),
            _ => Layout::POSITION_MAJOR,
        };
        Ok(ValueInfo::new(
            (d.positions_len(), d.frames, c),
            inputs[0].dtype,
            layout,
        ))
    }

    fn flops(&self, _: &[&ValueInfo], _: &ValueInfo) -> u64 {
        0
    }

    fn forward(&self, inputs: &[&Tensor], ctx: &SliceCtx) -> Result<Tensor> {
        if ctx.band.is_some() {
            let band = FramesToPositions {
                dims: band_dims(self.dims, ctx),
                ..self.clone()
            };
            return band.forward(inputs, &unbanded(ctx));
        }
        let d = self.dims;
        let x = inputs[0];
        let rows = ctx.rows(d.positions_len());
        let parts = batch_pieces(rows, d.hw())
            .into_iter()
            .map(|(b, hw)| {
                let frames = x.narrow(0, b * d.frames, d.frames)?;
                Ok(match self.from {
                    FrameLayout::ChannelsFirst => frames
                        .reshape((d.frames, self.channels, d.hw()))?
                        .narrow(2, hw.start, hw.len())?
                        .permute((2, 0, 1))?,
                    FrameLayout::Tokens => {
                        frames.narrow(1, hw.start, hw.len())?.permute((1, 0, 2))?
                    }
                })
            })
            .collect::<Result<Vec<_>>>()?;
        cat_views(parts, ctx.kernels)
    }
}

/// `(B*H*W, T, C)` -> frame-major features, back to the layout between blocks.
///
/// Sliced along frames, it reads the position-major input whole and gathers only the frames
/// of its slice.
#[derive(Debug, Clone)]
pub struct PositionsToFrames {
    pub dims: VideoDims,
    pub channels: usize,
    pub to: FrameLayout,
}

impl Op for PositionsToFrames {
    op_contract!("positions_to_frames", Frames);

    fn gathers_input(&self, input: usize, axis: Axis) -> bool {
        input == 0 && axis == Axis::Frames
    }

    /// A band of positions is the video of the band's height: row for row.
    fn rows(&self) -> Option<RowRule> {
        (self.to == FrameLayout::ChannelsFirst).then_some(RowRule::Same)
    }

    fn infer(&self, inputs: &[&ValueInfo]) -> Result<ValueInfo> {
        let d = self.dims;
        let c = self.channels;
        expect_rank(inputs[0], &[d.positions_len(), d.frames, c], self.kind())?;
        let layout = match (self.to, inputs[0].layout.rows) {
            (FrameLayout::ChannelsFirst, AxisTag::Blocks { .. }) => Layout::IMAGES,
            _ => Layout::FRAME_MAJOR,
        };
        Ok(ValueInfo::new(self.to.shape(d, c), inputs[0].dtype, layout))
    }

    fn flops(&self, _: &[&ValueInfo], _: &ValueInfo) -> u64 {
        0
    }

    fn forward(&self, inputs: &[&Tensor], ctx: &SliceCtx) -> Result<Tensor> {
        if ctx.band.is_some() {
            let band = PositionsToFrames {
                dims: band_dims(self.dims, ctx),
                ..self.clone()
            };
            return band.forward(inputs, &unbanded(ctx));
        }
        let d = self.dims;
        let x = inputs[0];
        let rows = ctx.rows(d.frames_len());
        let rows_len = rows.len();
        let parts = batch_pieces(rows, d.frames)
            .into_iter()
            .map(|(b, t)| {
                let frames = x
                    .narrow(0, b * d.hw(), d.hw())?
                    .narrow(1, t.start, t.len())?;
                Ok(match self.to {
                    FrameLayout::ChannelsFirst => frames.permute((1, 2, 0))?,
                    FrameLayout::Tokens => frames.permute((1, 0, 2))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let out = cat_views(parts, ctx.kernels)?;
        Ok(match self.to {
            FrameLayout::ChannelsFirst => {
                out.reshape((rows_len, self.channels, d.height, d.width))?
            }
            FrameLayout::Tokens => out,
        })
    }
}

/// Frame-major `(N, C, H, W)` <-> channels-last tokens `(N, H*W, C)`, frame by frame.
#[derive(Debug, Clone, Copy)]
pub struct Tokens {
    pub height: usize,
    pub width: usize,
    /// `true`: to tokens; `false`: back to `(N, C, H, W)`.
    pub to_tokens: bool,
}

impl Op for Tokens {
    fn kind(&self) -> &'static str {
        if self.to_tokens {
            "to_tokens"
        } else {
            "from_tokens"
        }
    }

    fn independence(&self) -> Independence {
        Independence::Frames
    }

    fn infer(&self, inputs: &[&ValueInfo]) -> Result<ValueInfo> {
        let x = inputs[0];
        let hw = self.height * self.width;
        // Tokens flatten H and W: no dim holds the rows.
        let (dims, layout) = match (x.shape.dims(), self.to_tokens) {
            (&[n, c, h, w], true) if h == self.height && w == self.width => {
                (vec![n, hw, c], Layout::FRAME_MAJOR)
            }
            (&[n, l, c], false) if l == hw => (vec![n, c, self.height, self.width], Layout::IMAGES),
            (d, _) => {
                return Err(IrError::Plan(format!(
                    "{} at {}x{} cannot take {d:?}",
                    self.kind(),
                    self.height,
                    self.width
                )))
            }
        };
        Ok(ValueInfo::new(dims, x.dtype, layout))
    }

    fn flops(&self, _: &[&ValueInfo], _: &ValueInfo) -> u64 {
        0
    }

    fn forward(&self, inputs: &[&Tensor], ctx: &SliceCtx) -> Result<Tensor> {
        let x = inputs[0];
        let k = ctx.kernels;
        Ok(if self.to_tokens {
            let (n, c, h, w) = x.dims4()?;
            kernels::contiguous(k, &x.reshape((n, c, h * w))?.transpose(1, 2)?)?
        } else {
            let (n, _, c) = x.dims3()?;
            kernels::contiguous(k, &x.transpose(1, 2)?)?.reshape((n, c, self.height, self.width))?
        })
    }
}

/// Nearest-neighbour resize of each frame to `height x width`, as torch's
/// `F.interpolate(mode="nearest")`: output pixel `i` reads input pixel `floor(i * in / out)`.
///
/// diffusers' `Upsample2D` doubles (`scale_factor=2`), or, when a UNet forwards upsample sizes
/// because its latents are not multiples of `2^levels`, resizes to its skip connection's size
/// (`2n - 1` from `n` where a stride-2 conv rounded an odd size up). Frame by frame, one candle
/// kernel, no workspace.
#[derive(Debug, Clone, Copy)]
pub struct UpsampleNearest {
    pub height: usize,
    pub width: usize,
    /// The integer factor of the height when there is one (diffusers' `scale_factor=2`):
    /// then the op runs on bands of rows.
    pub row_factor: Option<usize>,
}

impl UpsampleNearest {
    /// Resize `(in_h, in_w)` frames to `height x width`.
    pub fn new((in_h, in_w): (usize, usize), height: usize, width: usize) -> Self {
        let exact = in_h > 0 && height % in_h == 0 && in_w > 0 && width % in_w == 0;
        UpsampleNearest {
            height,
            width,
            row_factor: exact.then(|| height / in_h),
        }
    }
}

impl Op for UpsampleNearest {
    op_contract!("upsample_nearest", Frames);
    fn rows(&self) -> Option<RowRule> {
        self.row_factor.map(|factor| RowRule::Upsample { factor })
    }
    fn infer(&self, inputs: &[&ValueInfo]) -> Result<ValueInfo> {
        match inputs[0].shape.dims() {
            &[n, c, h, w] if h > 0 && w > 0 && self.height > 0 && self.width > 0 => {
                Ok(ValueInfo::new(
                    (n, c, self.height, self.width),
                    inputs[0].dtype,
                    inputs[0].layout,
                ))
            }
            d => Err(IrError::Plan(format!(
                "upsample_nearest to {}x{} expects non-empty (N, C, H, W), got {d:?}",
                self.height, self.width
            ))),
        }
    }
    /// On a band whose first or last output row is not the first or last copy of an input
    /// row, the band's input rows are upsampled whole and cut: that copy is the workspace.
    fn workspace_bytes(&self, inputs: &[&ValueInfo], output: &ValueInfo, ws: Workspace) -> usize {
        let (x, factor) = (inputs[0].shape.dims(), self.row_factor.unwrap_or(1));
        let out_rows = output.shape.dims()[2];
        if ws.on_rows && x[2] * factor != out_rows {
            output.bytes() / out_rows.max(1) * x[2] * factor
        } else {
            0
        }
    }
    fn flops(&self, _: &[&ValueInfo], _: &ValueInfo) -> u64 {
        0
    }
    fn forward(&self, x: &[&Tensor], ctx: &SliceCtx) -> Result<Tensor> {
        let (Some(band), Some(factor)) = (&ctx.band, self.row_factor) else {
            return Ok(x[0].upsample_nearest2d(self.height, self.width)?);
        };
        let rows = x[0].dim(2)? * factor;
        let up = x[0].upsample_nearest2d(rows, self.width)?;
        if rows == band.out.len() {
            return Ok(up);
        }
        let first = band.out.start - band.input.start * factor;
        Ok(up.narrow(2, first, band.out.len())?.contiguous()?)
    }
}

/// Zero padding of one pixel on the right and bottom of each frame, before a stride-2 conv
/// with no padding (diffusers' `Downsample2D` with `padding=0`).
///
/// Two candle pads: a zero column and the width-padded copy, then a zero row and the result.
#[derive(Debug, Clone, Copy)]
pub struct PadEnd;

impl PadEnd {
    fn tiling(&self, x: &ValueInfo, output: &ValueInfo, ws: Workspace) -> (usize, usize) {
        let d = x.shape.dims();
        let (c, h, w, size) = (d[1], d[2], d[3], x.dtype.size_in_bytes());
        row_chunk(d[0], output.bytes(), ws.limit, |r| {
            let wide = r * c * h * (w + 1) * size;
            let col = r * c * h * size;
            let row = r * c * (w + 1) * size;
            let out = r * c * (h + 1) * (w + 1) * size;
            (col + wide).max(wide + row + out)
        })
    }
}

impl Op for PadEnd {
    op_contract!("pad_end", Frames);
    fn infer(&self, inputs: &[&ValueInfo]) -> Result<ValueInfo> {
        match inputs[0].shape.dims() {
            &[n, c, h, w] => Ok(ValueInfo::new(
                (n, c, h + 1, w + 1),
                inputs[0].dtype,
                inputs[0].layout,
            )),
            d => Err(IrError::Plan(format!(
                "pad_end expects (N, C, H, W), got {d:?}"
            ))),
        }
    }
    fn workspace_bytes(&self, inputs: &[&ValueInfo], output: &ValueInfo, ws: Workspace) -> usize {
        self.tiling(inputs[0], output, ws).1
    }
    fn flops(&self, _: &[&ValueInfo], _: &ValueInfo) -> u64 {
        0
    }
    fn forward(&self, x: &[&Tensor], ctx: &SliceCtx) -> Result<Tensor> {
        let x = x[0];
        let out = self.infer(&[&info_of(x)])?;
        let (chunk, _) = self.tiling(&info_of(x), &out, ctx.workspace());
        by_row_chunks(out.shape.dims(), x.dtype(), x.device(), chunk, |r| {
            let frames = x.narrow(0, r.start, r.len())?;
            Ok(frames.pad_with_zeros(3, 0, 1)?.pad_with_zeros(2, 0, 1)?)
        })
    }
}
