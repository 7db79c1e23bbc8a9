//! Toy ops on images `(B*T, C, H, W)` and position-major `(B*H*W, T, C)` features that run
//! on bands of rows: windows with halos (3x3 and 1x1 convolutions, stride 2), nearest
//! upsampling, per-frame and per-video statistics (reductions over the bands) with their
//! pointwise applications, and layout changes; random graphs of them for the row proptests.

use candle_core::{DType, Device, Tensor};

use super::{cat0, pieces, same, Add, Squash, TimeMix};
use crate::{
    check_group, Axis, Graph, Group, Layout, Op, Plan, Result, RowRule, SliceCtx, ValueId,
    ValueInfo, Workspace,
};

/// The extent of a toy video: batch, frames, channels, height, width.
#[derive(Copy, Clone, Debug)]
pub struct RowDims {
    pub b: usize,
    pub t: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
}

impl RowDims {
    fn at(self, h: usize, w: usize) -> RowDims {
        RowDims { h, w, ..self }
    }

    pub fn image_info(&self) -> ValueInfo {
        ValueInfo::new(
            (self.b * self.t, self.c, self.h, self.w),
            DType::F32,
            Layout::IMAGES,
        )
    }

    pub fn position_info(&self) -> ValueInfo {
        ValueInfo::new(
            (self.b * self.h * self.w, self.t, self.c),
            DType::F32,
            Layout::positions_of(self.b, self.w),
        )
    }

    /// Positions per batch item of a call: the band's rows when it runs on rows.
    fn hw_of(&self, ctx: &SliceCtx) -> usize {
        match &ctx.band {
            Some(band) => band.out.len() * self.w,
            None => self.h * self.w,
        }
    }
}

/// A fixed, channel-mixing `kernel`x`kernel` convolution, zero-padded by `pad` on every side.
#[derive(Debug)]
pub struct ToyConv {
    pub kernel: usize,
    pub stride: usize,
    pub pad: usize,
}

impl ToyConv {
    fn weight(&self, c: usize, dev: &Device) -> Result<Tensor> {
        let k = self.kernel;
        let w: Vec<f32> = (0..c * c * k * k)
            .map(|i| (i as f32 * 0.7 + 1.0).sin() * 0.4)
            .collect();
        Ok(Tensor::from_vec(w, (c, c, k, k), dev)?)
    }

    fn out(&self, n: usize) -> usize {
        (n + 2 * self.pad - self.kernel) / self.stride + 1
    }
}

toy_op! {
    ToyConv: "toy_conv", Frames, workspace 2;
    fn describe(&self) -> String {
        format!("k{}s{}p{}", self.kernel, self.stride, self.pad)
    }
    fn rows(&self) -> Option<RowRule> {
        Some(RowRule::Window {
            kernel: self.kernel,
            stride: self.stride,
            pad: self.pad,
        })
    }
    fn infer(&self, i: &[&ValueInfo]) -> Result<ValueInfo> {
        let d = i[0].shape.dims();
        let dims = [d[0], d[1], self.out(d[2]), self.out(d[3])];
        Ok(ValueInfo::new(dims.to_vec(), i[0].dtype, i[0].layout))
    }
    fn flops(&self, _: &[&ValueInfo], o: &ValueInfo) -> u64 {
        let c = o.shape.dims()[1];
        (2 * o.shape.elem_count() * c * self.kernel * self.kernel) as u64
    }
    fn forward(&self, x: &[&Tensor], ctx: &SliceCtx) -> Result<Tensor> {
        let (top, bottom) = match &ctx.band {
            Some(band) => band.padding(self.kernel, self.stride, self.pad),
            None => (self.pad, self.pad),
        };
        let padded = x[0]
            .pad_with_zeros(2, top, bottom)?
            .pad_with_zeros(3, self.pad, self.pad)?;
        let w = self.weight(x[0].dim(1)?, x[0].device())?;
        Ok(padded.conv2d(&w, 0, self.stride, 1, 1)?)
    }
}

/// Nearest upsampling by 2 along H and W.
#[derive(Debug)]
pub struct ToyUpsample;

toy_op! {
    ToyUpsample: "toy_upsample", Frames, flops 0;
    fn rows(&self) -> Option<RowRule> {
        Some(RowRule::Upsample { factor: 2 })
    }
    fn infer(&self, i: &[&ValueInfo]) -> Result<ValueInfo> {
        let d = i[0].shape.dims();
        Ok(ValueInfo::new(
            vec![d[0], d[1], 2 * d[2], 2 * d[3]],
            i[0].dtype,
            i[0].layout,
        ))
    }
    fn forward(&self, x: &[&Tensor], ctx: &SliceCtx) -> Result<Tensor> {
        let (_, _, h, w) = x[0].dims4()?;
        let up = x[0].upsample_nearest2d(2 * h, 2 * w)?;
        Ok(match &ctx.band {
            // The input rows cover the band from an even row on.
            Some(band) => up.narrow(2, band.out.start % 2, band.out.len())?,
            None => up,
        })
    }
}

