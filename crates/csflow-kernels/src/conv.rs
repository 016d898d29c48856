//! 2-d convolution (zero padding, dilation 1, one group) as im2col + `gemm`, with both gradients.
//!
//! candle's own CPU convolution has no fused bias and computes its input gradient through a naive
//! `conv_transpose2d`; here all three products are single GEMMs per sample:
//! forward Y = W·cols(X) + b, input gradient dX = col2im(Wᵀ·G), weight gradient dW = Σ G·cols(X)ᵀ.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::gemm::{matmul, matmul_bias_act, Mat};
use crate::winograd::{self, Kernel};
use crate::{f32_slice, items_per_task, Activation};

/// Geometry of one convolution.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Geom {
    cin: usize,
    h: usize,
    w: usize,
    cout: usize,
    kh: usize,
    kw: usize,
    stride: usize,
    pad: usize,
    pub(crate) ho: usize,
    pub(crate) wo: usize,
}

impl Geom {
    pub(crate) fn new(x: &[usize], w: &[usize], stride: usize, pad: usize) -> Result<Self> {
        let (&[_, cin, h, wd], &[cout, wcin, kh, kw]) = (x, w) else {
            candle_core::bail!("conv2d: expected x [N, C, H, W] and w [O, C, kh, kw], got {x:?} and {w:?}");
        };
        if cin != wcin {
            candle_core::bail!("conv2d: input has {cin} channels, the kernel expects {wcin}");
        }
        if stride == 0 || h + 2 * pad < kh || wd + 2 * pad < kw {
            candle_core::bail!("conv2d: kernel {kh}x{kw} does not fit input {h}x{wd} with padding {pad}");
        }
        let (ho, wo) = ((h + 2 * pad - kh) / stride + 1, (wd + 2 * pad - kw) / stride + 1);
        Ok(Self { cin, h, w: wd, cout, kh, kw, stride, pad, ho, wo })
    }

    /// An inference convolution of a square weight `[O, C, k, k]` (padding k / 2) over x `dims`: its geometry,
    /// samples, output pixels per sample and output shape.
    pub(crate) fn square(
        dims: &[usize],
        [cout, cin, k]: [usize; 3],
        stride: usize,
    ) -> Result<(Self, usize, usize, Shape)> {
        let g = Self::new(dims, &[cout, cin, k, k], stride, k / 2)?;
        let (n, hw) = (dims[0], g.hw_out());
        Ok((g, n, hw, Shape::from((n, cout, g.ho, g.wo))))
    }

    /// im2col of n samples into a new buffer ([`Geom::im2col`], ld = n·Ho·Wo), with `extra` zeros after it.
    pub(crate) fn columns(&self, x: &[f32], n: usize, extra: usize) -> Vec<f32> {
        let (rows, ld) = (self.k(), n * self.hw_out());
        let mut cols = crate::uninit(rows * ld + extra);
        cols[rows * ld..].fill(0.0);
        self.im2col(x, &mut cols[..rows * ld], ld);
        cols
    }

    /// Rows of the column matrix: Cin * kh * kw.
    pub(crate) fn k(&self) -> usize {
        self.cin * self.kh * self.kw
    }

    /// The Winograd shape for n samples when this is a square stride-1 "same" convolution (the flow's
    /// per-scale and up convolutions) on maps large enough for [`winograd`] to pay.
    fn winograd(&self, n: usize) -> Option<winograd::Shape> {
        let g = *self;
        let s = winograd::Shape { n, cin: g.cin, cout: g.cout, h: g.h, w: g.w, k: g.kh, m: 2 };
        (g.kh == g.kw && g.stride == 1 && g.pad == g.kh / 2 && winograd::pays(s)).then_some(s)
    }

    pub(crate) fn hw_out(&self) -> usize {
        self.ho * self.wo
    }

