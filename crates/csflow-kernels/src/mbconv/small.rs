//! Inverted-residual blocks on small maps (Lite0's blocks at 16x16 to 2x2) with vectors over channels.
//!
//! The NCHW kernels put a map's columns in the vector lanes: on a 4x4 map half of each vector idles, a
//! depthwise plane costs more to set up than to convolve (some 180 ns per 8x8 plane against 40 ns of
//! multiply-adds), and at 2x2 a block ran at an eighth of the FMA peak. Here the expanded and depthwise maps
//! are pixel-major, in panels of [`CH`] channels (two AVX2 vectors, one AVX-512 vector): the 1x1 layers
//! broadcast one input value per pixel against a panel of weights, the depthwise convolution multiplies
//! whole vectors of channels per tap. Each task expands one panel of channels and convolves it while it is in
//! L1; the projection then reads all panels' depthwise output.

/// Channels per panel: two AVX2 vectors, one AVX-512 vector.
pub(crate) const CH: usize = 16;

/// Weights with vectors over output channels: `packed[p][k][i]` = `rows[p * CH + i][k]` for rows [o][cols],
/// and the bias, both zero past the last channel.
#[derive(Clone, Debug)]
pub(crate) struct ChannelPanels {
    packed: Vec<f32>,
    bias: Vec<f32>,
    cols: usize,
}

impl ChannelPanels {
    /// From rows [o][cols] (row-major, o = bias.len()) and the bias.
    pub(crate) fn new(rows: &[f32], cols: usize, bias: &[f32]) -> Self {
        let panels = bias.len().div_ceil(CH);
        let mut packed = vec![0f32; panels * cols * CH];
        for (r, row) in rows.chunks_exact(cols).enumerate() {
            for (k, &v) in row.iter().enumerate() {
                packed[((r / CH) * cols + k) * CH + r % CH] = v;
            }
        }
        let mut bias = bias.to_vec();
        bias.resize(panels * CH, 0.0);
        Self { packed, bias, cols }
    }
}

#[cfg(target_arch = "x86_64")]
pub(super) mod x86 {
    use std::arch::x86_64::*;

    use rayon::prelude::*;

    use super::{ChannelPanels, CH};
    use crate::gemm::SendPtr;
    use crate::mbconv::{Dims, InvertedResidual};
    use crate::simd::Simd;

    /// With 512-bit vectors for `avx512`, else 256-bit ones.
    ///
    /// # Safety
    /// The CPU supports AVX2 and FMA (and AVX-512 F, BW and VL for `avx512`); `d` are x's, the layers' and
    /// out's sizes, checked to chain.
    pub(in crate::mbconv) unsafe fn run(blk: &InvertedResidual, d: Dims, x: &[f32], out: &mut [f32], avx512: bool) {
        if avx512 {
            run_with::<Avx512>(blk, d, x, out)
        } else {
            run_with::<Avx2>(blk, d, x, out)
        }
    }

    /// The two passes compiled for one vector width.
    trait Width {
        /// Pixels per product tile.
        const PX: usize;
        /// Panels of output channels the expansion and the projection take at once (each pixel's broadcast
        /// input serves them all).
        const PANELS: usize;
        unsafe fn expand_convolve(
            blk: &InvertedResidual,
            expand: Option<&ChannelPanels>,
            d: Dims,
            xs: &[f32],
            ps: std::ops::Range<usize>,
            expanded: &mut Vec<f32>,
            dst: (*mut f32, usize),
        );
        #[allow(clippy::too_many_arguments)]
        unsafe fn project_panels(
            blk: &InvertedResidual,
            w: &ChannelPanels,
            d: Dims,
            src: (&[f32], usize),
            qs: std::ops::Range<usize>,
            pixels: std::ops::Range<usize>,
            xs: &[f32],
            out: *mut f32,
        );
    }

    /// Two AVX2 vectors a panel, tiles of six pixels: twelve accumulators, the two weight vectors and a
    /// broadcast fill the 16 registers. Three vectors by four pixels needed one more: the spilled
    /// accumulator's chain through memory held the kernel to 42 GFLOPS.
    struct Avx2;
    /// One AVX-512 vector a panel, tiles of twelve pixels; the expansion and the projection take two panels
    /// at once (24 accumulators: one broadcast feeds two multiply-adds, where it fed one).
    struct Avx512;

