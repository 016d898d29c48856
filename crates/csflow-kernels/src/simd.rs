//! One vector register of f32, 256 or 512 bits wide, so that a kernel is written once and compiled for
//! AVX2 + FMA and for AVX-512 (each instance inlined into a function with those target features).

use std::arch::x86_64::*;

/// A vector of [`Simd::LANES`] f32 and the mask type that selects some of its lanes.
///
/// # Safety
/// Every method needs the CPU features of its type (AVX2 + FMA for `__m256`, AVX-512 F for `__m512`) and
/// may only be called from code compiled with them.
pub(crate) trait Simd: Copy {
    const LANES: usize;
    type Mask: Copy;
    /// Selects the first `n` lanes (all of them when `n >= LANES`).
    unsafe fn first(n: usize) -> Self::Mask;
    /// `LANES` values at `p`, or with `MASKED` only the lanes of `m` (zeros elsewhere, nothing read there).
    unsafe fn load<const MASKED: bool>(p: *const f32, m: Self::Mask) -> Self;
    /// Stores every lane at `p`, or with `MASKED` only the lanes of `m`.
    unsafe fn store<const MASKED: bool>(self, p: *mut f32, m: Self::Mask);
    /// `LANES` f16 values (bits) at `p`, widened (F16C with AVX2).
    unsafe fn load_half(p: *const u16) -> Self;
    unsafe fn splat(v: f32) -> Self;
    unsafe fn add(self, o: Self) -> Self;
    unsafe fn sub(self, o: Self) -> Self;
    unsafe fn mul(self, o: Self) -> Self;
    unsafe fn div(self, o: Self) -> Self;
    /// `a * b + self`.
    unsafe fn fmadd(self, a: Self, b: Self) -> Self;
    /// `self - a * b`.
    unsafe fn fnmadd(self, a: Self, b: Self) -> Self;
    /// Clamped to [lo, hi], NaN kept (as `f32::clamp`).
    unsafe fn clamp(self, lo: f32, hi: f32) -> Self;
    /// 2^n for lanes holding `round + n` (an integer n added to `round`, whose bits are `round_bits`): n from
    /// the low mantissa bits, put in the exponent.
    unsafe fn pow2(self, round_bits: i32) -> Self;
    /// Clamped to [0, 6].
    unsafe fn relu6(self) -> Self;
    /// `slope *` the lanes not above zero.
    unsafe fn leaky(self, slope: f32) -> Self;
}

impl Simd for __m256 {
    const LANES: usize = 8;
    type Mask = __m256i;

    #[inline(always)]
    unsafe fn first(n: usize) -> __m256i {
        crate::first_lanes(n)
    }

    #[inline(always)]
    unsafe fn load<const MASKED: bool>(p: *const f32, m: __m256i) -> Self {
        crate::load_lanes::<MASKED>(p, m)
    }

    #[inline(always)]
    unsafe fn store<const MASKED: bool>(self, p: *mut f32, m: __m256i) {
        if MASKED {
            _mm256_maskstore_ps(p, m, self)
        } else {
            _mm256_storeu_ps(p, self)
        }
    }

    #[inline(always)]
    unsafe fn load_half(p: *const u16) -> Self {
        _mm256_cvtph_ps(_mm_loadu_si128(p.cast()))
    }

    #[inline(always)]
    unsafe fn splat(v: f32) -> Self {
        _mm256_set1_ps(v)
    }

    #[inline(always)]
    unsafe fn add(self, o: Self) -> Self {
        _mm256_add_ps(self, o)
    }

    #[inline(always)]
    unsafe fn sub(self, o: Self) -> Self {
        _mm256_sub_ps(self, o)
    }

    #[inline(always)]
    unsafe fn mul(self, o: Self) -> Self {
        _mm256_mul_ps(self, o)
    }

    #[inline(always)]
    unsafe fn div(self, o: Self) -> Self {
        _mm256_div_ps(self, o)
    }

    #[inline(always)]
    unsafe fn fmadd(self, a: Self, b: Self) -> Self {
        _mm256_fmadd_ps(a, b, self)
    }

    #[inline(always)]
    unsafe fn fnmadd(self, a: Self, b: Self) -> Self {
        _mm256_fnmadd_ps(a, b, self)
    }

