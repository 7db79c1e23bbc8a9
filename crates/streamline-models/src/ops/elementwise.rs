//! Pointwise combinations: residual adds, blends, skip concatenation, embedding adds. On f32
//! on the CPU the sums run as streamline's kernels, split across the threads (candle's run
//! on one thread, or on a spinning pool of their own).

use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;
use streamline_ir::op_contract;
use streamline_ir::{IrError, Kernels, Op, Result, RowRule, SliceCtx, ValueInfo, Workspace};
use streamline_kernels::portable::norm::BatchRows;
use streamline_kernels::ChannelTables;

use super::kernels;
use super::layout::{batch_ids, by_row_chunks, info_of, row_chunk};

/// Whether the f32 CPU kernels run an op on `x` under `ws`.
fn cpu_f32(x: &ValueInfo, ws: Workspace) -> bool {
    ws.kernels == Kernels::Cpu && x.dtype == DType::F32
}

fn elems(v: &ValueInfo) -> u64 {
    v.shape.elem_count() as u64
}

/// `a + b` for two values of one shape and layout (residuals, skip connections).
#[derive(Debug, Clone, Copy)]
pub struct Add;

impl Op for Add {
    op_contract!("add", Both, rows RowRule::Same);
    fn infer(&self, inputs: &[&ValueInfo]) -> Result<ValueInfo> {
        if inputs[0] != inputs[1] {
            return Err(IrError::Plan(format!(
                "add of {} and {}",
                inputs[0], inputs[1]
            )));
        }
        Ok(inputs[0].clone())
    }
    fn flops(&self, inputs: &[&ValueInfo], _: &ValueInfo) -> u64 {
        elems(inputs[0])
    }
    fn forward(&self, x: &[&Tensor], ctx: &SliceCtx) -> Result<Tensor> {
        Ok(kernels::add(ctx.workspace().kernels, x[0], x[1])?)
    }
}

/// diffusers' `AlphaBlender`: `alpha * spatial + (1 - alpha) * temporal`.
///
/// With the "learned" strategy alpha is `sigmoid(mix_factor)`; "learned_with_images" gives
/// the same wherever `image_only_indicator` is 0, and SVD's UNet always passes zeros, so alpha
/// is one number. The temporal VAE swaps the roles (`switch_spatial_to_temporal_mix`).
#[derive(Debug, Clone)]
pub struct Blend {
    alpha: f64,
}

impl Blend {
    pub fn learned(switch_spatial_to_temporal: bool, vb: VarBuilder) -> candle_core::Result<Self> {
        // Read once at load, in f32: no f64 tensor exists on any device (Metal has none).
        let mix = f64::from(
            vb.get(1, "mix_factor")?
                .to_dtype(DType::F32)?
                .to_vec1::<f32>()?[0],
        );
        let alpha = 1.0 / (1.0 + (-mix).exp());
        Ok(Blend {
            alpha: if switch_spatial_to_temporal {
                1.0 - alpha
            } else {
                alpha
            },
        })
    }

    /// Computed as `alpha * (a - b) + b`: the difference, its scaled copy, then the result,
    /// so one buffer besides the result (the two scaled inputs would be two). The f32 CPU
    /// kernel needs none.
    fn tiling(&self, x: &ValueInfo, output: &ValueInfo, ws: Workspace) -> (usize, usize) {
        let rows = x.shape.dims()[0];
        if cpu_f32(x, ws) {
            return (rows, 0);
        }
        let per = x.bytes() / rows.max(1);
        row_chunk(rows, output.bytes(), ws.limit, |r| 2 * r * per)
    }
}