    /// [`Width`] for a vector type `$s`, `$v` of them a panel, tiles of `$px` pixels, `$q` panels at once in
    /// the expansion and the projection, compiled with `$features`.
    macro_rules! width {
        ($name:ident, $s:ty, $v:literal, $px:literal, $q:literal, $features:literal) => {
            impl Width for $name {
                const PX: usize = $px;
                const PANELS: usize = $q;

                #[target_feature(enable = $features)]
                unsafe fn expand_convolve(
                    blk: &InvertedResidual,
                    expand: Option<&ChannelPanels>,
                    d: Dims,
                    xs: &[f32],
                    ps: std::ops::Range<usize>,
                    expanded: &mut Vec<f32>,
                    dst: (*mut f32, usize),
                ) {
                    if ps.len() == $q {
                        expand_convolve::<$s, $v, $px, $q>(blk, expand, d, xs, ps.start, expanded, dst)
                    } else {
                        for p in ps.clone() {
                            let dst = (dst.0.add((p - ps.start) * CH), dst.1);
                            expand_convolve::<$s, $v, $px, 1>(blk, expand, d, xs, p, expanded, dst)
                        }
                    }
                }

                #[target_feature(enable = $features)]
                unsafe fn project_panels(
                    blk: &InvertedResidual,
                    w: &ChannelPanels,
                    d: Dims,
                    src: (&[f32], usize),
                    qs: std::ops::Range<usize>,
                    pixels: std::ops::Range<usize>,
                    xs: &[f32],
                    out: *mut f32,
                ) {
                    if qs.len() == $q {
                        project_panels::<$s, $v, $px, $q>(blk, w, d, src, qs.start, pixels, xs, out)
                    } else {
                        for q in qs {
                            project_panels::<$s, $v, $px, 1>(blk, w, d, src, q, pixels.clone(), xs, out)
                        }
                    }
                }
            }
        };
    }

    width!(Avx2, __m256, 2, 6, 1, "avx2,fma");
    width!(Avx512, __m512, 1, 12, 2, "avx2,fma,avx512f,avx512bw,avx512vl");

    /// The first pass alone: the depthwise output of every panel, `[n][ho * wo][panels * CH]` (channels
    /// past the last zero), for blocks whose squeeze-excitation gates need all of it before the projection.
    ///
    /// # Safety
    /// As [`run`].
    pub(in crate::mbconv) unsafe fn panels(blk: &InvertedResidual, d: Dims, x: &[f32], avx512: bool) -> Vec<f32> {
        if avx512 {
            panels_with::<Avx512>(blk, d, x)
        } else {
            panels_with::<Avx2>(blk, d, x)
        }
    }

    /// The second pass alone: the projection of [`panels`]' output (bias and skip added) into `out`.
    ///
    /// # Safety
    /// As [`run`]; `convolved` is [`panels`]' output for `d`.
    pub(in crate::mbconv) unsafe fn project(
        blk: &InvertedResidual,
        d: Dims,
        convolved: &[f32],
        x: &[f32],
        out: &mut [f32],
        avx512: bool,
    ) {
        if avx512 {
            project_with::<Avx512>(blk, d, convolved, x, out)
        } else {
            project_with::<Avx2>(blk, d, convolved, x, out)
        }
    }

    unsafe fn run_with<W: Width>(blk: &InvertedResidual, d: Dims, x: &[f32], out: &mut [f32]) {
        let convolved = panels_with::<W>(blk, d, x);
        project_with::<W>(blk, d, &convolved, x, out)
    }

    unsafe fn panels_with<W: Width>(blk: &InvertedResidual, d: Dims, x: &[f32]) -> Vec<f32> {
        let (hw, hwo) = (d.h * d.wd, d.ho * d.wo);
        let panels = d.c.div_ceil(CH);
        let cpad = panels * CH;
        let expand = blk.expand.map(|e| e.channel_panels());
        // Every element is written by the first pass: each panel's task writes all CH lanes of its pixels.
        let mut convolved = crate::uninit(d.n * hwo * cpad);
        let conv = SendPtr(convolved.as_mut_ptr());
        let tasks = panels.div_ceil(W::PANELS);
        (0..d.n * tasks).into_par_iter().for_each_init(Vec::new, |expanded, t| {
            let conv = &conv;
            let (s, p) = (t / tasks, t % tasks * W::PANELS);
            let xs = &x[s * d.cin * hw..(s + 1) * d.cin * hw];
            let dst = (conv.0.add(s * hwo * cpad + p * CH), cpad);
            // SAFETY: the CPU supports W's features; this task alone writes its panels' lanes of sample s.
            unsafe { W::expand_convolve(blk, expand, d, xs, p..panels.min(p + W::PANELS), expanded, dst) };
        });
        convolved
    }

