//! Depthwise 2-d convolution (one filter per channel) with asymmetric zero padding and a fused
//! bias + activation epilogue, for inference. candle runs depthwise convolutions as grouped
//! convolutions, about 78x slower than PyTorch on CPU (SPEC section 5).

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::mbconv::small::ChannelPanels;
use crate::{f32_slice, Activation};

/// Zero padding on each side: EfficientNet's "static same" padding is asymmetric for stride 2.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Padding {
    pub top: usize,
    pub bottom: usize,
    pub left: usize,
    pub right: usize,
}

impl Padding {
    pub fn symmetric(p: usize) -> Self {
        Self { top: p, bottom: p, left: p, right: p }
    }

    /// The output size (ho, wo) of a kh x kw kernel at `stride` on an h x w input with this padding, or an
    /// error naming `op` where the kernel does not fit or the stride is 0.
    pub(crate) fn output_size(
        self,
        op: &str,
        h: usize,
        w: usize,
        kh: usize,
        kw: usize,
        stride: usize,
    ) -> Result<(usize, usize)> {
        let (ph, pw) = (h + self.top + self.bottom, w + self.left + self.right);
        if stride == 0 || kh == 0 || kw == 0 || ph < kh || pw < kw {
            candle_core::bail!(
                "{op}: kernel {kh}x{kw} does not fit input {h}x{w} with padding {self:?} and stride {stride}"
            );
        }
        Ok(((ph - kh) / stride + 1, (pw - kw) / stride + 1))
    }
}

/// A depthwise convolution's weight `[C, 1, k, k]` and bias `[C]`, for [`InvertedResidual`](crate::InvertedResidual),
/// with a copy that has vectors over channels (for small maps).
#[derive(Clone, Debug)]
pub struct DepthwiseWeights {
    weight: Tensor,
    bias: Tensor,
    by_channel: ChannelPanels,
}

impl DepthwiseWeights {
    /// From a square kernel's weight `[C, 1, k, k]` and a bias `[C]`.
    pub fn new(weight: &Tensor, bias: &Tensor) -> Result<Self> {
        let &[c, 1, k, kw] = weight.dims() else {
            candle_core::bail!("depthwise conv: weight must be [C, 1, k, k], got {:?}", weight.dims());
        };
        if k != kw || k == 0 || bias.dims() != [c] {
            candle_core::bail!(
                "depthwise conv: weight {:?} and bias {:?}: need a square kernel and C biases",
                weight.dims(),
                bias.dims()
            );
        }
        let (weight, bias) = (weight.to_dtype(DType::F32)?.contiguous()?, bias.to_dtype(DType::F32)?.contiguous()?);
        let by_channel = ChannelPanels::new(&weight.flatten_all()?.to_vec1()?, k * k, &bias.to_vec1()?);
        Ok(Self { weight, bias, by_channel })
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn bias(&self) -> &Tensor {
        &self.bias
    }

    pub(crate) fn channel_panels(&self) -> &ChannelPanels {
        &self.by_channel
    }
}

struct Depthwise {
    stride: usize,
    pad: Padding,
    act: Activation,
}

impl CustomOp3 for Depthwise {
    fn name(&self) -> &'static str {
        "csflow-depthwise-conv2d"
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
        let (&[n, c, h, wd], &[wc, one, kh, kw]) = (xl.dims(), wl.dims()) else {
            candle_core::bail!(
                "depthwise conv: expected x [N, C, H, W] and w [C, 1, k, k], got {:?} and {:?}",
                xl.dims(),
                wl.dims()
            );
        };
        if h == 0 || wd == 0 {
            candle_core::bail!("depthwise conv: empty input {h}x{wd}");
        }
        if kh == 0 || kw == 0 {
            candle_core::bail!("depthwise conv: empty kernel {kh}x{kw}");
        }
        if wc != c || one != 1 || b.len() != c {
            candle_core::bail!("depthwise conv: {c} channels but weight {:?} and bias {}", wl.dims(), b.len());
        }
        let (s, p) = (self.stride, self.pad);
        let (ho, wo) = p.output_size("depthwise conv", h, wd, kh, kw, s)?;
        let phased = Phased::new(s, p, wd, h + p.top + p.bottom);
        let taps = phased.taps(kh, kw);
        let grid = grid_of(&taps, phased.row_step());
        let act = self.act;
        let mut out = crate::uninit(n * c * ho * wo);
        out.par_chunks_mut(ho * wo).enumerate().for_each_init(
            // Zeroed once: the interior is overwritten for every plane, the border and the slack stay zero.
            || vec![0f32; phased.len() + SLACK],
            |buf, (plane_idx, o)| {
                let ch = plane_idx % c;
                let src = &x[plane_idx * h * wd..(plane_idx + 1) * h * wd];
                phased.fill(buf, src, wd, p.top);
                let filt = &w[ch * kh * kw..(ch + 1) * kh * kw];
                let plane = Plane { buf, taps: &taps, filt, row_step: phased.row_step(), grid };
                plane.convolve(b[ch], act, wo, o);
            },
        );
        Ok((CpuStorage::F32(out), Shape::from((n, c, ho, wo))))
    }
}

