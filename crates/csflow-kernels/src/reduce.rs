//! Sums in f64: per plane of NCHW maps, in parallel over planes (a convolution's bias gradient), and of
//! squares (the gradient norm). candle's reductions run on one thread, over a strided index where the reduced
//! dimensions are not the last ones, and add in f32.

use rayon::prelude::*;

use crate::items_per_task;

/// Σ f(x) in f64 over 16 running sums (one sum is a chain of dependent additions, 4 cycles a value), in AVX2
/// where the CPU has it (built for baseline x86-64 the conversions and additions stay scalar).
#[inline(always)]
fn sum_by(x: &[f32], f: impl Fn(f64) -> f64) -> f64 {
    #[cfg(target_arch = "x86_64")]
    if crate::has_avx2_fma() {
        // SAFETY: the CPU supports AVX2 and FMA (checked).
        return unsafe { sum_by_avx2(x, f) };
    }
    sum_by_portable(x, f)
}

/// [`sum_by`] compiled for AVX2.
///
/// # Safety
/// The CPU supports AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn sum_by_avx2(x: &[f32], f: impl Fn(f64) -> f64) -> f64 {
    sum_by_portable(x, f)
}

#[inline(always)]
fn sum_by_portable(x: &[f32], f: impl Fn(f64) -> f64) -> f64 {
    let mut acc = [0f64; 16];
    let chunks = x.chunks_exact(16);
    let tail: f64 = chunks.remainder().iter().map(|&v| f(v as f64)).sum();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += f(v as f64);
        }
    }
    acc.iter().sum::<f64>() + tail
}

/// Σ x² in f64 (a gradient norm).
pub fn sum_of_squares(x: &[f32]) -> f64 {
    sum_by(x, |v| v * v)
}

/// Σ of each plane of `hw` consecutive values in `x` (x.len() a multiple of hw).
pub(crate) fn plane_sums(x: &[f32], hw: usize) -> Vec<f64> {
    if hw == 0 {
        return Vec::new();
    }
    x.par_chunks_exact(hw).with_min_len(items_per_task(hw)).map(|p| sum_by(p, |v| v)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 0.1 repeated 1000 times: the f32 running sum drifts to 99.99905, the f64 sum rounds to 100.0 exactly;
    /// planes of 1..=6 and 7..=12 sum to 21 and 57.
    #[test]
    fn plane_sums_of_hand_worked_planes() {
        let drift = vec![0.1f32; 1000];
        assert_ne!(drift.iter().sum::<f32>(), 100.0);
        assert_eq!(plane_sums(&drift, 1000)[0] as f32, 100.0);
        let x: Vec<f32> = (1..=12).map(|v| v as f32).collect();
        assert_eq!(plane_sums(&x, 6), [21.0, 57.0]);
    }

    /// 1² + … + 19² = 19 · 20 · 39 / 6 = 2470: a run of sixteen and a remainder of three.
    #[test]
    fn sum_of_squares_counts_every_value() {
        let v: Vec<f32> = (1..=19).map(|k| k as f32).collect();
        assert_eq!(sum_of_squares(&v), 2470.0);
        assert_eq!(sum_of_squares(&v[..3]), 14.0);
        assert_eq!(sum_of_squares(&[]), 0.0);
    }
}