    #[inline(always)]
    unsafe fn clamp(self, lo: f32, hi: f32) -> Self {
        // max/min return their second operand where either is NaN.
        _mm256_min_ps(_mm256_set1_ps(hi), _mm256_max_ps(_mm256_set1_ps(lo), self))
    }

    #[inline(always)]
    unsafe fn pow2(self, round_bits: i32) -> Self {
        let n = _mm256_sub_epi32(_mm256_castps_si256(self), _mm256_set1_epi32(round_bits - 127));
        _mm256_castsi256_ps(_mm256_slli_epi32::<23>(n))
    }

    #[inline(always)]
    unsafe fn relu6(self) -> Self {
        _mm256_min_ps(_mm256_max_ps(self, _mm256_setzero_ps()), _mm256_set1_ps(6.0))
    }

    #[inline(always)]
    unsafe fn leaky(self, slope: f32) -> Self {
        let positive = _mm256_cmp_ps::<_CMP_GT_OQ>(self, _mm256_setzero_ps());
        _mm256_blendv_ps(_mm256_mul_ps(self, _mm256_set1_ps(slope)), self, positive)
    }
}

impl Simd for __m512 {
    const LANES: usize = 16;
    type Mask = __mmask16;

    #[inline(always)]
    unsafe fn first(n: usize) -> __mmask16 {
        crate::microkernel::lanes(n)
    }

    #[inline(always)]
    unsafe fn load<const MASKED: bool>(p: *const f32, m: __mmask16) -> Self {
        if MASKED {
            _mm512_maskz_loadu_ps(m, p)
        } else {
            _mm512_loadu_ps(p)
        }
    }

    #[inline(always)]
    unsafe fn store<const MASKED: bool>(self, p: *mut f32, m: __mmask16) {
        if MASKED {
            _mm512_mask_storeu_ps(p, m, self)
        } else {
            _mm512_storeu_ps(p, self)
        }
    }

    #[inline(always)]
    unsafe fn load_half(p: *const u16) -> Self {
        _mm512_cvtph_ps(_mm256_loadu_si256(p.cast()))
    }

    #[inline(always)]
    unsafe fn splat(v: f32) -> Self {
        _mm512_set1_ps(v)
    }

    #[inline(always)]
    unsafe fn add(self, o: Self) -> Self {
        _mm512_add_ps(self, o)
    }

    #[inline(always)]
    unsafe fn sub(self, o: Self) -> Self {
        _mm512_sub_ps(self, o)
    }

    #[inline(always)]
    unsafe fn mul(self, o: Self) -> Self {
        _mm512_mul_ps(self, o)
    }

    #[inline(always)]
    unsafe fn div(self, o: Self) -> Self {
        _mm512_div_ps(self, o)
    }

    #[inline(always)]
    unsafe fn fmadd(self, a: Self, b: Self) -> Self {
        _mm512_fmadd_ps(a, b, self)
    }

    #[inline(always)]
    unsafe fn fnmadd(self, a: Self, b: Self) -> Self {
        _mm512_fnmadd_ps(a, b, self)
    }

    #[inline(always)]
    unsafe fn clamp(self, lo: f32, hi: f32) -> Self {
        // max/min return their second operand where either is NaN.
        _mm512_min_ps(_mm512_set1_ps(hi), _mm512_max_ps(_mm512_set1_ps(lo), self))
    }

    #[inline(always)]
    unsafe fn pow2(self, round_bits: i32) -> Self {
        let n = _mm512_sub_epi32(_mm512_castps_si512(self), _mm512_set1_epi32(round_bits - 127));
        _mm512_castsi512_ps(_mm512_slli_epi32::<23>(n))
    }

    #[inline(always)]
    unsafe fn relu6(self) -> Self {
        _mm512_min_ps(_mm512_max_ps(self, _mm512_setzero_ps()), _mm512_set1_ps(6.0))
    }

    #[inline(always)]
    unsafe fn leaky(self, slope: f32) -> Self {
        let not_positive = _mm512_cmp_ps_mask::<_CMP_NGT_UQ>(self, _mm512_setzero_ps());
        _mm512_mask_mul_ps(self, not_positive, self, _mm512_set1_ps(slope))
    }
}
