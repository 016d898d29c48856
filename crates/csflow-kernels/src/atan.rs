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
