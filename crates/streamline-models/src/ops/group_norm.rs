//! GroupNorm over (C/G, T, H, W), split so that slicing along positions stays exact.
//!
//! The statistics of a temporal GroupNorm span every position and frame of a batch item, so
//! they cannot be computed per slice. [`GroupNormStats`] is a reduction: each slice yields
//! per-(batch item, group) counts, means and centered sums of squares that merge exactly
//! (Chan et al.'s parallel update), in f64. [`GroupNormApply`] is then pointwise per position.
//! The paper's official code instead normalizes each slice with its own statistics.

use candle_core::{DType, Device, Tensor};
use streamline_ir::{Independence, IrError, Layout, Op, Result, SliceCtx, ValueInfo};

use super::layout::{batch_pieces, cat0};
use super::VideoDims;

/// Count, mean and centered sum of squares of one (batch item, group).
#[derive(Copy, Clone, Debug, Default, PartialEq)]
struct Moments {
    count: f64,
    mean: f64,
    m2: f64,
}

impl Moments {
    fn merge(self, o: Moments) -> Moments {
        let count = self.count + o.count;
        if count == 0.0 {
            return Moments::default();
        }
        let delta = o.mean - self.mean;
        Moments {
            count,
            mean: self.mean + delta * o.count / count,
            m2: self.m2 + o.m2 + delta * delta * self.count * o.count / count,
        }
    }
}

fn moments_to_tensor(m: &[Moments], batch: usize, groups: usize) -> Result<Tensor> {
    let flat: Vec<f64> = m.iter().flat_map(|m| [m.count, m.mean, m.m2]).collect();
    Ok(Tensor::from_vec(flat, (batch, groups, 3), &Device::Cpu)?)
}

fn moments_from_tensor(t: &Tensor) -> Result<Vec<Moments>> {
    let flat = t.flatten_all()?.to_vec1::<f64>()?;
    Ok(flat
        .chunks_exact(3)
        .map(|c| Moments {
            count: c[0],
            mean: c[1],
            m2: c[2],
        })
        .collect())
}

fn check_groups(channels: usize, groups: usize) -> Result<usize> {
    if groups == 0 || channels % groups != 0 {
        return Err(IrError::Plan(format!(
            "GroupNorm with {groups} groups cannot split {channels} channels"
        )));
    }
    Ok(channels / groups)
}

/// Per-(batch item, group) moments of a position-major `(B*H*W, T, C)` feature: a `(B, G, 3)`
/// f64 tensor of count, mean and centered sum of squares.
#[derive(Debug, Clone)]
pub struct GroupNormStats {
    pub dims: VideoDims,
    pub channels: usize,
    pub groups: usize,
}

impl GroupNormStats {
    pub fn new(dims: VideoDims, channels: usize, groups: usize) -> Result<Self> {
        check_groups(channels, groups)?;
        Ok(GroupNormStats {
            dims,
            channels,
            groups,
        })
    }

    /// Moments of one batch item's rows `(n, T, C)`, in f64 from f32 partial sums.
    fn piece_moments(&self, x: &Tensor) -> Result<Vec<Moments>> {
        let per_group = self.channels / self.groups;
        let (n, t, _) = x.dims3()?;
        let x = x
            .to_dtype(DType::F32)?
            .reshape((n * t, self.groups, per_group))?;
        let count = (n * t * per_group) as f64;
        // Sum each row's channels in f32, then the short row sums in f64.
        let sums = x.sum(2)?.to_dtype(DType::F64)?.sum(0)?.to_vec1::<f64>()?;
        let means: Vec<f64> = sums.iter().map(|s| s / count).collect();
        let mean_t = Tensor::from_vec(
            means.iter().map(|&m| m as f32).collect::<Vec<_>>(),
            (1, self.groups, 1),
            x.device(),
        )?;
        let m2 = x
            .broadcast_sub(&mean_t)?
            .sqr()?
            .sum(2)?
            .to_dtype(DType::F64)?
            .sum(0)?
            .to_vec1::<f64>()?;
        // The f32 mean differs from the f64 one by rounding; correct M2 for the shift.
        Ok(means
            .iter()
            .zip(m2)
            .map(|(&mean, m2)| {
                let shift = mean - f64::from(mean as f32);
                Moments {
                    count,
                    mean,
                    m2: (m2 - count * shift * shift).max(0.0),
                }
            })
            .collect())
    }
}

