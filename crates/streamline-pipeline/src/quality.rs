//! Frame quality against a reference video: max abs difference, PSNR and SSIM, for tests and
//! Step Rehash reports.
//!
//! SSIM is the standard one of Wang et al. (2004): 11-tap Gaussian window, sigma 1.5, K1 0.01,
//! K2 0.03, data range 1, population covariances — scikit-image's `structural_similarity` with
//! `gaussian_weights=True, sigma=1.5, use_sample_covariance=False`, which its documentation
//! gives for matching the paper. Computed per frame and channel and averaged.

use candle_core::{DType, Result, Tensor};

/// The largest absolute difference between two tensors of one shape (plan exactness checks).
pub fn max_abs(a: &Tensor, b: &Tensor) -> Result<f32> {
    (a.to_dtype(DType::F32)? - b.to_dtype(DType::F32)?)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()
}

/// PSNR in dB of frames in `[0, 1]` against `reference` (same shape), over all frames.
pub fn psnr(frames: &Tensor, reference: &Tensor) -> Result<f64> {
    let mse = (frames.to_dtype(DType::F64)? - reference.to_dtype(DType::F64)?)?
        .sqr()?
        .mean_all()?
        .to_scalar::<f64>()?;
    Ok(10.0 * (1.0 / mse.max(1e-20)).log10())
}

const RADIUS: usize = 5;
const SIGMA: f64 = 1.5;

fn gaussian() -> [f64; 2 * RADIUS + 1] {
    let mut w = [0.0; 2 * RADIUS + 1];
    for (i, v) in w.iter_mut().enumerate() {
        let d = i as f64 - RADIUS as f64;
        *v = (-d * d / (2.0 * SIGMA * SIGMA)).exp();
    }
    let sum: f64 = w.iter().sum();
    w.map(|v| v / sum)
}

/// Separable Gaussian filter of an `h x w` plane over the windows that fit inside it
/// (scikit-image crops the border of half a window before averaging).
fn blur(plane: &[f64], h: usize, w: usize, k: &[f64]) -> Vec<f64> {
    let n = k.len();
    let (oh, ow) = (h + 1 - n, w + 1 - n);
    let mut rows = vec![0.0; h * ow];
    for y in 0..h {
        for x in 0..ow {
            rows[y * ow + x] = (0..n).map(|i| k[i] * plane[y * w + x + i]).sum();
        }
    }
    let mut out = vec![0.0; oh * ow];
    for y in 0..oh {
        for x in 0..ow {
            out[y * ow + x] = (0..n).map(|i| k[i] * rows[(y + i) * ow + x]).sum();
        }
    }
    out
}

fn plane_ssim(a: &[f64], b: &[f64], h: usize, w: usize, k: &[f64]) -> f64 {
    let (c1, c2) = (0.01f64.powi(2), 0.03f64.powi(2));
    let prod = |x: &[f64], y: &[f64]| x.iter().zip(y).map(|(p, q)| p * q).collect::<Vec<_>>();
    let (ma, mb) = (blur(a, h, w, k), blur(b, h, w, k));
    let (aa, bb, ab) = (
        blur(&prod(a, a), h, w, k),
        blur(&prod(b, b), h, w, k),
        blur(&prod(a, b), h, w, k),
    );
    let map = (0..ma.len()).map(|i| {
        let (ua, ub) = (ma[i], mb[i]);
        let va = aa[i] - ua * ua;
        let vb = bb[i] - ub * ub;
        let vab = ab[i] - ua * ub;
        ((2.0 * ua * ub + c1) * (2.0 * vab + c2)) / ((ua * ua + ub * ub + c1) * (va + vb + c2))
    });
    map.sum::<f64>() / ma.len() as f64
}

/// Mean SSIM of frames `(F, C, H, W)` in `[0, 1]` against `reference`, over frames and
/// channels. Frames must be at least 11 pixels on each side.
pub fn ssim(frames: &Tensor, reference: &Tensor) -> Result<f64> {
    let (f, c, h, w) = frames.dims4()?;
    if reference.dims() != frames.dims() {
        candle_core::bail!(
            "SSIM of {:?} against {:?}: shapes differ",
            frames.dims(),
            reference.dims()
        );
    }
    if h < 2 * RADIUS + 1 || w < 2 * RADIUS + 1 {
        candle_core::bail!("SSIM needs frames of at least 11x11, got {h}x{w}");
    }
    let a = frames
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1::<f64>()?;
    let b = reference
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1::<f64>()?;
    let k = gaussian();
    let planes = f * c;
    let total: f64 = (0..planes)
        .map(|p| {
            let r = p * h * w..(p + 1) * h * w;
            plane_ssim(&a[r.clone()], &b[r], h, w, &k)
        })
        .sum();
    Ok(total / planes as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn identical_frames_score_perfectly_and_noise_lowers_both() {
        let dev = Device::Cpu;
        let a = Tensor::rand(0f32, 1f32, (2, 3, 16, 20), &dev).unwrap();
        assert!((ssim(&a, &a).unwrap() - 1.0).abs() < 1e-12);
        assert!(psnr(&a, &a).unwrap() > 150.0);
        let noisy = (&a + (Tensor::randn(0f32, 0.05, a.shape(), &dev).unwrap()))
            .unwrap()
            .clamp(0f32, 1f32)
            .unwrap();
        let s = ssim(&noisy, &a).unwrap();
        assert!(s > 0.5 && s < 0.99, "{s}");
        let p = psnr(&noisy, &a).unwrap();
        assert!(p > 24.0 && p < 28.0, "{p}");
        assert!(ssim(&a.narrow(2, 0, 8).unwrap(), &a.narrow(2, 0, 8).unwrap()).is_err());
    }

    /// scikit-image: `structural_similarity(x ** 2, x, gaussian_weights=True, sigma=1.5,
    /// use_sample_covariance=False, data_range=1.0)` for a 16x16 horizontal ramp `x` in [0, 1]
    /// is 0.776813.
    #[test]
    fn matches_a_known_value() {
        let dev = Device::Cpu;
        let ramp: Vec<f32> = (0..16 * 16).map(|i| (i % 16) as f32 / 15.0).collect();
        let x = Tensor::from_vec(ramp, (1, 1, 16, 16), &dev).unwrap();
        let y = x.sqr().unwrap();
        let s = ssim(&y, &x).unwrap();
        assert!((s - 0.776813).abs() < 1e-6, "{s}");
    }
}
