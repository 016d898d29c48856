//! Prepared Winograd convolutions that keep the plain weights: each task transforms the weights it is about
//! to multiply (U = G g Gᵀ for its 24 output channels and a slice of input channels) into a buffer that stays
//! in L2, then runs the α² products of that slice with a micro-kernel of `crate::microkernel` (f32 in AVX2 or
//! AVX-512 registers, or bfloat16 pairs with `Precision::Bf16` on CPUs with AVX512_BF16).
//!
//! Transformed weights hold 16/9 (3x3) or 36/25 (5x5) as many values as the plain ones: 1.5 GB against 1.0 GB
//! for the paper's flow. Reordered at load so that each output channel's weights are one sequential stream
//! of eight input channels' k² taps at a time, eight pairs go through G together in vector registers, and
//! the next slice's weights are prefetched into L2 while the products run: at batch 1 the per-call transform
//! costs about what the larger transformed weights cost in memory reads, except on maps of 3x3 tiles
//! (6x6), where one layer takes 1.1-1.3x the transformed weights' time.

use super::*;
use crate::Precision;

/// Output channels per task: the micro-kernel's panels (four of 6 channels in AVX2 registers, three of 8 in
/// AVX-512 ones) pass over each strip of V while it is in L1.
const ROWS: usize = 24;
/// Bytes of transformed weights per task and slice of input channels, which stay in L2 while the products
/// use them.
const SLICE_BYTES: usize = 128 * 1024;

/// Above this many bytes of V, a call transforms the whole weight first and multiplies through the `gemm`
/// crate: the fused products read all of V once per task of ROWS output channels, which from 21 MB (5x5,
/// 1024 channels in, 24x24 map: 50 ms against 30 with the transform made at load, 41 with it made per call;
/// one thread) waited on memory; at 9.4 MB (3x3, same layer) they were within 2-10 % of it.
const FUSED_V_BYTES: usize = 12 << 20;

/// Whether a call on `tiles` tiles of α x α transformed values with `cin` input channels runs the fused
/// products (V in bfloat16 with `bf16`, half the bytes).
pub(super) fn fuses(cin: usize, alpha: usize, tiles: usize, bf16: bool) -> bool {
    let positions = alpha * alpha;
    cin * positions * tiles * if bf16 { 2 } else { 4 } <= FUSED_V_BYTES
}

/// Input channels per slice for α² positions (a multiple of the vector width).
fn slice_channels(positions: usize) -> usize {
    (SLICE_BYTES / (positions * ROWS * 4)) / 8 * 8
}

/// Input channels per slice of `cin` for α² positions: slices of equal size (96 channels as two of 48, not
/// 80 and 16: each slice loads and stores M), a multiple of the vector width, at most [`slice_channels`].
fn slice_step(cin: usize, positions: usize) -> usize {
    let kcm = slice_channels(positions);
    cin.div_ceil(cin.div_ceil(kcm)).next_multiple_of(IB).min(kcm)
}

/// U = G g Gᵀ of F(2x2, 3x3) rounded to bfloat16 (to nearest, ties to even, as `vcvtneps2bf16`), as pairs of
/// input channels in the order [`x86::group_stored_bf16`] reads them: per task of ROWS output channels, per
/// slice of input channels ([`slice_step`]), per position ξ, its rows of the slice's pairs, so that every
/// product reads one sequential stream. `w` is the layer's weight [cout, cin, 3, 3].
pub(super) fn stored_bf16(w: &[f32], cout: usize, cin: usize) -> Vec<u32> {
    const A: usize = 4;
    let positions = A * A;
    // [out][α²][in], from the same f32 operations as the per-call transform's.
    let u = transform_weights(w, cout, cin, (3, 2), Kernel::Forward);
    let bf16 = |v: f32| half::bf16::from_f32(v).to_bits() as u32;
    let (pairs, step) = (cin.div_ceil(2), slice_step(cin, positions));
    let mut out = Vec::with_capacity(cout * positions * pairs);
    for o0 in (0..cout).step_by(ROWS) {
        let rows = ROWS.min(cout - o0);
        for k0 in (0..cin).step_by(step) {
            let kc = step.min(cin - k0);
            for xi in 0..positions {
                for o in o0..o0 + rows {
                    let at = |i: usize| if i < cin { bf16(u[(o * positions + xi) * cin + i]) } else { 0 };
                    out.extend((k0..k0 + kc).step_by(2).map(|i| at(i) | at(i + 1) << 16));
                }
            }
        }
    }
    debug_assert_eq!(out.len(), cout * positions * pairs);
    out
}

