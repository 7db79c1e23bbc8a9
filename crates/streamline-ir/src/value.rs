//! Values: shape, dtype and how each slicing axis maps onto the tensor.

use std::fmt;

use candle_core::{DType, Shape};

/// The two index spaces along which video features can be sliced exactly (design.md, "Axes").
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Axis {
    /// The B*T frames: frame-wise ops see whole frames per slice.
    Frames,
    /// The B*H*W spatial locations: position-wise ops see every frame of each location.
    Positions,
}

impl Axis {
    pub const ALL: [Axis; 2] = [Axis::Frames, Axis::Positions];
}

impl fmt::Display for Axis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Axis::Frames => "frames",
            Axis::Positions => "positions",
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
}

impl fmt::Display for AxisTag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AxisTag::Dim(d) => write!(f, "{d}"),
            AxisTag::Whole => f.write_str("*"),
            AxisTag::Interleaved => f.write_str("~"),
        }
    }
}

/// The layout tag of a value: one [`AxisTag`] per axis.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct Layout {
    pub frames: AxisTag,
    pub positions: AxisTag,
}

impl Layout {
    /// `(B*T, ...)` features, as diffusers keeps them between blocks.
    pub const FRAME_MAJOR: Layout = Layout {
        frames: AxisTag::Dim(0),
        positions: AxisTag::Interleaved,
    };
    /// `(B*H*W, T, ...)` features, as temporal layers see them.
    pub const POSITION_MAJOR: Layout = Layout {
        frames: AxisTag::Interleaved,
        positions: AxisTag::Dim(0),
    };
    /// Values that every slice sees whole.
    pub const WHOLE: Layout = Layout {
        frames: AxisTag::Whole,
        positions: AxisTag::Whole,
    };

    pub fn tag(&self, axis: Axis) -> AxisTag {
        match axis {
            Axis::Frames => self.frames,
            Axis::Positions => self.positions,
        }
    }
}

impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "f:{} p:{}", self.frames, self.positions)
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
        match self.layout.tag(axis) {
            AxisTag::Dim(d) => self.shape.dims().get(d).copied(),
            _ => None,
        }
    }

    /// The info of one slice of `len` along `axis` (unchanged when the axis is not a dim).
    pub fn sliced(&self, axis: Axis, len: usize) -> ValueInfo {
        match self.layout.tag(axis) {
            AxisTag::Dim(d) => {
                let mut dims = self.shape.dims().to_vec();
                dims[d] = len;
                ValueInfo::new(dims, self.dtype, self.layout)
            }
            _ => self.clone(),
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
