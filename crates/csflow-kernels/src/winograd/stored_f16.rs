//! Transformed weights stored in half precision (IEEE f16) for `--precision bf16`, multiplied in f32 with
//! the output channels in the vector lanes.
//!
//! At batch 1 the flow's 5x5 layers stream their transformed weights from memory once per call: 80 MB in f32
//! for F(4x4, 5x5) 1024 -> 304, about as long as their products take. In f16 they are half the bytes, and f16
//! keeps 11 significant bits where bfloat16 keeps 8: a float64 simulation of F(4x4, 5x5) over 1024 channels
//! put the rounding of U to f16 (V in f32) at 3.7e-3 of the outputs' size (rms), the class of the bfloat16
//! products the other layers run under bf16 (F(2x2, 3x3) 4.1e-3, im2col 3.0e-3), where U in bfloat16 gave
//! 3.0e-2.
//!
//! The products put 16 output channels in each register and broadcast V's values: with F(4x4, 5x5) on a
//! 24x24 map a product has 36 tiles, which vectors of tiles fill only to three quarters (three registers for
//! 36 values), while 304 output channels fill 19 registers. A call takes a strip of up to [`STRIP`] output
//! channels (four registers) by up to [`GROUP`] tiles: 24 accumulators, each multiply-add useful.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use rayon::prelude::*;

use super::{around_products, Shape, Tile};
use crate::gemm::SendPtr;
use crate::Activation;

/// Output channels per strip: four registers of 16.
const STRIP: usize = 64;
/// Tiles per micro-kernel call: with four registers of U and one of V, 24 accumulators of the 32 registers.
const GROUP: usize = 6;

/// Whether this CPU runs the products (AVX-512 with F16C).
pub(super) fn supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// U [out][α²][in] (f32) rounded to f16 (to nearest, ties to even) and laid out as the products read it:
/// per position ξ, per strip of [`STRIP`] output channels, per input channel, the strip's values, padded
/// with zeros to whole vectors of 16 (so a position holds cin x ⌈cout / 16⌉·16 values).
pub(super) fn pack(u: &[f32], cout: usize, cin: usize, positions: usize) -> Vec<u16> {
    assert_eq!(u.len(), cout * positions * cin);
    let padded = cout.next_multiple_of(16);
    let mut out = vec![0u16; positions * cin * padded];
    for xi in 0..positions {
        for c0 in (0..cout).step_by(STRIP) {
            let width = STRIP.min(padded - c0);
            let strip = &mut out[(xi * padded + c0) * cin..][..cin * width];
            for o in c0..cout.min(c0 + STRIP) {
                for i in 0..cin {
                    strip[i * width + o - c0] = half::f16::from_f32(u[(o * positions + xi) * cin + i]).to_bits();
                }
            }
        }
    }
    out
}

/// The convolution with weights from [`pack`]; `s` as [`super::conv`]'s.
pub(super) fn conv<const A: usize, const R: usize, const M: usize, T: Tile<A, R, M>>(
    x: &[f32],
    u: &[u16],
    bias: Option<&[f32]>,
    act: Activation,
    s: Shape,
) -> Vec<f32> {
    let (tiles, positions, padded) = (s.tiles(), A * A, s.cout.next_multiple_of(16));
    assert_eq!(u.len(), positions * s.cin * padded);
    assert!(supported(), "f16 weights are made only where the CPU multiplies them");
    let ld = s.ld(positions);
    around_products::<A, R, M, T>(x, bias, act, s, |v, m| {
        let strips = s.cout.div_ceil(STRIP);
        let dst = SendPtr(m.as_mut_ptr());
        // One task per position and strip: 320 for F(4x4, 5x5) 1024 -> 304, each streaming its part of U once.
        (0..positions * strips).into_par_iter().for_each(|task| {
            let dst = &dst;
            let (xi, c0) = (task / strips, task % strips * STRIP);
            let width = STRIP.min(s.cout - c0);
            let strip = &u[(xi * padded + c0) * s.cin..][..s.cin * STRIP.min(padded - c0)];
            for t0 in (0..tiles).step_by(GROUP) {
                let call = Call {
                    u: strip.as_ptr(),
                    k: s.cin,
                    // (A pointer, not a slice: V is empty without input channels, and then never read.)
                    v: v.as_ptr().wrapping_add(xi * tiles + t0),
                    m: dst.0,
                    offset: c0 * ld + xi * tiles + t0,
                    ld,
                    rows: width,
                };
                // SAFETY: the strip holds cin rows of ⌈width / 16⌉ vectors; V's rows (ld apart, cin of them)
                // hold the group's tiles; the call writes M's rows c0..c0 + width at this position's tiles
                // t0.., which no other task writes.
                #[cfg(target_arch = "x86_64")]
                unsafe {
                    call.run(GROUP.min(tiles - t0))
                }
            }
        });
    })
}

