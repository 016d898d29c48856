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
        if wc != c || one != 1 || b.len() != c {
            candle_core::bail!("depthwise conv: {c} channels but weight {:?} and bias {}", wl.dims(), b.len());
        }
        let (s, p) = (self.stride, self.pad);
        let (ph, pw) = (h + p.top + p.bottom, wd + p.left + p.right);
        if s == 0 || ph < kh || pw < kw {
            candle_core::bail!("depthwise conv: kernel {kh}x{kw} does not fit input {h}x{wd} with padding {p:?}");
        }
        let (ho, wo) = ((ph - kh) / s + 1, (pw - kw) / s + 1);
        // Every element is written below, so the buffer skips zeroing (8.8 MB for a 240x96x96 map).
        let mut out: Vec<f32> = Vec::with_capacity(n * c * ho * wo);
        let act = self.act;
        out.spare_capacity_mut()[..n * c * ho * wo].par_chunks_mut(ho * wo).enumerate().for_each_init(
            || (vec![0f32; ph * pw], vec![0f32; wo]),
            |(padded, acc), (plane_idx, o)| {
                let ch = plane_idx % c;
                let src = &x[plane_idx * h * wd..(plane_idx + 1) * h * wd];
                for y in 0..h {
                    padded[(y + p.top) * pw + p.left..(y + p.top) * pw + p.left + wd]
                        .copy_from_slice(&src[y * wd..(y + 1) * wd]);
                }
                let filt = &w[ch * kh * kw..(ch + 1) * kh * kw];
                for oy in 0..ho {
                    let rows = &padded[oy * s * pw..];
                    if s == 1 {
                        row_stride1_dispatch(rows, pw, filt, kh, kw, b[ch], acc);
                    } else {
                        acc.fill(b[ch]);
                        for ky in 0..kh {
                            let row = &rows[ky * pw..(ky + 1) * pw];
                            for kx in 0..kw {
                                let wv = filt[ky * kw + kx];
                                for (ox, a) in acc.iter_mut().enumerate() {
                                    *a += wv * row[ox * s + kx];
                                }
                            }
                        }
                    }
                    for (d, &a) in o[oy * wo..(oy + 1) * wo].iter_mut().zip(acc.iter()) {
                        d.write(act.apply(a));
                    }
                }
            },
        );
        // SAFETY: the planes above cover all n * c * ho * wo elements, each written once.
        unsafe { out.set_len(n * c * ho * wo) };
        Ok((CpuStorage::F32(out), Shape::from((n, c, ho, wo))))
    }
}

/// Outputs kept in registers while all kernel taps accumulate.
const LANES: usize = 16;

/// One output row of a stride-1 depthwise convolution: `rows` starts at the padded input row of the first
/// tap. Accumulates LANES outputs at a time over every tap before storing them, so the inner loop is one
/// vector FMA per tap instead of a load-FMA-store pass over the whole row.
#[inline(always)]
fn row_stride1<const FMA: bool>(
    rows: &[f32],
    pw: usize,
    filt: &[f32],
    kh: usize,
    kw: usize,
    bias: f32,
    out: &mut [f32],
) {
    let wo = out.len();
    let mut x0 = 0;
    while x0 + LANES <= wo {
        let mut acc = [bias; LANES];
        for ky in 0..kh {
            let row = &rows[ky * pw + x0..];
            for kx in 0..kw {
                let wv = filt[ky * kw + kx];
                let src: &[f32; LANES] = row[kx..kx + LANES].try_into().expect("LANES-wide window");
                for l in 0..LANES {
                    acc[l] = if FMA { wv.mul_add(src[l], acc[l]) } else { acc[l] + wv * src[l] };
                }
            }
        }
        out[x0..x0 + LANES].copy_from_slice(&acc);
        x0 += LANES;
    }
    for (i, o) in out.iter_mut().enumerate().skip(x0) {
        let mut a = bias;
        for ky in 0..kh {
            for kx in 0..kw {
                a += filt[ky * kw + kx] * rows[ky * pw + i + kx];
            }
        }
        *o = a;
    }
}

/// [`row_stride1`] compiled for AVX2 + FMA, chosen at run time so one binary runs on any x86-64.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn row_stride1_avx2(rows: &[f32], pw: usize, filt: &[f32], kh: usize, kw: usize, bias: f32, out: &mut [f32]) {
    row_stride1::<true>(rows, pw, filt, kh, kw, bias, out)
}

fn row_stride1_dispatch(rows: &[f32], pw: usize, filt: &[f32], kh: usize, kw: usize, bias: f32, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if crate::has_avx2_fma() {
        // SAFETY: the CPU supports AVX2 and FMA (checked at run time).
        return unsafe { row_stride1_avx2(rows, pw, filt, kh, kw, bias, out) };
    }
    row_stride1::<false>(rows, pw, filt, kh, kw, bias, out)
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

    /// Against candle's grouped convolution on an explicitly padded input.
    #[test]
    fn matches_grouped_convolution() {
        let dev = Device::Cpu;
        for &(k, s, pad) in &[
            (3usize, 1usize, Padding::symmetric(1)),
            (3, 2, Padding { top: 0, bottom: 1, left: 0, right: 1 }),
            (5, 2, Padding { top: 1, bottom: 2, left: 1, right: 2 }),
            (5, 1, Padding::symmetric(2)),
        ] {
            let (n, c, h, w) = (2, 5, 9, 8);
            let x = Tensor::from_vec(data(n * c * h * w, 1), (n, c, h, w), &dev).unwrap();
            let wt = Tensor::from_vec(data(c * k * k, 2), (c, 1, k, k), &dev).unwrap();
            let b = Tensor::from_vec(data(c, 3), c, &dev).unwrap();
            let ours = depthwise_conv2d(&x, &wt, &b, s, pad, Activation::Identity).unwrap();
            let xp = x.pad_with_zeros(2, pad.top, pad.bottom).unwrap().pad_with_zeros(3, pad.left, pad.right).unwrap();
            let theirs = xp.conv2d(&wt, 0, s, 1, c).unwrap().broadcast_add(&b.reshape((1, c, 1, 1)).unwrap()).unwrap();
            assert_eq!(ours.dims(), theirs.dims());
            let d: f32 = (ours - theirs).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap();
            assert!(d < 1e-5, "k {k} s {s}: {d}");
        }
    }
}
