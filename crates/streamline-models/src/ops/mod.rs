//! IR ops shared by the models.
//!
//! Video features travel frame-major, `(B*T, C, H, W)`, between blocks; temporal layers work
//! position-major, `(B*H*W, T, C)`, where one dim enumerates the positions so slicing along
//! them is a plain narrow. [`FramesToPositions`] and [`PositionsToFrames`] switch between the
//! two and gather their slice from the other layout themselves, so a layout change never
//! materializes inside a sliced group.

mod attention;
mod elementwise;
mod embed;
mod group_norm;
mod kernels;
mod layout;
mod nn;
mod rows;
mod temporal;

pub use attention::{Attention, Context};
pub use elementwise::{Add, AddBatchEmb, AddBroadcast, Blend, ConcatChannels};
pub use embed::{Const, Sinusoid};
pub use group_norm::{GroupNormApply, GroupNormStats};
pub use layout::{FrameLayout, FramesToPositions, PositionsToFrames, Tokens, VideoDims};
pub use nn::{Conv2d, Geglu, GroupNormFrames, LayerNorm, Linear, PadEnd, Silu, UpsampleNearest};
pub use rows::{GroupNormFrameApply, GroupNormFrameStats};
pub use temporal::TemporalConv;