/// One micro-kernel call: `rows` output channels (a strip) by a group of tiles, over `k` input channels;
/// V's and M's rows are `ld` apart, and the call writes M from `offset`.
struct Call {
    u: *const u16,
    k: usize,
    v: *const f32,
    m: *mut f32,
    offset: usize,
    ld: usize,
    rows: usize,
}

#[cfg(target_arch = "x86_64")]
impl Call {
    /// Dispatches on the strip's registers and the group's tiles.
    unsafe fn run(&self, group: usize) {
        macro_rules! tiles {
            ($r:literal) => {
                match group {
                    1 => self.kernel::<$r, 1>(),
                    2 => self.kernel::<$r, 2>(),
                    3 => self.kernel::<$r, 3>(),
                    4 => self.kernel::<$r, 4>(),
                    5 => self.kernel::<$r, 5>(),
                    _ => self.kernel::<$r, 6>(),
                }
            };
        }
        match self.rows.div_ceil(16) {
            1 => tiles!(1),
            2 => tiles!(2),
            3 => tiles!(3),
            _ => tiles!(4),
        }
    }

    /// `V` registers of output channels by `G` tiles; the sums go to M through scatters (16 channels of a tile
    /// are `ld` apart there), once per call.
    #[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl,f16c")]
    unsafe fn kernel<const V: usize, const G: usize>(&self) {
        let mut acc = [[_mm512_setzero_ps(); V]; G];
        for k in 0..self.k {
            let mut uv = [_mm512_setzero_ps(); V];
            for (r, x) in uv.iter_mut().enumerate() {
                *x = _mm512_cvtph_ps(_mm256_loadu_si256(self.u.add((k * V + r) * 16).cast()));
            }
            for (t, row) in acc.iter_mut().enumerate() {
                let b = _mm512_set1_ps(*self.v.add(k * self.ld + t));
                for (a, x) in row.iter_mut().zip(&uv) {
                    *a = _mm512_fmadd_ps(*x, b, *a);
                }
            }
        }
        // 16 channels of a tile are ld apart in M: two scatters of 8 with 64-bit offsets, right for any map
        // size (32-bit ones, one scatter of 16, made the paper-size bf16 forward 1-1.5 % faster but would
        // write astray past 2^31 / 15 values of M per channel).
        let s = self.ld as i64;
        let index = _mm512_setr_epi64(0, s, 2 * s, 3 * s, 4 * s, 5 * s, 6 * s, 7 * s);
        for (t, row) in acc.iter().enumerate() {
            for (r, a) in row.iter().enumerate() {
                let rows = 16.min(self.rows - 16 * r);
                let p = self.m.add(self.offset + 16 * r * self.ld + t);
                let mask = |from: usize| (((1u32 << rows.saturating_sub(from).min(8)) - 1) & 0xFF) as __mmask8;
                _mm512_mask_i64scatter_ps::<4>(p.cast(), mask(0), index, _mm512_castps512_ps256(*a));
                let high = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(*a)));
                // (Past M's end when the strip ends within the first 8 lanes: then masked out entirely.)
                _mm512_mask_i64scatter_ps::<4>(p.wrapping_add(8 * self.ld).cast(), mask(8), index, high);
            }
        }
    }
}
