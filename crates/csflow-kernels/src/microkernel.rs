//! Register-blocked micro-kernels for row-major products C (+)= A · B on x86-64: f32 in AVX2 (6 x 16) and
//! AVX-512 (8 x 32) registers, and bfloat16 pairs with `vdpbf16ps` (8 x 32). The fused Winograd products
//! drive them slice by slice ([`crate::winograd`]), and on CPUs with AVX-512 every product whose rows are
//! contiguous goes through [`gemm512`] (the `gemm` crate's AVX-512 kernels need a nightly compiler).

use std::arch::x86_64::*;

use rayon::prelude::*;

/// Rows and columns of the AVX2 kernel.
const MR: usize = 6;
const NR: usize = 16;

/// One micro-kernel call: `MR` output channels (`rows` of them real) by `width` tiles, over `k` steps
/// (input channels, or pairs of them in bfloat16); rows of u are `ldu` apart, rows of v and m (channels or
/// pairs) `ld`. The first slice starts from zero, later ones from the partial sums stored in m.
pub(crate) struct Call<E> {
    u: *const E,
    ldu: usize,
    v: *const E,
    m: *mut f32,
    ldv: usize,
    ldm: usize,
    k: usize,
    rows: usize,
    first: bool,
    width: usize,
}

impl<E> Call<E> {
    /// Where row i of u starts: rows past the real ones read the last real row (their sums are never stored),
    /// so a product of m rows reads only those m.
    #[inline(always)]
    fn row(&self, i: usize) -> usize {
        i.min(self.rows - 1) * self.ldu
    }
}

/// A micro-kernel of `MR` output channels by `NR` tiles (two registers).
pub(crate) trait Kernel {
    /// What u and v hold: f32 values, or pairs of bfloat16 (`PAIRS`).
    type E;
    const PAIRS: bool;
    const MR: usize;
    const NR: usize;
    /// Whether the registers hold three vectors a row (24 accumulators of 32: AVX-512).
    const WIDE: bool;
    /// `V` registers of NR / 2 tiles; `MASKED` reads and stores only the first `width`.
    unsafe fn run<const V: usize, const MASKED: bool>(c: &Call<Self::E>);
}

/// The products of one position ξ and one slice for a task's `rows` output channels: u holds their
/// transformed weights (rows `ldu` apart), v the slice's rows of V and m their rows of M (`ld` apart).
#[inline(always)]
pub(crate) unsafe fn products<K: Kernel>(
    u: *const K::E,
    ldu: usize,
    v: *const K::E,
    m: *mut f32,
    (ldv, ldm): (usize, usize),
    (k, rows, first, tiles): (usize, usize, bool, usize),
) {
    let mut col = 0;
    while col < tiles {
        let rest = tiles - col;
        // A last part strip of at most half a strip goes with the strip before it, three registers a row: one
        // pass over u's rows instead of two, and 24 multiply-adds per 11 loads instead of 8 per 9 for the
        // part strip (36 tiles, as F(4x4, 5x5) on 24x24 and F(2x2) on 12x12 maps have: the paper-size forward
        // 4 % faster in f32 and in bfloat16).
        let width = if K::WIDE && rest > K::NR && rest <= K::NR + K::NR / 2 { rest } else { K::NR.min(rest) };
        for p in 0..rows.div_ceil(K::MR) {
            let c = Call {
                u: u.add(p * K::MR * ldu),
                ldu,
                v: v.add(col),
                m: m.add(p * K::MR * ldm + col),
                ldv,
                ldm,
                k,
                rows: K::MR.min(rows - p * K::MR),
                first,
                width,
            };
            if width > K::NR {
                K::run::<3, true>(&c);
            } else if width == K::NR {
                K::run::<2, false>(&c);
            } else if width > K::NR / 2 {
                K::run::<2, true>(&c);
            } else {
                K::run::<1, true>(&c);
            }
        }
        col += width;
    }
}

/// f32 in AVX2 registers: 6 channels x 16 tiles.
pub(crate) struct F32x8;

impl Kernel for F32x8 {
    type E = f32;
    const PAIRS: bool = false;
    const MR: usize = MR;
    const NR: usize = NR;
    const WIDE: bool = false;