impl Op for Blend {
    op_contract!("blend", Both, rows RowRule::Same);
    fn describe(&self) -> String {
        format!("{:.4}", self.alpha)
    }
    fn infer(&self, inputs: &[&ValueInfo]) -> Result<ValueInfo> {
        Add.infer(inputs)
    }
    fn workspace_bytes(&self, inputs: &[&ValueInfo], output: &ValueInfo, ws: Workspace) -> usize {
        self.tiling(inputs[0], output, ws).1
    }
    fn flops(&self, inputs: &[&ValueInfo], _: &ValueInfo) -> u64 {
        3 * elems(inputs[0])
    }
    fn forward(&self, x: &[&Tensor], ctx: &SliceCtx) -> Result<Tensor> {
        let (a, b) = (x[0], x[1]);
        if let Some(blended) = kernels::blend(ctx.workspace().kernels, a, b, self.alpha) {
            return Ok(blended?);
        }
        let (chunk, _) = self.tiling(&info_of(a), &info_of(a), ctx.workspace());
        by_row_chunks(a.dims(), a.dtype(), a.device(), chunk, |r| {
            let (a, b) = (
                a.narrow(0, r.start, r.len())?,
                b.narrow(0, r.start, r.len())?,
            );
            let scaled = ((&a - &b)? * self.alpha)?;
            Ok((scaled + b)?)
        })
    }
}

/// Channel concatenation `(N, C1, ...)` + `(N, C2, ...)` of the up path and a skip.
#[derive(Debug, Clone, Copy)]
pub struct ConcatChannels;

impl Op for ConcatChannels {
    op_contract!("concat", Both);
    fn infer(&self, inputs: &[&ValueInfo]) -> Result<ValueInfo> {
        let (a, b) = (inputs[0].shape.dims(), inputs[1].shape.dims());
        let compatible = a.len() == b.len()
            && a.len() >= 2
            && a[0] == b[0]
            && a[2..] == b[2..]
            && inputs[0].layout == inputs[1].layout
            && inputs[0].dtype == inputs[1].dtype;
        if !compatible {
            return Err(IrError::Plan(format!(
                "concat of {} and {}",
                inputs[0], inputs[1]
            )));
        }
        let mut dims = a.to_vec();
        dims[1] += b[1];
        Ok(ValueInfo::new(dims, inputs[0].dtype, inputs[0].layout))
    }
    fn flops(&self, _: &[&ValueInfo], _: &ValueInfo) -> u64 {
        0
    }
    fn forward(&self, x: &[&Tensor], _: &SliceCtx) -> Result<Tensor> {
        Ok(Tensor::cat(&[x[0], x[1]], 1)?)
    }
}

/// Adds a per-batch-item vector `e: (B, C)` along the channel dim of every row of batch item
/// `row / rows_per_batch` (resnet time embeddings). `e` is read whole; the slice context tells
/// which batch item each row belongs to. On f32 on the CPU one kernel pass writes the result
/// (`streamline_kernels::batch_affine`); otherwise one gather makes the `(rows, C)` per-row
/// vectors, the only buffer besides the result, wherever the slice meets batch boundaries.
#[derive(Debug, Clone)]
pub struct AddBatchEmb {
    pub rows_per_batch: usize,
    pub channel_dim: usize,
}

impl AddBatchEmb {
    /// Per chunk of rows: their batch ids and per-row vectors, then the result.
    fn tiling(&self, inputs: &[&ValueInfo], output: &ValueInfo, ws: Workspace) -> (usize, usize) {
        let (x, e) = (inputs[0], inputs[1]);
        let rows = x.shape.dims()[0];
        if let Some(bytes) = self.kernel_workspace(x, e, ws) {
            return (rows, bytes);
        }
        let per_row = std::mem::size_of::<u32>() + e.bytes() / e.shape.dims()[0].max(1);
        let out_row = x.bytes() / rows.max(1);
        row_chunk(rows, output.bytes(), ws.limit, |r| r * (per_row + out_row))
    }
}

impl AddBatchEmb {
    /// The f32 CPU kernel's workspace (the table on the host and the kernel's copy), `None`
    /// where it does not run: other devices and dtypes, or a limit it would not fit.
    fn kernel_workspace(&self, x: &ValueInfo, e: &ValueInfo, ws: Workspace) -> Option<usize> {
        let bytes = 2 * e.shape.elem_count() * 4;
        (cpu_f32(x, ws) && ws.limit.is_none_or(|l| bytes <= l)).then_some(bytes)
    }
}

