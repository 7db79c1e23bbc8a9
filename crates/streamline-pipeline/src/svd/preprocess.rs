//! Image preprocessing exactly as diffusers' SVD pipeline does it.
//!
//! The CLIP input goes through `_resize_with_antialiasing` (a Gaussian blur whose width follows
//! the downscale factor, reflect-padded, then bicubic interpolation with `align_corners=True`,
//! A = -0.75), computed here on the host in f32 like torch does on CPU.

use candle_core::{Device, Tensor};

/// A host image: `channels x height x width`, row-major, f32.
#[derive(Clone, Debug, PartialEq)]
pub struct Planes {
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    pub data: Vec<f32>,
}

impl Planes {
    pub fn from_tensor(t: &Tensor) -> candle_core::Result<Self> {
        let (channels, height, width) = t.dims3()?;
        Ok(Planes {
            channels,
            height,
            width,
            data: t.flatten_all()?.to_vec1::<f32>()?,
        })
    }

    pub fn to_tensor(&self, device: &Device) -> candle_core::Result<Tensor> {
        Tensor::from_vec(
            self.data.clone(),
            (self.channels, self.height, self.width),
            device,
        )
    }

    fn map(&self, f: impl Fn(f32) -> f32) -> Planes {
        Planes {
            data: self.data.iter().map(|&x| f(x)).collect(),
            ..self.clone()
        }
    }

    /// Apply a 1-D operator along rows (`horizontal`) or columns: `out[o] = sum_j w[o][j] *
    /// in[idx[o][j]]`, one taps list per output index.
    fn separable(&self, taps: &[Vec<(usize, f32)>], horizontal: bool) -> Planes {
        let (h, w) = (self.height, self.width);
        let (oh, ow) = if horizontal {
            (h, taps.len())
        } else {
            (taps.len(), w)
        };
        let mut data = vec![0f32; self.channels * oh * ow];
        for c in 0..self.channels {
            let src = &self.data[c * h * w..(c + 1) * h * w];
            let dst = &mut data[c * oh * ow..(c + 1) * oh * ow];
            for y in 0..oh {
                for x in 0..ow {
                    let (o, fixed) = if horizontal { (x, y) } else { (y, x) };
                    dst[y * ow + x] = taps[o]
                        .iter()
                        .map(|&(i, wgt)| {
                            let v = if horizontal {
                                src[fixed * w + i]
                            } else {
                                src[i * w + fixed]
                            };
                            wgt * v
                        })
                        .sum();
                }
            }
        }
        Planes {
            channels: self.channels,
            height: oh,
            width: ow,
            data,
        }
    }
}

/// torch's `reflect` padding index.
fn reflect(i: isize, n: usize) -> usize {
    let n = n as isize;
    if n == 1 {
        return 0;
    }
    let period = 2 * (n - 1);
    let m = i.rem_euclid(period);
    (if m < n { m } else { period - m }) as usize
}

/// Taps of diffusers' `_gaussian` kernel of odd size `k`, reflect-padded `_filter2d`.
fn gaussian_taps(n: usize, k: usize, sigma: f32) -> Vec<Vec<(usize, f32)>> {
    let xs: Vec<f32> = (0..k).map(|i| i as f32 - (k / 2) as f32).collect();
    let g: Vec<f32> = xs
        .iter()
        .map(|x| (-(x * x) / (2.0 * sigma * sigma)).exp())
        .collect();
    let sum: f32 = g.iter().sum();
    let kernel: Vec<f32> = g.iter().map(|v| v / sum).collect();
    let front = (k - 1) / 2;
    (0..n)
        .map(|o| {
            (0..k)
                .map(|j| {
                    (
                        reflect(o as isize + j as isize - front as isize, n),
                        kernel[j],
                    )
                })
                .collect()
        })
        .collect()
}

/// torch's bicubic interpolation taps (A = -0.75, `align_corners=True`, edge-clamped).
fn bicubic_taps(n_in: usize, n_out: usize) -> Vec<Vec<(usize, f32)>> {
    const A: f32 = -0.75;
    let scale = if n_out > 1 {
        (n_in as f32 - 1.0) / (n_out as f32 - 1.0)
    } else {
        0.0
    };
    let near = |x: f32| ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
    let far = |x: f32| ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A;
    (0..n_out)
        .map(|o| {
            let src = scale * o as f32;
            let i = src.floor();
            let t = src - i;
            let w = [far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)];
            (0..4)
                .map(|j| {
                    let idx = (i as isize - 1 + j as isize).clamp(0, n_in as isize - 1) as usize;
                    (idx, w[j])
                })
                .collect()
        })
        .collect()
}

/// diffusers' `_resize_with_antialiasing(input, (height, width))` for one image.
pub fn resize_with_antialiasing(img: &Planes, height: usize, width: usize) -> Planes {
    let factor = |from: usize, to: usize| from as f32 / to as f32;
    let sigma = |f: f32| ((f - 1.0) / 2.0).max(0.001);
    let (sy, sx) = (
        sigma(factor(img.height, height)),
        sigma(factor(img.width, width)),
    );
    let odd = |s: f32| {
        let k = (2.0 * 2.0 * s).max(3.0) as usize;
        if k % 2 == 0 {
            k + 1
        } else {
            k
        }
    };
    let blurred = img
        .separable(&gaussian_taps(img.width, odd(sx), sx), true)
        .separable(&gaussian_taps(img.height, odd(sy), sy), false);
    blurred
        .separable(&bicubic_taps(img.width, width), true)
        .separable(&bicubic_taps(img.height, height), false)
}

/// The CLIP input of SVD's `_encode_image`: `[0, 1]` image -> `[-1, 1]`, antialiased resize to
/// `size`, back to `[0, 1]`, then the feature extractor's normalization.
pub fn clip_input(img: &Planes, size: usize, mean: [f32; 3], std: [f32; 3]) -> Planes {
    let resized =
        resize_with_antialiasing(&img.map(|x| x * 2.0 - 1.0), size, size).map(|x| (x + 1.0) / 2.0);
    let plane = size * size;
    Planes {
        data: resized
            .data
            .iter()
            .enumerate()
            .map(|(i, &x)| {
                let c = i / plane;
                (x - mean[c]) / std[c]
            })
            .collect(),
        ..resized
    }
}
