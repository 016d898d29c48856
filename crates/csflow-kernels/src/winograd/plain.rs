//! Prepared Winograd convolutions that keep the plain weights: each task transforms the weights it is about
//! to multiply (U = G g Gᵀ for its 24 output channels and a slice of input channels) into a buffer that stays
//! in L2, then runs the α² products of that slice with its own micro-kernel (6 channels x 16 tiles).
//!
//! Transformed weights hold 16/9 (3x3) or 36/25 (5x5) as many values as the plain ones: 1.5 GB against 1.0 GB
//! for the paper's flow. Reordered at load so that each output channel's weights are one sequential stream
//! of eight input channels' k² taps at a time, eight pairs go through G together in vector registers, and
//! the next slice's weights are prefetched into L2 while the products run: at batch 1 the per-call transform
//! costs about what the larger transformed weights cost in memory reads, except on maps of 3x3 tiles
//! (6x6), where one layer takes 1.1-1.3x the transformed weights' time.

use super::*;

/// Output channels per micro-kernel call.
const MR: usize = 6;
/// Columns (tiles) per micro-kernel call: two AVX2 vectors.
const NR: usize = 16;
/// Output channels per task: four panels pass over each strip of V while it is in L1.
const ROWS: usize = 4 * MR;
/// Bytes of transformed weights per task and slice of input channels, which stay in L2 while the products
/// use them.
const SLICE_BYTES: usize = 128 * 1024;

/// Above this many bytes of V, a call transforms the whole weight first and multiplies through the `gemm`
/// crate: the fused products read all of V once per task of ROWS output channels, which from 21 MB (5x5,
/// 1024 channels in, 24x24 map: 50 ms against 30 with the transform made at load, 41 with it made per call;
/// one thread) waited on memory; at 9.4 MB (3x3, same layer) they were within 2-10 % of it.
const FUSED_V_BYTES: usize = 12 << 20;

/// Whether a call on `tiles` tiles with `cin` input channels and k x k kernels runs the fused products.
pub(super) fn fuses(cin: usize, k: usize, tiles: usize) -> bool {
    let positions = (k + 1) * (k + 1);
    cin * positions * tiles * 4 <= FUSED_V_BYTES
}

