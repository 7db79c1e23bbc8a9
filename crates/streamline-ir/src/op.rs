//! The contract every lowered layer implements.

use std::fmt::Debug;
use std::ops::Range;

use candle_core::{Device, Tensor};

use crate::error::Result;
use crate::value::{Axis, ValueInfo};

/// Along which axes an op may run slice by slice with no change to any number.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum Independence {
    /// Mixes everything: only ever runs whole.
    None,
    /// Treats every frame alone (2D convs, per-frame norms, spatial attention).
    Frames,
    /// Mixes only along time at each location (temporal attention and convs).
    Positions,
    /// Pointwise: any slicing is exact.
    Both,
}

impl Independence {
    pub fn allows(self, axis: Axis) -> bool {
        matches!(
            (self, axis),
            (Independence::Both, _)
                | (Independence::Frames, Axis::Frames)
                | (Independence::Positions, Axis::Positions)
        )
    }
}

/// How an op runs on bands of rows ([`Axis::Rows`]): which rows of its inputs (those with a
/// dim enumerating the rows; the others arrive whole) one band of its output needs.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum RowRule {
    /// Output row `r` reads input row `r` alone: pointwise ops, temporal ops (all frames of
    /// a position are in every band), layout changes.
    Same,
    /// A window along H, zero-padded at the image edges: output row `r` reads input rows
    /// `r*stride - pad .. r*stride - pad + kernel`, clamped to the image. The op reads
    /// [`SliceCtx::band`] to pad only where the band meets an edge of the image.
    Window {
        kernel: usize,
        stride: usize,
        pad: usize,
    },
    /// Nearest upsampling by an integer `factor`: output row `r` reads input row `r / factor`.
    Upsample { factor: usize },
    /// A reduction over rows (statistics): each band reads its own input rows, which the
    /// bands partition, and yields a partial result that [`Op::merge`] folds. Its consumers
    /// in the same group run in a later pass over the bands.
    Reduce,
}

impl RowRule {
    /// The input rows that output rows `out` need, clamped to an input of `in_len` rows.
    pub fn input_rows(self, out: &Range<usize>, in_len: usize) -> Range<usize> {
        if out.is_empty() {
            return 0..0;
        }
        match self {
            RowRule::Same | RowRule::Reduce => out.start.min(in_len)..out.end.min(in_len),
            RowRule::Window {
                kernel,
                stride,
                pad,
            } => {
                let start = (out.start * stride).saturating_sub(pad);
                let end = ((out.end - 1) * stride + kernel).saturating_sub(pad);
                start.min(in_len)..end.min(in_len)
            }
            RowRule::Upsample { factor } => out.start / factor..(out.end - 1) / factor + 1,
        }
    }

    /// The output length this rule makes of an input of `in_len` rows (`None` for a
    /// reduction), to check a graph's shapes against the rule.
    pub fn output_len(self, in_len: usize) -> Option<usize> {
        match self {
            RowRule::Same => Some(in_len),
            RowRule::Window {
                kernel,
                stride,
                pad,
            } => (in_len + 2 * pad)
                .checked_sub(kernel)
                .map(|n| n / stride.max(1) + 1),
            RowRule::Upsample { factor } => Some(in_len * factor),
            RowRule::Reduce => None,
        }
    }
}

/// The rows one call on a band of rows computes and the rows of its inputs it was given.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RowBand {
    /// Output rows computed (for a reduction: the input rows it reduces).
    pub out: Range<usize>,
    /// Rows of the whole output (for a reduction: of the whole input).
    pub out_len: usize,
    /// Rows of the row-enumerated inputs given, clamped to the image.
    pub input: Range<usize>,
    /// Rows of the whole inputs.
    pub input_len: usize,
}

impl RowBand {
    /// Zero rows a window of `rule` needs above and below the given input rows: nonzero only
    /// where the band meets an edge of the image.
    pub fn padding(&self, kernel: usize, stride: usize, pad: usize) -> (usize, usize) {
        let want_start = (self.out.start * stride) as isize - pad as isize;
        let want_end = ((self.out.end.max(1) - 1) * stride + kernel) as isize - pad as isize;
        let top = (self.input.start as isize - want_start).max(0) as usize;
        let bottom = (want_end - self.input.end as isize).max(0) as usize;
        (top, bottom)
    }
}

