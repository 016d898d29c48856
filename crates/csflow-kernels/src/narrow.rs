//! Convolutions onto few output pixels (a flow's 4x4 and 2x2 maps one image at a time, and the stride-2
//! convolutions onto them), for inference.
//!
//! There every weight meets a handful of pixels and the time is the weights' read: a 3x3 256 -> 192 layer
//! holds 1.8 MB for 4 output pixels, and the im2col path packed all of it again on every call. Here the
//! weights are packed once, in panels of [`CH`] output channels (`[panel][C·k·k][CH]`), in f32 or in f16
//! (half the bytes, 11 significant bits, widened in registers), and each panel is read once per task of up
//! to 16 groups of 16 output pixels: vectors over output channels, one broadcast im2col value per pixel.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::conv::Geom;
use crate::{f32_slice, Activation};

/// Output channels per packed panel: one AVX-512 vector, two AVX2 ones.
const CH: usize = 16;
/// im2col values read past a row's last column by a group rounded up to its kernel's pixel count.
const OVERREAD: usize = 16;

/// A convolution's weight [O, C, k, k] packed for [`conv_narrow`], with its bias.
#[derive(Clone, Debug)]
pub struct NarrowWeights {
    packed: Packed,
    /// Zero past the last output channel.
    bias: Vec<f32>,
    cout: usize,
    cin: usize,
    k: usize,
}

#[derive(Clone, Debug)]
enum Packed {
    F32(Vec<f32>),
    /// IEEE half-precision bits.
    F16(Vec<u16>),
}

impl NarrowWeights {
    /// From a square weight `[O, C, k, k]` and a bias `[O]`; with `half`, the weights rounded to f16 (relative
    /// error at most 2^-11 from 6.1e-5 to 65504; smaller weights lose precision gradually and those below
    /// 3e-8 become 0, an absolute error no sum notices).
    pub fn new(weight: &Tensor, bias: &Tensor, half: bool) -> Result<Self> {
        let ([cout, cin, k], w) = crate::conv::square_weight("narrow conv", weight, bias)?;
        let kdim = cin * k * k;
        let panels = cout.div_ceil(CH);
        let mut packed = vec![0f32; panels * kdim * CH];
        for (o, row) in w.chunks_exact(kdim).enumerate() {
            for (r, &v) in row.iter().enumerate() {
                packed[((o / CH) * kdim + r) * CH + o % CH] = v;
            }
        }
        let packed = match half {
            true => Packed::F16(packed.iter().map(|&v| half::f16::from_f32(v).to_bits()).collect()),
            false => Packed::F32(packed),
        };
        let mut bias: Vec<f32> = bias.to_vec1()?;
        bias.resize(panels * CH, 0.0);
        Ok(Self { packed, bias, cout, cin, k })
    }

    /// Whether the weights are held in f16.
    pub fn is_half(&self) -> bool {
        matches!(self.packed, Packed::F16(_))
    }

    /// Weight `r` (of C·k·k) of output channel `o`, widened.
    fn get(&self, o: usize, r: usize) -> f32 {
        let at = ((o / CH) * self.cin * self.k * self.k + r) * CH + o % CH;
        match &self.packed {
            Packed::F32(p) => p[at],
            Packed::F16(p) => half::f16::from_bits(p[at]).to_f32(),
        }
    }
}

/// `act(F.conv2d(x, w, b, stride, padding=k // 2))` for x [N, C, H, W] through the packed weights; no
/// gradients. Fastest where N·Ho·Wo is small (up to about 16 pixels); right at any size.
pub fn conv_narrow(x: &Tensor, w: &NarrowWeights, stride: usize, act: Activation) -> Result<Tensor> {
    x.contiguous()?.apply_op1_no_bwd(&Narrow { w, stride, act })
}

struct Narrow<'a> {
    w: &'a NarrowWeights,
    stride: usize,
    act: Activation,
}

