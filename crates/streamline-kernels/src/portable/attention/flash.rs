//! Attention through candle-flash-attn's fused kernel, where the `flash-attn` feature is on.
//!
//! Not compiled or run on the development machines (no CUDA toolkit there): it is kept to
//! candle-flash-attn 0.11's contract, read from its source. `flash_attn` takes `(batch, seq,
//! heads, head_dim)` f16 or bf16 CUDA tensors whose last dim is contiguous (other strides are
//! passed to the kernel as they are), with as many key rows as query rows, and allocates its
//! result and an f32 log-sum-exp per query and head.

use candle_core::{DType, Result, Tensor};

use super::{longest_chunk, sizes, tile_by_tile, Tiles, BLOCK_BYTES};
use crate::attention::{AttentionSizes, KvRows};

/// [`super::attention`] through candle-flash-attn's fused kernel (CUDA, f16 or bf16, head
/// dims a multiple of 8 up to 512): no scores in memory at all. The pieces' views go to the
/// kernel as they are, heads read in place by their strides; a grouped piece is its run of
/// rows folded into one sequence against the shared kv row, so keys and values are neither
/// expanded nor copied. Each piece's result (flash_attn allocates its own) is written into
/// the output, pieces within [`BLOCK_BYTES`], so that copy stays bounded.
pub fn flash_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
    kv: KvRows,
) -> Result<Tensor> {
    let s = sizes(q, k, v, heads, kv)?;
    tile_by_tile(q, k, v, heads, kv, flash_tiles(&s), |q, k, v| {
        candle_flash_attn::flash_attn(&q, &k, &v, scale as f32, false)
    })
}

/// Bytes [`flash_attention`] allocates beyond its inputs and output: a piece's result and
/// its rows' log-sum-exp (f32, per query and head). Exact for own rows, a bound for grouped.
pub fn flash_attention_workspace(s: AttentionSizes, dtype: DType) -> usize {
    let t = flash_tiles(&s);
    let (b, l) = (
        longest_chunk(s.rows, t.rows),
        longest_chunk(s.queries, t.queries),
    );
    b * l * (s.channels * dtype.size_in_bytes() + 4 * s.heads)
}

/// Pieces for [`flash_attention`]: all keys at once, results within [`BLOCK_BYTES`] of f32.
fn flash_tiles(s: &AttentionSizes) -> Tiles {
    let budget = BLOCK_BYTES / 4;
    let (lq, c) = (s.queries.max(1), s.channels.max(1));
    let (rows, queries) = if lq * c <= budget {
        (budget / (lq * c), lq)
    } else {
        (1, (budget / c).clamp(1, lq))
    };
    Tiles {
        rows,
        queries,
        keys: s.keys.max(1),
    }
}
