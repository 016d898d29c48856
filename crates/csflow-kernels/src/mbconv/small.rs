//! Inverted-residual blocks on small maps (Lite0's blocks at 16x16 to 2x2) with vectors over channels.
//!
//! The NCHW kernels put a map's columns in the vector lanes: on a 4x4 map half of each vector idles, a
//! depthwise plane costs more to set up than to convolve (some 180 ns per 8x8 plane against 40 ns of
//! multiply-adds), and at 2x2 a block ran at an eighth of the FMA peak. Here the expanded and depthwise maps
//! are pixel-major, in panels of [`CH`] channels (two vectors): the 1x1 layers broadcast one input value per
//! pixel against two vectors of weights, the depthwise convolution multiplies whole vectors of channels per
//! tap. Each task expands one panel of channels and convolves it while it is in L1; the projection then reads
//! all panels' depthwise output.

/// Channels per panel: two AVX2 vectors.
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

    /// Vectors per panel.
    const V: usize = CH / 8;
    /// Pixels per micro-kernel tile: twelve accumulators, the two weight vectors and a broadcast fill the 16
    /// registers. Three vectors by four pixels needed one more: the spilled accumulator's chain through memory
    /// held the kernel to 42 GFLOPS.
    const PX: usize = 6;

    type Tile = [[__m256; V]; PX];

    /// # Safety
    /// The CPU supports AVX2 and FMA; `d` are x's, the layers' and out's sizes, checked to chain.
    pub(in crate::mbconv) unsafe fn run(blk: &InvertedResidual, d: Dims, x: &[f32], out: &mut [f32]) {
        let (hw, hwo) = (d.h * d.wd, d.ho * d.wo);
        let (panels, out_panels) = (d.c.div_ceil(CH), d.cout.div_ceil(CH));
        let cpad = panels * CH;
        let expand = blk.expand.map(|e| e.channel_panels());
        // Every element is written by the first pass: each panel's task writes all CH lanes of its pixels.
        let mut convolved = crate::uninit(d.n * hwo * cpad);
        let conv = SendPtr(convolved.as_mut_ptr());
        (0..d.n * panels).into_par_iter().for_each_init(Vec::new, |expanded, t| {
            let conv = &conv;
            let (s, p) = (t / panels, t % panels);
            let xs = &x[s * d.cin * hw..(s + 1) * d.cin * hw];
            // SAFETY: the CPU supports AVX2 and FMA; this task alone writes panel p's lanes of sample s.
            unsafe { expand_convolve(blk, expand, d, xs, p, expanded, conv.0.add(s * hwo * cpad + p * CH), cpad) };
        });
        let project = blk.project.channel_panels();
        let dst = SendPtr(out.as_mut_ptr());
        // Tasks of pixel groups (whose depthwise output then stays in cache while every panel of weights passes
        // over it) by ranges of output panels (on the smallest maps the weights are the work to split).
        let want = 4 * rayon::current_num_threads();
        let groups = (hwo / (8 * PX)).clamp(1, want);
        let per_group = hwo.div_ceil(groups).next_multiple_of(PX);
        let groups = hwo.div_ceil(per_group);
        let per_chunk = out_panels.div_ceil(want.div_ceil(d.n * groups).clamp(1, out_panels));
        let chunks = out_panels.div_ceil(per_chunk);
        (0..d.n * groups * chunks).into_par_iter().for_each(|t| {
            let dst = &dst;
            let (s, g, c) = (t / (groups * chunks), t / chunks % groups, t % chunks);
            let xs = &x[s * d.cin * hw..(s + 1) * d.cin * hw];
            let src = &convolved[s * hwo * cpad..(s + 1) * hwo * cpad];
            let pixels = g * per_group..((g + 1) * per_group).min(hwo);
            for q in c * per_chunk..((c + 1) * per_chunk).min(out_panels) {
                // SAFETY: the CPU supports AVX2 and FMA; this task alone writes output channels q * CH.. of
                // sample s at `pixels`.
                unsafe {
                    project_panel(blk, project, d, src, cpad, q, pixels.clone(), xs, dst.0.add(s * d.cout * hwo))
                };
            }
        });
    }

    /// Panel `p` of one sample: the expansion of its channels into `expanded` ([pixel][CH]), then the depthwise
    /// convolution of those into `dst` (pixel-major, `ld` apart).
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn expand_convolve(
        blk: &InvertedResidual,
        expand: Option<&ChannelPanels>,
        d: Dims,
        xs: &[f32],
        p: usize,
        expanded: &mut Vec<f32>,
        dst: *mut f32,
        ld: usize,
    ) {
        let hw = d.h * d.wd;
        let c0 = p * CH;
        expanded.resize(hw * CH, 0.0);
        let e = expanded.as_mut_ptr();
        match expand {
            Some(w) => {
                let (wp, bias) = (w.packed[p * w.cols * CH..].as_ptr(), load(w.bias[c0..].as_ptr()));
                for p0 in (0..hw).step_by(PX) {
                    let np = PX.min(hw - p0);
                    // Pixel q of channel k is xs[k * hw + q].
                    let acc = product(np, wp, w.cols, xs[p0..].as_ptr(), (1, hw));
                    for (i, row) in acc.iter().enumerate().take(np) {
                        let mut r = add(*row, bias);
                        blk.act.apply_registers(&mut r);
                        store(e.add((p0 + i) * CH), r);
                    }
                }
            }
            None => {
                for (i, lane) in expanded.chunks_exact_mut(CH).enumerate() {
                    for (j, v) in lane.iter_mut().enumerate() {
                        *v = if c0 + j < d.c { xs[(c0 + j) * hw + i] } else { 0.0 };
                    }
                }
            }
        }
        let dw = blk.depthwise.channel_panels();
        let (taps, bias) = (dw.packed[p * dw.cols * CH..].as_ptr(), load(dw.bias[c0..].as_ptr()));
        let (k, s, pad) = (d.k as isize, blk.stride as isize, blk.pad);
        let (h, wd) = (d.h as isize, d.wd as isize);
        for oy in 0..d.ho {
            let y0 = oy as isize * s - pad.top as isize;
            for ox in 0..d.wo {
                let x0 = ox as isize * s - pad.left as isize;
                let mut acc = bias;
                // Taps inside the map only: the padding is zero.
                for ky in (-y0).max(0)..k.min(h - y0) {
                    for kx in (-x0).max(0)..k.min(wd - x0) {
                        let w = taps.add((ky * k + kx) as usize * CH);
                        let v = e.add(((y0 + ky) * wd + x0 + kx) as usize * CH);
                        for (j, a) in acc.iter_mut().enumerate() {
                            *a = _mm256_fmadd_ps(_mm256_loadu_ps(w.add(8 * j)), _mm256_loadu_ps(v.add(8 * j)), *a);
                        }
                    }
                }
                blk.act.apply_registers(&mut acc);
                store(dst.add((oy * d.wo + ox) * ld), acc);
            }
        }
    }

    /// Output channels `q * CH..` at output pixels `pixels` of one sample from the depthwise output `src`
    /// (pixel-major, `ld` apart), bias and skip added, written to `out` [cout, ho * wo].
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn project_panel(
        blk: &InvertedResidual,
        w: &ChannelPanels,
        d: Dims,
        src: &[f32],
        ld: usize,
        q: usize,
        pixels: std::ops::Range<usize>,
        xs: &[f32],
        out: *mut f32,
    ) {
        let hwo = d.ho * d.wo;
        let (wp, bias) = (w.packed[q * w.cols * CH..].as_ptr(), load(w.bias[q * CH..].as_ptr()));
        let rows = CH.min(d.cout - q * CH);
        let mut tile = [[0f32; CH]; PX];
        for p0 in pixels.clone().step_by(PX) {
            let np = PX.min(pixels.end - p0);
            // Pixel i of channel k is src[i * ld + k].
            let acc = product(np, wp, w.cols, src[p0 * ld..].as_ptr(), (ld, 1));
            for (row, t) in acc.iter().zip(tile.iter_mut()).take(np) {
                store(t.as_mut_ptr(), add(*row, bias));
            }
            // Back to NCHW: a tile's CH x np values, scattered by channel.
            for i in 0..rows {
                let o = q * CH + i;
                for (j, t) in tile.iter().enumerate().take(np) {
                    let skip = if blk.skip { xs[o * hwo + p0 + j] } else { 0.0 };
                    *out.add(o * hwo + p0 + j) = t[i] + skip;
                }
            }
        }
    }

    /// The products of `np` (1..=PX) pixels' inputs with a panel of weights `w` ([kdim][CH]): pixel i's k-th
    /// input is x[i * strides.0 + k * strides.1]. Rows from np on are zero.
    #[inline(always)]
    unsafe fn product(np: usize, w: *const f32, kdim: usize, x: *const f32, strides: (usize, usize)) -> Tile {
        match np {
            6 => product_of::<6>(w, kdim, x, strides),
            5 => product_of::<5>(w, kdim, x, strides),
            4 => product_of::<4>(w, kdim, x, strides),
            3 => product_of::<3>(w, kdim, x, strides),
            2 => product_of::<2>(w, kdim, x, strides),
            _ => product_of::<1>(w, kdim, x, strides),
        }
    }

    #[inline(always)]
    unsafe fn product_of<const P: usize>(w: *const f32, kdim: usize, x: *const f32, (sp, sk): (usize, usize)) -> Tile {
        let mut acc = [[_mm256_setzero_ps(); V]; PX];
        for k in 0..kdim {
            let wv = load(w.add(k * CH));
            for (i, row) in acc.iter_mut().enumerate().take(P) {
                let xb = _mm256_broadcast_ss(&*x.add(i * sp + k * sk));
                for (a, wv) in row.iter_mut().zip(&wv) {
                    *a = _mm256_fmadd_ps(xb, *wv, *a);
                }
            }
        }
        acc
    }

    #[inline(always)]
    unsafe fn load(p: *const f32) -> [__m256; V] {
        let mut v = [_mm256_setzero_ps(); V];
        for (j, v) in v.iter_mut().enumerate() {
            *v = _mm256_loadu_ps(p.add(8 * j));
        }
        v
    }

    #[inline(always)]
    unsafe fn add(mut a: [__m256; V], b: [__m256; V]) -> [__m256; V] {
        for (a, b) in a.iter_mut().zip(b) {
            *a = _mm256_add_ps(*a, b);
        }
        a
    }

    #[inline(always)]
    unsafe fn store(p: *mut f32, v: [__m256; V]) {
        for (j, v) in v.iter().enumerate() {
            _mm256_storeu_ps(p.add(8 * j), *v);
        }
    }
}
