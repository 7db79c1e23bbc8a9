//! Element-wise math written so that LLVM vectorizes it, compiled once per instruction set
//! and picked at run time.
//!
//! Release builds target baseline x86-64 (SSE2), where loops stay 4 lanes wide and
//! `mul_add` is a libm call. [`simd_fn!`] compiles a function body a second time with
//! AVX2 + FMA enabled and calls that copy when the CPU has them, so the same plain Rust loops
//! run 8 lanes wide with fused multiply-adds. The math functions here use only operations
//! LLVM vectorizes (no libm calls, no branches), and reductions keep [`LANES`] independent
//! accumulators, since float addition may not be reordered by the compiler.

/// Independent accumulators of a reduction: one AVX2 register of f32.
pub const LANES: usize = 16;

/// Define a function whose body also runs as an AVX2 + FMA copy on CPUs that have them.
macro_rules! simd_fn {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx2,fma")]
                fn widest($($arg: $ty),*) $(-> $ret)? {
                    body($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                fn wide($($arg: $ty),*) $(-> $ret)? {
                    body($($arg),*)
                }
                if std::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has the features `widest` was compiled for.
                    return unsafe { widest($($arg),*) };
                }
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU has the features `wide` was compiled for.
                    return unsafe { wide($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}
pub(crate) use simd_fn;

/// `e^x` in f32, relative error about 2e-7 (Cephes' expf: `x = n ln 2 + r`, a degree-7
/// polynomial in `r`, then `2^n` through the exponent bits). Underflows to 0 below -87.3.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Rounds to nearest by pushing the fraction out of the mantissa.
    const ROUND: f32 = 12_582_912.0;
    let xc = x.clamp(-87.336_54, 88.376_26);
    let shifted = xc * LOG2E + ROUND;
    let n = shifted - ROUND;
    let r = n.mul_add(-LN2_LO, n.mul_add(-LN2_HI, xc));
    let mut p = 1.987_569_1e-4_f32;
    p = p.mul_add(r, 1.398_199_9e-3);
    p = p.mul_add(r, 8.333_452e-3);
    p = p.mul_add(r, 4.166_579_6e-2);
    p = p.mul_add(r, 0.166_666_65);
    p = p.mul_add(r, 0.5);
    let e = p.mul_add(r * r, r + 1.0);
    // 2^n from the integer `n` already in `shifted`'s low mantissa bits: integer lanes, where
    // `n as i32` would be a saturating scalar conversion per lane.
    let biased = shifted
        .to_bits()
        .wrapping_sub(ROUND.to_bits())
        .wrapping_add(127);
    let scale = f32::from_bits(biased << 23);
    let y = e * scale;
    if x < -87.336_54 {
        0.0
    } else {
        y
    }
}

/// erf(x) in f32, absolute error below 1e-6 (the formula's 1.5e-7 plus f32 rounding): Abramowitz and Stegun 7.1.26, the form PyTorch
/// vectorizes too.
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    const P: f32 = 0.327_591_1;
    const A1: f32 = 0.254_829_6;
    const A2: f32 = -0.284_496_74;
    const A3: f32 = 1.421_413_7;
    const A4: f32 = -1.453_152_1;
    const A5: f32 = 1.061_405_4;
    let a = x.abs();
    let t = 1.0 / P.mul_add(a, 1.0);
    let mut p = A5;
    p = p.mul_add(t, A4);
    p = p.mul_add(t, A3);
    p = p.mul_add(t, A2);
    p = p.mul_add(t, A1);
    let y = 1.0 - p * t * exp(-a * a);
    y.copysign(x)
}

/// GELU with the exact erf form, `x/2 (1 + erf(x/sqrt 2))`, as diffusers' `GELU` and `GEGLU`.
#[inline(always)]
pub fn gelu_erf(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// Sum of `xs` in [`LANES`] partial sums.
#[inline(always)]
pub fn sum(xs: &[f32]) -> f32 {
    // Fewer than LANES: the partial sums below would all stay 0 and add nothing to the tail,
    // so summing the tail alone is the same number, without zeroing and adding them (GroupNorm
    // statistics of the small models sum groups of 2-8 channels, millions of times a step).
    if xs.len() < LANES {
        return xs.iter().sum();
    }
    let mut acc = [0f32; LANES];
    let chunks = xs.chunks_exact(LANES);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            *a += v;
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Sum of `(x - mean)^2` over `xs`, in [`LANES`] partial sums.
#[inline(always)]
pub fn centered_squares(xs: &[f32], mean: f32) -> f32 {
    // As in `sum`: below LANES the tail is the whole result.
    if xs.len() < LANES {
        return xs.iter().map(|v| (v - mean) * (v - mean)).sum();
    }
    let mut acc = [0f32; LANES];
    let chunks = xs.chunks_exact(LANES);
    let tail: f32 = chunks
        .remainder()
        .iter()
        .map(|v| (v - mean) * (v - mean))
        .sum();
    for c in chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            let d = v - mean;
            *a = d.mul_add(d, *a);
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Largest element (`-inf` for none), in [`LANES`] partial maxima.
#[inline(always)]
pub fn max(xs: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = xs.chunks_exact(LANES);
    let tail = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = a.max(v);
        }
    }
    acc.iter().fold(tail, |m, &v| m.max(v))
}

/// `xs[i] = e^(xs[i] - shift)`, returning the sum of the results (summed as they are made,
/// in [`LANES`] partial sums).
#[inline(always)]
pub fn exp_shifted(xs: &mut [f32], shift: f32) -> f32 {
    let mut acc = [0f32; LANES];
    let mut chunks = xs.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for (a, v) in acc.iter_mut().zip(c.iter_mut()) {
            *v = exp(*v - shift);
            *a += *v;
        }
    }
    let mut tail = 0.0;
    for v in chunks.into_remainder() {
        *v = exp(*v - shift);
        tail += *v;
    }
    acc.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_std_over_the_softmax_range() {
        let mut worst = 0f32;
        for i in -87_000..88_000 {
            let x = i as f32 / 1000.0;
            let (got, want) = (exp(x), x.exp());
            worst = worst.max(((got - want) / want).abs());
        }
        assert!(worst < 5e-7, "relative error {worst}");
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
    }

    #[test]
    fn erf_matches_libm() {
        let mut worst = 0f64;
        for i in -6000..6000 {
            let x = i as f32 / 1000.0;
            let want = libm_erf(f64::from(x));
            worst = worst.max((f64::from(erf(x)) - want).abs());
        }
        assert!(worst < 1e-6, "absolute error {worst}");
    }

    /// erf by its Maclaurin series (|x| < 3) or continued fraction, in f64.
    fn libm_erf(x: f64) -> f64 {
        let a = x.abs();
        let y = if a < 3.0 {
            let (mut term, mut total, mut n) = (a, a, 0.0);
            while term.abs() > 1e-17 {
                n += 1.0;
                term *= -a * a / n;
                total += term / (2.0 * n + 1.0);
            }
            total * 2.0 / std::f64::consts::PI.sqrt()
        } else {
            let mut f = 0.0;
            for k in (1..60).rev() {
                f = (k as f64 / 2.0) / (a + f);
            }
            1.0 - (-a * a).exp() / (std::f64::consts::PI.sqrt() * (a + f))
        };
        y.copysign(x)
    }
}
