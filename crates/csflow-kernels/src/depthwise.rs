//! Depthwise 2-d convolution (one filter per channel) with asymmetric zero padding and a fused
//! bias + activation epilogue, for inference. candle runs depthwise convolutions as grouped
//! convolutions, about 78x slower than PyTorch on CPU (SPEC section 5).

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

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
        if wc != c || one != 1 || b.len() != c {
            candle_core::bail!("depthwise conv: {c} channels but weight {:?} and bias {}", wl.dims(), b.len());
        }
        let (s, p) = (self.stride, self.pad);
        let (ph, pw) = (h + p.top + p.bottom, wd + p.left + p.right);
        if s == 0 || ph < kh || pw < kw {
            candle_core::bail!("depthwise conv: kernel {kh}x{kw} does not fit input {h}x{wd} with padding {p:?}");
        }
        let (ho, wo) = ((ph - kh) / s + 1, (pw - kw) / s + 1);
        // The padded plane is split into `s` column phases (phase q holds padded columns q, q + s, ...), so
        // every tap of every stride reads a contiguous window: tap (ky, kx) of output row oy starts at
        // phase kx % s, row oy * s + ky, column kx / s.
        let pws = pw.div_ceil(s);
        let taps: Vec<usize> = (0..kh * kw).map(|t| (t % kw % s) * ph * pws + (t / kw) * pws + t % kw / s).collect();
        let act = self.act;
        let mut out = crate::uninit(n * c * ho * wo);
        out.par_chunks_mut(ho * wo).enumerate().for_each_init(
            // Zeroed once: the interior is overwritten for every plane, the border and the slack stay zero.
            || vec![0f32; s * ph * pws + LANES],
            |buf, (plane_idx, o)| {
                let ch = plane_idx % c;
                let src = &x[plane_idx * h * wd..(plane_idx + 1) * h * wd];
                for (y, row) in src.chunks_exact(wd).enumerate() {
                    let y = (y + p.top) * pws;
                    if s == 1 {
                        buf[y + p.left..y + p.left + wd].copy_from_slice(row);
                    } else if s == 2 {
                        // A deinterleave in pairs (vectorised) instead of two strided gathers.
                        let (phase0, phase1) = buf.split_at_mut(ph * pws);
                        let (first, second) = (y + p.left / 2, y + (p.left + 1) / 2);
                        let (evens, odds) = if p.left % 2 == 0 {
                            (&mut phase0[first..], &mut phase1[second..])
                        } else {
                            (&mut phase1[first..], &mut phase0[second..])
                        };
                        for ((pair, e), o) in row.chunks_exact(2).zip(evens.iter_mut()).zip(odds.iter_mut()) {
                            *e = pair[0];
                            *o = pair[1];
                        }
                        if wd % 2 == 1 {
                            evens[wd / 2] = row[wd - 1];
                        }
                    } else {
                        for q in 0..s {
                            // The first input column that lands in phase q, and its place there.
                            let first = (q + s - p.left % s) % s;
                            let count = wd.saturating_sub(first).div_ceil(s);
                            let dst = &mut buf[q * ph * pws + y + (first + p.left) / s..][..count];
                            for (i, d) in dst.iter_mut().enumerate() {
                                *d = row[first + i * s];
                            }
                        }
                    }
                }
                let plane = Plane { buf, taps: &taps, filt: &w[ch * kh * kw..(ch + 1) * kh * kw], row_step: s * pws };
                plane.convolve(b[ch], act, wo, o);
            },
        );
        Ok((CpuStorage::F32(out), Shape::from((n, c, ho, wo))))
    }
}

/// Outputs kept in registers while all kernel taps accumulate.
const LANES: usize = 16;

/// One channel's padded input (in column phases) and what each output row reads of it.
struct Plane<'a> {
    buf: &'a [f32],
    /// Offset of each tap's window from the start of output row 0.
    taps: &'a [usize],
    filt: &'a [f32],
    /// Offset between consecutive output rows' windows.
    row_step: usize,
}