    /// The output positions o in 0..n (along one axis) whose input position o * stride + k - pad lies in
    /// 0..len, as a range, and the input position of its first element.
    fn valid(&self, k: usize, n: usize, len: usize) -> (std::ops::Range<usize>, usize) {
        let (s, p) = (self.stride, self.pad);
        // First o with o*s + k >= p, and one past the last with o*s + k - p <= len - 1.
        let lo = p.saturating_sub(k).div_ceil(s).min(n);
        let hi = if len + p > k { ((len + p - k - 1) / s + 1).min(n) } else { 0 };
        let hi = hi.max(lo);
        (lo..hi, (lo * s + k).saturating_sub(p))
    }

    /// Unfolds m samples [m, Cin, H, W] into cols [Cin*kh*kw, ld], ld = m x Ho*Wo (sample j in columns
    /// j*Ho*Wo..(j+1)*Ho*Wo).
    pub(crate) fn im2col(&self, x: &[f32], cols: &mut [f32], ld: usize) {
        let g = *self;
        let (hw, plane) = (g.hw_out(), g.cin * g.h * g.w);
        let m = ld / hw;
        // Strided or narrow outputs (the flow's stride-2 convolutions, 2x2-8x8 maps) gather through a table of
        // input offsets per tap, usize::MAX where the tap falls in the padding: per output row, the copy of
        // 2-8 values cost less than the two zero fills and the call around it.
        let gather = g.stride > 1 || g.wo < 16;
        // Built by nested loops: with a division per entry it took as long as the stem's gather itself.
        let mut table = Vec::with_capacity(if gather { g.kh * g.kw * hw } else { 0 });
        if gather {
            for (ky, kx) in (0..g.kh).flat_map(|ky| (0..g.kw).map(move |kx| (ky, kx))) {
                for oy in 0..g.ho {
                    let iy = (oy * g.stride + ky).wrapping_sub(g.pad);
                    table.extend((0..g.wo).map(|ox| {
                        let ix = (ox * g.stride + kx).wrapping_sub(g.pad);
                        if iy < g.h && ix < g.w {
                            iy * g.w + ix
                        } else {
                            usize::MAX
                        }
                    }));
                }
            }
        }
        // One parallel pass over the rows for all samples: per-sample passes cost more in scheduling than in
        // copying when maps are small (8x8 and below).
        cols.par_chunks_mut(ld).enumerate().with_min_len(items_per_task(ld)).for_each(|(row, out)| {
            let (ci, ky, kx) = (row / (g.kh * g.kw), (row / g.kw) % g.kh, row % g.kw);
            if gather {
                let taps = &table[(ky * g.kw + kx) * hw..][..hw];
                for (j, out) in out.chunks_exact_mut(hw).enumerate() {
                    let plane = &x[j * plane + ci * g.h * g.w..j * plane + (ci + 1) * g.h * g.w];
                    for (d, &at) in out.iter_mut().zip(taps) {
                        *d = plane.get(at).copied().unwrap_or(0.0);
                    }
                }
                return;
            }
            let (ys, iy0) = g.valid(ky, g.ho, g.h);
            let (xs, ix0) = g.valid(kx, g.wo, g.w);
            for j in 0..m {
                let plane = &x[j * plane + ci * g.h * g.w..j * plane + (ci + 1) * g.h * g.w];
                let out = &mut out[j * hw..(j + 1) * hw];
                for (oy, dst) in out.chunks_exact_mut(g.wo).enumerate() {
                    if !ys.contains(&oy) || xs.is_empty() {
                        dst.fill(0.0);
                        continue;
                    }
                    // Stride 1 here (strided outputs took the gather above).
                    let iy = iy0 + oy - ys.start;
                    let src = &plane[iy * g.w + ix0..(iy + 1) * g.w];
                    dst[..xs.start].fill(0.0);
                    dst[xs.end..].fill(0.0);
                    let dst = &mut dst[xs.clone()];
                    dst.copy_from_slice(&src[..dst.len()]);
                }
            }
        });
    }

