//! The one adapter from the CPU kernels to candle's custom ops.
//!
//! candle's `CustomOp1`, `CustomOp2` and `CustomOp3` each want a name and a `cpu_fwd` of
//! their own arity. Every kernel here writes [`CpuKernel::run`] over an array of inputs
//! instead, and [`Kernel`] implements all three traits over it, so the plumbing exists
//! once and a kernel's impl is its name and its body.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape};

/// One input of a kernel as candle hands it over: its storage and its layout.
pub(crate) type Input<'a> = (&'a CpuStorage, &'a Layout);

/// A kernel on `N` CPU inputs.
pub(crate) trait CpuKernel<const N: usize>: Send + Sync {
    /// The op's name in candle's errors.
    const NAME: &'static str;

    fn run(&self, inputs: [Input<'_>; N]) -> Result<(CpuStorage, Shape)>;
}

/// A [`CpuKernel`] as candle's custom op of its arity.
pub(crate) struct Kernel<K>(pub K);

impl<K: CpuKernel<1>> CustomOp1 for Kernel<K> {
    fn name(&self) -> &'static str {
        K::NAME
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        self.0.run([(s, l)])
    }
}

impl<K: CpuKernel<2>> CustomOp2 for Kernel<K> {
    fn name(&self) -> &'static str {
        K::NAME
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.0.run([(s1, l1), (s2, l2)])
    }
}

impl<K: CpuKernel<3>> CustomOp3 for Kernel<K> {
    fn name(&self) -> &'static str {
        K::NAME
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.0.run([(s1, l1), (s2, l2), (s3, l3)])
    }
}