    unsafe fn project_with<W: Width>(blk: &InvertedResidual, d: Dims, convolved: &[f32], x: &[f32], out: &mut [f32]) {
        let (hw, hwo) = (d.h * d.wd, d.ho * d.wo);
        let (out_panels, cpad) = (d.cout.div_ceil(CH), d.c.div_ceil(CH) * CH);
        let project = blk.project.channel_panels();
        let dst = SendPtr(out.as_mut_ptr());
        // Tasks of pixel groups (whose depthwise output then stays in cache while every panel of weights passes
        // over it) by ranges of output panels (on the smallest maps the weights are the work to split).
        let want = 4 * rayon::current_num_threads();
        let groups = (hwo / (8 * W::PX)).clamp(1, want);
        let per_group = hwo.div_ceil(groups).next_multiple_of(W::PX);
        let groups = hwo.div_ceil(per_group);
        let per_chunk = out_panels.div_ceil(want.div_ceil(d.n * groups).clamp(1, out_panels));
        let chunks = out_panels.div_ceil(per_chunk);
        (0..d.n * groups * chunks).into_par_iter().for_each(|t| {
            let dst = &dst;
            let (s, g, c) = (t / (groups * chunks), t / chunks % groups, t % chunks);
            let xs = &x[s * d.cin * hw..(s + 1) * d.cin * hw];
            let src = &convolved[s * hwo * cpad..(s + 1) * hwo * cpad];
            let pixels = g * per_group..((g + 1) * per_group).min(hwo);
            let end = ((c + 1) * per_chunk).min(out_panels);
            for q in (c * per_chunk..end).step_by(W::PANELS) {
                // SAFETY: the CPU supports W's features; this task alone writes output channels q * CH.. of
                // sample s at `pixels`.
                unsafe {
                    let out = dst.0.add(s * d.cout * hwo);
                    W::project_panels(blk, project, d, (src, cpad), q..end.min(q + W::PANELS), pixels.clone(), xs, out)
                };
            }
        });
    }

    /// Panels `p..p + Q` of one sample: the expansion of their channels into `expanded` ([panel][pixel][CH]),
    /// then the depthwise convolution of each into `dst` (pixel-major, `ld` apart). `V` vectors of `S` make a
    /// panel.
    #[inline(always)]
    unsafe fn expand_convolve<S: Simd, const V: usize, const PX: usize, const Q: usize>(
        blk: &InvertedResidual,
        expand: Option<&ChannelPanels>,
        d: Dims,
        xs: &[f32],
        p: usize,
        expanded: &mut Vec<f32>,
        (dst, ld): (*mut f32, usize),
    ) {
        let hw = d.h * d.wd;
        expanded.resize(Q * hw * CH, 0.0);
        let e = expanded.as_mut_ptr();
        match expand {
            Some(w) => {
                let wp = w.packed[p * w.cols * CH..].as_ptr();
                for p0 in (0..hw).step_by(PX) {
                    let np = PX.min(hw - p0);
                    // Pixel q of channel k is xs[k * hw + q].
                    let acc = product::<S, V, PX, Q>(np, (wp, w.cols * CH), w.cols, xs[p0..].as_ptr(), (1, hw));
                    for (i, row) in acc.iter().enumerate().take(np) {
                        for (j, panel) in row.iter().enumerate() {
                            let mut r = add(*panel, load::<S, V>(w.bias[(p + j) * CH..].as_ptr()));
                            blk.act.apply_registers(&mut r);
                            store(e.add((j * hw + p0 + i) * CH), r);
                        }
                    }
                }
            }
            None => {
                for (idx, lane) in expanded.chunks_exact_mut(CH).enumerate() {
                    let (j, i) = (idx / hw, idx % hw);
                    for (l, v) in lane.iter_mut().enumerate() {
                        let c = (p + j) * CH + l;
                        *v = if c < d.c { xs[c * hw + i] } else { 0.0 };
                    }
                }
            }
        }
        for j in 0..Q {
            convolve_panel::<S, V>(blk, d, e.add(j * hw * CH), p + j, (dst.add(j * CH), ld));
        }
    }