    /// Folds cols [Cin*kh*kw, ld] (ld = m samples x Ho*Wo) back onto m samples [m, Cin, H, W], adding overlaps
    /// (im2col's transpose).
    fn col2im(&self, cols: &[f32], ld: usize, x: &mut [f32]) {
        let g = *self;
        let hw = g.hw_out();
        x.par_chunks_mut(g.h * g.w).enumerate().with_min_len(items_per_task(g.h * g.w * g.kh * g.kw)).for_each(
            |(idx, plane)| {
                let (j, ci) = (idx / g.cin, idx % g.cin);
                let off = j * hw;
                plane.fill(0.0);
                for ky in 0..g.kh {
                    let (ys, iy0) = g.valid(ky, g.ho, g.h);
                    for kx in 0..g.kw {
                        let (xs, ix0) = g.valid(kx, g.wo, g.w);
                        if xs.is_empty() {
                            continue;
                        }
                        let r = (ci * g.kh + ky) * g.kw + kx;
                        let row = &cols[r * ld + off..r * ld + off + hw];
                        for (n, oy) in ys.clone().enumerate() {
                            let iy = iy0 + n * g.stride;
                            let dst = &mut plane[iy * g.w + ix0..(iy + 1) * g.w];
                            let src = &row[oy * g.wo + xs.start..oy * g.wo + xs.end];
                            let dst = &mut dst[..(src.len() - 1) * g.stride + 1];
                            for (i, &v) in src.iter().enumerate() {
                                dst[i * g.stride] += v;
                            }
                        }
                    }
                }
            },
        );
    }
}

/// Column-matrix elements per GEMM: samples are batched into one product up to this size, so small maps
/// (8x8 at batch 16) still make GEMMs wide enough to run at speed.
const COLS_BUDGET: usize = 1 << 23;

/// Samples per batched GEMM for a column matrix of k rows and hw columns per sample.
fn samples_per_chunk(k: usize, hw: usize, n: usize) -> usize {
    (COLS_BUDGET / (k * hw).max(1)).clamp(1, n.max(1))
}

/// Copies sample-major [m, rows, hw] into row-major [rows, m * hw] (and back with `to_samples`).
fn to_rows(src: &[f32], m: usize, rows: usize, hw: usize, dst: &mut [f32]) {
    dst.par_chunks_mut(m * hw).enumerate().with_min_len(items_per_task(m * hw)).for_each(|(r, d)| {
        for j in 0..m {
            d[j * hw..(j + 1) * hw].copy_from_slice(&src[(j * rows + r) * hw..(j * rows + r + 1) * hw]);
        }
    });
}

fn to_samples(src: &[f32], m: usize, rows: usize, hw: usize, dst: &mut [f32]) {
    dst.par_chunks_mut(rows * hw).enumerate().for_each(|(j, d)| {
        for r in 0..rows {
            d[r * hw..(r + 1) * hw].copy_from_slice(&src[r * m * hw + j * hw..r * m * hw + (j + 1) * hw]);
        }
    });
}

struct Conv {
    stride: usize,
    pad: usize,
    /// Applied in the epilogue; anything but identity only without gradients (inference).
    act: Activation,
}