/// Which implementation of the ops runs. What an op allocates depends on it, so a plan is made
/// for one ([`crate::Plan::kernels`]) and every call is told it ([`SliceCtx::kernels`]).
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Hash)]
pub enum Kernels {
    /// streamline-kernels' CPU kernels; CPU tensors only.
    #[default]
    Cpu,
    /// The portable path, built from candle ops and tiled so that no buffer exceeds what the
    /// plan counts: on a GPU (`gpu`), or on the CPU when asked for, so that what a GPU runs is
    /// tested there. Where it runs changes a few costs (candle's CPU backend lacks some half
    /// precision products, which then run in f32).
    Portable { gpu: bool },
    /// The portable path with attention through flash-attn (CUDA, f16 and bf16).
    FlashAttn,
}

impl Kernels {
    /// Whether candle's CPU backend runs these kernels.
    pub fn on_cpu(self) -> bool {
        matches!(self, Kernels::Cpu | Kernels::Portable { gpu: false })
    }

    /// Whether these kernels run on tensors of `device`.
    pub fn runs_on(self, device: &Device) -> bool {
        match self {
            Kernels::Cpu | Kernels::Portable { gpu: false } => device.is_cpu(),
            Kernels::Portable { gpu: true } => !device.is_cpu(),
            Kernels::FlashAttn => device.is_cuda(),
        }
    }
}

impl std::fmt::Display for Kernels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Kernels::Cpu => "cpu",
            Kernels::Portable { gpu: false } => "portable (CPU)",
            Kernels::Portable { gpu: true } => "portable (GPU)",
            Kernels::FlashAttn => "flash-attn",
        })
    }
}

/// What an op's transient buffers depend on besides shapes: the implementation that runs and
/// the group's workspace limit.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct Workspace {
    pub kernels: Kernels,
    /// Bytes of transient workspace one call may use; `None`: ops run untiled.
    pub limit: Option<usize>,
    /// The call runs on a band of rows ([`Axis::Rows`]): its shapes are those of the band,
    /// and per-video extents follow from them (a band of a position-major feature holds
    /// `B * rows * W` positions).
    pub on_rows: bool,
}

/// Which part of the sliced axis a forward call computes.
///
/// Most ops ignore it: their inputs arrive already narrowed. Ops that read a value whole (norm
/// statistics per batch item, a frame-major input they gather from) use it to find which rows
/// of that value belong to the slice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceCtx {
    /// `None` when the node runs unsliced.
    pub axis: Option<Axis>,
    /// The slice, in the axis' index space.
    pub range: Range<usize>,
    /// Length of the whole axis.
    pub len: usize,
    /// Bytes of transient workspace the call may use (see [`Op::workspace_bytes`]).
    pub workspace_limit: Option<usize>,
    /// The implementation to run.
    pub kernels: Kernels,
    /// Along [`Axis::Rows`]: the band this call computes (then `range` is `band.out` and
    /// `len` is `band.out_len`).
    pub band: Option<RowBand>,
}

impl SliceCtx {
    /// The context of an unsliced run.
    pub fn whole() -> Self {
        SliceCtx {
            axis: None,
            range: 0..0,
            len: 0,
            workspace_limit: None,
            kernels: Kernels::Cpu,
            band: None,
        }
    }

    /// What this call's workspace is planned under.
    pub fn workspace(&self) -> Workspace {
        Workspace {
            kernels: self.kernels,
            limit: self.workspace_limit,
            on_rows: self.band.is_some(),
        }
    }

    /// The rows of an axis of length `len` this call covers (all of them when unsliced).
    pub fn rows(&self, len: usize) -> Range<usize> {
        match self.axis {
            Some(_) => self.range.clone(),
            None => 0..len,
        }
    }
}