    #[inline(always)]
    unsafe fn run<const V: usize, const MASKED: bool>(c: &Call<f32>) {
        let mut masks = [_mm256_setzero_si256(); V];
        for (v, m) in masks.iter_mut().enumerate() {
            *m = crate::first_lanes(c.width.saturating_sub(8 * v));
        }
        let mut acc = [[_mm256_setzero_ps(); V]; MR];
        if !c.first {
            for (i, row) in acc.iter_mut().enumerate().take(c.rows) {
                for (v, a) in row.iter_mut().enumerate() {
                    *a = crate::load_lanes::<MASKED>(c.m.add(i * c.ldm + 8 * v), masks[v]);
                }
            }
        }
        for k in 0..c.k {
            let mut xv = [_mm256_setzero_ps(); V];
            for (v, x) in xv.iter_mut().enumerate() {
                *x = crate::load_lanes::<MASKED>(c.v.add(k * c.ldv + 8 * v), masks[v]);
            }
            for (i, row) in acc.iter_mut().enumerate() {
                let wv = _mm256_broadcast_ss(&*c.u.add(c.row(i) + k));
                for (a, x) in row.iter_mut().zip(&xv) {
                    *a = _mm256_fmadd_ps(wv, *x, *a);
                }
            }
        }
        for (i, row) in acc.iter().enumerate().take(c.rows) {
            for (v, a) in row.iter().enumerate() {
                let p = c.m.add(i * c.ldm + 8 * v);
                if MASKED {
                    _mm256_maskstore_ps(p, masks[v], *a);
                } else {
                    _mm256_storeu_ps(p, *a);
                }
            }
        }
    }
}

/// f32 in AVX-512 registers: 8 channels x 32 tiles.
pub(crate) struct F32x16;

impl Kernel for F32x16 {
    type E = f32;
    const PAIRS: bool = false;
    const MR: usize = 8;
    const NR: usize = 32;
    const WIDE: bool = true;

    #[inline(always)]
    unsafe fn run<const V: usize, const MASKED: bool>(c: &Call<f32>) {
        let (mut acc, masks) = start_rows::<V, _>(c);
        for k in 0..c.k {
            let mut xv = [_mm512_setzero_ps(); V];
            for (j, x) in xv.iter_mut().enumerate() {
                let p = c.v.add(k * c.ldv + 16 * j);
                *x = if MASKED { _mm512_maskz_loadu_ps(masks[j], p) } else { _mm512_loadu_ps(p) };
            }
            for (i, row) in acc.iter_mut().enumerate() {
                let w = _mm512_set1_ps(*c.u.add(c.row(i) + k));
                for (a, x) in row.iter_mut().zip(&xv) {
                    *a = _mm512_fmadd_ps(w, *x, *a);
                }
            }
        }
        store_rows::<V, MASKED, _>(c, &acc, &masks);
    }
}

/// bfloat16 pairs in AVX-512 registers: 8 channels (16 accumulators of the 32 registers) x 32 tiles,
/// each multiply-add summing a pair of input channels.
pub(crate) struct Bf16x16;

impl Kernel for Bf16x16 {
    type E = u32;
    const PAIRS: bool = true;
    const MR: usize = 8;
    const NR: usize = 32;
    const WIDE: bool = true;

    #[inline(always)]
    unsafe fn run<const V: usize, const MASKED: bool>(c: &Call<u32>) {
        let (mut acc, masks) = start_rows::<V, _>(c);
        for k in 0..c.k {
            let mut xv = [std::mem::transmute::<__m512i, __m512bh>(_mm512_setzero_si512()); V];
            for (j, x) in xv.iter_mut().enumerate() {
                let p = c.v.add(k * c.ldv + 16 * j);
                let v =
                    if MASKED { _mm512_maskz_loadu_epi32(masks[j], p.cast()) } else { _mm512_loadu_si512(p.cast()) };
                *x = std::mem::transmute::<__m512i, __m512bh>(v);
            }
            for (i, row) in acc.iter_mut().enumerate() {
                let w = _mm512_set1_epi32(*c.u.add(c.row(i) + k) as i32);
                let w = std::mem::transmute::<__m512i, __m512bh>(w);
                for (a, x) in row.iter_mut().zip(&xv) {
                    *a = _mm512_dpbf16_ps(*a, w, *x);
                }
            }
        }
        store_rows::<V, MASKED, _>(c, &acc, &masks);
    }
}

/// The 16-lane masks of a call's `width` columns, and its 8 rows of accumulators: zero, or (after the first
/// slice) the partial sums stored in m.
#[inline(always)]
unsafe fn start_rows<const V: usize, E>(c: &Call<E>) -> ([[__m512; V]; 8], [__mmask16; V]) {
    let mut masks = [0 as __mmask16; V];
    for (j, m) in masks.iter_mut().enumerate() {
        *m = lanes(c.width.saturating_sub(16 * j));
    }
    let mut acc = [[_mm512_setzero_ps(); V]; 8];
    if !c.first {
        for (i, row) in acc.iter_mut().enumerate().take(c.rows) {
            for (j, a) in row.iter_mut().enumerate() {
                *a = _mm512_maskz_loadu_ps(masks[j], c.m.add(i * c.ldm + 16 * j));
            }
        }
    }
    (acc, masks)
}

