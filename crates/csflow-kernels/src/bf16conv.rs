//! Direct convolutions in bfloat16 pairs (`vdpbf16ps`), for inference in `Precision::Bf16` where neither
//! Winograd nor the narrow products apply: the flow's stride-2 convolutions onto the paper size's 12x12 maps,
//! and onto smaller maps in batches, which in f32 went through im2col and the f32 product at 270-330 GFLOPS.
//!
//! The weights are rounded to bfloat16 once and stored as pairs of input channels for each tap, in strips of
//! [`STRIP`] output channels (`[strip][⌈C / 2⌉][k·k][64]`, channel 2c in each u32's low half, 2c + 1 in its
//! high half); the input is rounded once into the same pairs, padded by k / 2. The products put 16 output
//! channels in each register and broadcast the input's pair for each of [`GROUP`] output pixels straight from
//! the padded planes: no im2col (which with its pairing took as long as the products, 14 MB of columns for a
//! 5x5 1024 -> 304 layer onto 12x12), and every lane useful on maps of 36 pixels. Each multiply-add sums two
//! products in f32: a plain direct sum of bfloat16 operands, no transform amplifying their rounding (a
//! relative error of at most 2^-8 per product).

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::conv::Geom;
use crate::{f32_slice, Activation};

/// Output channels per strip: four registers of 16.
const STRIP: usize = 64;
/// Output pixels per micro-kernel call: with four registers of weights, 20 accumulators. With six (24) the
/// compiler kept one accumulator on the stack, loaded and stored at every multiply-add (3x3 1024 -> 304,
/// 24x24 -> 12x12: 1.44 ms against 1.14 with five).
const GROUP: usize = 5;
/// Pairs of input channels per slice: a strip's weights for a slice (64 pairs, 3x3: 147 KB, 5x5: 410 KB)
/// stay in L2 while the task's pixel groups pass over them (32 and 128 ran slower).
const KB: usize = 64;
/// Output pixels per task at most (eight groups): tasks by sample, strip and run of pixels, so that the
/// paper's 304 output channels onto 12x12 (five strips) spread over threads.
const PIXELS: usize = 40;

/// A convolution's weight [O, C, k, k] rounded to bfloat16 and packed in pairs of input channels, with its
/// bias.
#[derive(Clone, Debug)]
pub struct Bf16Weights {
    /// `[strip][pairs][k·k][width]`: channels 2c (low half) and 2c + 1 (high half, zero past the last) at one
    /// tap for each output channel of the strip; width 64, the last strip's padded with zeros to 16s.
    packed: Vec<u32>,
    bias: Vec<f32>,
    cout: usize,
    cin: usize,
    k: usize,
}

impl Bf16Weights {
    /// From a square weight `[O, C, k, k]` and a bias `[O]` (kept in f32).
    pub fn new(weight: &Tensor, bias: &Tensor) -> Result<Self> {
        let ([cout, cin, k], w) = crate::conv::square_weight("bf16 conv", weight, bias)?;
        let (pairs, kk) = (cin.div_ceil(2), k * k);
        let mut packed = vec![0u32; cout.next_multiple_of(16) * pairs * kk];
        for o in 0..cout {
            let (at, width) = Self::strip(cout, pairs * kk, o);
            for c in 0..pairs {
                for tap in 0..kk {
                    let hi = if 2 * c + 1 < cin { w[((o * cin) + 2 * c + 1) * kk + tap] } else { 0.0 };
                    packed[at + (c * kk + tap) * width + o % STRIP] = pair(w[(o * cin + 2 * c) * kk + tap], hi);
                }
            }
        }
        Ok(Self { packed, bias: bias.to_vec1()?, cout, cin, k })
    }

    /// Where output channel o's strip starts in `packed` and its width, for `per` (pairs x taps) per channel.
    fn strip(cout: usize, per: usize, o: usize) -> (usize, usize) {
        let o0 = o / STRIP * STRIP;
        (o0 * per, STRIP.min(cout.next_multiple_of(16) - o0))
    }