/// Count, mean and centered sum of squares, merged exactly (Chan et al.), per row of `(n, 3)`.
fn merge_moments(acc: &Tensor, partial: &Tensor) -> Result<Tensor> {
    let (a, b) = (acc.to_vec2::<f32>()?, partial.to_vec2::<f32>()?);
    let merged: Vec<f32> = a
        .iter()
        .zip(&b)
        .flat_map(|(a, b)| {
            let (na, nb) = (f64::from(a[0]), f64::from(b[0]));
            let n = na + nb;
            if n == 0.0 {
                return [0.0; 3];
            }
            let delta = f64::from(b[1]) - f64::from(a[1]);
            let mean = f64::from(a[1]) + delta * nb / n;
            let m2 = f64::from(a[2]) + f64::from(b[2]) + delta * delta * na * nb / n;
            [n as f32, mean as f32, m2 as f32]
        })
        .collect();
    Ok(Tensor::from_vec(merged, (a.len(), 3), acc.device())?)
}

/// The moments of every row of `rows` `(n, k)`.
fn moments(rows: &Tensor) -> Result<Vec<[f32; 3]>> {
    let rows = rows.to_vec2::<f32>()?;
    Ok(rows
        .iter()
        .map(|r| {
            let n = r.len() as f64;
            let mean = r.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
            let m2 = r
                .iter()
                .map(|&v| (f64::from(v) - mean).powi(2))
                .sum::<f64>();
            [n as f32, mean as f32, m2 as f32]
        })
        .collect())
}

fn moments_tensor(m: Vec<[f32; 3]>, dev: &Device) -> Result<Tensor> {
    let n = m.len();
    Ok(Tensor::from_vec(m.concat(), (n, 3), dev)?)
}

/// Per-frame statistics over (C, H, W): frame-wise, and a reduction over the rows.
#[derive(Debug)]
pub struct FrameMoments;

toy_op! {
    FrameMoments: "frame_moments", Frames, rows Reduce, flops 3;
    fn merge(&self, acc: &Tensor, partial: &Tensor) -> Result<Tensor> {
        merge_moments(acc, partial)
    }
    fn infer(&self, i: &[&ValueInfo]) -> Result<ValueInfo> {
        let n = i[0].shape.dims()[0];
        Ok(ValueInfo::new((n, 3), DType::F32, Layout::PER_FRAME))
    }
    fn forward(&self, x: &[&Tensor], _: &SliceCtx) -> Result<Tensor> {
        moments_tensor(moments(&x[0].flatten_from(1)?)?, x[0].device())
    }
}

/// `(x - mean) / sqrt(var + 1)` with per-frame statistics: frame-wise, row for row.
#[derive(Debug)]
pub struct FrameApply;

toy_op! {
    FrameApply: "frame_apply", Frames, rows Same, infer same, flops 2;
    fn forward(&self, x: &[&Tensor], _: &SliceCtx) -> Result<Tensor> {
        let (scale, shift) = scale_shift(x[1])?;
        let shape = (x[0].dim(0)?, 1, 1, 1);
        Ok(x[0]
            .broadcast_mul(&scale.reshape(shape)?)?
            .broadcast_add(&shift.reshape(shape)?)?)
    }
}

/// Per row of moments `(n, 3)`: `1 / sqrt(var + 1)` and `-mean` times it.
fn scale_shift(m: &Tensor) -> Result<(Tensor, Tensor)> {
    let (count, mean, m2) = (m.narrow(1, 0, 1)?, m.narrow(1, 1, 1)?, m.narrow(1, 2, 1)?);
    let scale = ((m2 / count)? + 1.0)?.sqrt()?.recip()?.flatten_all()?;
    let shift = (mean.flatten_all()? * &scale)?.neg()?;
    Ok((scale, shift))
}

/// Images to position-major features: gathers its positions when sliced along them, and
/// keeps the rows of a band.
#[derive(Debug)]
pub struct ToPositions(pub RowDims);