    /// The depthwise convolution of panel `p` (its expanded channels at `e`, [pixel][CH]) into `dst`
    /// (pixel-major, `ld` apart).
    #[inline(always)]
    unsafe fn convolve_panel<S: Simd, const V: usize>(
        blk: &InvertedResidual,
        d: Dims,
        e: *const f32,
        p: usize,
        (dst, ld): (*mut f32, usize),
    ) {
        let c0 = p * CH;
        let dw = blk.depthwise.channel_panels();
        let (taps, bias) = (dw.packed[p * dw.cols * CH..].as_ptr(), load::<S, V>(dw.bias[c0..].as_ptr()));
        let (k, s, pad) = (d.k as isize, blk.stride as isize, blk.pad);
        let (h, wd) = (d.h as isize, d.wd as isize);
        for oy in 0..d.ho {
            let y0 = oy as isize * s - pad.top as isize;
            let ys = (-y0).max(0)..k.min(h - y0);
            let mut ox = 0;
            while ox < d.wo {
                let x0 = ox as isize * s - pad.left as isize;
                if ox + GROUP <= d.wo && x0 >= 0 && x0 + (GROUP as isize - 1) * s + k <= wd {
                    // GROUP pixels whose windows lie inside the map's columns: GROUP chains of multiply-adds
                    // (one pixel's two left the FMA latency exposed).
                    let mut acc = [bias; GROUP];
                    for ky in ys.clone() {
                        let row = e.add(((y0 + ky) * wd + x0) as usize * CH);
                        for kx in 0..k {
                            let w = load(taps.add((ky * k + kx) as usize * CH));
                            for (j, a) in acc.iter_mut().enumerate() {
                                *a = fmadd(*a, w, load(row.add((j as isize * s + kx) as usize * CH)));
                            }
                        }
                    }
                    for (j, a) in acc.iter_mut().enumerate() {
                        blk.act.apply_registers(a);
                        store(dst.add((oy * d.wo + ox + j) * ld), *a);
                    }
                    ox += GROUP;
                    continue;
                }
                // Even and odd taps sum apart: two chains of multiply-adds (one vector a panel had one).
                let (mut even, mut odd) = (bias, [S::splat(0.0); V]);
                // Taps inside the map only: the padding is zero.
                for ky in (-y0).max(0)..k.min(h - y0) {
                    let row = |kx: isize| {
                        (taps.add((ky * k + kx) as usize * CH), e.add(((y0 + ky) * wd + x0 + kx) as usize * CH))
                    };
                    let (kx0, kx1) = ((-x0).max(0), k.min(wd - x0));
                    let mut kx = kx0;
                    while kx < kx1 {
                        let (w, v) = row(kx);
                        even = fmadd(even, load(w), load(v));
                        if kx + 1 < kx1 {
                            let (w, v) = row(kx + 1);
                            odd = fmadd(odd, load(w), load(v));
                        }
                        kx += 2;
                    }
                }
                let mut acc = add(even, odd);
                blk.act.apply_registers(&mut acc);
                store(dst.add((oy * d.wo + ox) * ld), acc);
                ox += 1;
            }
        }
    }

    /// Output pixels of a row the depthwise convolution takes at once where their windows lie inside the map.
    const GROUP: usize = 4;

