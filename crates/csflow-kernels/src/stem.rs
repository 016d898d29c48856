//! Dense convolution of inputs with few channels (the backbone's stem: 3 -> 32-48 channels, 3x3, stride 2),
//! inference only.
//!
//! Per output row the taps are gathered into a small [cin·kh·kw, wo] block that stays in L1, then multiplied by
//! the weights with output pixels across the vector lanes, four output channels at a time, bias and activation
//! applied in registers before one store. The im2col path wrote the whole column matrix (27 x 16384 values for
//! Lite0 at 256 px), read it back through the `gemm` crate's packing, and needed an explicitly padded copy of
//! the image first: 7 % of a one-thread Lite0 extraction.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::gemm::SendPtr;
use crate::{f32_slice, Activation, Padding};

/// Output pixels per block: two AVX2 vectors.
const BLOCK: usize = 16;

/// Output channels per block.
const GROUP: usize = 4;

struct Stem {
    stride: usize,
    pad: Padding,
    act: Activation,
}

/// Geometry of one call.
#[derive(Clone, Copy)]
struct Geom {
    h: usize,
    w: usize,
    cout: usize,
    kh: usize,
    kw: usize,
    ho: usize,
    wo: usize,
}

impl CustomOp3 for Stem {
    fn name(&self) -> &'static str {
        "csflow-stem-conv"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w, b) =
            (f32_slice(xs, xl, self.name())?, f32_slice(ws, wl, self.name())?, f32_slice(bs, bl, self.name())?);
        let (&[n, cin, h, wd], &[cout, wcin, kh, kw]) = (xl.dims(), wl.dims()) else {
            candle_core::bail!(
                "stem conv: expected x [N, C, H, W] and w [O, C, kh, kw], got {:?} and {:?}",
                xl.dims(),
                wl.dims()
            );
        };
        if wcin != cin || b.len() != cout {
            candle_core::bail!("stem conv: input has {cin} channels, weight {:?}, bias {} values", wl.dims(), b.len());
        }
        let (s, p) = (self.stride, self.pad);
        let (ho, wo) = p.output_size("stem conv", h, wd, kh, kw, s)?;
        let g = Geom { h, w: wd, cout, kh, kw, ho, wo };
        let mut out = crate::uninit(n * cout * g.ho * g.wo);
        let k = cin * kh * kw;
        let ld = g.wo.div_ceil(BLOCK) * BLOCK;
        let dst = SendPtr(out.as_mut_ptr());
        (0..n * g.ho).into_par_iter().for_each_init(
            // Columns past wo stay zero: the last block computes them and does not store them.
            || vec![0f32; k * ld],
            |cols, row| {
                let (j, oy) = (row / g.ho, row % g.ho);
                gather_row(&x[j * cin * h * wd..(j + 1) * cin * h * wd], g, s, p, oy, ld, cols);
                let dst = &dst;
                // SAFETY: row (j, oy) writes only output row oy of the planes (j, o), disjoint from every
                // other row's; `multiply` stays within wo columns of each.
                unsafe { multiply(cols, ld, k, w, b, self.act, g, dst.0.add(j * cout * g.ho * g.wo + oy * g.wo)) }
            },
        );
        Ok((CpuStorage::F32(out), Shape::from((n, cout, g.ho, g.wo))))
    }
}

/// cols [cin·kh·kw][ld]: the input value under each tap for every output column of row oy (zero in the padding).
fn gather_row(x: &[f32], g: Geom, s: usize, p: Padding, oy: usize, ld: usize, cols: &mut [f32]) {
    for (t, dst) in cols.chunks_exact_mut(ld).enumerate() {
        let (c, ky, kx) = (t / (g.kh * g.kw), t / g.kw % g.kh, t % g.kw);
        let iy = (oy * s + ky).wrapping_sub(p.top);
        if iy >= g.h {
            dst[..g.wo].fill(0.0);
            continue;
        }
        let src = &x[(c * g.h + iy) * g.w..][..g.w];
        // Stride 2 with AVX2: the columns from the first inside the row by vector deinterleaves (the scalar
        // loop alone was a quarter of the stem: Lite0 at 256 px, one thread, min of 300, 676-688 -> 515-520 us).
        #[cfg(target_arch = "x86_64")]
        let vector = if s == 2 && crate::has_avx2_fma() {
            let lo = p.left.saturating_sub(kx).div_ceil(2).min(g.wo);
            let first = 2 * lo + kx - p.left.min(2 * lo + kx);
            // SAFETY: the CPU supports AVX2; `deinterleave` checks its reads and writes against the slices.
            let written = unsafe { x86::deinterleave(src, first, &mut dst[lo..g.wo]) };
            lo..lo + written
        } else {
            0..0
        };
        #[cfg(not(target_arch = "x86_64"))]
        let vector = 0..0;
        let (head, tail) = dst[..g.wo].split_at_mut(vector.end);
        let scalar = head[..vector.start]
            .iter_mut()
            .enumerate()
            .chain(tail.iter_mut().enumerate().map(|(i, d)| (i + vector.end, d)));
        for (ox, d) in scalar {
            let ix = (ox * s + kx).wrapping_sub(p.left);
            *d = if ix < g.w { src[ix] } else { 0.0 };
        }
    }
}