/// A channel's zero-bordered input split into `s` column phases (phase q holds padded columns q, q + s, ...)
/// of `ph` rows by `pws` columns, `left` zero columns before the input's first: every tap of every stride
/// then reads a contiguous window.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Phased {
    pub(crate) s: usize,
    pub(crate) left: usize,
    pub(crate) ph: usize,
    pub(crate) pws: usize,
}

impl Phased {
    /// For rows of `wd` values with `pad`'s columns, `ph` rows (padding ones included) per phase.
    pub(crate) fn new(s: usize, pad: Padding, wd: usize, ph: usize) -> Self {
        Self { s, left: pad.left, ph, pws: (wd + pad.left + pad.right).div_ceil(s) }
    }

    /// Values in the plane (all phases).
    pub(crate) fn len(&self) -> usize {
        self.s * self.ph * self.pws
    }

    /// Offset between consecutive output rows' windows.
    pub(crate) fn row_step(&self) -> usize {
        self.s * self.pws
    }

    /// The offset of each tap's window from the start of output row 0's: tap (ky, kx) of output row oy
    /// starts at phase kx % s, row oy * s + ky, column kx / s.
    pub(crate) fn taps(&self, kh: usize, kw: usize) -> Vec<usize> {
        let (s, ph, pws) = (self.s, self.ph, self.pws);
        (0..kh * kw).map(|t| (t % kw % s) * ph * pws + (t / kw) * pws + t % kw / s).collect()
    }

    /// Copies rows of `wd` values into the plane's interior from plane row `row0` on (the border is left as
    /// it is).
    pub(crate) fn fill(&self, buf: &mut [f32], src: &[f32], wd: usize, row0: usize) {
        let Self { s, left, ph, pws } = *self;
        for (y, row) in src.chunks_exact(wd).enumerate() {
            let y = (y + row0) * pws;
            if s == 1 {
                copy_row(&mut buf[y + left..y + left + wd], row);
            } else if s == 2 {
                let (phase0, phase1) = buf.split_at_mut(ph * pws);
                let (first, second) = (y + left / 2, y + left.div_ceil(2));
                let (evens, odds) = if left.is_multiple_of(2) {
                    (&mut phase0[first..], &mut phase1[second..])
                } else {
                    (&mut phase1[first..], &mut phase0[second..])
                };
                deinterleave(row, evens, odds);
            } else {
                for q in 0..s {
                    // The first input column that lands in phase q, and its place there.
                    let first = (q + s - left % s) % s;
                    let count = wd.saturating_sub(first).div_ceil(s);
                    let dst = &mut buf[q * ph * pws + y + (first + left) / s..][..count];
                    for (i, d) in dst.iter_mut().enumerate() {
                        *d = row[first + i * s];
                    }
                }
            }
        }
    }
}

/// `dst = src` for a row: inline vector moves where AVX2 is there (a `memcpy` call per short row cost more
/// than the copy).
fn copy_row(dst: &mut [f32], src: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if crate::has_avx2_fma() {
        // SAFETY: the CPU supports AVX2 and FMA (checked at run time).
        return unsafe { x86::copy_row(dst, src) };
    }
    dst.copy_from_slice(src)
}

