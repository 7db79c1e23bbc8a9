//! Layout changes between frame-major and position-major video features.

use std::ops::Range;

use candle_core::Tensor;
use streamline_ir::{Axis, Independence, IrError, Layout, Op, Result, SliceCtx, ValueInfo};

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

/// Concatenate per-batch pieces along dim 0 (no copy when there is one piece).
pub(crate) fn cat0(parts: Vec<Tensor>) -> Result<Tensor> {
    Ok(match parts.len() {
        1 => parts.into_iter().next().expect("one part"),
        _ => Tensor::cat(&parts, 0)?,
    })
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
/// positions of its slice, so the full transposed copy never exists.
#[derive(Debug, Clone)]
pub struct FramesToPositions {
    pub dims: VideoDims,
    pub channels: usize,
    pub from: FrameLayout,
}

impl Op for FramesToPositions {
    fn kind(&self) -> &'static str {
        "frames_to_positions"
    }

    fn independence(&self) -> Independence {
        Independence::Positions
    }

    fn gathers_input(&self, input: usize, axis: Axis) -> bool {
        input == 0 && axis == Axis::Positions
    }

    fn infer(&self, inputs: &[&ValueInfo]) -> Result<ValueInfo> {
        let d = self.dims;
        let c = self.channels;
        expect_rank(inputs[0], &self.from.shape(d, c), self.kind())?;
        Ok(ValueInfo::new(
            (d.positions_len(), d.frames, c),
            inputs[0].dtype,
            Layout::POSITION_MAJOR,
        ))
    }

    fn workspace_bytes(&self, _: &[&ValueInfo], output: &ValueInfo) -> usize {
        // Per-batch pieces are gathered, then concatenated into the output.
        output.bytes()
    }

    fn flops(&self, _: &[&ValueInfo], _: &ValueInfo) -> u64 {
        0
    }

    fn forward(&self, inputs: &[&Tensor], ctx: &SliceCtx) -> Result<Tensor> {
        let d = self.dims;
        let x = inputs[0];
        let rows = ctx.rows(d.positions_len());
        let parts = batch_pieces(rows, d.hw())
            .into_iter()
            .map(|(b, hw)| {
                let frames = x.narrow(0, b * d.frames, d.frames)?;
                let piece = match self.from {
                    FrameLayout::ChannelsFirst => frames
                        .reshape((d.frames, self.channels, d.hw()))?
                        .narrow(2, hw.start, hw.len())?
                        .permute((2, 0, 1))?,
                    FrameLayout::Tokens => {
                        frames.narrow(1, hw.start, hw.len())?.permute((1, 0, 2))?
                    }
                };
                Ok(piece.contiguous()?)
            })
            .collect::<Result<Vec<_>>>()?;
        cat0(parts)
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
    fn kind(&self) -> &'static str {
        "positions_to_frames"
    }

    fn independence(&self) -> Independence {
        Independence::Frames
    }

    fn gathers_input(&self, input: usize, axis: Axis) -> bool {
        input == 0 && axis == Axis::Frames
    }

    fn infer(&self, inputs: &[&ValueInfo]) -> Result<ValueInfo> {
        let d = self.dims;
        let c = self.channels;
        expect_rank(inputs[0], &[d.positions_len(), d.frames, c], self.kind())?;
        Ok(ValueInfo::new(
            self.to.shape(d, c),
            inputs[0].dtype,
            Layout::FRAME_MAJOR,
        ))
    }

    fn workspace_bytes(&self, _: &[&ValueInfo], output: &ValueInfo) -> usize {
        output.bytes()
    }

    fn flops(&self, _: &[&ValueInfo], _: &ValueInfo) -> u64 {
        0
    }

    fn forward(&self, inputs: &[&Tensor], ctx: &SliceCtx) -> Result<Tensor> {
        let d = self.dims;
        let x = inputs[0];
        let rows = ctx.rows(d.frames_len());
        let parts = batch_pieces(rows, d.frames)
            .into_iter()
            .map(|(b, t)| {
                let frames = x
                    .narrow(0, b * d.hw(), d.hw())?
                    .narrow(1, t.start, t.len())?;
                Ok(match self.to {
                    FrameLayout::ChannelsFirst => frames
                        .permute((1, 2, 0))?
                        .contiguous()?
                        .reshape((t.len(), self.channels, d.height, d.width))?,
                    FrameLayout::Tokens => frames.permute((1, 0, 2))?.contiguous()?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        cat0(parts)
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
        let dims = match (x.shape.dims(), self.to_tokens) {
            (&[n, c, h, w], true) if h == self.height && w == self.width => vec![n, hw, c],
            (&[n, l, c], false) if l == hw => vec![n, c, self.height, self.width],
            (d, _) => {
                return Err(IrError::Plan(format!(
                    "{} at {}x{} cannot take {d:?}",
                    self.kind(),
                    self.height,
                    self.width
                )))
            }
        };
        Ok(ValueInfo::new(dims, x.dtype, x.layout))
    }

    fn flops(&self, _: &[&ValueInfo], _: &ValueInfo) -> u64 {
        0
    }

    fn forward(&self, inputs: &[&Tensor], _: &SliceCtx) -> Result<Tensor> {
        let x = inputs[0];
        Ok(if self.to_tokens {
            let (n, c, h, w) = x.dims4()?;
            x.reshape((n, c, h * w))?.transpose(1, 2)?.contiguous()?
        } else {
            let (n, _, c) = x.dims3()?;
            x.transpose(1, 2)?
                .contiguous()?
                .reshape((n, c, self.height, self.width))?
        })
    }
}
