//! How a kernel call computes: the CPU kernel in f32 (half types widened around it), or
//! candle's own ops on other devices and dtypes.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Device, Layout, Result, Tensor};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compute {
    /// candle's ops: not on the CPU, or a dtype the kernels do not take.
    Reference,
    /// The CPU kernel on f32 tensors.
    F32,
    /// The CPU kernel on f32 copies of tensors of this half dtype.
    Widen(DType),
}

impl Compute {
    pub fn for_dtype(dtype: DType, device: &Device) -> Compute {
        match (device, dtype) {
            (Device::Cpu, DType::F32) => Compute::F32,
            (Device::Cpu, DType::F16 | DType::BF16) => Compute::Widen(dtype),
            _ => Compute::Reference,
        }
    }

    pub fn of(t: &Tensor) -> Compute {
        Compute::for_dtype(t.dtype(), t.device())
    }

    /// `t` as the kernel takes it: contiguous f32.
    pub fn widen(self, t: &Tensor) -> Result<Tensor> {
        match self {
            Compute::Widen(_) => t.to_dtype(DType::F32)?.contiguous(),
            _ => t.contiguous(),
        }
    }

    /// A kernel's f32 result in the caller's dtype.
    pub fn narrow(self, t: Tensor) -> Result<Tensor> {
        match self {
            Compute::Widen(dtype) => t.to_dtype(dtype),
            _ => Ok(t),
        }
    }

    /// Bytes of the f32 copy [`Compute::widen`] makes of `elems` elements (none for f32).
    pub fn widened_bytes(self, elems: usize) -> usize {
        match self {
            Compute::Widen(_) => 4 * elems,
            _ => 0,
        }
    }
}

/// The f32 elements of a contiguous CPU tensor.
pub fn as_f32<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((start, end))) => Ok(&v[start..end]),
        (CpuStorage::F32(_), None) => {
            candle_core::bail!("kernel input {:?} is not contiguous", l.shape())
        }
        (other, _) => candle_core::bail!("kernel input is {:?}, not f32", other.dtype()),
    }
}