/// Even elements of `row` to `evens`, odd ones to `odds` (a stride-2 plane's two column phases).
fn deinterleave(row: &[f32], evens: &mut [f32], odds: &mut [f32]) {
    let pairs = row.len() / 2;
    #[cfg(target_arch = "x86_64")]
    let done = if crate::has_avx2_fma() {
        // SAFETY: the CPU supports AVX2 and FMA (checked at run time).
        unsafe { x86::deinterleave(row, evens, odds) }
    } else {
        0
    };
    #[cfg(not(target_arch = "x86_64"))]
    let done = 0;
    for i in done..pairs {
        evens[i] = row[2 * i];
        odds[i] = row[2 * i + 1];
    }
    if row.len() % 2 == 1 {
        evens[pairs] = row[row.len() - 1];
    }
}

/// Outputs kept in registers while all kernel taps accumulate (the portable path).
pub(crate) const LANES: usize = 16;
/// Values past a plane's phases that a block may read: the widest block (two AVX-512 vectors) starting in
/// the last row.
pub(crate) const SLACK: usize = 32;

/// One channel's padded input (in column phases) and what each output row reads of it.
pub(crate) struct Plane<'a> {
    pub(crate) buf: &'a [f32],
    /// Offset of each tap's window from the start of output row 0.
    pub(crate) taps: &'a [usize],
    pub(crate) filt: &'a [f32],
    /// Offset between consecutive output rows' windows.
    pub(crate) row_step: usize,
    /// [`grid_of`] the taps and row step.
    pub(crate) grid: Option<(usize, usize, usize)>,
}

/// (k, stride, plane row length) where `taps` are a k x k kernel's at `stride` on a plane of `stride` column
/// phases ([`Phased::taps`]) whose output rows are `row_step` apart; None for any other list of taps. Found
/// once per layer (per channel and band it took 2-5 % of a block).
pub(crate) fn grid_of(taps: &[usize], row_step: usize) -> Option<(usize, usize, usize)> {
    let k = (1..=7).find(|k| k * k == taps.len())?;
    let pws = if k > 1 { taps[k].checked_sub(taps[0])? } else { return None };
    let s = row_step.checked_div(pws)?;
    let fits = s * pws == row_step && taps.iter().enumerate().all(|(t, &off)| taps[t % k] + (t / k) * pws == off);
    fits.then_some((k, s, pws))
}

impl Plane<'_> {
    /// The outputs' rows (`wo` each, as many as `out` holds), biased and activated.
    pub(crate) fn convolve(&self, bias: f32, act: Activation, wo: usize, out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if crate::has_avx2_fma() {
            // SAFETY: the CPU supports AVX2 and FMA (checked at run time).
            return unsafe { x86::convolve(self, bias, act, wo, out) };
        }
        self.convolve_lanes(bias, act, wo, out)
    }

    /// Accumulates LANES outputs at a time over every tap, applies the activation and stores them once (the
    /// portable path; [`x86::convolve`] is the same with explicit AVX2 or AVX-512). Rows narrower than LANES take
    /// half-width blocks; blocks read past the row end into the next row or the buffer's slack and store only
    /// the row's part.
    fn convolve_lanes(&self, bias: f32, act: Activation, wo: usize, out: &mut [f32]) {
        for (oy, out_row) in out.chunks_exact_mut(wo).enumerate() {
            let base = oy * self.row_step;
            let mut x0 = 0;
            while x0 < wo {
                let width = LANES.min(wo - x0);
                let dst = &mut out_row[x0..x0 + width];
                if width > LANES / 2 {
                    self.block::<LANES>(base + x0, bias, act, dst);
                } else {
                    self.block::<{ LANES / 2 }>(base + x0, bias, act, dst);
                }
                x0 += width;
            }
        }
    }

    /// N outputs whose windows start at `start` (+ each tap's offset); the first `out.len()` are stored.
    #[inline(always)]
    fn block<const N: usize>(&self, start: usize, bias: f32, act: Activation, out: &mut [f32]) {
        let mut acc = [bias; N];
        for (&off, &wv) in self.taps.iter().zip(self.filt) {
            let src: &[f32; N] = self.buf[start + off..start + off + N].try_into().expect("N-wide window");
            for l in 0..N {
                acc[l] += wv * src[l];
            }
        }
        let acc = &mut acc[..out.len()];
        act.apply_lanes::<false>(acc);
        out.copy_from_slice(acc);
    }
}