impl CustomOp3 for Conv {
    fn name(&self) -> &'static str {
        "csflow-conv2d"
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
        let g = Geom::new(xl.dims(), wl.dims(), self.stride, self.pad)?;
        if b.len() != g.cout {
            candle_core::bail!("conv2d: bias has {} values for {} output channels", b.len(), g.cout);
        }
        let n = xl.dims()[0];
        if let Some(s) = g.winograd(n) {
            let u = winograd::transform_weights(w, g.cout, g.cin, (s.k, s.m), Kernel::Forward);
            let y = winograd::conv(x, &u, Some(b), self.act, s);
            return Ok((CpuStorage::F32(y), Shape::from((n, g.cout, g.h, g.w))));
        }
        let (k, hw) = (g.k(), g.hw_out());
        // 1x1 stride-1 kernels (the backbone's expand and project layers) multiply the input as it is: its
        // column matrix would be a copy of it.
        let pointwise = g.kh == 1 && g.kw == 1 && g.stride == 1 && g.pad == 0;
        let chunk = if pointwise { 1 } else { samples_per_chunk(k, hw, n) };
        let mut out = crate::uninit(n * g.cout * hw);
        // Buffers below are written whole before they are read (im2col, the bias fill, to_samples).
        let mut cols = if pointwise { Vec::new() } else { crate::uninit(k * hw * chunk) };
        let mut y = if chunk > 1 { crate::uninit(g.cout * hw * chunk) } else { Vec::new() };
        let plane = g.cin * g.h * g.w;
        let act = self.act;
        for s0 in (0..n).step_by(chunk) {
            let m = chunk.min(n - s0);
            let ld = m * hw;
            let rhs = if pointwise {
                &x[s0 * plane..(s0 + 1) * plane]
            } else {
                g.im2col(&x[s0 * plane..(s0 + m) * plane], &mut cols[..k * ld], ld);
                &cols[..k * ld]
            };
            let dst_out = &mut out[s0 * g.cout * hw..(s0 + m) * g.cout * hw];
            // One sample's product is already in the output's layout; several are gathered in y first.
            let dst = if m == 1 { &mut *dst_out } else { &mut y[..g.cout * ld] };
            matmul_bias_act(dst, g.cout, ld, k, w, rhs, b, act);
            if m > 1 {
                to_samples(&y[..g.cout * ld], m, g.cout, hw, dst_out);
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((n, g.cout, g.ho, g.wo))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let (h, wd) = (x.dim(2)?, x.dim(3)?);
        let gx = grad.apply_op2_no_bwd(w, &ConvInputGrad { stride: self.stride, pad: self.pad, h, w: wd })?;
        let (kh, kw) = (w.dim(2)?, w.dim(3)?);
        let gw = x.apply_op2_no_bwd(&grad, &ConvWeightGrad { stride: self.stride, pad: self.pad, kh, kw })?;
        let gb = grad.apply_op1_no_bwd(&BiasGrad)?;
        Ok((Some(gx), Some(gw), Some(gb)))
    }
}

/// dX from the output gradient G [N, O, Ho, Wo] and the kernel W.
struct ConvInputGrad {
    stride: usize,
    pad: usize,
    h: usize,
    w: usize,
}

impl CustomOp2 for ConvInputGrad {
    fn name(&self) -> &'static str {
        "csflow-conv2d-input-grad"
    }

    fn cpu_fwd(&self, gs: &CpuStorage, gl: &Layout, ws: &CpuStorage, wl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (gr, w) = (f32_slice(gs, gl, self.name())?, f32_slice(ws, wl, self.name())?);
        let n = gl.dims()[0];
        let wdims = wl.dims();
        let g = Geom::new(&[n, wdims[1], self.h, self.w], wdims, self.stride, self.pad)?;
        if gl.dims() != [n, g.cout, g.ho, g.wo] {
            candle_core::bail!("conv2d backward: gradient shape {:?} does not match the forward", gl.dims());
        }
        if let Some(s) = g.winograd(n) {
            let u = winograd::transform_weights(w, g.cout, g.cin, (s.k, s.m), Kernel::InputGradient);
            let s = winograd::Shape { cin: s.cout, cout: s.cin, ..s };
            return Ok((
                CpuStorage::F32(winograd::conv(gr, &u, None, Activation::Identity, s)),
                Shape::from((n, g.cin, g.h, g.w)),
            ));
        }
        let (k, hw) = (g.k(), g.hw_out());
        // col2im zeroes each plane before adding into it; the products and to_rows write their whole outputs.
        let mut out = crate::uninit(n * g.cin * g.h * g.w);
        let chunk = samples_per_chunk(k, hw, n);
        let mut cols = crate::uninit(k * hw * chunk);
        let mut gt = crate::uninit(g.cout * hw * chunk);
        let plane = g.cin * g.h * g.w;
        for s0 in (0..n).step_by(chunk) {
            let m = chunk.min(n - s0);
            let ld = m * hw;
            to_rows(&gr[s0 * g.cout * hw..(s0 + m) * g.cout * hw], m, g.cout, hw, &mut gt[..g.cout * ld]);
            matmul(
                &mut cols[..k * ld],
                k,
                ld,
                g.cout,
                Mat::transposed(w.as_ptr(), k),
                Mat::plain(gt.as_ptr(), ld),
                false,
            );
            g.col2im(&cols, ld, &mut out[s0 * plane..(s0 + m) * plane]);
        }
        Ok((CpuStorage::F32(out), Shape::from((n, g.cin, g.h, g.w))))
    }
}

