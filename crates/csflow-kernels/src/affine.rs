//! The soft-clamped affine transform of a coupling block as one op each way.
//!
//! y = x · e^l + t with l = a · 0.636 · atan(s / a), from x [B, C, H, W] and st = [s | t] [B, 2C, H, W]. As
//! tensor ops it took nine passes forward (the narrowed halves copied, the scalings, atan, exp, product,
//! sum) and some fifteen backward; here one pass computes y and l, and one computes all three gradients.
//! The arithmetic is the tensor ops' own, in their order (each scaling rounded, no fused multiply-adds),
//! but for atan and the exponential: this crate's polynomials (each within 2 ulp of f64's), so that the loops
//! vectorise, where libm's scalar `expf` and `atanf` were the op's time and 6 % of the CPU-size flow forward.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::f32_slice;

/// The atan's scale in CS-Flow's soft clamp: the authors' 2/π, rounded as they write it.
pub const SOFT_CLAMP_SLOPE: f64 = 0.636;

/// The clamp `a`, as the scalings' f32 factors.
#[derive(Clone, Copy)]
struct Clamp {
    /// 1 / a.
    inv: f32,
    /// a · 0.636.
    out: f32,
}

impl Clamp {
    fn new(a: f64) -> Self {
        Self { inv: (1.0 / a) as f32, out: (a * SOFT_CLAMP_SLOPE) as f32 }
    }

    /// (u = s / a, l = a · 0.636 · atan(u)).
    #[inline(always)]
    fn log_scale(self, s: f32) -> (f32, f32) {
        let u = s * self.inv;
        (u, crate::atan::atan_poly(u) * self.out)
    }
}

/// Shapes of x [B, C, H, W] and st [B, 2C, H, W]: (B, C, H, W).
fn dims(op: &str, xl: &Layout, sl: &Layout) -> Result<(usize, usize, usize, usize)> {
    let (&[b, c, h, w], &[sb, sc, sh, sw]) = (xl.dims(), sl.dims()) else {
        candle_core::bail!(
            "{op}: expected x [B, C, H, W] and st [B, 2C, H, W], got {:?} and {:?}",
            xl.dims(),
            sl.dims()
        );
    };
    if (sb, sc, sh, sw) != (b, 2 * c, h, w) {
        candle_core::bail!("{op}: st {:?} does not hold s and t for x {:?}", sl.dims(), xl.dims());
    }
    Ok((b, c, h, w))
}

struct SoftAffine(Clamp);

impl CustomOp2 for SoftAffine {
    fn name(&self) -> &'static str {
        "csflow-soft-affine"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, ss: &CpuStorage, sl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, c, h, w) = dims(self.name(), xl, sl)?;
        let (x, st) = (f32_slice(xs, xl, self.name())?, f32_slice(ss, sl, self.name())?);
        let (clamp, hw) = (self.0, h * w);
        // [y | l] per sample: both are written whole below.
        let mut out = crate::uninit(b * 2 * c * hw);
        out.par_chunks_mut((2 * c * hw).max(1)).enumerate().for_each(|(j, out)| {
            let (y, l) = out.split_at_mut(c * hw);
            let (s, t) = st[j * 2 * c * hw..(j + 1) * 2 * c * hw].split_at(c * hw);
            let x = &x[j * c * hw..(j + 1) * c * hw];
            forward(clamp, (s, t), x, (y, l));
        });
        Ok((CpuStorage::F32(out), Shape::from((b, 2 * c, h, w))))
    }

    fn bwd(&self, x: &Tensor, st: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let c = x.dim(1)?;
        let g = grad.contiguous()?.apply_op3_no_bwd(x, st, &SoftAffineGrad(self.0))?;
        Ok((Some(g.narrow(1, 0, c)?), Some(g.narrow(1, c, 2 * c)?)))
    }
}

/// [dx | ds | dt] from the output's gradient [gy | gl], x and st.
struct SoftAffineGrad(Clamp);