impl Op for AddBatchEmb {
    op_contract!("add_batch_emb", Both);
    fn infer(&self, inputs: &[&ValueInfo]) -> Result<ValueInfo> {
        let (x, e) = (inputs[0], inputs[1]);
        let ok = match (x.shape.dims(), e.shape.dims()) {
            (xd, &[b, c]) => {
                xd.get(self.channel_dim) == Some(&c) && xd[0] == b * self.rows_per_batch
            }
            _ => false,
        };
        if !ok {
            return Err(IrError::Plan(format!(
                "add_batch_emb of {x} and {e} ({} rows per batch item, channels at dim {})",
                self.rows_per_batch, self.channel_dim
            )));
        }
        Ok(x.clone())
    }
    fn workspace_bytes(&self, inputs: &[&ValueInfo], output: &ValueInfo, ws: Workspace) -> usize {
        self.tiling(inputs, output, ws).1
    }
    fn flops(&self, inputs: &[&ValueInfo], _: &ValueInfo) -> u64 {
        elems(inputs[0])
    }
    fn forward(&self, x: &[&Tensor], ctx: &SliceCtx) -> Result<Tensor> {
        let (h, e) = (x[0], x[1]);
        let rows = ctx.rows(h.dim(0)?);
        if self
            .kernel_workspace(&info_of(h), &info_of(e), ctx.workspace())
            .is_some()
        {
            let table = e.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            let tables = ChannelTables {
                scale: None,
                shift: &table,
                channels: e.dim(1)?,
            };
            let inner = h.dims()[self.channel_dim + 1..].iter().product();
            let at = BatchRows {
                per_batch: self.rows_per_batch,
                first: rows.start,
            };
            if let Some(out) = streamline_kernels::batch_affine(h, tables, inner, at) {
                return Ok(out?);
            }
        }
        let (chunk, _) = self.tiling(&[&info_of(h), &info_of(e)], &info_of(h), ctx.workspace());
        by_row_chunks(h.dims(), h.dtype(), h.device(), chunk, |r| {
            let abs = rows.start + r.start..rows.start + r.end;
            let ids = batch_ids(abs, self.rows_per_batch, h.device())?;
            let mut shape = vec![1; h.rank()];
            shape[0] = r.len();
            shape[self.channel_dim] = e.dim(1)?;
            let per_row = e.index_select(&ids, 0)?.reshape(shape)?;
            Ok(h.narrow(0, r.start, r.len())?.broadcast_add(&per_row)?)
        })
    }
}

/// `x + e` with `e` read whole and broadcast (frame position embeddings `(T, C)` added to
/// position-major `(P, T, C)` features).
#[derive(Debug, Clone, Copy)]
pub struct AddBroadcast;

impl Op for AddBroadcast {
    op_contract!("add_broadcast", Both);
    fn infer(&self, inputs: &[&ValueInfo]) -> Result<ValueInfo> {
        let (x, e) = (inputs[0].shape.dims(), inputs[1].shape.dims());
        if e.len() > x.len() || x[x.len() - e.len()..] != *e {
            return Err(IrError::Plan(format!(
                "add_broadcast of {} and {}",
                inputs[0], inputs[1]
            )));
        }
        Ok(inputs[0].clone())
    }
    /// The f32 CPU kernel holds `e` on the host and in its own copy.
    fn workspace_bytes(&self, inputs: &[&ValueInfo], _: &ValueInfo, ws: Workspace) -> usize {
        match cpu_f32(inputs[1], ws) {
            true => 2 * inputs[1].shape.elem_count() * 4,
            false => 0,
        }
    }
    fn flops(&self, inputs: &[&ValueInfo], _: &ValueInfo) -> u64 {
        elems(inputs[0])
    }
    fn forward(&self, x: &[&Tensor], ctx: &SliceCtx) -> Result<Tensor> {
        let (h, e) = (x[0], x[1]);
        if cpu_f32(&info_of(e), ctx.workspace()) {
            // One batch item whose channels are all of `e`, repeated along every row.
            let table = e.flatten_all()?.to_vec1::<f32>()?;
            let tables = ChannelTables {
                scale: None,
                shift: &table,
                channels: table.len(),
            };
            let rows = h.elem_count() / table.len().max(1);
            let at = BatchRows {
                per_batch: rows,
                first: 0,
            };
            let flat = h.reshape((rows, table.len()))?;
            if let Some(out) = streamline_kernels::batch_affine(&flat, tables, 1, at) {
                return Ok(out?.reshape(h.shape())?);
            }
        }
        Ok(h.broadcast_add(e)?)
    }
}