/// The methods of an [`Op`] impl that only name the op: its kind, its independence and,
/// where it runs on row bands, its [`RowRule`]. Most layers spell them alike, so an impl
/// says them in one line, `op_contract!("silu", Both, rows RowRule::Same);`, and keeps its
/// own methods for what differs; an op whose kind or rule depends on its fields writes them.
#[macro_export]
macro_rules! op_contract {
    ($kind:literal, $indep:ident $(, rows $rows:expr)?) => {
        fn kind(&self) -> &'static str {
            $kind
        }
        fn independence(&self) -> $crate::Independence {
            $crate::Independence::$indep
        }
        $(fn rows(&self) -> Option<$crate::RowRule> {
            Some($rows)
        })?
    };
}

/// One node's computation.
///
/// Shape functions (`infer`, `workspace_bytes`, `flops`) never touch weights, so a full-size
/// model can be planned without loading it.
pub trait Op: Debug + Send + Sync {
    /// Short kind name used in dumps, e.g. `conv2d`.
    fn kind(&self) -> &'static str;

    /// Parameters worth showing in a dump (kernel size, heads, ...).
    fn describe(&self) -> String {
        String::new()
    }

    /// Axes along which the op is exact when run slice by slice.
    fn independence(&self) -> Independence;

    /// How the op runs on bands of rows; `None`: it needs whole frames (spatial attention,
    /// ops that flatten H and W).
    fn rows(&self) -> Option<RowRule> {
        None
    }

    /// Whether the op runs exactly slice by slice along `axis`.
    fn allows(&self, axis: Axis) -> bool {
        match axis {
            Axis::Rows => self.rows().is_some(),
            _ => self.independence().allows(axis),
        }
    }

    /// A reduction runs slice by slice along its independent axes, but each slice yields a
    /// partial result that [`Op::merge`] folds; its output is whole along the sliced axis and
    /// only exists once every slice has run.
    fn is_reduction(&self) -> bool {
        false
    }

    /// Whether the op is a reduction along `axis`: per-frame statistics are a reduction
    /// along the rows but frame-wise along the frames.
    fn reduces(&self, axis: Axis) -> bool {
        match axis {
            Axis::Rows => self.rows() == Some(RowRule::Reduce),
            _ => self.is_reduction(),
        }
    }

    /// Fold two partial results of a reduction.
    fn merge(&self, acc: &Tensor, partial: &Tensor) -> Result<Tensor> {
        let _ = (acc, partial);
        Err(crate::IrError::Plan(format!(
            "{} is not a reduction and cannot merge partial results",
            self.kind()
        )))
    }

    /// Whether input `input` may be a value with an interleaved tag along `axis`: the op then
    /// receives it whole and gathers the slice described by the [`SliceCtx`] itself.
    fn gathers_input(&self, input: usize, axis: Axis) -> bool {
        let _ = (input, axis);
        false
    }

    /// Output shape, dtype and layout from the inputs'. Errors explain the mismatch.
    fn infer(&self, inputs: &[&ValueInfo]) -> Result<ValueInfo>;

    /// Bytes of transient buffers one call allocates besides its output (attention scores,
    /// im2col columns), for per-slice inputs and output, with `ws.kernels` running. Under a
    /// limit (`ws.limit`, the group's workspace limit, also in [`SliceCtx::workspace_limit`])
    /// ops that tile (query chunks, im2col row tiles) return what their tiling uses, which is
    /// above the limit only when no tiling fits; ops that cannot tile return their untiled
    /// figure either way.
    fn workspace_bytes(&self, inputs: &[&ValueInfo], output: &ValueInfo, ws: Workspace) -> usize {
        let _ = (inputs, output, ws);
        0
    }

    /// Floating-point operations of one call.
    fn flops(&self, inputs: &[&ValueInfo], output: &ValueInfo) -> u64;

    /// Bytes of the parameters the op holds.
    fn param_bytes(&self) -> usize {
        0
    }

    /// Compute the output (or a reduction's partial) of one slice.
    fn forward(&self, inputs: &[&Tensor], ctx: &SliceCtx) -> Result<Tensor>;
}