impl CustomOp3 for SoftAffineGrad {
    fn name(&self) -> &'static str {
        "csflow-soft-affine-grad"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        xs: &CpuStorage,
        xl: &Layout,
        ss: &CpuStorage,
        sl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, c, h, w) = dims(self.name(), xl, sl)?;
        if gl.dims() != sl.dims() {
            candle_core::bail!("{}: gradient {:?} for output {:?}", self.name(), gl.dims(), sl.dims());
        }
        let (g, x, st) =
            (f32_slice(gs, gl, self.name())?, f32_slice(xs, xl, self.name())?, f32_slice(ss, sl, self.name())?);
        let (clamp, n) = (self.0, c * h * w);
        let mut out = crate::uninit(b * 3 * n);
        out.par_chunks_mut((3 * n).max(1)).enumerate().for_each(|(j, out)| {
            let (dx, rest) = out.split_at_mut(n);
            let (ds, dt) = rest.split_at_mut(n);
            let (gy, gl) = g[j * 2 * n..(j + 1) * 2 * n].split_at(n);
            let s = &st[j * 2 * n..j * 2 * n + n];
            let x = &x[j * n..(j + 1) * n];
            gradient(clamp, (gy, gl), (x, s), (dx, ds, dt));
        });
        Ok((CpuStorage::F32(out), Shape::from((b, 3 * c, h, w))))
    }
}

/// [`forward_lanes`] compiled for AVX2 + FMA where the CPU has them (the loop vectorises there), else as it
/// is.
fn forward(clamp: Clamp, st: (&[f32], &[f32]), x: &[f32], out: (&mut [f32], &mut [f32])) {
    #[cfg(target_arch = "x86_64")]
    if crate::has_avx2_fma() {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2(clamp: Clamp, st: (&[f32], &[f32]), x: &[f32], out: (&mut [f32], &mut [f32])) {
            forward_lanes(true, clamp, st, x, out)
        }
        // SAFETY: the CPU supports AVX2 and FMA (checked).
        return unsafe { avx2(clamp, st, x, out) };
    }
    forward_lanes(false, clamp, st, x, out)
}

/// [`gradient_lanes`] as [`forward`] runs [`forward_lanes`].
fn gradient(clamp: Clamp, g: (&[f32], &[f32]), xs: (&[f32], &[f32]), out: (&mut [f32], &mut [f32], &mut [f32])) {
    #[cfg(target_arch = "x86_64")]
    if crate::has_avx2_fma() {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2(
            clamp: Clamp,
            g: (&[f32], &[f32]),
            xs: (&[f32], &[f32]),
            out: (&mut [f32], &mut [f32], &mut [f32]),
        ) {
            gradient_lanes(true, clamp, g, xs, out)
        }
        // SAFETY: the CPU supports AVX2 and FMA (checked).
        return unsafe { avx2(clamp, g, xs, out) };
    }
    gradient_lanes(false, clamp, g, xs, out)
}

/// l = a · 0.636 · atan(s / a), y = e^l · x + t.
#[inline(always)]
fn forward_lanes(fma: bool, clamp: Clamp, (s, t): (&[f32], &[f32]), x: &[f32], (y, l): (&mut [f32], &mut [f32])) {
    for i in 0..y.len() {
        l[i] = clamp.log_scale(s[i]).1;
        y[i] = exp(fma, l[i]) * x[i] + t[i];
    }
}

/// dx, ds, dt from gy, gl, x and s.
#[inline(always)]
fn gradient_lanes(
    fma: bool,
    clamp: Clamp,
    (gy, gl): (&[f32], &[f32]),
    (x, s): (&[f32], &[f32]),
    (dx, ds, dt): (&mut [f32], &mut [f32], &mut [f32]),
) {
    for i in 0..dx.len() {
        let (u, l) = clamp.log_scale(s[i]);
        let e = exp(fma, l);
        dx[i] = gy[i] * e;
        dt[i] = gy[i];
        // d y / d l = x e; d l / d u = 0.636 a / (1 + u²); d u / d s = 1 / a.
        let dl = gy[i] * x[i] * e + gl[i];
        ds[i] = dl * clamp.out / (u * u + 1.0) * clamp.inv;
    }
}

