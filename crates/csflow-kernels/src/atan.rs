use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::{f32_slice, CHUNK};

struct Atan;

impl CustomOp1 for Atan {
    fn name(&self) -> &'static str {
        "csflow-atan"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let src = f32_slice(storage, layout, self.name())?;
        let mut out = vec![0f32; src.len()];
        out.par_chunks_mut(CHUNK)
            .zip(src.par_chunks(CHUNK))
            .for_each(|(o, s)| o.iter_mut().zip(s).for_each(|(o, &s)| *o = s.atan()));
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    /// d atan(x) / dx = 1 / (1 + x^2), built from differentiable tensor ops.
    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let denom = (arg.sqr()? + 1.0)?;
        Ok(Some(grad_res.div(&denom)?))
    }
}

/// tan(3π/8) and tan(π/8): the bounds of the argument reduction.
const TAN_3PI_8: f32 = 2.414_213_6;
const TAN_PI_8: f32 = 0.414_213_57;
/// Cephes' `atanf` polynomial in z = x², highest power first.
const ATAN_P: [f32; 4] = [8.053_744_5e-2, -1.387_768_6e-1, 1.997_771_1e-1, -3.333_295e-1];

/// atan(x) to 2 ulp, branch-free so that loops over it vectorise (libm's scalar `atanf` was most of the soft
/// affine transform's time): Cephes' reduction to |x| <= tan(π/8) (x itself, (|x| - 1) / (|x| + 1) plus
/// π/4, or -1 / |x| plus π/2), its degree-9 odd polynomial, the sign restored. NaN stays NaN; ±∞ gives ±π/2.
#[inline(always)]
pub(crate) fn atan_poly(x: f32) -> f32 {
    let a = x.abs();
    let (big, mid) = (a > TAN_3PI_8, a > TAN_PI_8);
    let num = if big {
        -1.0
    } else if mid {
        a - 1.0
    } else {
        a
    };
    let den = if big {
        a
    } else if mid {
        a + 1.0
    } else {
        1.0
    };
    let base = if big {
        std::f32::consts::FRAC_PI_2
    } else if mid {
        std::f32::consts::FRAC_PI_4
    } else {
        0.0
    };
    let r = num / den;
    let z = r * r;
    let mut p = ATAN_P[0];
    for &c in &ATAN_P[1..] {
        p = p * z + c;
    }
    (base + (p * z * r + r)).copysign(x)
}

/// Elementwise arctangent of an f32 tensor, differentiable.
pub fn atan(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Atan)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn values_match_std_and_known_points() {
        let xs = [-1e6f32, -3.0, -1.0, -0.25, 0.0, 0.5, 1.0, 1.7320508, 40.0];
        let t = Tensor::new(&xs, &Device::Cpu).unwrap();
        let y: Vec<f32> = atan(&t).unwrap().to_vec1().unwrap();
        for (x, y) in xs.iter().zip(&y) {
            assert_eq!(*y, x.atan());
        }
        assert!((y[6] - std::f32::consts::FRAC_PI_4).abs() < 1e-7);
        assert!((y[7] - std::f32::consts::FRAC_PI_3).abs() < 1e-6);
    }

    /// The polynomial against f64's atan, relative to the value, across six decades each way, the reduction's
    /// bounds and the limits: measured 1.9e-7 at worst (1.6 ulp).
    #[test]
    fn polynomial_is_within_two_ulp_of_f64() {
        let mut xs: Vec<f32> = (-60_000..=60_000).map(|i| (i as f32 * 1e-4).powi(3) * 1e3).collect();
        xs.extend([TAN_PI_8, TAN_3PI_8, 1.0, -1.0, 1e-30, -1e-30, 1e30, f32::MAX, f32::MIN_POSITIVE]);
        let mut worst = 0f64;
        for &x in &xs {
            let (got, want) = (atan_poly(x) as f64, (x as f64).atan());
            if want != 0.0 {
                worst = worst.max(((got - want) / want).abs());
            } else {
                assert_eq!(got, 0.0);
            }
        }
        assert!(worst < 2.0 * f32::EPSILON as f64, "worst relative error {worst:e}");
        assert_eq!(atan_poly(f32::INFINITY), std::f32::consts::FRAC_PI_2);
        assert_eq!(atan_poly(f32::NEG_INFINITY), -std::f32::consts::FRAC_PI_2);
        assert!(atan_poly(f32::NAN).is_nan());
        assert_eq!(atan_poly(-0.0).to_bits(), (-0.0f32).to_bits());
    }

    #[test]
    fn gradient_matches_finite_differences() {
        let xs: Vec<f32> = (0..41).map(|i| (i as f32 - 20.0) * 0.37).collect();
        let v = Var::new(xs.as_slice(), &Device::Cpu).unwrap();
        let w = Tensor::new(&[0.3f32], &Device::Cpu).unwrap();
        let loss = atan(v.as_tensor()).unwrap().broadcast_mul(&w).unwrap().sum_all().unwrap();
        let g: Vec<f32> = loss.backward().unwrap().get(&v).unwrap().to_vec1().unwrap();
        for (x, g) in xs.iter().zip(&g) {
            let x = *x as f64;
            let h = 1e-4;
            let fd = 0.3 * ((x + h).atan() - (x - h).atan()) / (2.0 * h);
            assert!((*g as f64 - fd).abs() < 1e-6, "x {x}: {g} vs {fd}");
        }
    }
}