impl CustomOp1 for Narrow<'_> {
    fn name(&self) -> &'static str {
        "csflow-narrow-conv"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(xs, xl, self.name())?;
        let w = self.w;
        let (g, n, hw, shape) = Geom::square(xl.dims(), [w.cout, w.cin, w.k], self.stride)?;
        let cols_n = n * hw;
        let mut out = crate::uninit(n * w.cout * hw);
        if cols_n == 0 || w.cout == 0 {
            return Ok((CpuStorage::F32(out), shape));
        }
        let cols = g.columns(x, n, OVERREAD);
        #[cfg(target_arch = "x86_64")]
        if crate::has_avx2_fma() && std::is_x86_feature_detected!("f16c") {
            let at = |j: usize, o: usize| ((j / hw) * w.cout + o) * hw + j % hw;
            // SAFETY: AVX2, FMA and F16C checked (AVX-512 for `wide`); cols holds kdim rows of cols_n values
            // and OVERREAD more; `at` maps into out.
            unsafe { x86::run(w, self.act, &cols, cols_n, &mut out, &at, crate::has_avx512()) };
            return Ok((CpuStorage::F32(out), shape));
        }
        portable(w, self.act, &cols, cols_n, &mut out, hw);
        Ok((CpuStorage::F32(out), shape))
    }
}