impl Plane<'_> {
    fn convolve(&self, bias: f32, act: Activation, wo: usize, out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if crate::has_avx2_fma() {
            // SAFETY: the CPU supports AVX2 and FMA (checked at run time).
            return unsafe { self.convolve_avx2(bias, act, wo, out) };
        }
        self.convolve_lanes::<false>(bias, act, wo, out)
    }

    /// [`Plane::convolve_lanes`] compiled for AVX2 + FMA, chosen at run time so one binary runs on any x86-64.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn convolve_avx2(&self, bias: f32, act: Activation, wo: usize, out: &mut [f32]) {
        self.convolve_lanes::<true>(bias, act, wo, out)
    }

    /// Accumulates LANES outputs at a time over every tap in registers, applies the activation there and
    /// stores them once: one vector FMA per tap instead of a load-FMA-store pass over the row. Rows narrower
    /// than LANES (most of a 64 px extraction) take half-width blocks; blocks read past the row end into the
    /// next row or the buffer's slack and store only the row's part.
    #[inline(always)]
    fn convolve_lanes<const FMA: bool>(&self, bias: f32, act: Activation, wo: usize, out: &mut [f32]) {
        for (oy, out_row) in out.chunks_exact_mut(wo).enumerate() {
            let base = oy * self.row_step;
            let mut x0 = 0;
            while x0 < wo {
                let width = LANES.min(wo - x0);
                let dst = &mut out_row[x0..x0 + width];
                if width > LANES / 2 {
                    self.block::<LANES, FMA>(base + x0, bias, act, dst);
                } else {
                    self.block::<{ LANES / 2 }, FMA>(base + x0, bias, act, dst);
                }
                x0 += width;
            }
        }
    }

    /// N outputs whose windows start at `start` (+ each tap's offset); the first `out.len()` are stored.
    #[inline(always)]
    fn block<const N: usize, const FMA: bool>(&self, start: usize, bias: f32, act: Activation, out: &mut [f32]) {
        let mut acc = [bias; N];
        for (&off, &wv) in self.taps.iter().zip(self.filt) {
            let src: &[f32; N] = self.buf[start + off..start + off + N].try_into().expect("N-wide window");
            for l in 0..N {
                acc[l] = crate::madd::<FMA>(wv, src[l], acc[l]);
            }
        }
        let acc = &mut acc[..out.len()];
        act.apply_lanes::<FMA>(acc);
        out.copy_from_slice(acc);
    }
}

/// Depthwise convolution x [N, C, H, W] * w [C, 1, k, k] + b [C], then `act`. Inference only.
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
    /// enough for full LANES blocks and a partial one, strides 1-3, odd and even sizes.
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
            for (h, w) in [(9, 8), (7, 41)] {
                let (n, c) = (2, 5);
                let x = Tensor::from_vec(data(n * c * h * w, 1), (n, c, h, w), &dev).unwrap();
                let wt = Tensor::from_vec(data(c * k * k, 2), (c, 1, k, k), &dev).unwrap();
                let b = Tensor::from_vec(data(c, 3), c, &dev).unwrap();
                let xp =
                    x.pad_with_zeros(2, pad.top, pad.bottom).unwrap().pad_with_zeros(3, pad.left, pad.right).unwrap();
                let plain =
                    xp.conv2d(&wt, 0, s, 1, c).unwrap().broadcast_add(&b.reshape((1, c, 1, 1)).unwrap()).unwrap();
                for (act, theirs) in [
                    (Activation::Identity, plain.clone()),
                    (Activation::Swish, plain.silu().unwrap()),
                    (Activation::Relu6, plain.clamp(0f32, 6f32).unwrap()),
                ] {
                    let ours = depthwise_conv2d(&x, &wt, &b, s, pad, act).unwrap();
                    assert_eq!(ours.dims(), theirs.dims());
                    let d: f32 = (ours - theirs).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap();
                    assert!(d < 1e-5, "k {k} s {s} {h}x{w} {act:?}: {d}");
                }
            }
        }
    }

    /// A map with no columns is refused with an error, not a panic.
    #[test]
    fn empty_input_is_an_error() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((1, 2, 3, 0), candle_core::DType::F32, &dev).unwrap();
        let w = Tensor::zeros((2, 1, 3, 3), candle_core::DType::F32, &dev).unwrap();
        let b = Tensor::zeros(2, candle_core::DType::F32, &dev).unwrap();
        let err = depthwise_conv2d(&x, &w, &b, 1, Padding::symmetric(1), Activation::Identity).unwrap_err();
        assert!(err.to_string().contains("empty input 3x0"), "{err}");
    }
}