toy_op! {
    ToPositions: "to_positions", Positions, rows Same, flops 0;
    fn gathers_input(&self, input: usize, axis: Axis) -> bool {
        input == 0 && axis == Axis::Positions
    }
    fn infer(&self, _: &[&ValueInfo]) -> Result<ValueInfo> {
        Ok(self.0.position_info())
    }
    fn forward(&self, x: &[&Tensor], ctx: &SliceCtx) -> Result<Tensor> {
        let d = self.0;
        let (n, c, h, w) = x[0].dims4()?;
        let flat = x[0].reshape((d.b, n / d.b, c, h * w))?;
        if ctx.axis != Some(Axis::Positions) {
            return Ok(flat.permute((0, 3, 1, 2))?.reshape((d.b * h * w, d.t, c))?);
        }
        let parts = pieces(ctx.range.clone(), h * w)
            .into_iter()
            .map(|(b, r)| {
                let item = flat.narrow(0, b, 1)?.squeeze(0)?;
                Ok(item
                    .narrow(2, r.start, r.len())?
                    .permute((2, 0, 1))?
                    .contiguous()?)
            })
            .collect::<Result<Vec<_>>>()?;
        cat0(parts)
    }
}

/// Position-major features back to images: gathers its frames when sliced along them, and
/// keeps the rows of a band.
#[derive(Debug)]
pub struct ToImages(pub RowDims);

toy_op! {
    ToImages: "to_images", Frames, rows Same, flops 0;
    fn gathers_input(&self, input: usize, axis: Axis) -> bool {
        input == 0 && axis == Axis::Frames
    }
    fn infer(&self, _: &[&ValueInfo]) -> Result<ValueInfo> {
        Ok(self.0.image_info())
    }
    fn forward(&self, x: &[&Tensor], ctx: &SliceCtx) -> Result<Tensor> {
        let d = self.0;
        let (_, t, c) = x[0].dims3()?;
        let hw = d.hw_of(ctx);
        let h = hw / d.w;
        let items = x[0].reshape((d.b, hw, t, c))?;
        if ctx.axis != Some(Axis::Frames) {
            let images = items.permute((0, 2, 3, 1))?;
            return Ok(images.reshape((d.b * t, c, h, d.w))?);
        }
        let parts = pieces(ctx.range.clone(), d.t)
            .into_iter()
            .map(|(b, r)| {
                let item = items.narrow(0, b, 1)?.squeeze(0)?;
                Ok(item
                    .narrow(1, r.start, r.len())?
                    .permute((1, 2, 0))?
                    .reshape((r.len(), c, h, d.w))?)
            })
            .collect::<Result<Vec<_>>>()?;
        cat0(parts)
    }
}

/// The batch item and the local rows of every piece of a position-major call.
fn position_pieces(d: RowDims, ctx: &SliceCtx) -> Vec<(usize, std::ops::Range<usize>)> {
    let per = d.hw_of(ctx);
    let rows = match ctx.axis {
        Some(Axis::Positions) => ctx.range.clone(),
        _ => 0..d.b * per,
    };
    pieces(rows.clone(), per)
        .into_iter()
        .map(|(b, r)| {
            let off = b * per + r.start - rows.start;
            (b, off..off + r.len())
        })
        .collect()
}

/// Per-video statistics over (H, W, T, C) of a position-major feature: a reduction over the
/// positions and over the rows.
#[derive(Debug)]
pub struct VideoMoments(pub RowDims);

toy_op! {
    VideoMoments: "video_moments", Positions, rows Reduce, flops 3;
    fn is_reduction(&self) -> bool {
        true
    }
    fn merge(&self, acc: &Tensor, partial: &Tensor) -> Result<Tensor> {
        merge_moments(acc, partial)
    }
    fn infer(&self, _: &[&ValueInfo]) -> Result<ValueInfo> {
        Ok(ValueInfo::new((self.0.b, 3), DType::F32, Layout::WHOLE))
    }
    fn forward(&self, x: &[&Tensor], ctx: &SliceCtx) -> Result<Tensor> {
        let mut m = vec![[0f32; 3]; self.0.b];
        for (b, r) in position_pieces(self.0, ctx) {
            m[b] = moments(
                &x[0]
                    .narrow(0, r.start, r.len())?
                    .flatten_all()?
                    .unsqueeze(0)?,
            )?[0];
        }
        moments_tensor(m, x[0].device())
    }
}

/// Pointwise normalization of a position-major feature by its video's statistics.
#[derive(Debug)]
pub struct VideoApply(pub RowDims);

toy_op! {
    VideoApply: "video_apply", Positions, rows Same, infer same, flops 2;
    fn forward(&self, x: &[&Tensor], ctx: &SliceCtx) -> Result<Tensor> {
        let (scale, shift) = scale_shift(x[1])?;
        let (scale, shift) = (scale.to_vec1::<f32>()?, shift.to_vec1::<f32>()?);
        let parts = position_pieces(self.0, ctx)
            .into_iter()
            .map(|(b, r)| {
                let piece = x[0].narrow(0, r.start, r.len())?;
                Ok(piece.affine(f64::from(scale[b]), f64::from(shift[b]))?)
            })
            .collect::<Result<Vec<_>>>()?;
        cat0(parts)
    }
}

