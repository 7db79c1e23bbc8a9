//! The portable path: memory-lean ops built from candle's tensor ops alone, so they run on
//! every device candle has (CUDA, Metal, and the CPU, where they are tested).

pub mod attention;
