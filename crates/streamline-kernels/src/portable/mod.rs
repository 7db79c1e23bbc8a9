//! The portable path: memory-lean ops built from candle's tensor ops alone (no custom op, no
//! f64, no read back to the host), so they run on every device candle has (CUDA, Metal, and
//! the CPU, where they are tested), each op's temporaries bounded (attention in query tiles and
//! key blocks, convolutions in bands of rows under a bound on im2col, the rest in tiles of rows)
//! and declared by a workspace function.

pub mod attention;
pub mod conv;
pub mod linear;
pub mod norm;
mod tiles;
