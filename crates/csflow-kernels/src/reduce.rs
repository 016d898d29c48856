//! Sums in f64: per plane of NCHW maps, in parallel over planes (a convolution's bias gradient), per channel
//! of pixel-major maps (squeeze-excitation's means on the small-map path) and of squares (the gradient
//! norm). candle's reductions run on one thread, over a strided index where the reduced dimensions are not
//! the last ones, and add in f32.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::{f32_slice, items_per_task};

/// Σ x (or Σ x² for `SQUARES`) in f64 over 16 running sums (one sum is a chain of dependent additions, 4
/// cycles a value), in AVX2 where the CPU has it (built for baseline x86-64 the conversions and additions
/// stay scalar).
#[inline(always)]
fn sum_by<const SQUARES: bool>(x: &[f32]) -> f64 {
    #[cfg(target_arch = "x86_64")]
    if crate::has_avx2_fma() {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2<const SQUARES: bool>(x: &[f32]) -> f64 {
            sum_lanes::<SQUARES>(x)
        }
        // SAFETY: the CPU supports AVX2 and FMA (checked).
        return unsafe { avx2::<SQUARES>(x) };
    }
    sum_lanes::<SQUARES>(x)
}

#[inline(always)]
fn sum_lanes<const SQUARES: bool>(x: &[f32]) -> f64 {
    let mut acc = [0f64; 16];
    let chunks = x.chunks_exact(16);
    let tail: f64 = chunks.remainder().iter().map(|&v| term::<SQUARES>(v)).sum();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += term::<SQUARES>(v);
        }
    }
    acc.iter().sum::<f64>() + tail
}

#[inline(always)]
fn term<const SQUARES: bool>(v: f32) -> f64 {
    if SQUARES {
        (v as f64) * (v as f64)
    } else {
        v as f64
    }
}

/// Σ x in f64.
pub(crate) fn sum(x: &[f32]) -> f64 {
    sum_by::<false>(x)
}

/// Σ x² in f64 (a gradient norm).
pub fn sum_of_squares(x: &[f32]) -> f64 {
    sum_by::<true>(x)
}

/// Σ of each plane of `hw` consecutive values in `x` (x.len() a multiple of hw).
pub(crate) fn plane_sums(x: &[f32], hw: usize) -> Vec<f64> {
    if hw == 0 {
        return Vec::new();
    }
    x.par_chunks_exact(hw).with_min_len(items_per_task(hw)).map(sum).collect()
}

/// The mean over pixels of each of the first `c` channels of pixel-major maps [N, HW, C'] (C' >= c): [N, c].
/// candle's `mean(1)` walks a strided index there (2.6 % of B5 at 768 px, on its 12x12 and 6x6 blocks).
pub(crate) fn pixel_means(x: &Tensor, c: usize) -> Result<Tensor> {
    x.contiguous()?.apply_op1_no_bwd(&PixelMeans { c })
}

struct PixelMeans {
    c: usize,
}

impl CustomOp1 for PixelMeans {
    fn name(&self) -> &'static str {
        "csflow-pixel-means"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(xs, xl, self.name())?;
        let &[n, hw, cp] = xl.dims() else {
            candle_core::bail!("{}: expected [N, HW, C], got {:?}", self.name(), xl.dims());
        };
        let c = self.c;
        if c > cp || hw == 0 {
            candle_core::bail!("{}: the means of {c} channels of {:?}", self.name(), xl.dims());
        }
        let mut means = Vec::with_capacity(n * c);
        for sample in x.chunks_exact(hw * cp) {
            let sums = channel_sums(sample, cp, c);
            means.extend(sums.iter().map(|&s| (s / hw as f64) as f32));
        }
        Ok((CpuStorage::F32(means), Shape::from((n, c))))
    }
}

/// Σ over the rows of `width` values of x of each of their first c values, in AVX2 where the CPU has it
/// (as [`sum_by`]): one chain per channel, the channels side by side in the vectors.
fn channel_sums(x: &[f32], width: usize, c: usize) -> Vec<f64> {
    #[cfg(target_arch = "x86_64")]
    if crate::has_avx2_fma() {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2(x: &[f32], width: usize, c: usize) -> Vec<f64> {
            channel_lanes(x, width, c)
        }
        // SAFETY: the CPU supports AVX2 and FMA (checked).
        return unsafe { avx2(x, width, c) };
    }
    channel_lanes(x, width, c)
}

#[inline(always)]
fn channel_lanes(x: &[f32], width: usize, c: usize) -> Vec<f64> {
    let mut sums = vec![0f64; c];
    for row in x.chunks_exact(width) {
        for (s, &v) in sums.iter_mut().zip(row) {
            *s += v as f64;
        }
    }
    sums
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

    /// Two samples of three pixels, four channels stored of which three are asked for: sample 0 has
    /// channel values 1..=12 pixel by pixel (means 5, 6, 7), sample 1 the negatives.
    #[test]
    fn pixel_means_of_hand_worked_maps() {
        let mut x: Vec<f32> = (1..=12).map(|v| v as f32).collect();
        x.extend((1..=12).map(|v| -v as f32));
        let t = Tensor::from_vec(x, (2, 3, 4), &candle_core::Device::Cpu).unwrap();
        let means = pixel_means(&t, 3).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(means, [[5.0, 6.0, 7.0], [-5.0, -6.0, -7.0]]);
        assert!(pixel_means(&t, 5).is_err());
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