/// Input channels per slice for α² positions (a multiple of the vector width).
fn slice_channels(positions: usize) -> usize {
    (SLICE_BYTES / (positions * ROWS * 4)) / 8 * 8
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
pub(super) fn conv(x: &[f32], w: &[f32], bias: Option<&[f32]>, act: Activation, s: Shape) -> Vec<f32> {
    conv_by(x, w, bias, act, s, fuses(s.cin, s.k, s.tiles()))
}

/// [`conv`] by the fused products, or (`fused` false, or without AVX2) with the whole weight transformed first.
pub(super) fn conv_by(x: &[f32], w: &[f32], bias: Option<&[f32]>, act: Activation, s: Shape, fused: bool) -> Vec<f32> {
    assert_eq!(w.len(), s.cout * s.k * s.k * s.cin.div_ceil(IB) * IB);
    #[cfg(target_arch = "x86_64")]
    if crate::has_avx2_fma() {
        return match s.k {
            3 => conv_avx2::<4, 3, F2x3>(x, w, bias, act, s, fused),
            5 => conv_avx2::<6, 5, F2x5>(x, w, bias, act, s, fused),
            k => unreachable!("no Winograd variant for {k}x{k} kernels"),
        };
    }
    // Elsewhere the whole transform, made per call.
    let u = transform_weights(&from_blocks(w, s.cin, s.k), s.cout, s.cin, s.k, Kernel::Forward);
    super::conv(x, &u, bias, act, s)
}

#[cfg(target_arch = "x86_64")]
fn conv_avx2<const A: usize, const R: usize, T: Tile<A, R>>(
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    act: Activation,
    s: Shape,
    fused: bool,
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
                x86::transform_block::<A, R, T>(
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
    around_products::<A, R, T>(x, bias, act, s, |v, m| {
        let dst = crate::gemm::SendPtr(m.as_mut_ptr());
        (0..s.cout.div_ceil(ROWS)).into_par_iter().for_each(|g| {
            let dst = &dst;
            // SAFETY: the CPU supports AVX2 and FMA (checked by the caller); task g writes only the rows of
            // output channels g*ROWS.. g*ROWS + ROWS of M, disjoint from every other task; w, v and m have the
            // sizes `group` reads and writes (asserted by `conv` and `around_products`).
            unsafe { x86::group::<A, R, T>(w, v, dst.0, s, g) }
        })
    })
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;
    use std::cell::RefCell;

    use super::*;

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
    pub(super) unsafe fn group<const A: usize, const R: usize, T: Tile<A, R>>(
        w: &[f32],
        v: &[f32],
        m: *mut f32,
        s: Shape,
        g: usize,
    ) {
        let (positions, tiles, cin) = (A * A, s.tiles(), s.cin);
        let kcm = slice_channels(positions);
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
        // Slices of equal size (96 channels as two of 48, not 80 and 16: each slice loads and stores M).
        let step = cin.div_ceil(cin.div_ceil(kcm)).next_multiple_of(IB).min(kcm);
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
            transform_block::<A, R, T>(w, cin, (o0, rows), (k0, kc), u.as_mut_ptr(), (ROWS * kcm, kcm));
            for xi in 0..positions {
                let until = (fetched + lines.div_ceil(positions)).min(lines);
                for l in fetched..until {
                    let at = next.wrapping_add((l / lines_per_row) * row_len + (l % lines_per_row) * line_floats);
                    _mm_prefetch::<_MM_HINT_T1>(at as *const i8);
                }
                fetched = until;
                let (ub, vb) = (u.as_ptr().add(xi * ROWS * kcm), v.as_ptr().add(k0 * ld + xi * tiles));
                let mb = m.add(o0 * ld + xi * tiles);
                for col in (0..tiles).step_by(NR) {
                    let width = NR.min(tiles - col);
                    for p in 0..rows.div_ceil(MR) {
                        let call = Micro {
                            u: ub.add(p * MR * kcm),
                            ldu: kcm,
                            v: vb.add(col),
                            m: mb.add(p * MR * ld + col),
                            ld,
                            kc,
                            rows: MR.min(rows - p * MR),
                            first: k0 == 0,
                            width,
                        };
                        if width == NR {
                            call.run::<2, false>();
                        } else if width > NR / 2 {
                            call.run::<2, true>();
                        } else {
                            call.run::<1, true>();
                        }
                    }
                }
            }
        }
        SLICE.set(u);
    }

    /// U for output channels o0..o0 + rows and input channels k0..k0 + kc of the blocked weight w (`cin` input
    /// channels), stored at `dst`: position ξ, output channel o0 + r, input channel k0 + i at
    /// ξ * pos_ld + r * row_ld + i. Eight input channels per step; a last partial step stores only its own.
    ///
    /// # Safety
    /// AVX2 and FMA; w is a blocked weight with at least o0 + rows output channels and k0 + kc <= cin; dst has
    /// room for every value written.
    #[target_feature(enable = "avx2,fma")]
    // a indexes the columns' coefficients inside a closure and the destination: clearer as a range.
    #[allow(clippy::needless_range_loop)]
    pub(super) unsafe fn transform_block<const A: usize, const R: usize, T: Tile<A, R>>(
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
                let g: [[V8; R]; R] = from_fn(|ky| from_fn(|kx| V8(_mm256_loadu_ps(taps.add((ky * R + kx) * IB)))));
                // As `weights_t`: columns of g through G, then each of those rows through G again.
                let cols: [[V8; A]; R] = from_fn(|kx| T::g(from_fn(|ky| g[ky][kx])));
                let mask = crate::first_lanes(kc - i0);
                for a in 0..A {
                    for (q, val) in T::g(from_fn(|kx| cols[kx][a])).into_iter().enumerate() {
                        let to = dst.add((a * A + q) * pos_ld + r * row_ld + i0);
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

    /// One micro-kernel call: MR output channels (`rows` of them real) by `width` tiles, over `kc` input
    /// channels; rows of u are `ldu` apart, rows of v and m (channels) `ld`. The first slice starts from
    /// zero, later ones from the partial sums stored in m.
    struct Micro {
        u: *const f32,
        ldu: usize,
        v: *const f32,
        m: *mut f32,
        ld: usize,
        kc: usize,
        rows: usize,
        first: bool,
        width: usize,
    }

    impl Micro {
        /// `V` vectors of 8 tiles; `MASKED` reads and stores only the first `width`.
        #[inline(always)]
        unsafe fn run<const V: usize, const MASKED: bool>(&self) {
            let masks: [__m256i; V] = from_fn(|v| crate::first_lanes(self.width.saturating_sub(8 * v)));
            let mut acc = [[_mm256_setzero_ps(); V]; MR];
            if !self.first {
                for (i, row) in acc.iter_mut().enumerate().take(self.rows) {
                    for (v, a) in row.iter_mut().enumerate() {
                        *a = crate::load_lanes::<MASKED>(self.m.add(i * self.ld + 8 * v), masks[v]);
                    }
                }
            }
            for k in 0..self.kc {
                let xv: [__m256; V] =
                    from_fn(|v| crate::load_lanes::<MASKED>(self.v.add(k * self.ld + 8 * v), masks[v]));
                for (i, row) in acc.iter_mut().enumerate() {
                    let wv = _mm256_broadcast_ss(&*self.u.add(i * self.ldu + k));
                    for (a, x) in row.iter_mut().zip(&xv) {
                        *a = _mm256_fmadd_ps(wv, *x, *a);
                    }
                }
            }
            for (i, row) in acc.iter().enumerate().take(self.rows) {
                for (v, a) in row.iter().enumerate() {
                    let p = self.m.add(i * self.ld + 8 * v);
                    if MASKED {
                        _mm256_maskstore_ps(p, masks[v], *a);
                    } else {
                        _mm256_storeu_ps(p, *a);
                    }
                }
            }
        }
    }
}
