//! Convolutions as im2col products in bfloat16 pairs (`vdpbf16ps`), for inference in `Precision::Bf16`
//! where neither Winograd nor the narrow products apply: the flow's stride-2 convolutions onto 12x12 maps at
//! the paper's size, which in f32 went through im2col and the f32 product at 270-330 GFLOPS.
//!
//! The weights are rounded to bfloat16 once and stored as pairs of input taps (`[O][⌈C·k·k / 2⌉]`, tap 2p
//! in each u32's low half, 2p + 1 in its high half), the im2col columns are rounded as they are paired,
//! and each multiply-add sums two products in f32. A plain direct sum of bfloat16 operands: no transform
//! amplifies their rounding (a relative error of at most 2^-8 per product).

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::conv::Geom;
use crate::{f32_slice, Activation};

/// Output channels per task: two of the micro-kernel's panels of 8.
const ROWS: usize = 16;
/// Input tap pairs per slice: a task's weights (16 x 256 pairs, 16 KB) stay in L1 and the slice of columns
/// (256 pairs x at most [`COLS`], 256 KB) in L2 while the products pass over them.
const KC: usize = 256;
/// Output pixels per task at most (a multiple of the micro-kernel's 32).
const COLS: usize = 256;

/// A convolution's weight [O, C, k, k] rounded to bfloat16 and packed in pairs of taps, with its bias.
#[derive(Clone, Debug)]
pub struct Bf16Weights {
    /// `[O][pairs]`: taps 2p (low half) and 2p + 1 (high half, zero past the last) of each output channel.
    pairs: Vec<u32>,
    bias: Vec<f32>,
    cout: usize,
    cin: usize,
    k: usize,
}

impl Bf16Weights {
    /// From a square weight `[O, C, k, k]` and a bias `[O]` (kept in f32).
    pub fn new(weight: &Tensor, bias: &Tensor) -> Result<Self> {
        let ([cout, cin, k], w) = crate::conv::square_weight("bf16 conv", weight, bias)?;
        let kdim = cin * k * k;
        let pairs = w
            .chunks_exact(kdim)
            .flat_map(|row| row.chunks(2).map(|p| pair(p[0], p.get(1).copied().unwrap_or(0.0))))
            .collect();
        Ok(Self { pairs, bias: bias.to_vec1()?, cout, cin, k })
    }

    /// Pairs per output channel.
    fn ld(&self) -> usize {
        (self.cin * self.k * self.k).div_ceil(2)
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
        let (cols_n, kdim) = (n * hw, g.k());
        let mut out = crate::uninit(n * w.cout * hw);
        if cols_n == 0 || w.cout == 0 {
            return Ok((CpuStorage::F32(out), shape));
        }
        let cols = g.columns(x, n, 0);
        #[cfg(target_arch = "x86_64")]
        if crate::has_avx512_bf16() {
            // SAFETY: AVX512_BF16 with AVX512F/BW/VL checked; cols holds kdim rows of cols_n values.
            let v = unsafe { crate::microkernel::to_pairs(&cols, kdim, cols_n, cols_n) };
            drop(cols);
            // SAFETY: as above; v holds ⌈kdim / 2⌉ rows of cols_n pairs and out n·cout·hw values.
            unsafe { x86::run(w, self.act, &v, (n, hw), &mut out) };
            return Ok((CpuStorage::F32(out), shape));
        }
        portable(w, self.act, &cols, (n, hw), &mut out);
        Ok((CpuStorage::F32(out), shape))
    }
}