    /// Output channel o's rounded weight for input channel c at tap `tap`.
    fn weight(&self, o: usize, c: usize, tap: usize) -> f32 {
        let kk = self.k * self.k;
        let (at, width) = Self::strip(self.cout, self.cin.div_ceil(2) * kk, o);
        let (lo, hi) = unpair(self.packed[at + (c / 2 * kk + tap) * width + o % STRIP]);
        if c.is_multiple_of(2) {
            lo
        } else {
            hi
        }
    }
}

/// Two values rounded to bfloat16 (to nearest even), `lo` in the low half.
fn pair(lo: f32, hi: f32) -> u32 {
    let bits = |v: f32| half::bf16::from_f32(v).to_bits() as u32;
    bits(lo) | bits(hi) << 16
}

/// The two values of a pair, widened.
fn unpair(p: u32) -> (f32, f32) {
    (f32::from_bits(p << 16), f32::from_bits(p & 0xFFFF_0000))
}

/// `act(F.conv2d(x, w, b, stride, padding=k // 2))` for x [N, C, H, W] with the weights and x rounded to
/// bfloat16 and the products summed in f32; no gradients. Without AVX512_BF16 the same rounded operands are
/// multiplied in f32 (slowly: a reference, not a fast path).
pub fn conv_bf16(x: &Tensor, w: &Bf16Weights, stride: usize, act: Activation) -> Result<Tensor> {
    x.contiguous()?.apply_op1_no_bwd(&Bf16Conv { w, stride, act })
}

struct Bf16Conv<'a> {
    w: &'a Bf16Weights,
    stride: usize,
    act: Activation,
}

impl CustomOp1 for Bf16Conv<'_> {
    fn name(&self) -> &'static str {
        "csflow-bf16-conv"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(xs, xl, self.name())?;
        let w = self.w;
        let (g, n, hw, shape) = Geom::square(xl.dims(), [w.cout, w.cin, w.k], self.stride)?;
        // Every output value is written by either path.
        let mut out = crate::uninit(n * w.cout * hw);
        if n * hw == 0 || w.cout == 0 {
            return Ok((CpuStorage::F32(out), shape));
        }
        #[cfg(target_arch = "x86_64")]
        if crate::has_avx512_bf16() {
            let (h, wd) = (xl.dims()[2], xl.dims()[3]);
            // SAFETY: AVX512_BF16 with AVX512F/BW/VL checked; x holds n·cin·h·wd values and out n·cout·hw.
            unsafe { x86::run(w, self.act, x, (n, h, wd), (self.stride, g.ho, g.wo), &mut out) };
            return Ok((CpuStorage::F32(out), shape));
        }
        portable(w, self.act, &g.columns(x, n, 0), (n, hw), &mut out);
        Ok((CpuStorage::F32(out), shape))
    }
}