/// out[o][ox] (planes ho·wo apart from `out`) = act(b[o] + Σ_t w[o][t] cols[t][ox]) for all output channels.
///
/// # Safety
/// `out` points at row oy of plane (j, 0); the caller owns that row in every plane of sample j.
#[allow(clippy::too_many_arguments)]
unsafe fn multiply(cols: &[f32], ld: usize, k: usize, w: &[f32], b: &[f32], act: Activation, g: Geom, out: *mut f32) {
    #[cfg(target_arch = "x86_64")]
    if crate::has_avx2_fma() {
        // SAFETY: the CPU supports AVX2 and FMA (checked at run time); the rest is the caller's.
        return unsafe { x86::multiply(cols, ld, k, w, b, act, g, out) };
    }
    for o in 0..g.cout {
        let mut row: Vec<f32> =
            (0..g.wo).map(|ox| b[o] + (0..k).map(|t| w[o * k + t] * cols[t * ld + ox]).sum::<f32>()).collect();
        act.apply_slice(&mut row);
        // SAFETY: row oy of plane o holds wo values, owned by the caller.
        unsafe { std::ptr::copy_nonoverlapping(row.as_ptr(), out.add(o * g.ho * g.wo), g.wo) };
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{Geom, BLOCK, GROUP};
    use crate::Activation;

    /// dst[i] = src[first + 2 i] for whole vectors of 8 while their 16 source values lie in `src`; returns
    /// how many values it wrote (the caller does the rest).
    ///
    /// # Safety
    /// AVX2.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn deinterleave(src: &[f32], first: usize, dst: &mut [f32]) -> usize {
        let mut i = 0;
        while i + 8 <= dst.len() && first + 2 * i + 16 <= src.len() {
            // SAFETY: 16 values from first + 2i lie in src and 8 from i in dst (the loop's condition).
            unsafe {
                let p = src.as_ptr().add(first + 2 * i);
                let (a, b) = (_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8)));
                // [a0 a2 b0 b2 | a4 a6 b4 b6], then its 64-bit pairs reordered to a0 a2 a4 a6 b0 b2 b4 b6.
                let evens = _mm256_castps_pd(_mm256_shuffle_ps::<0x88>(a, b));
                _mm256_storeu_ps(dst.as_mut_ptr().add(i), _mm256_castpd_ps(_mm256_permute4x64_pd::<0xD8>(evens)));
            }
            i += 8;
        }
        i
    }

    /// [`super::multiply`] with GROUP output channels x BLOCK pixels in eight accumulators.
    ///
    /// # Safety
    /// AVX2 and FMA; as [`super::multiply`].
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn multiply(
        cols: &[f32],
        ld: usize,
        k: usize,
        w: &[f32],
        b: &[f32],
        act: Activation,
        g: Geom,
        out: *mut f32,
    ) {
        assert!(
            cols.len() >= k * ld && w.len() == g.cout * k && b.len() == g.cout && ld >= g.wo.div_ceil(BLOCK) * BLOCK
        );
        for o0 in (0..g.cout).step_by(GROUP) {
            let n_o = GROUP.min(g.cout - o0);
            // A partial group repeats its last channel in the missing places and does not store them.
            let oc: [usize; GROUP] = std::array::from_fn(|i| o0 + i.min(n_o - 1));
            for x0 in (0..g.wo).step_by(BLOCK) {
                unsafe {
                    let mut acc = [_mm256_setzero_ps(); 2 * GROUP];
                    for t in 0..k {
                        // SAFETY: t < k and x0 + BLOCK <= ld: within cols (asserted).
                        let c = cols.as_ptr().add(t * ld + x0);
                        let (c0, c1) = (_mm256_loadu_ps(c), _mm256_loadu_ps(c.add(8)));
                        for (i, &o) in oc.iter().enumerate() {
                            let wv = _mm256_set1_ps(*w.get_unchecked(o * k + t));
                            acc[2 * i] = _mm256_fmadd_ps(wv, c0, acc[2 * i]);
                            acc[2 * i + 1] = _mm256_fmadd_ps(wv, c1, acc[2 * i + 1]);
                        }
                    }
                    for (i, &o) in oc.iter().enumerate() {
                        let bv = _mm256_set1_ps(b[o]);
                        acc[2 * i] = _mm256_add_ps(acc[2 * i], bv);
                        acc[2 * i + 1] = _mm256_add_ps(acc[2 * i + 1], bv);
                    }
                    act.apply_registers(&mut acc);
                    let width = BLOCK.min(g.wo - x0);
                    for (i, &o) in oc.iter().enumerate().take(n_o) {
                        // SAFETY: columns x0..x0 + width of row oy in plane o, owned by the caller.
                        let d = out.add(o * g.ho * g.wo + x0);
                        if width == BLOCK {
                            _mm256_storeu_ps(d, acc[2 * i]);
                            _mm256_storeu_ps(d.add(8), acc[2 * i + 1]);
                        } else {
                            let mut tmp = [0f32; BLOCK];
                            _mm256_storeu_ps(tmp.as_mut_ptr(), acc[2 * i]);
                            _mm256_storeu_ps(tmp.as_mut_ptr().add(8), acc[2 * i + 1]);
                            std::ptr::copy_nonoverlapping(tmp.as_ptr(), d, width);
                        }
                    }
                }
            }
        }
    }
}