#[inline(always)]
fn exp(fma: bool, v: f32) -> f32 {
    if fma {
        crate::activation::exp::<true>(v)
    } else {
        crate::activation::exp::<false>(v)
    }
}

/// [y | l] for x [B, C, H, W] and st = [s | t] [B, 2C, H, W]: y = x · e^l + t, l = a · 0.636 · atan(s / a)
/// (a = `clamp`), as [B, 2C, H, W]; differentiable in x and st.
pub fn soft_affine(x: &Tensor, st: &Tensor, clamp: f64) -> Result<Tensor> {
    x.contiguous()?.apply_op2(&st.contiguous()?, SoftAffine(Clamp::new(clamp)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_data as data;
    use candle_core::{Device, Var};

    /// Values and both gradients against the same function as candle tensor ops (atan through this crate's
    /// op), under a loss weighting y and l differently; batch 2, odd sizes.
    #[test]
    fn matches_the_tensor_ops_and_their_gradients() {
        let dev = Device::Cpu;
        let (b, c, h, w, a) = (2usize, 3usize, 5usize, 7usize, 3.0f64);
        let x =
            Var::from_tensor(&(Tensor::from_vec(data(b * c * h * w, 1), (b, c, h, w), &dev).unwrap() * 2.0).unwrap())
                .unwrap();
        let st = Var::from_tensor(
            &(Tensor::from_vec(data(b * 2 * c * h * w, 2), (b, 2 * c, h, w), &dev).unwrap() * 6.0).unwrap(),
        )
        .unwrap();
        let wy = Tensor::from_vec(data(b * c * h * w, 3), (b, c, h, w), &dev).unwrap();
        let wl = Tensor::from_vec(data(b * c * h * w, 4), (b, c, h, w), &dev).unwrap();
        let loss = |y: &Tensor, l: &Tensor| {
            ((y * &wy).unwrap().sum_all().unwrap() + (l * &wl).unwrap().sum_all().unwrap()).unwrap()
        };

        let fused = soft_affine(x.as_tensor(), st.as_tensor(), a).unwrap();
        let (y, l) = (fused.narrow(1, 0, c).unwrap(), fused.narrow(1, c, c).unwrap());
        let g = loss(&y, &l).backward().unwrap();
        let ours = [y, l, g.get(&x).unwrap().clone(), g.get(&st).unwrap().clone()];

        let (s, t) = (st.as_tensor().narrow(1, 0, c).unwrap(), st.as_tensor().narrow(1, c, c).unwrap());
        let l = (crate::atan(&(s / a).unwrap()).unwrap() * (a * SOFT_CLAMP_SLOPE)).unwrap();
        let y = ((l.exp().unwrap() * x.as_tensor()).unwrap() + t).unwrap();
        let g = loss(&y, &l).backward().unwrap();
        let theirs = [y, l, g.get(&x).unwrap().clone(), g.get(&st).unwrap().clone()];

        for (what, (o, t)) in ["y", "l", "dx", "dst"].iter().zip(ours.iter().zip(&theirs)) {
            assert_eq!(o.dims(), t.dims(), "{what}");
            let (o, t): (Vec<f32>, Vec<f32>) =
                (o.flatten_all().unwrap().to_vec1().unwrap(), t.flatten_all().unwrap().to_vec1().unwrap());
            for (i, (o, t)) in o.iter().zip(&t).enumerate() {
                assert!((o - t).abs() <= 2e-6 * t.abs().max(1.0), "{what}[{i}]: {o} vs {t}");
            }
        }
    }

    /// Mismatched halves are errors, not panics.
    #[test]
    fn mismatched_shapes_are_errors() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((1, 3, 2, 2), candle_core::DType::F32, &dev).unwrap();
        let st = Tensor::zeros((1, 5, 2, 2), candle_core::DType::F32, &dev).unwrap();
        assert!(soft_affine(&x, &st, 3.0).unwrap_err().to_string().contains("does not hold"));
    }
}