/// The first `rows` rows of 8 accumulators into m (`MASKED`: the first `width` tiles).
#[inline(always)]
unsafe fn store_rows<const V: usize, const MASKED: bool, E>(
    c: &Call<E>,
    acc: &[[__m512; V]; 8],
    masks: &[__mmask16; V],
) {
    for (i, row) in acc.iter().enumerate().take(c.rows) {
        for (j, a) in row.iter().enumerate() {
            let p = c.m.add(i * c.ldm + 16 * j);
            if MASKED {
                _mm512_mask_storeu_ps(p, masks[j], *a);
            } else {
                _mm512_storeu_ps(p, *a);
            }
        }
    }
}

/// mask of the first n (at most 16) lanes.
pub(crate) fn lanes(n: usize) -> __mmask16 {
    if n >= 16 {
        0xFFFF
    } else {
        (1u16 << n) - 1
    }
}

/// Input channels (k) per slice of [`gemm512`]: A's slice of 8 rows (8 KB) and B's strip (32 KB) stay in L2.
const KC: usize = 256;
/// Columns per block of [`gemm512`]: a slice of B, KC x NC (512 KB at most), passes under all of A's rows.
const NC: usize = 512;

/// C [m x n] (+ C with `accumulate`) = A [m x k] · B [k x n], rows of A `lda` apart, of B `ldb` and of C
/// `ldc`, each contiguous; single-threaded.
///
/// # Safety
/// The CPU supports AVX2, FMA and AVX512F/BW/VL; the matrices hold what their sizes and strides say, and C
/// does not overlap A or B.
#[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm512(
    c: *mut f32,
    ldc: usize,
    (m, n, k): (usize, usize, usize),
    a: *const f32,
    lda: usize,
    b: *const f32,
    ldb: usize,
    accumulate: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for r in 0..m {
                std::ptr::write_bytes(c.add(r * ldc), 0, n);
            }
        }
        return;
    }
    for n0 in (0..n).step_by(NC) {
        let nc = NC.min(n - n0);
        for k0 in (0..k).step_by(KC) {
            let kc = KC.min(k - k0);
            let first = !accumulate && k0 == 0;
            products::<F32x16>(a.add(k0), lda, b.add(k0 * ldb + n0), c.add(n0), (ldb, ldc), (kc, m, first, nc));
        }
    }
}

/// `rows` rows of n values, `ld` apart, as bfloat16 pairs of rows: ⌈rows / 2⌉ rows of n u32 values, `ld`
/// apart, row 2c in each value's low half and 2c + 1 (zero past the last) in its high half, as
/// `vdpbf16ps` multiplies them (the Winograd input's channels, im2col's columns).
///
/// # Safety
/// The CPU supports AVX512_BF16 (with AVX512F, BW and VL); v holds `cin` rows.
#[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl,avx512bf16")]
// Written before read, as `crate::uninit`'s buffers.
#[allow(clippy::uninit_vec)]
pub(crate) unsafe fn to_pairs(v: &[f32], cin: usize, n: usize, ld: usize) -> Vec<u32> {
    let pairs = cin.div_ceil(2);
    assert!(v.len() >= (cin - 1) * ld + n && n <= ld);
    let mut out: Vec<u32> = Vec::with_capacity(pairs * ld);
    // SAFETY: u32 has no invalid values; the first n of every row are written below, and the padding up to
    // the next row is never read.
    out.set_len(pairs * ld);
    out.par_chunks_mut(ld).enumerate().for_each(|(cp, row)| {
        let a = &v[2 * cp * ld..][..n];
        let b = (2 * cp + 1 < cin).then(|| &v[(2 * cp + 1) * ld..][..n]);
        // SAFETY: as this function's; the row has room for n values.
        unsafe { pair_row(a, b, &mut row[..n]) }
    });
    out
}

/// One row of [`to_pairs`].
#[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl,avx512bf16")]
pub(crate) unsafe fn pair_row(a: &[f32], b: Option<&[f32]>, out: &mut [u32]) {
    let idx: [u16; 32] = std::array::from_fn(|i| if i % 2 == 0 { i as u16 / 2 } else { 16 + i as u16 / 2 });
    let idx = _mm512_loadu_si512(idx.as_ptr().cast());
    for t0 in (0..a.len()).step_by(16) {
        let mask = lanes(a.len() - t0);
        let fa = _mm512_maskz_loadu_ps(mask, a.as_ptr().add(t0));
        let fb = b.map_or(_mm512_setzero_ps(), |b| _mm512_maskz_loadu_ps(mask, b.as_ptr().add(t0)));
        // a's 16 values in the low half, b's in the high, then interleaved value by value.
        let packed = std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(fb, fa));
        _mm512_mask_storeu_epi32(out.as_mut_ptr().add(t0).cast(), mask, _mm512_permutexvar_epi16(idx, packed));
    }
}
