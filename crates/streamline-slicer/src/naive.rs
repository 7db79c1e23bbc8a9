//! The paper's naive slicing (Sec. 3), kept **only as a wrong baseline**.
//!
//! Naive slicing cuts temporal layers along frames as well, so each chunk of frames is
//! denoised as if it were a video of its own: temporal attention, temporal convolutions and
//! temporal GroupNorm statistics never see frames of other chunks, and motion breaks at chunk
//! borders. The exact alternative is [`crate::PaperSlicer`], which slices temporal layers along
//! positions instead. A pipeline runs the naive baseline by evaluating its model once per
//! chunk of [`frame_chunks`], lowered at that chunk's frame count.

use std::ops::Range;

/// The frame ranges of naive slicing: `chunks` runs of consecutive frames whose lengths differ
/// by at most one (capped at one frame per chunk).
pub fn frame_chunks(frames: usize, chunks: usize) -> Vec<Range<usize>> {
    streamline_ir::chunk_ranges(frames, chunks)
}