/// y [n, cout, h, w] = conv(x [n, cin, h, w], w) + bias for 3x3 weights stored by [`stored_bf16`]: the input
/// transformed and rounded to bfloat16 per call, products in `vdpbf16ps`. The CPU must support AVX512_BF16.
#[cfg(target_arch = "x86_64")]
pub(super) fn conv_stored_bf16(x: &[f32], u: &[u32], bias: Option<&[f32]>, act: Activation, s: Shape) -> Vec<f32> {
    assert!(crate::has_avx512_bf16() && s.k == 3 && s.m == 2);
    assert_eq!(u.len(), s.cout * 16 * s.cin.div_ceil(2));
    around_products::<4, 3, 2, F2x3>(x, bias, act, s, |v, m| {
        let dst = crate::gemm::SendPtr(m.as_mut_ptr());
        // SAFETY: AVX512_BF16 (asserted); v holds s.cin channels.
        let pairs = unsafe { crate::microkernel::to_pairs(v, s.cin, 16 * s.tiles(), s.ld(16)) };
        (0..s.cout.div_ceil(ROWS)).into_par_iter().for_each(|g| {
            let dst = &dst;
            // SAFETY: the CPU supports AVX512_BF16 (asserted); task g writes only the rows of output channels
            // g*ROWS.. g*ROWS + ROWS of M, disjoint from every other task; u, the pairs and m have the sizes
            // read and written (asserted above and by `around_products`).
            unsafe { x86::group_stored_bf16(u, pairs.as_ptr(), dst.0, s, g) }
        })
    })
}

/// Input channels per block of the reordered weight: one vector.
const IB: usize = 8;

/// w [O, I, k, k] as [O][⌈I / 8⌉][k²][8], zero past the last input channel: for each output channel, the
/// k² taps of eight input channels at a time, so the per-call transform reads one sequential stream.
pub(super) fn by_blocks(w: &[f32], cout: usize, cin: usize, k: usize) -> Vec<f32> {
    let taps = k * k;
    assert_eq!(w.len(), cout * cin * taps);
    let row = cin.div_ceil(IB) * taps * IB;
    let mut out = vec![0f32; cout * row];
    for (src, dst) in w.chunks_exact(cin * taps).zip(out.chunks_exact_mut(row)) {
        for (i, pair) in src.chunks_exact(taps).enumerate() {
            for (t, &v) in pair.iter().enumerate() {
                dst[((i / IB) * taps + t) * IB + i % IB] = v;
            }
        }
    }
    out
}

/// [`by_blocks`]'s inverse.
pub(super) fn from_blocks(w: &[f32], cin: usize, k: usize) -> Vec<f32> {
    let taps = k * k;
    let row = cin.div_ceil(IB) * taps * IB;
    let mut out = vec![0f32; w.len() / row * cin * taps];
    for (src, dst) in w.chunks_exact(row).zip(out.chunks_exact_mut(cin * taps)) {
        for (i, pair) in dst.chunks_exact_mut(taps).enumerate() {
            for (t, v) in pair.iter_mut().enumerate() {
                *v = src[((i / IB) * taps + t) * IB + i % IB];
            }
        }
    }
    out
}

/// y [n, cout, h, w] = conv(x [n, cin, h, w], w) + bias for the reordered weight `w` ([`by_blocks`]).
///
/// `Precision::Bf16` on CPUs with AVX512_BF16 rounds the transformed weights and input to bfloat16 and sums
/// their products in f32 (`vdpbf16ps`); elsewhere, and for calls that transform the whole weight, f32.
pub(super) fn conv(x: &[f32], w: &[f32], bias: Option<&[f32]>, act: Activation, s: Shape, p: Precision) -> Vec<f32> {
    let kernel = Products::best(p, s.k);
    conv_by(x, w, bias, act, s, fuses(s.cin, s.alpha(), s.tiles(), kernel == Products::Bf16), kernel)
}