/// `F.conv2d(F.pad(x, pad), w, b, stride)` then `act`, for x [N, C, H, W] with few channels (the stem),
/// w `[O, C, kh, kw]`, b `[O]`; without gradients.
pub fn stem_conv(x: &Tensor, w: &Tensor, b: &Tensor, stride: usize, pad: Padding, act: Activation) -> Result<Tensor> {
    x.contiguous()?.apply_op3_no_bwd(&w.contiguous()?, &b.contiguous()?, &Stem { stride, pad, act })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_data as data;
    use candle_core::Device;

    /// Against candle's convolution on an explicitly padded input, then candle's activation: output channel
    /// counts with and without a partial group, rows with and without a partial block, strides 1 and 2,
    /// asymmetric padding (TensorFlow's "same" on even sizes), 3x3 and 5x5, maps narrower than the kernel.
    #[test]
    fn matches_candle_convolution() {
        let dev = Device::Cpu;
        for &(n, c, o, h, w, k, s, pad) in &[
            (2usize, 3usize, 6usize, 9usize, 20usize, 3usize, 2usize, Padding { top: 0, bottom: 1, left: 0, right: 1 }),
            (1, 3, 8, 32, 34, 3, 2, Padding { top: 0, bottom: 1, left: 0, right: 1 }),
            // A row whose last output column reads the right padding (the vector deinterleave must stop short).
            (1, 3, 4, 8, 32, 3, 2, Padding { top: 0, bottom: 1, left: 0, right: 1 }),
            (1, 3, 4, 8, 40, 3, 2, Padding::symmetric(1)),
            (1, 2, 5, 7, 37, 3, 1, Padding::symmetric(1)),
            (1, 1, 4, 6, 5, 5, 1, Padding::symmetric(2)),
            // Windows wider than the map: taps whose columns all fall in the padding.
            (1, 2, 4, 3, 1, 5, 1, Padding::symmetric(2)),
            (1, 3, 4, 5, 2, 3, 2, Padding { top: 1, bottom: 1, left: 2, right: 2 }),
        ] {
            let x = (Tensor::from_vec(data(n * c * h * w, 1), (n, c, h, w), &dev).unwrap() * 4.0).unwrap();
            let wt = Tensor::from_vec(data(o * c * k * k, 2), (o, c, k, k), &dev).unwrap();
            let b = Tensor::from_vec(data(o, 3), o, &dev).unwrap();
            for (act, theirs) in crate::candle_reference(&x, &wt, &b, s, pad, 1) {
                let ours = stem_conv(&x, &wt, &b, s, pad, act).unwrap();
                assert_eq!(ours.dims(), theirs.dims());
                let d: f32 = (ours - theirs).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap();
                assert!(d < 1e-5, "{n}x{c}->{o} {h}x{w} k {k} s {s} {act:?}: {d}");
            }
        }
    }

    #[test]
    fn mismatched_shapes_are_errors() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((1, 3, 4, 4), candle_core::DType::F32, &dev).unwrap();
        let w = Tensor::zeros((8, 2, 3, 3), candle_core::DType::F32, &dev).unwrap();
        let b = Tensor::zeros(8, candle_core::DType::F32, &dev).unwrap();
        assert!(stem_conv(&x, &w, &b, 2, Padding::symmetric(1), Activation::Identity).is_err());
        let w = Tensor::zeros((8, 3, 7, 7), candle_core::DType::F32, &dev).unwrap();
        let err = stem_conv(&x, &w, &b, 1, Padding::symmetric(1), Activation::Identity).unwrap_err();
        assert!(err.to_string().contains("does not fit"), "{err}");
    }
}