/// A random graph of row-capable toy ops on one input image `x`: each step `(kind, a, b)`
/// applies one op to earlier values (`a`, `b` pick them); the output is the last image.
pub fn random_row_graph(d: RowDims, steps: &[(u8, u16, u16)]) -> Graph {
    let mut g = Graph::new();
    let x = g.input("x", d.image_info()).expect("input");
    // Images with their (h, w), and position-major values with theirs.
    let mut images: Vec<(ValueId, usize, usize)> = vec![(x, d.h, d.w)];
    let mut positions: Vec<(ValueId, usize, usize)> = Vec::new();
    let pick = |v: &[(ValueId, usize, usize)], r: u16| v[r as usize % v.len()];
    for (i, &(kind, a, b)) in steps.iter().enumerate() {
        let name = format!("n{i}");
        let (v, h, w) = pick(&images, a);
        let kind = if positions.is_empty() && kind % 10 >= 8 {
            7
        } else {
            kind % 10
        };
        match kind {
            0..=2 => {
                let (kernel, stride, pad) = [(3, 1, 1), (1, 1, 0), (3, 2, 1)][kind as usize];
                let conv = ToyConv {
                    kernel,
                    stride,
                    pad,
                };
                let (oh, ow) = (conv.out(h), conv.out(w));
                images.push((g.push(&name, conv, &[v]).expect("conv"), oh, ow));
            }
            3 if h <= 8 && w <= 8 => {
                let out = g.push(&name, ToyUpsample, &[v]).expect("upsample");
                images.push((out, 2 * h, 2 * w));
            }
            4 => {
                let s = g
                    .push(&format!("{name}.stats"), FrameMoments, &[v])
                    .expect("stats");
                images.push((g.push(&name, FrameApply, &[v, s]).expect("apply"), h, w));
            }
            5 => {
                let other = images
                    .iter()
                    .rev()
                    .find(|&&(o, oh, ow)| (oh, ow) == (h, w) && (o != v || b % 2 == 0))
                    .map_or(v, |&(o, _, _)| o);
                images.push((g.push(&name, Add, &[v, other]).expect("add"), h, w));
            }
            3 | 6 => images.push((g.push(&name, Squash, &[v]).expect("squash"), h, w)),
            7 => {
                let p = g
                    .push(&name, ToPositions(d.at(h, w)), &[v])
                    .expect("to positions");
                positions.push((p, h, w));
            }
            8 => {
                let (p, h, w) = pick(&positions, b);
                let out = match a % 3 {
                    0 => g.push(&name, TimeMix, &[p]),
                    1 => {
                        let s = g.push(&format!("{name}.stats"), VideoMoments(d.at(h, w)), &[p]);
                        g.push(&name, VideoApply(d.at(h, w)), &[p, s.expect("stats")])
                    }
                    _ => g.push(&name, Squash, &[p]),
                };
                positions.push((out.expect("temporal step"), h, w));
            }
            _ => {
                let (p, h, w) = pick(&positions, b);
                let out = g
                    .push(&name, ToImages(d.at(h, w)), &[p])
                    .expect("to images");
                images.push((out, h, w));
            }
        }
    }
    let last = images.last().expect("the input at least").0;
    g.set_outputs(&[last]);
    g
}

/// Deterministic input for a graph made by [`random_row_graph`].
pub fn row_tensors(d: RowDims, seed: u64) -> Vec<Tensor> {
    let info = d.image_info();
    let n = info.shape.elem_count();
    let values: Vec<f32> = (0..n)
        .map(|i| {
            ((i as u64).wrapping_mul(2654435761).wrapping_add(seed) % 2001) as f32 / 1000.0 - 1.0
        })
        .collect();
    vec![Tensor::from_vec(values, info.shape, &Device::Cpu).expect("toy input")]
}

/// Maximal runs of nodes that can run on rows become row groups of `chunks` bands (capped
/// at each group's rows); every other node runs alone and whole.
pub fn longest_row_groups(g: &Graph, chunks: usize) -> Plan {
    let n = g.nodes().len();
    let along = |nodes: std::ops::Range<usize>| Group::sliced(nodes, Axis::Rows, 1);
    let mut groups = Vec::new();
    let mut i = 0;
    while i < n {
        let mut end = i + 1;
        let Ok(mut len) = check_group(g, &along(i..end)) else {
            groups.push(Group::whole(i..end));
            i = end;
            continue;
        };
        while end < n {
            match check_group(g, &along(i..end + 1)) {
                Ok(l) => (len, end) = (l, end + 1),
                Err(_) => break,
            }
        }
        groups.push(Group::sliced(i..end, Axis::Rows, chunks.clamp(1, len)));
        i = end;
    }
    Plan::new(groups)
}