/// Without AVX512_BF16: direct sums of the rounded operands per output value, over im2col's columns.
fn portable(w: &Bf16Weights, act: Activation, cols: &[f32], (n, hw): (usize, usize), out: &mut [f32]) {
    let (kk, kdim, cols_n) = (w.k * w.k, w.cin * w.k * w.k, n * hw);
    let round = |v: f32| half::bf16::from_f32(v).to_f32();
    out.par_chunks_mut(hw).enumerate().for_each(|(idx, plane)| {
        let (s, o) = (idx / w.cout, idx % w.cout);
        let row: Vec<f32> = (0..kdim).map(|r| w.weight(o, r / kk, r % kk)).collect();
        for (p, y) in plane.iter_mut().enumerate() {
            let j = s * hw + p;
            let sum = (0..kdim).fold(w.bias[o], |acc, r| acc + row[r] * round(cols[r * cols_n + j]));
            *y = act.apply(sum);
        }
    });
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::*;
    use crate::gemm::SendPtr;

    /// The input as bfloat16 pairs of channels, each plane padded by `p` zeros: [n][⌈C / 2⌉][h + 2p][w + 2p].
    #[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl,avx512bf16")]
    unsafe fn padded_pairs(x: &[f32], cin: usize, (n, h, w): (usize, usize, usize), p: usize) -> Vec<u32> {
        let (pairs, hp, wp) = (cin.div_ceil(2), h + 2 * p, w + 2 * p);
        let mut out = vec![0u32; n * pairs * hp * wp];
        out.par_chunks_mut(hp * wp).enumerate().for_each(|(plane, o)| {
            let (s, c) = (plane / pairs, plane % pairs);
            let channel = |i: usize| &x[(s * cin + i) * h * w..][..h * w];
            let (a, b) = (channel(2 * c), (2 * c + 1 < cin).then(|| channel(2 * c + 1)));
            for y in 0..h {
                let row = &mut o[(y + p) * wp + p..][..w];
                // SAFETY: as this function's; the row has room for w pairs.
                unsafe { crate::microkernel::pair_row(&a[y * w..][..w], b.map(|b| &b[y * w..][..w]), row) };
            }
        });
        out
    }

    /// Every task: `PIXELS` output pixels of one sample by one strip of output channels, over slices of
    /// `KB` pairs of input channels, then the bias and activation on the way out.
    ///
    /// # Safety
    /// The CPU supports AVX512_BF16 (with AVX512F, BW and VL); x holds n·cin·h·w values and out n·cout·ho·wo.
    #[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl,avx512bf16")]
    pub(super) unsafe fn run(
        w: &Bf16Weights,
        act: Activation,
        x: &[f32],
        (n, h, wd): (usize, usize, usize),
        (stride, ho, wo): (usize, usize, usize),
        out: &mut [f32],
    ) {
        let (k, p, hw) = (w.k, w.k / 2, ho * wo);
        assert!(x.len() >= n * w.cin * h * wd && out.len() >= n * w.cout * hw);
        let (pairs, kk, wp) = (w.cin.div_ceil(2), k * k, wd + 2 * p);
        let plane = (h + 2 * p) * wp;
        let xp = padded_pairs(x, w.cin, (n, h, wd), p);
        let taps: Vec<usize> = (0..kk).map(|t| t / k * wp + t % k).collect();
        let (strips, runs) = (w.cout.div_ceil(STRIP), hw.div_ceil(PIXELS));
        let dst = SendPtr(out.as_mut_ptr());
        (0..n * strips * runs).into_par_iter().for_each(|task| {
            let dst = &dst;
            let (s, strip, run) = (task / (strips * runs), task / runs % strips, task % runs);
            let o0 = strip * STRIP;
            let (at, width) = Bf16Weights::strip(w.cout, pairs * kk, o0);
            let (p0, p1) = (run * PIXELS, hw.min(run * PIXELS + PIXELS));
            // Partial sums [pixel][width] of this task, across slices.
            let mut acc = vec![0f32; (p1 - p0) * width];
            for c0 in (0..pairs).step_by(KB) {
                let call = Call {
                    u: w.packed[at + c0 * kk * width..].as_ptr(),
                    width,
                    x: xp[(s * pairs + c0) * plane..].as_ptr(),
                    plane,
                    pairs: KB.min(pairs - c0),
                    taps: &taps,
                    first: c0 == 0,
                };
                for g0 in (p0..p1).step_by(GROUP) {
                    let mut offsets = [0usize; GROUP];
                    for (t, o) in offsets.iter_mut().enumerate().take(p1.min(g0 + GROUP) - g0) {
                        let (oy, ox) = ((g0 + t) / wo, (g0 + t) % wo);
                        *o = stride * oy * wp + stride * ox;
                    }
                    // SAFETY: the strip's slice holds pairs x taps rows of width; every offset plus tap stays
                    // in the padded plane (stride·(ho - 1) + k - 1 < h + 2p); acc has room for the group.
                    unsafe { call.run(&offsets, p1.min(g0 + GROUP) - g0, acc[(g0 - p0) * width..].as_mut_ptr()) };
                }
            }
            let rows = width.min(w.cout - o0);
            for (i, sums) in acc.chunks_exact(width).enumerate() {
                for (r, v) in sums[..rows].iter().enumerate() {
                    // SAFETY: task (s, strip, run) alone writes channels o0..o0 + rows at pixels p0..p1.
                    unsafe { *dst.0.add((s * w.cout + o0 + r) * hw + p0 + i) = act.apply(v + w.bias[o0 + r]) };
                }
            }
        });
    }

    /// One slice of a strip's products: the weights of `pairs` channel pairs from `u` (rows of `width`), the
    /// input's planes from `x` (`plane` apart), tap offsets within a plane.
    struct Call<'a> {
        u: *const u32,
        width: usize,
        x: *const u32,
        plane: usize,
        pairs: usize,
        taps: &'a [usize],
        first: bool,
    }

    impl Call<'_> {
        /// The group's pixels (their offsets in a plane; `group` of them real) into acc [group][width].
        #[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl,avx512bf16")]
        unsafe fn run(&self, offsets: &[usize; GROUP], group: usize, acc: *mut f32) {
            macro_rules! pixels {
                ($v:literal) => {
                    match group {
                        1 => self.kernel::<$v, 1>(offsets, acc),
                        2 => self.kernel::<$v, 2>(offsets, acc),
                        3 => self.kernel::<$v, 3>(offsets, acc),
                        4 => self.kernel::<$v, 4>(offsets, acc),
                        _ => self.kernel::<$v, 5>(offsets, acc),
                    }
                };
            }
            match self.width / 16 {
                1 => pixels!(1),
                2 => pixels!(2),
                3 => pixels!(3),
                _ => pixels!(4),
            }
        }

        /// `V` registers of output channels by `G` pixels.
        #[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl,avx512bf16")]
        unsafe fn kernel<const V: usize, const G: usize>(&self, offsets: &[usize; GROUP], acc: *mut f32) {
            let mut sums = [[_mm512_setzero_ps(); V]; G];
            if !self.first {
                for (t, row) in sums.iter_mut().enumerate() {
                    for (r, a) in row.iter_mut().enumerate() {
                        *a = _mm512_loadu_ps(acc.add(t * self.width + 16 * r));
                    }
                }
            }
            let kk = self.taps.len();
            for c in 0..self.pairs {
                let x = self.x.add(c * self.plane);
                for (i, &tap) in self.taps.iter().enumerate() {
                    let u = self.u.add((c * kk + i) * self.width);
                    let mut uv = [_mm512_setzero_si512(); V];
                    for (r, v) in uv.iter_mut().enumerate() {
                        *v = _mm512_loadu_si512(u.add(16 * r).cast());
                    }
                    for (t, row) in sums.iter_mut().enumerate() {
                        let b = _mm512_set1_epi32(*x.add(offsets[t] + tap) as i32);
                        let b = std::mem::transmute::<__m512i, __m512bh>(b);
                        for (a, v) in row.iter_mut().zip(&uv) {
                            *a = _mm512_dpbf16_ps(*a, std::mem::transmute::<__m512i, __m512bh>(*v), b);
                        }
                    }
                }
            }
            for (t, row) in sums.iter().enumerate() {
                for (r, a) in row.iter().enumerate() {
                    _mm512_storeu_ps(acc.add(t * self.width + 16 * r), *a);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;
    use crate::{candle_reference, test_data as data, Padding};

    fn tensor(v: Vec<f32>, shape: &[usize]) -> Tensor {
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn bf16(v: Vec<f32>) -> Vec<f32> {
        v.into_iter().map(|v| half::bf16::from_f32(v).to_f32()).collect()
    }

    /// The path CPUs without AVX512_BF16 take, on any CPU.
    fn portable_conv(x: &Tensor, w: &Bf16Weights, stride: usize, act: Activation) -> Vec<f32> {
        let (g, n, hw, _) = Geom::square(x.dims(), [w.cout, w.cin, w.k], stride).unwrap();
        let cols = g.columns(&x.flatten_all().unwrap().to_vec1::<f32>().unwrap(), n, 0);
        let mut out = vec![f32::NAN; n * w.cout * hw];
        portable(w, act, &cols, (n, hw), &mut out);
        out
    }

    /// Shapes with odd channel counts (a last half pair), two slices of KB pairs (151 channels: 64 + 12
    /// pairs), two strips of output channels (70: 64 + 6 in a padded vector) and partial vectors of 16, runs
    /// of PIXELS past the first (40x40, and 20x20 in a batch of two) and partial groups of 5 (7x7, 6x6, 5x5
    /// outputs), batches of two and three, strides 1 and 2, 1x1 and 5x5 kernels.
    const CASES: [(usize, usize, usize, usize, usize, usize); 8] = [
        // (n, cin, cout, size, k, stride)
        (1, 3, 5, 7, 3, 1),
        (2, 5, 18, 20, 3, 1),
        (2, 80, 21, 11, 3, 2),
        (1, 6, 40, 40, 3, 1),
        (2, 33, 17, 9, 5, 2),
        (1, 64, 9, 24, 5, 2),
        (3, 7, 19, 6, 1, 1),
        (1, 151, 70, 9, 3, 2),
    ];

    /// With operands that bfloat16 holds exactly, the products are exact and only the f32 sums differ from
    /// candle's convolution of the same values (biases and activations included).
    #[test]
    fn exact_operands_give_candle_convolution() {
        for (i, &(n, cin, cout, size, k, stride)) in CASES.iter().enumerate() {
            let x = tensor(bf16(data(n * cin * size * size, i)), &[n, cin, size, size]);
            let wt = tensor(bf16(data(cout * cin * k * k, i + 10)), &[cout, cin, k, k]);
            let b = tensor(data(cout, i + 20), &[cout]);
            let w = Bf16Weights::new(&wt, &b).unwrap();
            let p = k / 2;
            let pad = Padding { top: p, bottom: p, left: p, right: p };
            for (act, want) in candle_reference(&x, &wt, &b, stride, pad, 1) {
                let got = conv_bf16(&x, &w, stride, act).unwrap();
                assert_eq!(got.dims(), want.dims(), "case {i}");
                let fallback = tensor(portable_conv(&x, &w, stride, act), want.dims());
                let scale = want.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                for (path, got) in [("dispatched", got), ("portable", fallback)] {
                    let diff = (got - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                    assert!(diff <= 1e-5 * scale.max(1.0), "case {i} {path} {act:?}: max diff {diff} ({scale})");
                }
            }
        }
    }

    /// With any operands, each output is within the rounding's bound of the f32 convolution: two roundings to
    /// 8 significant bits per product (2^-8 of Σ |w·x|), plus the f32 sums'.
    #[test]
    fn rounding_stays_within_its_bound() {
        for (i, &(n, cin, cout, size, k, stride)) in CASES.iter().enumerate() {
            let x = tensor(data(n * cin * size * size, i + 30), &[n, cin, size, size]);
            let wt = tensor(data(cout * cin * k * k, i + 40), &[cout, cin, k, k]);
            let b = Tensor::zeros(cout, candle_core::DType::F32, &Device::Cpu).unwrap();
            let w = Bf16Weights::new(&wt, &b).unwrap();
            let p = k / 2;
            let pad = Padding { top: p, bottom: p, left: p, right: p };
            let (_, want) = candle_reference(&x, &wt, &b, stride, pad, 1).remove(0);
            let (_, bound) = candle_reference(&x.abs().unwrap(), &wt.abs().unwrap(), &b, stride, pad, 1).remove(0);
            let got = conv_bf16(&x, &w, stride, Activation::Identity).unwrap();
            let err = (got - &want).unwrap().abs().unwrap();
            let slack = ((bound * (2f64.powi(-8) + 1e-6)).unwrap() + 1e-6).unwrap();
            let over = err.gt(&slack).unwrap().to_dtype(candle_core::DType::F32).unwrap().sum_all().unwrap();
            assert_eq!(over.to_scalar::<f32>().unwrap(), 0.0, "case {i}: outputs past the rounding bound");
            // And the rounding is real: bfloat16 operands do move the sums.
            let moved = err.max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(moved > 1e-5, "case {i}: no rounding seen ({moved})");
        }
    }
}