/// Without AVX2: direct sums per output value.
fn portable(w: &NarrowWeights, act: Activation, cols: &[f32], ld: usize, out: &mut [f32], hw: usize) {
    let kdim = w.cin * w.k * w.k;
    out.par_chunks_mut(hw).enumerate().for_each(|(idx, plane)| {
        let (s, o) = (idx / w.cout, idx % w.cout);
        for (p, y) in plane.iter_mut().enumerate() {
            let j = s * hw + p;
            let sum = (0..kdim).fold(w.bias[o], |acc, r| acc + w.get(o, r) * cols[r * ld + j]);
            *y = act.apply(sum);
        }
    });
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::*;
    use crate::gemm::SendPtr;
    use crate::simd::Simd;

    /// The weights' element type, widened to f32 lanes as loaded.
    trait Weight: Copy + Sync {
        unsafe fn load<S: Simd>(p: *const Self) -> S;
    }

    impl Weight for f32 {
        #[inline(always)]
        unsafe fn load<S: Simd>(p: *const f32) -> S {
            S::load::<false>(p, S::first(S::LANES))
        }
    }

    impl Weight for u16 {
        #[inline(always)]
        unsafe fn load<S: Simd>(p: *const u16) -> S {
            S::load_half(p)
        }
    }

    /// The output's index of output channel `o` at im2col column `j`.
    type At<'a> = &'a (dyn Fn(usize, usize) -> usize + Sync);

    /// Through the AVX-512 kernel with `wide`, else the AVX2 one.
    ///
    /// # Safety
    /// The CPU supports AVX2, FMA and F16C (and AVX-512 for `wide`); `cols` holds C·k·k rows of `ld` values
    /// and [`OVERREAD`] more; `at` maps into `out`.
    pub(super) unsafe fn run(
        w: &NarrowWeights,
        act: Activation,
        cols: &[f32],
        ld: usize,
        out: &mut [f32],
        at: At,
        wide: bool,
    ) {
        match &w.packed {
            Packed::F32(p) => run_with(w, p, act, (cols, ld), out, at, wide),
            Packed::F16(p) => run_with(w, p, act, (cols, ld), out, at, wide),
        }
    }

    unsafe fn run_with<W: Weight>(
        w: &NarrowWeights,
        packed: &[W],
        act: Activation,
        (cols, ld): (&[f32], usize),
        out: &mut [f32],
        at: At,
        wide: bool,
    ) {
        let px = if wide { PX512 } else { PX256 };
        let (panels, groups) = (w.cout.div_ceil(CH), ld.div_ceil(px));
        let chunks = groups.div_ceil(GROUPS);
        let kdim = w.cin * w.k * w.k;
        let dst = SendPtr(out.as_mut_ptr());
        // Consecutive tasks share a panel: its weights come from L2 for the later chunks of pixels.
        (0..panels * chunks).into_par_iter().for_each(|t| {
            let (p, c) = (t / chunks, t % chunks);
            let task = Task {
                w,
                weights: packed[p * kdim * CH..].as_ptr(),
                kdim,
                act,
                cols: cols.as_ptr(),
                ld,
                panel: p,
                groups: c * GROUPS..((c + 1) * GROUPS).min(groups),
                px,
            };
            let dst = &dst;
            // SAFETY: the CPU's features checked by the caller; this task alone writes its panel's channels at
            // its pixels.
            unsafe {
                match wide {
                    true => task512(&task, dst.0, at),
                    false => task256(&task, dst.0, at),
                }
            }
        });
    }

    /// Input rows ahead whose weights are prefetched (8 KB of f16, 16 KB of f32). The weights stream from
    /// memory (a CPU-size flow holds 120 MB of them on its small maps) and the hardware prefetcher left the
    /// first multiply-add waiting on each line: CPU-size flow at batch 1, f16 7.9 -> 6.3 ms, f32 8.6 -> 7.2
    /// ms (64 rows ahead: 6.7 and 7.5 ms; 512: as 256).
    const PREFETCH: usize = 256;
    /// Pixels per group: the AVX-512 kernel's accumulators (one vector each), the AVX2 one's (two each).
    const PX512: usize = 16;
    const PX256: usize = 6;
    /// Input rows per block: a block's weights (16 KB of f32) stay in L1 while each pixel group of the task
    /// passes over them, the partial sums kept between blocks. Without blocks every group read the panel's
    /// weights again from memory: the paper-size 24x24 -> 12x12 5x5 layer (144 pixels) took 9.5 ms,
    /// im2col + GEMM 8.7 ms.
    const KB: usize = 256;
    /// Pixel groups per task at most (their partial sums: 16 KB).
    const GROUPS: usize = 16;

    /// One panel of output channels at a range of pixel groups.
    struct Task<'a, W> {
        w: &'a NarrowWeights,
        /// The panel's.
        weights: *const W,
        kdim: usize,
        act: Activation,
        /// All of them, `ld` a row.
        cols: *const f32,
        ld: usize,
        panel: usize,
        groups: std::ops::Range<usize>,
        /// Pixels per group.
        px: usize,
    }

    #[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl")]
    unsafe fn task512<W: Weight>(t: &Task<W>, out: *mut f32, at: At) {
        t.blocks::<__m512, 1>(out, at, |t, blk| match blk.pixels {
            0..=4 => t.block::<__m512, 1, 4>(blk),
            5..=8 => t.block::<__m512, 1, 8>(blk),
            9..=12 => t.block::<__m512, 1, 12>(blk),
            _ => t.block::<__m512, 1, 16>(blk),
        })
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn task256<W: Weight>(t: &Task<W>, out: *mut f32, at: At) {
        t.blocks::<__m256, 2>(out, at, |t, blk| match blk.pixels {
            0..=2 => t.block::<__m256, 2, 2>(blk),
            3..=4 => t.block::<__m256, 2, 4>(blk),
            _ => t.block::<__m256, 2, 6>(blk),
        })
    }

    /// One pixel group's sums over one block of input rows.
    struct Block<'a> {
        rows: std::ops::Range<usize>,
        first: usize,
        pixels: usize,
        /// The group's partial sums between blocks ([pixel][CH], `px` of them).
        partial: &'a mut [[f32; CH]],
        out: *mut f32,
        at: At<'a>,
    }

    impl<W: Weight> Task<'_, W> {
        /// Each block of input rows by each pixel group, through `group` (a [`Task::block`] for the group's
        /// pixel count).
        #[inline(always)]
        unsafe fn blocks<S: Simd, const V: usize>(&self, out: *mut f32, at: At, group: impl Fn(&Self, Block)) {
            let mut partial = [[0f32; CH]; GROUPS * PX512];
            for k0 in (0..self.kdim).step_by(KB) {
                for (i, g) in self.groups.clone().enumerate() {
                    let first = g * self.px;
                    group(
                        self,
                        Block {
                            rows: k0..(k0 + KB).min(self.kdim),
                            first,
                            pixels: self.px.min(self.ld - first),
                            partial: &mut partial[i * self.px..(i + 1) * self.px],
                            out,
                            at,
                        },
                    );
                }
            }
        }

        /// `P` pixels (the group's, rounded up: the columns past it are read, never stored) by `V` vectors
        /// of output channels, over the block's input rows: from the bias on the first block, from the
        /// partial sums after; activated and stored in the output after the last.
        #[inline(always)]
        unsafe fn block<S: Simd, const V: usize, const P: usize>(&self, b: Block) {
            let all = S::first(S::LANES);
            let mut acc = [[S::splat(0.0); V]; P];
            let bias = self.w.bias[self.panel * CH..].as_ptr();
            for (row, partial) in acc.iter_mut().zip(b.partial.iter()) {
                let from = if b.rows.start == 0 { bias } else { partial.as_ptr() };
                for (v, a) in row.iter_mut().enumerate() {
                    *a = S::load::<false>(from.add(v * S::LANES), all);
                }
            }
            let cols = self.cols.add(b.first);
            for k in b.rows.clone() {
                if k % (64 / (CH * std::mem::size_of::<W>())).max(1) == 0 {
                    _mm_prefetch::<_MM_HINT_T0>(self.weights.wrapping_add((k + PREFETCH) * CH).cast());
                }
                let wv: [S; V] = std::array::from_fn(|v| W::load(self.weights.add(k * CH + v * S::LANES)));
                let x = cols.add(k * self.ld);
                for (i, row) in acc.iter_mut().enumerate() {
                    let xb = S::splat(*x.add(i));
                    for (a, wv) in row.iter_mut().zip(&wv) {
                        *a = a.fmadd(*wv, xb);
                    }
                }
            }
            let last = b.rows.end == self.kdim;
            for (row, t) in acc.iter_mut().zip(b.partial.iter_mut()) {
                if last {
                    self.act.apply_registers(row);
                }
                for (v, a) in row.iter().enumerate() {
                    a.store::<false>(t.as_mut_ptr().add(v * S::LANES), all);
                }
            }
            if last {
                // Back to NCHW: each pixel's channels scattered.
                let channels = CH.min(self.w.cout - self.panel * CH);
                for (i, t) in b.partial.iter().enumerate().take(b.pixels) {
                    for (c, &v) in t.iter().enumerate().take(channels) {
                        *b.out.add((b.at)(b.first + i, self.panel * CH + c)) = v;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_data as data;
    use candle_core::Device;

    /// Against candle's own convolution (with the bias and activations added there): stride 1 and 2,
    /// 3x3 and 5x5, 1x1 to 13x13 maps, batch 1 to 3 (pixel groups of 16 and 6 and their rounded-up tails,
    /// tasks of several groups: 338 pixels), output channels not a multiple of 16, 279 input rows (two blocks
    /// of partial sums); f32 weights to 1e-5, f16 weights within f16's rounding.
    #[test]
    fn matches_candle_conv() {
        let dev = Device::Cpu;
        for &(n, c, o, k, stride, h) in &[
            (1usize, 7usize, 20usize, 3usize, 1usize, 4usize),
            (1, 5, 16, 3, 1, 2),
            (3, 6, 33, 5, 1, 4),
            (1, 9, 17, 3, 2, 8),
            (2, 4, 5, 5, 2, 4),
            (1, 3, 40, 5, 1, 1),
            (1, 3, 18, 3, 1, 5),
            (2, 31, 20, 3, 1, 13),
        ] {
            let x = Tensor::from_vec(data(n * c * h * h, 1), (n, c, h, h), &dev).unwrap();
            let w = Tensor::from_vec(data(o * c * k * k, 2), (o, c, k, k), &dev).unwrap();
            let b = Tensor::from_vec(data(o, 3), o, &dev).unwrap();
            for half in [false, true] {
                let nw = NarrowWeights::new(&w, &b, half).unwrap();
                // The reference takes the weights as stored: f16-rounded ones for `half`.
                let wr = if half {
                    w.to_dtype(candle_core::DType::F16).unwrap().to_dtype(candle_core::DType::F32).unwrap()
                } else {
                    w.clone()
                };
                let pad = crate::Padding::symmetric(k / 2);
                let mut refs = crate::candle_reference(&x, &wr, &b, stride, pad, 1);
                let plain = refs[0].1.clone();
                refs.push((Activation::LeakyRelu(0.1), plain.maximum(&(&plain * 0.1).unwrap()).unwrap()));
                for (act, want) in refs {
                    let got = conv_narrow(&x, &nw, stride, act).unwrap();
                    assert_eq!(got.dims(), want.dims());
                    let (got, want): (Vec<f32>, Vec<f32>) =
                        (got.flatten_all().unwrap().to_vec1().unwrap(), want.flatten_all().unwrap().to_vec1().unwrap());
                    let mut outputs = vec![("op", got)];
                    // Every path this CPU has, called directly (the op takes the widest).
                    let g = Geom::new(x.dims(), &[o, c, k, k], stride, k / 2).unwrap();
                    let (hw, kdim) = (g.hw_out(), g.k());
                    let mut cols = vec![0f32; kdim * n * hw + OVERREAD];
                    g.im2col(&x.flatten_all().unwrap().to_vec1::<f32>().unwrap(), &mut cols[..kdim * n * hw], n * hw);
                    let mut out = vec![f32::NAN; n * o * hw];
                    portable(&nw, act, &cols, n * hw, &mut out, hw);
                    outputs.push(("portable", out));
                    #[cfg(target_arch = "x86_64")]
                    for wide in [false, true].into_iter().filter(|&w| {
                        crate::has_avx2_fma() && std::is_x86_feature_detected!("f16c") && (!w || crate::has_avx512())
                    }) {
                        let mut out = vec![f32::NAN; n * o * hw];
                        let at = |j: usize, ch: usize| ((j / hw) * o + ch) * hw + j % hw;
                        // SAFETY: features checked above; cols as the op makes it.
                        unsafe { x86::run(&nw, act, &cols, n * hw, &mut out, &at, wide) };
                        outputs.push((if wide { "avx512" } else { "avx2" }, out));
                    }
                    // Relative to the value where it exceeds 1: sums of 279 products reach 8, and the order of
                    // summation alone moves them by 1.1e-5 there.
                    for (what, got) in outputs {
                        for (i, (g, r)) in got.iter().zip(&want).enumerate() {
                            assert!(
                                (g - r).abs() < 1e-5 * r.abs().max(1.0),
                                "{what} {n}x{c}->{o} k{k} s{stride} {h}x{h} half {half} {act:?} [{i}]: {g} vs {r}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// Bad shapes are errors, not panics.
    #[test]
    fn bad_shapes_are_errors() {
        let dev = Device::Cpu;
        let z = |s: &[usize]| Tensor::zeros(s, candle_core::DType::F32, &dev).unwrap();
        assert!(NarrowWeights::new(&z(&[4, 3, 3, 2]), &z(&[4]), false).is_err());
        assert!(NarrowWeights::new(&z(&[4, 3, 3, 3]), &z(&[5]), false).is_err());
        let w = NarrowWeights::new(&z(&[4, 3, 3, 3]), &z(&[4]), true).unwrap();
        assert!(w.is_half());
        let err = conv_narrow(&z(&[1, 2, 4, 4]), &w, 1, Activation::Identity).unwrap_err().to_string();
        assert!(err.contains("channels"), "{err}");
        assert_eq!(conv_narrow(&z(&[0, 3, 4, 4]), &w, 1, Activation::Identity).unwrap().dims(), [0, 4, 4, 4]);
    }
}
