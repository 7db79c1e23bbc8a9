//! Values: shape, dtype and how each slicing axis maps onto the tensor.

use std::fmt;
use std::ops::Range;

use candle_core::{DType, Shape};

/// The index spaces along which video features can be sliced exactly (design.md, "Axes").
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Axis {
    /// The B*T frames: frame-wise ops see whole frames per slice.
    Frames,
    /// The B*H*W spatial locations: position-wise ops see every frame of each location.
    Positions,
    /// The H rows of every frame: bands of rows with all frames and channels. Frame-wise
    /// convolutions read a halo of rows around their band ([`crate::RowRule`]), so a band of
    /// one node needs a wider band of the nodes before it; per-frame and per-video statistics
    /// become reductions over the bands.
    Rows,
}

impl Axis {
    /// The axes whose slices need no halo: what the paper slices along.
    pub const ALL: [Axis; 2] = [Axis::Frames, Axis::Positions];
}

impl fmt::Display for Axis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Axis::Frames => "frames",
            Axis::Positions => "positions",
            Axis::Rows => "rows",
        })
    }
}

/// How one axis maps onto a value's tensor.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum AxisTag {
    /// Tensor dim `d` enumerates the axis, so a slice of the axis is `narrow(d, start, len)`.
    Dim(usize),
    /// The value does not vary along the axis: every slice sees it whole (per-batch
    /// conditioning, normalization statistics, constants).
    Whole,
    /// The value varies along the axis but no single dim enumerates it, e.g. a frame-major
    /// feature `(B*T, C, H, W)` seen from the positions axis. Only an op that gathers the
    /// slice it needs by itself may read such a value inside a group sliced along that axis.
    Interleaved,
    /// Dim `dim` enumerates `(outer, axis, inner)` flattened in that order: a slice of the
    /// axis is `outer` blocks of contiguous runs, e.g. the rows of a position-major
    /// `(B*H*W, T, C)` feature are `Blocks { dim: 0, outer: B, inner: W }`. With `outer` 1 a
    /// slice is one narrow.
    Blocks {
        dim: usize,
        outer: usize,
        inner: usize,
    },
}

impl AxisTag {
    /// The dim and the `(outer, inner)` blocking when a dim enumerates the axis.
    pub fn blocks(self) -> Option<(usize, usize, usize)> {
        match self {
            AxisTag::Dim(d) => Some((d, 1, 1)),
            AxisTag::Blocks { dim, outer, inner } => Some((dim, outer, inner)),
            AxisTag::Whole | AxisTag::Interleaved => None,
        }
    }

    /// For a slice `range` of an axis of length `len`: the `(offset, len)` runs along the dim,
    /// one per outer block.
    pub fn runs(self, range: &Range<usize>, len: usize) -> Vec<(usize, usize)> {
        let Some((_, outer, inner)) = self.blocks() else {
            return Vec::new();
        };
        (0..outer)
            .map(|o| ((o * len + range.start) * inner, range.len() * inner))
            .collect()
    }
}

impl fmt::Display for AxisTag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AxisTag::Dim(d) => write!(f, "{d}"),
            AxisTag::Whole => f.write_str("*"),
            AxisTag::Interleaved => f.write_str("~"),
            AxisTag::Blocks { dim, outer, inner } => write!(f, "{dim}({outer}*r*{inner})"),
        }
    }
}

/// The layout tag of a value: one [`AxisTag`] per axis.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct Layout {
    pub frames: AxisTag,
    pub positions: AxisTag,
    pub rows: AxisTag,
}

impl Layout {
    /// `(B*T, ...)` features, as diffusers keeps them between blocks.
    /// No dim is known to hold the rows (tokens, flattened pixels): use [`Layout::IMAGES`]
    /// for `(B*T, C, H, W)` images.
    pub const FRAME_MAJOR: Layout = Layout {
        frames: AxisTag::Dim(0),
        positions: AxisTag::Interleaved,
        rows: AxisTag::Interleaved,
    };
    /// `(B*T, C, H, W)` images: frame-major with the rows at dim 2.
    pub const IMAGES: Layout = Layout {
        rows: AxisTag::Dim(2),
        ..Layout::FRAME_MAJOR
    };
    /// `(B*H*W, T, ...)` features, as temporal layers see them. No dim is known to hold the
    /// rows: use [`Layout::positions_of`] when the batch and width are known.
    pub const POSITION_MAJOR: Layout = Layout {
        frames: AxisTag::Interleaved,
        positions: AxisTag::Dim(0),
        rows: AxisTag::Interleaved,
    };
    /// Values that every slice sees whole.
    pub const WHOLE: Layout = Layout {
        frames: AxisTag::Whole,
        positions: AxisTag::Whole,
        rows: AxisTag::Whole,
    };

    /// Position-major `(B*H*W, T, ...)` features of `batch` videos `width` pixels wide: the
    /// rows are blocks of dim 0.
    pub const fn positions_of(batch: usize, width: usize) -> Layout {
        Layout {
            rows: AxisTag::Blocks {
                dim: 0,
                outer: batch,
                inner: width,
            },
            ..Layout::POSITION_MAJOR
        }
    }

    /// Per-frame values (norm statistics, embeddings) `(B*T, ...)`: sliced with the frames,
    /// whole for every band of rows.
    pub const PER_FRAME: Layout = Layout {
        frames: AxisTag::Dim(0),
        positions: AxisTag::Interleaved,
        rows: AxisTag::Whole,
    };

    pub fn tag(&self, axis: Axis) -> AxisTag {
        match axis {
            Axis::Frames => self.frames,
            Axis::Positions => self.positions,
            Axis::Rows => self.rows,
        }
    }
}

impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "f:{} p:{}", self.frames, self.positions)?;
        match self.rows.blocks() {
            Some(_) => write!(f, " r:{}", self.rows),
            None => Ok(()),
        }
    }
}

/// Everything the planner knows about a value without computing it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValueInfo {
    pub shape: Shape,
    pub dtype: DType,
    pub layout: Layout,
}

impl ValueInfo {
    pub fn new(shape: impl Into<Shape>, dtype: DType, layout: Layout) -> Self {
        ValueInfo {
            shape: shape.into(),
            dtype,
            layout,
        }
    }

    pub fn bytes(&self) -> usize {
        self.shape.elem_count() * self.dtype.size_in_bytes()
    }

    /// Length of `axis` in this value, when a dim enumerates it.
    pub fn axis_len(&self, axis: Axis) -> Option<usize> {
        let (d, outer, inner) = self.layout.tag(axis).blocks()?;
        let n = self.shape.dims().get(d).copied()?;
        Some(n / (outer * inner).max(1))
    }

    /// The info of one slice of `len` along `axis` (unchanged when the axis is not a dim).
    pub fn sliced(&self, axis: Axis, len: usize) -> ValueInfo {
        match self.layout.tag(axis).blocks() {
            Some((d, outer, inner)) => {
                let mut dims = self.shape.dims().to_vec();
                dims[d] = outer * len * inner;
                ValueInfo::new(dims, self.dtype, self.layout)
            }
            None => self.clone(),
        }
    }
}

impl fmt::Display for ValueInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let dims: Vec<String> = self.shape.dims().iter().map(|d| d.to_string()).collect();
        write!(
            f,
            "{}[{}] {}",
            self.dtype.as_str(),
            dims.join(","),
            self.layout
        )
    }
}