/// The AVX2 + FMA and AVX-512 kernels, with explicit intrinsics: stores of a block's first n lanes are masked moves, not
/// `memcpy` calls of a run-time length (those calls were a third of the depthwise time).
#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{grid_of, Plane};
    use crate::simd::Simd;
    use crate::Activation;

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn copy_row(dst: &mut [f32], src: &[f32]) {
        assert_eq!(dst.len(), src.len());
        let (d, s, n) = (dst.as_mut_ptr(), src.as_ptr(), src.len());
        if n > 16 {
            // Long rows: `memmove` is as fast as vector moves (a loop of them would become one anyway).
            return dst.copy_from_slice(src);
        }
        // Up to two masked moves, no loop (LLVM turns a copy loop into a `memmove` call, which cost more
        // than the copy on rows of 2-16 values).
        for v in 0..2 {
            let m = crate::first_lanes(n.saturating_sub(8 * v));
            // wrapping: past a short row's end the address is formed but, masked off, not touched.
            _mm256_maskstore_ps(d.wrapping_add(8 * v), m, _mm256_maskload_ps(s.wrapping_add(8 * v), m));
        }
    }

    /// Deinterleaves whole groups of 8 pairs; returns how many pairs it did (the caller does the rest).
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn deinterleave(row: &[f32], evens: &mut [f32], odds: &mut [f32]) -> usize {
        let groups = (row.len() / 16).min(evens.len() / 8).min(odds.len() / 8);
        for g in 0..groups {
            let a = _mm256_loadu_ps(row.as_ptr().add(16 * g));
            let b = _mm256_loadu_ps(row.as_ptr().add(16 * g + 8));
            // Within each 128-bit half: [a0 a2 b0 b2], then the 64-bit quarters reordered to a0 a2 a4 a6 b0 ...
            let e = _mm256_shuffle_ps::<0b10_00_10_00>(a, b);
            let o = _mm256_shuffle_ps::<0b11_01_11_01>(a, b);
            let e = _mm256_castpd_ps(_mm256_permute4x64_pd::<0b11_01_10_00>(_mm256_castps_pd(e)));
            let o = _mm256_castpd_ps(_mm256_permute4x64_pd::<0b11_01_10_00>(_mm256_castps_pd(o)));
            _mm256_storeu_ps(evens.as_mut_ptr().add(8 * g), e);
            _mm256_storeu_ps(odds.as_mut_ptr().add(8 * g), o);
        }
        groups * 8
    }

    /// # Safety
    /// The CPU supports AVX2 and FMA.
    pub(super) unsafe fn convolve(plane: &Plane, bias: f32, act: Activation, wo: usize, out: &mut [f32]) {
        if crate::has_avx512() {
            convolve512(plane, bias, act, wo, out)
        } else {
            convolve256(plane, bias, act, wo, out)
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn convolve256(plane: &Plane, bias: f32, act: Activation, wo: usize, out: &mut [f32]) {
        convolve_with::<__m256>(plane, bias, act, wo, out)
    }

    #[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl")]
    pub(super) unsafe fn convolve512(plane: &Plane, bias: f32, act: Activation, wo: usize, out: &mut [f32]) {
        convolve_with::<__m512>(plane, bias, act, wo, out)
    }

    /// Blocks of two vectors of `S` (one where less than a vector of the row is left).
    #[inline(always)]
    unsafe fn convolve_with<S: Simd>(plane: &Plane, bias: f32, act: Activation, wo: usize, out: &mut [f32]) {
        let wide = 2 * S::LANES;
        // The furthest any block reads: the last row's last block, one or two vectors wide, at the largest tap.
        let last_x0 = (wo - 1) / wide * wide;
        let last_read = if wo - last_x0 > S::LANES { wide } else { S::LANES };
        let rows = out.len() / wo;
        let max_tap = plane.taps.iter().copied().max().unwrap_or(0);
        assert!(rows == 0 || (rows - 1) * plane.row_step + last_x0 + max_tap + last_read <= plane.buf.len());
        assert_eq!(plane.taps.len(), plane.filt.len());
        // The column-by-column kernels read with the grid's row length: it must be the taps' own (a plane
        // without a grid takes the tap-by-tap block).
        debug_assert!(plane.grid.is_none() || plane.grid == grid_of(plane.taps, plane.row_step));
        match plane.grid {
            Some((3, 1, pws)) => rows_with::<S, Grid<3, 1>>(plane, bias, act, wo, out, pws),
            Some((3, 2, pws)) => rows_with::<S, Grid<3, 2>>(plane, bias, act, wo, out, pws),
            Some((5, 1, pws)) => rows_with::<S, Grid<5, 1>>(plane, bias, act, wo, out, pws),
            Some((5, 2, pws)) => rows_with::<S, Grid<5, 2>>(plane, bias, act, wo, out, pws),
            _ => rows_with::<S, Taps>(plane, bias, act, wo, out, 0),
        }
    }

    /// The rows of a plane in blocks: four rows at a time (eight or four independent accumulator chains hide
    /// the FMA latency that bounded one row's two chains), the last ones alone; blocks of two vectors, or one
    /// where less is left.
    #[inline(always)]
    unsafe fn rows_with<S: Simd, B: Block>(
        plane: &Plane,
        bias: f32,
        act: Activation,
        wo: usize,
        out: &mut [f32],
        pws: usize,
    ) {
        let (wide, rows) = (2 * S::LANES, out.len() / wo);
        let mut oy = 0;
        while oy < rows {
            let r = if rows - oy >= ROWS { ROWS } else { 1 };
            let mut x0 = 0;
            while x0 < wo {
                let width = wide.min(wo - x0);
                let (start, dst) = (oy * plane.row_step + x0, out.as_mut_ptr().add(oy * wo + x0));
                let src = plane.buf.as_ptr().add(start);
                match (width > S::LANES, r) {
                    (true, ROWS) => store::<S, 2, ROWS>(B::sums(plane, src, bias, pws), act, dst, wo, width),
                    (true, _) => store::<S, 2, 1>(B::sums(plane, src, bias, pws), act, dst, wo, width),
                    (false, ROWS) => store::<S, 1, ROWS>(B::sums(plane, src, bias, pws), act, dst, wo, width),
                    (false, _) => store::<S, 1, 1>(B::sums(plane, src, bias, pws), act, dst, wo, width),
                }
                x0 += width;
            }
            oy += r;
        }
    }

    /// Output rows a block covers at once.
    const ROWS: usize = 4;

    /// How a block of `R` rows of `V` vectors of outputs sums its windows (row r's start at `src + r *
    /// row_step`, plus each tap's offset). Reads stay in the buffer as [`convolve_with`] asserts once per
    /// plane.
    trait Block {
        unsafe fn sums<S: Simd, const V: usize, const R: usize>(
            plane: &Plane,
            src: *const f32,
            bias: f32,
            pws: usize,
        ) -> [[S; V]; R];
    }

    /// Tap by tap: each tap's window loaded for every row (any taps).
    struct Taps;

    impl Block for Taps {
        #[inline(always)]
        unsafe fn sums<S: Simd, const V: usize, const R: usize>(
            plane: &Plane,
            src: *const f32,
            bias: f32,
            _: usize,
        ) -> [[S; V]; R] {
            let all = S::first(S::LANES);
            let mut acc = [[S::splat(bias); V]; R];
            for (&off, &wv) in plane.taps.iter().zip(plane.filt) {
                let w = S::splat(wv);
                for (r, row) in acc.iter_mut().enumerate() {
                    for (v, a) in row.iter_mut().enumerate() {
                        *a = a.fmadd(w, S::load::<false>(src.add(r * plane.row_step + off + S::LANES * v), all));
                    }
                }
            }
            acc
        }
    }

    /// A K x K kernel at stride `ST` on a plane of `ST` column phases ([`Plane::grid`]): column by column of
    /// the kernel, each plane row the block's windows cross is loaded once and serves every output row whose
    /// window holds it (up to ⌈K / ST⌉ of the four). Tap by tap, each of a 3x3 kernel's loads (most of them
    /// unaligned, split across cache lines) fed one multiply-add; here 1.6 (stride 1) to 1.1 (stride 2).
    struct Grid<const K: usize, const ST: usize>;

    impl<const K: usize, const ST: usize> Block for Grid<K, ST> {
        #[inline(always)]
        unsafe fn sums<S: Simd, const V: usize, const R: usize>(
            plane: &Plane,
            src: *const f32,
            bias: f32,
            pws: usize,
        ) -> [[S; V]; R] {
            let all = S::first(S::LANES);
            let mut acc = [[S::splat(bias); V]; R];
            // Loops, not `array::from_fn`: intrinsics in a closure that LLVM leaves out of line stay calls.
            let (mut w, mut x) = ([S::splat(0.0); K], [S::splat(0.0); V]);
            for kx in 0..K {
                let column = src.add(plane.taps[kx]);
                for (ky, w) in w.iter_mut().enumerate() {
                    *w = S::splat(plane.filt[ky * K + kx]);
                }
                for i in 0..(R - 1) * ST + K {
                    for (v, x) in x.iter_mut().enumerate() {
                        *x = S::load::<false>(column.add(i * pws + S::LANES * v), all);
                    }
                    for (r, row) in acc.iter_mut().enumerate() {
                        // Plane row i is row ky of output row r's window.
                        let Some(ky) = i.checked_sub(r * ST).filter(|&ky| ky < K) else { continue };
                        for (a, &x) in row.iter_mut().zip(&x) {
                            *a = a.fmadd(w[ky], x);
                        }
                    }
                }
            }
            acc
        }
    }

    /// A block's sums activated and stored: row r's first `width` (at most V vectors) outputs at `out + r *
    /// wo`; writes stay in the caller's rows.
    #[inline(always)]
    unsafe fn store<S: Simd, const V: usize, const R: usize>(
        mut acc: [[S; V]; R],
        act: Activation,
        out: *mut f32,
        wo: usize,
        width: usize,
    ) {
        debug_assert!(width <= S::LANES * V);
        let all = S::first(S::LANES);
        for (r, row) in acc.iter_mut().enumerate() {
            act.apply_registers(row);
            for (v, a) in row.iter().enumerate() {
                // Masked moves for a row's last lanes, not `memcpy` calls of a run-time length.
                let (p, n) = (out.add(r * wo + S::LANES * v), width.saturating_sub(S::LANES * v));
                if n >= S::LANES {
                    a.store::<false>(p, all)
                } else if n > 0 {
                    a.store::<true>(p, S::first(n))
                }
            }
        }
    }
}

/// Depthwise convolution x `[N, C, H, W]` * w `[C, 1, k, k]` + b `[C]`, then `act`. Inference only.
pub fn depthwise_conv2d(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    stride: usize,
    pad: Padding,
    act: Activation,
) -> Result<Tensor> {
    x.contiguous()?.apply_op3_no_bwd(&w.contiguous()?, &b.contiguous()?, &Depthwise { stride, pad, act })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_data as data;
    use candle_core::Device;

    /// Against candle's grouped convolution on an explicitly padded input, then candle's activation; maps wide
    /// enough for full blocks (16 and 32 lanes) and partial ones, strides 1-3, odd and even sizes.
    #[test]
    fn matches_grouped_convolution() {
        let dev = Device::Cpu;
        for &(k, s, pad) in &[
            (3usize, 1usize, Padding::symmetric(1)),
            (3, 2, Padding { top: 0, bottom: 1, left: 0, right: 1 }),
            (5, 2, Padding { top: 1, bottom: 2, left: 1, right: 2 }),
            (5, 1, Padding::symmetric(2)),
            (3, 3, Padding { top: 1, bottom: 1, left: 2, right: 0 }),
        ] {
            for (h, w) in [(9, 8), (7, 41), (5, 20), (3, 70)] {
                let (n, c) = (2, 5);
                let x = Tensor::from_vec(data(n * c * h * w, 1), (n, c, h, w), &dev).unwrap();
                let wt = Tensor::from_vec(data(c * k * k, 2), (c, 1, k, k), &dev).unwrap();
                let b = Tensor::from_vec(data(c, 3), c, &dev).unwrap();
                for (act, theirs) in crate::candle_reference(&x, &wt, &b, s, pad, c) {
                    let ours = depthwise_conv2d(&x, &wt, &b, s, pad, act).unwrap();
                    assert_eq!(ours.dims(), theirs.dims());
                    let d: f32 = (ours - theirs).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap();
                    assert!(d < 1e-5, "k {k} s {s} {h}x{w} {act:?}: {d}");
                }
            }
        }
    }

    /// Each kernel this CPU has (AVX2, AVX-512) gives the portable path's values on one plane, summing column
    /// by column of the kernel and tap by tap: rows in groups of four and alone, blocks of one and two
    /// vectors, partial ones, a last block exactly one vector wide.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn kernels_match_the_portable_path() {
        let (row_step, taps) = (75usize, [0usize, 1, 2, 75, 76, 77, 150, 151, 152]);
        let filt = data(taps.len(), 2);
        for (rows, wo) in [(6usize, 70usize), (5, 20), (1, 9), (4, 33), (3, 48), (4, 16)] {
            let buf = data(rows * row_step + 152 + SLACK, 1);
            assert_eq!(grid_of(&taps, row_step), Some((3, 1, 75)));
            // Column by column of the kernel, and tap by tap.
            for grid in [grid_of(&taps, row_step), None] {
                let plane = Plane { buf: &buf, taps: &taps, filt: &filt, row_step, grid };
                for act in [Activation::Identity, Activation::Swish, Activation::Relu6, Activation::LeakyRelu(0.1)] {
                    let mut want = vec![f32::NAN; rows * wo];
                    plane.convolve_lanes(0.25, act, wo, &mut want);
                    let mut paths: Vec<(&str, Vec<f32>)> = Vec::new();
                    if crate::has_avx2_fma() {
                        let mut out = vec![f32::NAN; rows * wo];
                        // SAFETY: AVX2 and FMA checked.
                        unsafe { x86::convolve256(&plane, 0.25, act, wo, &mut out) };
                        paths.push(("avx2", out));
                    }
                    if crate::has_avx512() {
                        let mut out = vec![f32::NAN; rows * wo];
                        // SAFETY: AVX-512 checked.
                        unsafe { x86::convolve512(&plane, 0.25, act, wo, &mut out) };
                        paths.push(("avx512", out));
                    }
                    for (what, got) in paths {
                        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                            assert!((g - w).abs() < 1e-5, "{what} {grid:?} {rows}x{wo} {act:?} [{i}]: {g} vs {w}");
                        }
                    }
                }
            }
        }
    }

    /// The layers' phased taps are recognised as their grids (the column-by-column kernels take them), other
    /// lists are not.
    #[test]
    fn phased_taps_form_grids() {
        for (k, s) in [(3, 1), (3, 2), (5, 1), (5, 2), (3, 3), (7, 1)] {
            let phased = Phased::new(s, Padding::symmetric(k / 2), 23, 30);
            let grid = grid_of(&phased.taps(k, k), phased.row_step());
            assert_eq!(grid, Some((k, s, phased.pws)), "k {k} s {s}");
        }
        assert_eq!(grid_of(&[0, 1, 2, 75, 76, 78, 150, 151, 152], 75), None);
        assert_eq!(grid_of(&[0, 1, 2], 75), None);
    }

    /// A map with no columns, or a kernel with no taps, is refused with an error, not a panic.
    #[test]
    fn empty_input_is_an_error() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((1, 2, 3, 0), candle_core::DType::F32, &dev).unwrap();
        let w = Tensor::zeros((2, 1, 3, 3), candle_core::DType::F32, &dev).unwrap();
        let b = Tensor::zeros(2, candle_core::DType::F32, &dev).unwrap();
        let err = depthwise_conv2d(&x, &w, &b, 1, Padding::symmetric(1), Activation::Identity).unwrap_err();
        assert!(err.to_string().contains("empty input 3x0"), "{err}");
        let x = Tensor::zeros((1, 2, 3, 3), candle_core::DType::F32, &dev).unwrap();
        let w = Tensor::zeros((2, 1, 0, 0), candle_core::DType::F32, &dev).unwrap();
        let err = depthwise_conv2d(&x, &w, &b, 1, Padding::symmetric(0), Activation::Identity).unwrap_err();
        assert!(err.to_string().contains("empty kernel"), "{err}");
    }
}