/// The micro-kernel of the fused products.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Products {
    /// f32, AVX2 registers.
    Avx2,
    /// f32, AVX-512 registers.
    Avx512,
    /// bfloat16 pairs, AVX-512 registers (AVX512_BF16).
    Bf16,
}

impl Products {
    /// The fastest this CPU runs in precision p for k x k kernels. bfloat16 for 3x3 only: F(2x2, 5x5)'s
    /// transforms (coefficients up to 5 and 1/24) amplify the rounding, and with its 5x5 block in bfloat16 too
    /// a trained flow's scores moved by up to 1.4e-3 relative (4.3e-4 without; tests/cli.rs).
    pub(super) fn best(p: Precision, k: usize) -> Self {
        if p == Precision::Bf16 && k == 3 && crate::has_avx512_bf16() {
            Products::Bf16
        } else if crate::has_avx512() {
            Products::Avx512
        } else {
            Products::Avx2
        }
    }

    /// Whether this CPU runs it.
    pub(super) fn supported(self) -> bool {
        match self {
            Products::Avx2 => vector_transforms(),
            Products::Avx512 => crate::has_avx512(),
            Products::Bf16 => crate::has_avx512_bf16(),
        }
    }
}

/// [`conv`] by the fused products of `kernel` (which the CPU must support), or (`fused` false,
/// or without AVX2) with the whole weight transformed first.
pub(super) fn conv_by(
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    act: Activation,
    s: Shape,
    fused: bool,
    kernel: Products,
) -> Vec<f32> {
    assert_eq!(w.len(), s.cout * s.k * s.k * s.cin.div_ceil(IB) * IB);
    assert!(kernel == Products::Avx2 || kernel.supported());
    #[cfg(target_arch = "x86_64")]
    if crate::has_avx2_fma() {
        return match (s.k, s.m) {
            (3, 2) => conv_avx2::<4, 3, 2, F2x3>(x, w, bias, act, s, fused, kernel),
            (5, 2) => conv_avx2::<6, 5, 2, F2x5>(x, w, bias, act, s, fused, kernel),
            (5, 4) => conv_avx2::<8, 5, 4, F4x5>(x, w, bias, act, s, fused, kernel),
            (k, m) => unreachable!("no Winograd variant F({m}x{m}, {k}x{k})"),
        };
    }
    // Elsewhere the whole transform, made per call.
    let u = transform_weights(&from_blocks(w, s.cin, s.k), s.cout, s.cin, (s.k, s.m), Kernel::Forward);
    super::conv(x, &u, bias, act, s)
}