/// dW = Σ_n G_n · cols(X_n)ᵀ from the input X and the output gradient G.
struct ConvWeightGrad {
    stride: usize,
    pad: usize,
    kh: usize,
    kw: usize,
}

impl CustomOp2 for ConvWeightGrad {
    fn name(&self) -> &'static str {
        "csflow-conv2d-weight-grad"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, gs: &CpuStorage, gl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, gr) = (f32_slice(xs, xl, self.name())?, f32_slice(gs, gl, self.name())?);
        let (n, cin, cout) = (xl.dims()[0], xl.dims()[1], gl.dims()[1]);
        let g = Geom::new(xl.dims(), &[cout, cin, self.kh, self.kw], self.stride, self.pad)?;
        if let Some(s) = g.winograd(n) {
            let dw = winograd::weight_grad(x, gr, s);
            return Ok((CpuStorage::F32(dw), Shape::from((cout, cin, s.k, s.k))));
        }
        let (k, hw) = (g.k(), g.hw_out());
        // The first product overwrites it (it does not read its destination), later ones accumulate.
        let mut out = crate::uninit(cout * k);
        let chunk = samples_per_chunk(k, hw, n);
        let mut cols = crate::uninit(k * hw * chunk);
        let mut gt = crate::uninit(cout * hw * chunk);
        let plane = cin * g.h * g.w;
        for s0 in (0..n).step_by(chunk) {
            let m = chunk.min(n - s0);
            let ld = m * hw;
            g.im2col(&x[s0 * plane..(s0 + m) * plane], &mut cols[..k * ld], ld);
            to_rows(&gr[s0 * cout * hw..(s0 + m) * cout * hw], m, cout, hw, &mut gt[..cout * ld]);
            matmul(&mut out, cout, k, ld, Mat::plain(gt.as_ptr(), ld), Mat::transposed(cols.as_ptr(), ld), s0 > 0);
        }
        Ok((CpuStorage::F32(out), Shape::from((cout, cin, self.kh, self.kw))))
    }
}

/// db [O] = Σ over samples and positions of the output gradient G [N, O, Ho, Wo], in f64. candle's
/// `sum((0, 2, 3))` walks a strided index: 5 % of the paper's training step.
struct BiasGrad;

impl CustomOp1 for BiasGrad {
    fn name(&self) -> &'static str {
        "csflow-conv2d-bias-grad"
    }

    fn cpu_fwd(&self, gs: &CpuStorage, gl: &Layout) -> Result<(CpuStorage, Shape)> {
        let gr = f32_slice(gs, gl, self.name())?;
        let &[n, c, h, w] = gl.dims() else {
            candle_core::bail!("conv2d backward: gradient must be [N, C, H, W], got {:?}", gl.dims());
        };
        let planes = crate::reduce::plane_sums(gr, h * w);
        // Empty planes (no sums) add nothing.
        let sums = (0..c).map(|o| (0..n).filter_map(|j| planes.get(j * c + o)).sum::<f64>() as f32).collect();
        Ok((CpuStorage::F32(sums), Shape::from(c)))
    }
}

/// A square inference weight `[O, C, k, k]` and its bias `[O]`: the sizes (O, C, k) and the weight's values,
/// or an error naming `op` and what does not fit.
pub(crate) fn square_weight(op: &str, weight: &Tensor, bias: &Tensor) -> Result<([usize; 3], Vec<f32>)> {
    let &[cout, cin, k, kw] = weight.dims() else {
        candle_core::bail!("{op}: weight must be [O, C, k, k], got {:?}", weight.dims());
    };
    if k != kw || cin == 0 || k == 0 {
        candle_core::bail!("{op}: weight {:?} is not a square kernel over some channels", weight.dims());
    }
    if bias.dims() != [cout] {
        candle_core::bail!("{op}: bias {:?} for {cout} output channels", bias.dims());
    }
    Ok(([cout, cin, k], weight.flatten_all()?.to_vec1()?))
}