impl Op for GroupNormStats {
    fn kind(&self) -> &'static str {
        "group_norm_stats"
    }

    fn describe(&self) -> String {
        format!("g{}", self.groups)
    }

    fn independence(&self) -> Independence {
        Independence::Positions
    }

    fn is_reduction(&self) -> bool {
        true
    }

    fn merge(&self, acc: &Tensor, partial: &Tensor) -> Result<Tensor> {
        let merged: Vec<Moments> = moments_from_tensor(acc)?
            .into_iter()
            .zip(moments_from_tensor(partial)?)
            .map(|(a, b)| a.merge(b))
            .collect();
        moments_to_tensor(&merged, self.dims.batch, self.groups)?
            .to_device(acc.device())
            .map_err(IrError::from)
    }

    fn infer(&self, inputs: &[&ValueInfo]) -> Result<ValueInfo> {
        let d = self.dims;
        let x = inputs[0];
        if x.shape.dims() != [d.positions_len(), d.frames, self.channels] {
            return Err(IrError::Plan(format!(
                "group_norm_stats expects ({}, {}, {}), got {:?}",
                d.positions_len(),
                d.frames,
                self.channels,
                x.shape.dims()
            )));
        }
        Ok(ValueInfo::new(
            (d.batch, self.groups, 3),
            DType::F64,
            Layout::WHOLE,
        ))
    }

    fn workspace_bytes(&self, inputs: &[&ValueInfo], _: &ValueInfo) -> usize {
        // An f32 copy of the slice and its centered squares.
        2 * inputs[0].shape.elem_count() * 4
    }

    fn flops(&self, inputs: &[&ValueInfo], _: &ValueInfo) -> u64 {
        4 * inputs[0].shape.elem_count() as u64
    }

    fn forward(&self, inputs: &[&Tensor], ctx: &SliceCtx) -> Result<Tensor> {
        let d = self.dims;
        let x = inputs[0];
        let rows = ctx.rows(d.positions_len());
        let mut moments = vec![Moments::default(); d.batch * self.groups];
        for (b, within) in batch_pieces(rows.clone(), d.hw()) {
            let offset = b * d.hw() + within.start - rows.start;
            let piece = self.piece_moments(&x.narrow(0, offset, within.len())?)?;
            for (g, m) in piece.into_iter().enumerate() {
                let slot = &mut moments[b * self.groups + g];
                *slot = slot.merge(m);
            }
        }
        moments_to_tensor(&moments, d.batch, self.groups)?
            .to_device(x.device())
            .map_err(IrError::from)
    }
}

/// `(x - mean) / sqrt(var + eps) * weight + bias` on a position-major `(B*H*W, T, C)` feature,
/// with the statistics of [`GroupNormStats`]; pointwise per position.
#[derive(Debug, Clone)]
pub struct GroupNormApply {
    pub dims: VideoDims,
    pub groups: usize,
    pub eps: f64,
    weight: Vec<f64>,
    bias: Vec<f64>,
    param_dtype: DType,
}

impl GroupNormApply {
    pub fn new(
        dims: VideoDims,
        groups: usize,
        eps: f64,
        weight: &Tensor,
        bias: &Tensor,
    ) -> Result<Self> {
        let host = |t: &Tensor| -> Result<Vec<f64>> {
            Ok(t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?)
        };
        let (w, b) = (host(weight)?, host(bias)?);
        if w.len() != b.len() {
            return Err(IrError::Plan(format!(
                "GroupNorm weight has {} channels, bias {}",
                w.len(),
                b.len()
            )));
        }
        check_groups(w.len(), groups)?;
        Ok(GroupNormApply {
            dims,
            groups,
            eps,
            weight: w,
            bias: b,
            param_dtype: weight.dtype(),
        })
    }

    fn channels(&self) -> usize {
        self.weight.len()
    }
}

impl Op for GroupNormApply {
    fn kind(&self) -> &'static str {
        "group_norm_apply"
    }

    fn describe(&self) -> String {
        format!("g{}", self.groups)
    }

    fn independence(&self) -> Independence {
        Independence::Positions
    }

    fn infer(&self, inputs: &[&ValueInfo]) -> Result<ValueInfo> {
        let d = self.dims;
        let (x, stats) = (inputs[0], inputs[1]);
        if x.shape.dims() != [d.positions_len(), d.frames, self.channels()]
            || stats.shape.dims() != [d.batch, self.groups, 3]
        {
            return Err(IrError::Plan(format!(
                "group_norm_apply expects ({}, {}, {}) and its statistics ({}, {}, 3), got {:?} and {:?}",
                d.positions_len(),
                d.frames,
                self.channels(),
                d.batch,
                self.groups,
                x.shape.dims(),
                stats.shape.dims()
            )));
        }
        Ok(x.clone())
    }

    fn workspace_bytes(&self, inputs: &[&ValueInfo], _: &ValueInfo) -> usize {
        // The scaled slice before the shift is added.
        inputs[0].bytes()
    }

    fn flops(&self, inputs: &[&ValueInfo], _: &ValueInfo) -> u64 {
        2 * inputs[0].shape.elem_count() as u64
    }

    fn param_bytes(&self) -> usize {
        2 * self.channels() * self.param_dtype.size_in_bytes()
    }

    fn forward(&self, inputs: &[&Tensor], ctx: &SliceCtx) -> Result<Tensor> {
        let d = self.dims;
        let (x, stats) = (inputs[0], moments_from_tensor(inputs[1])?);
        let per_group = self.channels() / self.groups;
        let rows = ctx.rows(d.positions_len());
        let mut parts = Vec::new();
        for (b, within) in batch_pieces(rows.clone(), d.hw()) {
            let offset = b * d.hw() + within.start - rows.start;
            let (mut scale, mut shift) = (Vec::new(), Vec::new());
            for c in 0..self.channels() {
                let m = stats[b * self.groups + c / per_group];
                let rstd = 1.0 / (m.m2 / m.count + self.eps).sqrt();
                let s = self.weight[c] * rstd;
                scale.push(s);
                shift.push(self.bias[c] - m.mean * s);
            }
            let vec = |v: Vec<f64>| -> Result<Tensor> {
                Ok(Tensor::from_vec(v, self.channels(), x.device())?.to_dtype(x.dtype())?)
            };
            let piece = x.narrow(0, offset, within.len())?;
            parts.push(
                piece
                    .broadcast_mul(&vec(scale)?)?
                    .broadcast_add(&vec(shift)?)?,
            );
        }
        cat0(parts)
    }
}