    /// Output channels `q * CH..` (`Q` panels) at output pixels `pixels` of one sample from the depthwise
    /// output `src` (pixel-major, `ld` apart), bias and skip added, written to `out` [cout, ho * wo].
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    unsafe fn project_panels<S: Simd, const V: usize, const PX: usize, const Q: usize>(
        blk: &InvertedResidual,
        w: &ChannelPanels,
        d: Dims,
        (src, ld): (&[f32], usize),
        q: usize,
        pixels: std::ops::Range<usize>,
        xs: &[f32],
        out: *mut f32,
    ) {
        let hwo = d.ho * d.wo;
        let wp = w.packed[q * w.cols * CH..].as_ptr();
        let mut tile = [[[0f32; CH]; Q]; PX];
        for p0 in pixels.clone().step_by(PX) {
            let np = PX.min(pixels.end - p0);
            // Pixel i of channel k is src[i * ld + k].
            let acc = product::<S, V, PX, Q>(np, (wp, w.cols * CH), w.cols, src[p0 * ld..].as_ptr(), (ld, 1));
            for (row, t) in acc.iter().zip(tile.iter_mut()).take(np) {
                for (j, (panel, t)) in row.iter().zip(t.iter_mut()).enumerate() {
                    store(t.as_mut_ptr(), add(*panel, load::<S, V>(w.bias[(q + j) * CH..].as_ptr())));
                }
            }
            // Back to NCHW: a tile's CH x np values per panel, scattered by channel.
            for j in 0..Q {
                for i in 0..CH.min(d.cout - (q + j) * CH) {
                    let o = (q + j) * CH + i;
                    for (p, t) in tile.iter().enumerate().take(np) {
                        let skip = if blk.skip { xs[o * hwo + p0 + p] } else { 0.0 };
                        *out.add(o * hwo + p0 + p) = t[j][i] + skip;
                    }
                }
            }
        }
    }

    /// The products of `np` (1..=PX) pixels' inputs with `Q` panels of weights ([kdim][CH] each, `w.1`
    /// apart from `w.0`): pixel i's k-th input is x[i * strides.0 + k * strides.1]. Rows from np on are zero.
    #[inline(always)]
    unsafe fn product<S: Simd, const V: usize, const PX: usize, const Q: usize>(
        np: usize,
        w: (*const f32, usize),
        kdim: usize,
        x: *const f32,
        strides: (usize, usize),
    ) -> [[[S; V]; Q]; PX] {
        macro_rules! by_pixels {
            ($($p:literal)*) => {
                match np {
                    $($p => product_of::<S, V, PX, $p, Q>(w, kdim, x, strides),)*
                    _ => product_of::<S, V, PX, PX, Q>(w, kdim, x, strides),
                }
            };
        }
        by_pixels!(1 2 3 4 5 6 7 8 9 10 11)
    }

    #[inline(always)]
    unsafe fn product_of<S: Simd, const V: usize, const PX: usize, const P: usize, const Q: usize>(
        (w, panel_step): (*const f32, usize),
        kdim: usize,
        x: *const f32,
        (sp, sk): (usize, usize),
    ) -> [[[S; V]; Q]; PX] {
        let mut acc = [[[S::splat(0.0); V]; Q]; PX];
        let mut wv = [[S::splat(0.0); V]; Q];
        for k in 0..kdim {
            for (j, wv) in wv.iter_mut().enumerate() {
                *wv = load::<S, V>(w.add(j * panel_step + k * CH));
            }
            for (i, row) in acc.iter_mut().enumerate().take(P) {
                let xb = S::splat(*x.add(i * sp + k * sk));
                for (panel, wv) in row.iter_mut().zip(&wv) {
                    for (a, wv) in panel.iter_mut().zip(wv) {
                        *a = a.fmadd(xb, *wv);
                    }
                }
            }
        }
        acc
    }

    /// A panel's CH values at p (a loop, not `array::from_fn`: intrinsics in a closure left out of line
    /// stay calls).
    #[inline(always)]
    unsafe fn load<S: Simd, const V: usize>(p: *const f32) -> [S; V] {
        let mut v = [S::splat(0.0); V];
        for (j, v) in v.iter_mut().enumerate() {
            *v = S::load::<false>(p.add(S::LANES * j), S::first(S::LANES));
        }
        v
    }

    #[inline(always)]
    unsafe fn add<S: Simd, const V: usize>(mut a: [S; V], b: [S; V]) -> [S; V] {
        for (a, b) in a.iter_mut().zip(b) {
            *a = a.add(b);
        }
        a
    }

    #[inline(always)]
    unsafe fn fmadd<S: Simd, const V: usize>(mut acc: [S; V], a: [S; V], b: [S; V]) -> [S; V] {
        for ((acc, a), b) in acc.iter_mut().zip(a).zip(b) {
            *acc = acc.fmadd(a, b);
        }
        acc
    }

    #[inline(always)]
    unsafe fn store<S: Simd, const V: usize>(p: *mut f32, v: [S; V]) {
        for (j, v) in v.iter().enumerate() {
            v.store::<false>(p.add(S::LANES * j), S::first(S::LANES));
        }
    }
}