/// `F.conv2d(x, w, b, stride, padding=pad)` for f32 tensors: x `[N, C, H, W]`, w `[O, C, kh, kw]`, b `[O]`.
/// Differentiable in all three arguments.
pub fn conv2d(x: &Tensor, w: &Tensor, b: &Tensor, stride: usize, pad: usize) -> Result<Tensor> {
    x.contiguous()?.apply_op3(&w.contiguous()?, &b.contiguous()?, Conv { stride, pad, act: Activation::Identity })
}

/// [`conv2d`] followed by `act`, fused into the product's epilogue; without gradients (the backbone).
pub fn conv2d_act(x: &Tensor, w: &Tensor, b: &Tensor, stride: usize, pad: usize, act: Activation) -> Result<Tensor> {
    x.contiguous()?.apply_op3_no_bwd(&w.contiguous()?, &b.contiguous()?, &Conv { stride, pad, act })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_data as data;
    use candle_core::{Device, Var};

    /// Against candle's own convolution (an independent implementation), values and the input and weight
    /// gradients, the bias gradient against sums in f64;
    /// also kernels wider than the map, and rows of 16 or more (im2col's row-copy path with 2x18 maps;
    /// narrower or strided outputs gather; 8x8 3x3 and 4x18 5x5 at batch 2 have 32 tiles or more: Winograd).
    /// (Stride 2, kernel 5 on a 2x3 map is left out: candle's own input gradient there comes out [2, 3, 2, 4]
    /// for a [2, 3, 2, 3] input.)
    #[test]
    fn matches_candle_conv_and_its_gradients() {
        for &(stride, k, h, w) in &[
            (1usize, 3usize, 7usize, 6usize),
            (1, 3, 1, 1),
            (1, 3, 2, 3),
            (1, 3, 5, 4),
            (1, 3, 8, 8),
            (2, 3, 8, 8),
            (2, 5, 9, 7),
            (1, 5, 4, 4),
            (1, 1, 3, 5),
            (1, 5, 2, 2),
            (1, 5, 1, 3),
            (1, 5, 3, 1),
            (1, 5, 1, 1),
            (1, 5, 4, 1),
            (2, 3, 1, 1),
            (1, 5, 4, 18),
            (1, 5, 2, 18),
        ] {
            compare_with_candle(2, 3, 4, stride, k, h, w);
        }
    }

    /// Five samples whose column matrices exceed the batching budget: GEMMs of 2, 2 and 1 samples (7x7: the
    /// im2col path, not Winograd's).
    #[test]
    fn batched_chunks_with_a_partial_last_one() {
        assert_eq!(samples_per_chunk(64 * 49, 32 * 32, 5), 2);
        compare_with_candle(5, 64, 3, 1, 7, 32, 32);
    }

    /// 3x3 and 5x5 stride-1 layers on maps with enough tiles take the Winograd path, all three products.
    #[test]
    fn winograd_layers_match_candle() {
        for k in [3, 5] {
            let g = Geom::new(&[2, 4, 12, 11], &[3, 4, k, k], 1, k / 2).unwrap();
            assert!(g.winograd(2).is_some(), "{k}x{k} takes the Winograd path");
            compare_with_candle(2, 4, 3, 1, k, 12, 11);
        }
    }

    /// The fused activation equals the activation applied after the plain op, on each path: pointwise (one
    /// and several samples), im2col, Winograd.
    #[test]
    fn fused_activation_matches_activation_after_the_op() {
        let dev = Device::Cpu;
        for &(n, cin, cout, k, stride, hw) in &[
            (1usize, 6usize, 5usize, 1usize, 1usize, 7usize),
            (3, 6, 5, 1, 1, 7),
            (2, 4, 3, 3, 2, 9),
            (2, 4, 3, 3, 1, 16),
        ] {
            let x = (Tensor::from_vec(data(n * cin * hw * hw, 1), (n, cin, hw, hw), &dev).unwrap() * 8.0).unwrap();
            let w = Tensor::from_vec(data(cout * cin * k * k, 2), (cout, cin, k, k), &dev).unwrap();
            let b = Tensor::from_vec(data(cout, 3), cout, &dev).unwrap();
            let plain = conv2d(&x, &w, &b, stride, k / 2).unwrap();
            for (act, want) in [
                (Activation::Relu6, plain.clamp(0f32, 6f32).unwrap()),
                (Activation::Swish, plain.silu().unwrap()),
                (Activation::Identity, plain.clone()),
            ] {
                let ours = conv2d_act(&x, &w, &b, stride, k / 2, act).unwrap();
                let err: f32 = (ours - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap();
                assert!(err < 1e-5, "{act:?} n {n} k {k} stride {stride}: {err}");
            }
            let relu6: Vec<f32> = conv2d_act(&x, &w, &b, stride, k / 2, Activation::Relu6)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            assert!(relu6.contains(&6.0) && relu6.contains(&0.0), "both clamps exercised");
        }
    }

    fn compare_with_candle(n: usize, cin: usize, cout: usize, stride: usize, k: usize, h: usize, w: usize) {
        let dev = Device::Cpu;
        {
            let pad = k / 2;
            let x = Var::from_vec(data(n * cin * h * w, 1), (n, cin, h, w), &dev).unwrap();
            let wt = Var::from_vec(data(cout * cin * k * k, 2), (cout, cin, k, k), &dev).unwrap();
            let b = Var::from_vec(data(cout, 3), cout, &dev).unwrap();
            let ours = conv2d(&x, &wt, &b, stride, pad).unwrap();
            let theirs =
                x.conv2d(&wt, pad, stride, 1, 1).unwrap().broadcast_add(&b.reshape((1, cout, 1, 1)).unwrap()).unwrap();
            assert_eq!(ours.dims(), theirs.dims());
            let diff = |a: &Tensor, b: &Tensor| -> f32 {
                (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap()
            };
            let scale: f32 = theirs.abs().unwrap().max_all().unwrap().to_scalar().unwrap();
            assert!(
                diff(&ours, &theirs) < 1e-5 * scale.max(1.0),
                "forward stride {stride} k {k}: {} of {scale}",
                diff(&ours, &theirs)
            );
            let up = Tensor::from_vec(data(ours.elem_count(), 4), ours.dims(), &dev).unwrap();
            let g1 = (ours * &up).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (theirs * &up).unwrap().sum_all().unwrap().backward().unwrap();
            // The bias gradient is each channel's sum of `up`, taken here in f64: candle's f32 sum over the
            // 5 x 32 x 32 values of the batched case rounds at 2.2e-5 of it (ours, in f64, to f32's rounding).
            let (u, hw) = (up.flatten_all().unwrap().to_vec1::<f32>().unwrap(), up.dims()[2] * up.dims()[3]);
            let ours_b = g1.get(&b).unwrap().to_vec1::<f32>().unwrap();
            for (o, &got) in ours_b.iter().enumerate() {
                let want: f64 =
                    (0..n).map(|j| u[(j * cout + o) * hw..][..hw].iter().map(|&v| v as f64).sum::<f64>()).sum();
                assert!((got as f64 - want).abs() <= 1e-6 * want.abs().max(1.0), "bias gradient {o}: {got} for {want}");
            }
            for v in [&x, &wt] {
                let (a, c) = (g1.get(v).unwrap(), g2.get(v).unwrap());
                // Relative to the gradient's size: sums of thousands of products round differently.
                let scale: f32 = c.abs().unwrap().max_all().unwrap().to_scalar().unwrap();
                assert!(
                    diff(a, c) < 1e-5 * scale.max(1.0),
                    "gradient stride {stride} k {k}: {} of {scale}",
                    diff(a, c)
                );
            }
        }
    }
}