/// Without AVX512_BF16: direct sums of the rounded operands per output value.
fn portable(w: &Bf16Weights, act: Activation, cols: &[f32], (n, hw): (usize, usize), out: &mut [f32]) {
    let (ld, kdim, cols_n) = (w.ld(), w.cin * w.k * w.k, n * hw);
    let round = |v: f32| half::bf16::from_f32(v).to_f32();
    out.par_chunks_mut(hw).enumerate().for_each(|(idx, plane)| {
        let (s, o) = (idx / w.cout, idx % w.cout);
        let row = &w.pairs[o * ld..][..ld];
        for (p, y) in plane.iter_mut().enumerate() {
            let j = s * hw + p;
            let sum = (0..kdim).fold(w.bias[o], |acc, r| {
                let (lo, hi) = unpair(row[r / 2]);
                let weight = if r % 2 == 0 { lo } else { hi };
                acc + weight * round(cols[r * cols_n + j])
            });
            *y = act.apply(sum);
        }
    });
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::*;
    use crate::gemm::SendPtr;
    use crate::microkernel::{products, Bf16x16};

    /// The products of every task: `ROWS` output channels by up to `COLS` pixels of one sample, over slices
    /// of `KC` pairs, each finished with its bias and activation while in cache.
    ///
    /// # Safety
    /// The CPU supports AVX512_BF16 (with AVX512F, BW and VL); v holds ⌈C·k·k / 2⌉ rows of n·hw pairs and
    /// out n·cout·hw values.
    #[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl,avx512bf16")]
    pub(super) unsafe fn run(w: &Bf16Weights, act: Activation, v: &[u32], (n, hw): (usize, usize), out: &mut [f32]) {
        let (ld, cols_n) = (w.ld(), n * hw);
        assert!(v.len() >= ld * cols_n && out.len() >= n * w.cout * hw);
        let (groups, blocks) = (w.cout.div_ceil(ROWS), hw.div_ceil(COLS));
        let dst = SendPtr(out.as_mut_ptr());
        (0..groups * n * blocks).into_par_iter().for_each(|t| {
            let dst = &dst;
            let (g, s, b) = (t / (n * blocks), t / blocks % n, t % blocks);
            let (o0, c0) = (g * ROWS, b * COLS);
            let (rows, width) = (ROWS.min(w.cout - o0), COLS.min(hw - c0));
            // SAFETY: task t alone writes rows o0..o0 + rows, columns c0..c0 + width of sample s's
            // [cout][hw] output; u, v and m hold what the products read and write (asserted above).
            unsafe {
                let m = dst.0.add((s * w.cout + o0) * hw + c0);
                let u = w.pairs.as_ptr().add(o0 * ld);
                let v = v.as_ptr().add(s * hw + c0);
                task(u, ld, v, cols_n, m, hw, (rows, width));
                for r in 0..rows {
                    let row = std::slice::from_raw_parts_mut(m.add(r * hw), width);
                    act.apply_slice_with_bias(row, w.bias[o0 + r]);
                }
            }
        });
    }

    /// m [rows][width] (rows `ldm` apart) = u [rows][ld] · v [ld][width] (rows `ldv` apart), in slices of KC.
    #[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl,avx512bf16")]
    unsafe fn task(
        u: *const u32,
        ld: usize,
        v: *const u32,
        ldv: usize,
        m: *mut f32,
        ldm: usize,
        (rows, width): (usize, usize),
    ) {
        for k0 in (0..ld).step_by(KC) {
            let kc = KC.min(ld - k0);
            products::<Bf16x16>(u.add(k0), ld, v.add(k0 * ldv), m, (ldv, ldm), (kc, rows, k0 == 0, width));
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

    /// Shapes with an odd tap count (3·3·3: a last half pair), slices of KC pairs with a partial last one
    /// (80·9 taps: 360 pairs; 64·25: 800), partial panels of 8 and groups of 16 output channels, columns past
    /// one task's COLS (40x40, and 20x20 in a batch of two), partial strips of 32 (7x7, 6x6), batches of two
    /// and three, strides 1 and 2, 1x1 and 5x5 kernels.
    const CASES: [(usize, usize, usize, usize, usize, usize); 7] = [
        // (n, cin, cout, size, k, stride)
        (1, 3, 5, 7, 3, 1),
        (2, 5, 18, 20, 3, 1),
        (2, 80, 21, 11, 3, 2),
        (1, 6, 40, 40, 3, 1),
        (2, 33, 17, 9, 5, 2),
        (1, 64, 9, 24, 5, 2),
        (3, 7, 19, 6, 1, 1),
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