#[cfg(target_arch = "x86_64")]
fn conv_avx2<const A: usize, const R: usize, const M: usize, T: Tile<A, R, M>>(
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    act: Activation,
    s: Shape,
    fused: bool,
    kernel: Products,
) -> Vec<f32> {
    if !fused {
        let mut u = crate::uninit(s.cout * A * A * s.cin);
        let rows_per_task = ROWS;
        let dst = crate::gemm::SendPtr(u.as_mut_ptr());
        (0..s.cout.div_ceil(rows_per_task)).into_par_iter().for_each(|g| {
            let dst = &dst;
            let (o0, positions) = (g * rows_per_task, A * A);
            let rows = rows_per_task.min(s.cout - o0);
            // SAFETY: AVX2 and FMA (checked by the caller); task g writes rows o0..o0 + rows of U [cout][α²][cin]
            // whole, disjoint from every other task.
            unsafe {
                x86::transform_block::<A, R, M, T>(
                    w,
                    s.cin,
                    (o0, rows),
                    (0, s.cin),
                    dst.0.add(o0 * positions * s.cin),
                    (s.cin, positions * s.cin),
                )
            }
        });
        return super::conv(x, &u, bias, act, s);
    }
    around_products::<A, R, M, T>(x, bias, act, s, |v, m| {
        let dst = crate::gemm::SendPtr(m.as_mut_ptr());
        // SAFETY: AVX512_BF16 for these products (asserted by `conv_by`); v holds s.cin channels.
        let pairs = (kernel == Products::Bf16)
            .then(|| unsafe { crate::microkernel::to_pairs(v, s.cin, A * A * s.tiles(), s.ld(A * A)) });
        (0..s.cout.div_ceil(ROWS)).into_par_iter().for_each(|g| {
            let dst = &dst;
            // SAFETY: the CPU supports AVX2 and FMA (checked by the caller), and AVX512_BF16 for the pairs;
            // task g writes only the rows of output channels g*ROWS.. g*ROWS + ROWS of M, disjoint from every
            // other task; w, v (or its pairs) and m have the sizes `group` reads and writes (asserted by
            // `conv` and `around_products`).
            unsafe {
                match &pairs {
                    Some(p) => x86::group_bf16::<A, R, M, T>(w, p.as_ptr().cast(), dst.0, s, g),
                    None if kernel == Products::Avx512 => x86::group_avx512::<A, R, M, T>(w, v.as_ptr(), dst.0, s, g),
                    None => x86::group::<A, R, M, T>(w, v.as_ptr(), dst.0, s, g),
                }
            }
        })
    })
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;
    use std::cell::RefCell;

    use super::*;
    use crate::microkernel::{products, Bf16x16, F32x16, F32x8, Kernel};

    thread_local! {
        /// Each worker's slice of transformed weights, [α²][ROWS][channels], kept between calls.
        static SLICE: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    }

    /// Output channels g*ROWS.. of M [cout][α²][tiles] from V [cin][α²][tiles] (channels `s.ld` apart in
    /// both) and the reordered weight w.
    ///
    /// # Safety
    /// The CPU supports AVX2 and FMA; w is the reordered weight of s, v and m hold s.cin and s.cout channels,
    /// and no other thread touches this group's rows of m.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn group<const A: usize, const R: usize, const M: usize, T: Tile<A, R, M>>(
        w: &[f32],
        v: *const f32,
        m: *mut f32,
        s: Shape,
        g: usize,
    ) {
        group_body::<A, R, M, T, F32x8>(w, v.cast(), m, s, g)
    }

    /// [`group`] in AVX-512 registers (twice the multiply-adds per instruction, on CPUs that run them at
    /// full width).
    ///
    /// # Safety
    /// As [`group`], and the CPU supports AVX512F, BW and VL.
    #[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl")]
    pub(super) unsafe fn group_avx512<const A: usize, const R: usize, const M: usize, T: Tile<A, R, M>>(
        w: &[f32],
        v: *const f32,
        m: *mut f32,
        s: Shape,
        g: usize,
    ) {
        group_body::<A, R, M, T, F32x16>(w, v.cast(), m, s, g)
    }

    /// [`group`] in bfloat16: v is V as channel pairs ([`to_pairs`]), the weights' slices are rounded to
    /// bfloat16 as they are transformed.
    ///
    /// # Safety
    /// As [`group`], and the CPU supports AVX512_BF16 (with AVX512F, BW and VL).
    #[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl,avx512bf16")]
    pub(super) unsafe fn group_bf16<const A: usize, const R: usize, const M: usize, T: Tile<A, R, M>>(
        w: &[f32],
        v: *const u32,
        m: *mut f32,
        s: Shape,
        g: usize,
    ) {
        group_body::<A, R, M, T, Bf16x16>(w, v.cast(), m, s, g)
    }

    #[inline(always)]
    unsafe fn group_body<const A: usize, const R: usize, const M: usize, T: Tile<A, R, M>, K: Kernel>(
        w: &[f32],
        v: *const u8,
        m: *mut f32,
        s: Shape,
        g: usize,
    ) {
        let (positions, tiles, cin) = (A * A, s.tiles(), s.cin);
        let (kcm, step) = (slice_channels(positions), slice_step(cin, positions));
        let o0 = g * ROWS;
        let rows = ROWS.min(s.cout - o0);
        let mut u = SLICE.take();
        // Initialised once; rows past `rows` keep stale values, which the micro-kernel multiplies but never
        // stores.
        if u.len() < positions * ROWS * kcm {
            u.resize(positions * ROWS * kcm, 0.0);
        }
        let ld = s.ld(positions);
        let row_len = R * R * cin.div_ceil(IB) * IB;
        for k0 in (0..cin).step_by(step) {
            let kc = step.min(cin - k0);
            // The weights the next slice transforms (this group's, or the next group's first, which this
            // thread most often runs next), fetched into L2 while the products below run: read on demand, the
            // transform waited on memory (at batch 1 on the 6x6 map it took as long as the products).
            let (next_o0, next_k0) = if k0 + step < cin { (o0, k0 + step) } else { (o0 + ROWS, 0) };
            let next_rows = ROWS.min(s.cout.saturating_sub(next_o0));
            let line_floats = 16;
            let lines_per_row = (step.min(cin - next_k0).div_ceil(IB) * R * R * IB).div_ceil(line_floats);
            let next = w.as_ptr().wrapping_add(next_o0 * row_len + next_k0 / IB * R * R * IB);
            let (lines, mut fetched) = (next_rows * lines_per_row, 0);
            // Not inlined: inside the products' loop nest the transform's vector operations were left as calls.
            let (cols, ld_u) = ((k0, kc), (ROWS * kcm, kcm));
            if K::PAIRS {
                transform_block_bf16::<A, R, M, T>(w, cin, (o0, rows), cols, u.as_mut_ptr(), ld_u);
            } else {
                transform_block::<A, R, M, T>(w, cin, (o0, rows), cols, u.as_mut_ptr(), ld_u);
            }
            for xi in 0..positions {
                let until = (fetched + lines.div_ceil(positions)).min(lines);
                for l in fetched..until {
                    let at = next.wrapping_add((l / lines_per_row) * row_len + (l % lines_per_row) * line_floats);
                    _mm_prefetch::<_MM_HINT_T1>(at as *const i8);
                }
                fetched = until;
                let mb = m.add(o0 * ld + xi * tiles);
                let first = k0 == 0;
                if K::PAIRS {
                    // Pairs of bfloat16: u's rows hold kcm / 2, v's channel pairs are ld apart.
                    let ub = u.as_ptr().cast::<K::E>().add(xi * ROWS * kcm / 2);
                    let vb = v.cast::<K::E>().add(k0 / 2 * ld + xi * tiles);
                    products::<K>(ub, kcm / 2, vb, mb, (ld, ld), (kc.div_ceil(2), rows, first, tiles));
                } else {
                    let ub = u.as_ptr().cast::<K::E>().add(xi * ROWS * kcm);
                    let vb = v.cast::<K::E>().add(k0 * ld + xi * tiles);
                    products::<K>(ub, kcm, vb, mb, (ld, ld), (kc, rows, first, tiles));
                }
            }
        }
        SLICE.set(u);
    }

    /// [`group`] for F(2x2, 3x3) weights stored by [`stored_bf16`]: the products only, each reading its rows
    /// of U where the previous one ended.
    ///
    /// # Safety
    /// The CPU supports AVX512_BF16 (with AVX512F, BW and VL); u is the stored weight of s, v is V as channel
    /// pairs ([`to_pairs`]), m holds s.cout channels, and no other thread touches this group's rows of m.
    #[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl,avx512bf16")]
    pub(super) unsafe fn group_stored_bf16(u: &[u32], v: *const u32, m: *mut f32, s: Shape, g: usize) {
        let (positions, tiles, cin) = (16, s.tiles(), s.cin);
        let (pairs, step, ld) = (cin.div_ceil(2), slice_step(cin, positions), s.ld(positions));
        let o0 = g * ROWS;
        let rows = ROWS.min(s.cout - o0);
        // This group's rows start after all earlier groups' (ROWS each).
        let mut ub = u.as_ptr().add(o0 * positions * pairs);
        let end = u.as_ptr().add(u.len());
        for k0 in (0..cin).step_by(step) {
            let kp = step.min(cin - k0).div_ceil(2);
            for xi in 0..positions {
                // The next position's weights, fetched while these products run.
                // (Hardware prefetch alone: the paper-size forward 6 % slower than the per-call transform.)
                let next = ub.wrapping_add(rows * kp);
                for l in (0..rows * kp).step_by(16) {
                    let at = next.wrapping_add(l);
                    if at < end {
                        _mm_prefetch::<_MM_HINT_T0>(at.cast());
                    }
                }
                let mb = m.add(o0 * ld + xi * tiles);
                let vb = v.add(k0 / 2 * ld + xi * tiles);
                products::<Bf16x16>(ub, kp, vb, mb, (ld, ld), (kp, rows, k0 == 0, tiles));
                ub = ub.add(rows * kp);
            }
        }
    }

    mod bf16 {
        use super::*;

        /// Eight values rounded to bfloat16 (to nearest even) at `dst`.
        #[inline(always)]
        pub(super) unsafe fn store8(dst: *mut u16, val: __m256) {
            let b: __m128bh = _mm256_cvtneps_pbh(val);
            _mm_storeu_si128(dst.cast(), std::mem::transmute::<__m128bh, __m128i>(b));
        }
    }

    /// U for output channels o0..o0 + rows and input channels k0..k0 + kc of the blocked weight w (`cin` input
    /// channels), stored at `dst`: position ξ, output channel o0 + r, input channel k0 + i at
    /// ξ * pos_ld + r * row_ld + i. Eight input channels per step; a last partial step stores only its own.
    ///
    /// # Safety
    /// AVX2 and FMA; w is a blocked weight with at least o0 + rows output channels and k0 + kc <= cin; dst has
    /// room for every value written.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn transform_block<const A: usize, const R: usize, const M: usize, T: Tile<A, R, M>>(
        w: &[f32],
        cin: usize,
        rows: (usize, usize),
        cols: (usize, usize),
        dst: *mut f32,
        ld: (usize, usize),
    ) {
        transform_block_to::<A, R, M, T, false>(w, cin, rows, cols, dst, ld)
    }

    /// [`transform_block`] rounded to bfloat16 and stored as such: dst holds bfloat16 values at the same
    /// offsets, every step of eight stored whole (the weights are zero past `cin`).
    ///
    /// # Safety
    /// As [`transform_block`], and the CPU supports AVX512_BF16 (with AVX512F, BW and VL).
    #[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl,avx512bf16")]
    unsafe fn transform_block_bf16<const A: usize, const R: usize, const M: usize, T: Tile<A, R, M>>(
        w: &[f32],
        cin: usize,
        rows: (usize, usize),
        cols: (usize, usize),
        dst: *mut f32,
        ld: (usize, usize),
    ) {
        transform_block_to::<A, R, M, T, true>(w, cin, rows, cols, dst, ld)
    }

    /// [`transform_block`], or with `BF16` [`transform_block_bf16`].
    #[inline(always)]
    // a indexes the columns' coefficients inside a closure and the destination: clearer as a range.
    #[allow(clippy::needless_range_loop)]
    unsafe fn transform_block_to<const A: usize, const R: usize, const M: usize, T: Tile<A, R, M>, const BF16: bool>(
        w: &[f32],
        cin: usize,
        (o0, rows): (usize, usize),
        (k0, kc): (usize, usize),
        dst: *mut f32,
        (pos_ld, row_ld): (usize, usize),
    ) {
        let row_len = R * R * cin.div_ceil(IB) * IB;
        for r in 0..rows {
            let row = &w[(o0 + r) * row_len..][..row_len];
            for i0 in (0..kc).step_by(IB) {
                let taps = row[(k0 + i0) / IB * R * R * IB..][..R * R * IB].as_ptr();
                // As `weights_t`: columns of g through G, then each of those rows through G again. Loops, not
                // `from_fn`: its closures, compiled without AVX, kept the vector operations as calls once this
                // was inlined into the bfloat16 products.
                let zero = V8(_mm256_setzero_ps());
                let mut cols = [[zero; A]; R];
                for (kx, col) in cols.iter_mut().enumerate() {
                    let mut taps_x = [zero; R];
                    for (ky, t) in taps_x.iter_mut().enumerate() {
                        *t = V8(_mm256_loadu_ps(taps.add((ky * R + kx) * IB)));
                    }
                    *col = T::g(taps_x);
                }
                let mask = crate::first_lanes(kc - i0);
                for a in 0..A {
                    let mut row_a = [zero; R];
                    for (kx, r) in row_a.iter_mut().enumerate() {
                        *r = cols[kx][a];
                    }
                    for (q, val) in T::g(row_a).into_iter().enumerate() {
                        let at = (a * A + q) * pos_ld + r * row_ld + i0;
                        if BF16 {
                            bf16::store8(dst.cast::<u16>().add(at), val.0);
                            continue;
                        }
                        let to = dst.add(at);
                        if kc - i0 >= IB {
                            _mm256_storeu_ps(to, val.0);
                        } else {
                            _mm256_maskstore_ps(to, mask, val.0);
                        }
                    }
                }
            }
        }
    }
}
