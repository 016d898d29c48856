use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::{f32_slice, Activation, CHUNK};

/// x for x > 0, slope * x otherwise; its gradient is 1 or slope by the same test (PyTorch's, also at 0).
/// One pass each way, where `maximum(x, slope * x)` takes two forward and about ten backward.
struct LeakyRelu(f32);

impl CustomOp1 for LeakyRelu {
    fn name(&self) -> &'static str {
        "csflow-leaky-relu"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let src = f32_slice(storage, layout, self.name())?;
        let act = Activation::LeakyRelu(self.0);
        let mut out = crate::uninit(src.len());
        out.par_chunks_mut(CHUNK).zip(src.par_chunks(CHUNK)).for_each(|(o, s)| {
            o.copy_from_slice(s);
            act.apply_slice(o);
        });
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad_res.contiguous()?.apply_op2_no_bwd(arg, &LeakyReluGrad(self.0))?))
    }
}

/// grad * (x > 0 ? 1 : slope).
struct LeakyReluGrad(f32);

impl CustomOp2 for LeakyReluGrad {
    fn name(&self) -> &'static str {
        "csflow-leaky-relu-grad"
    }

    fn cpu_fwd(&self, gs: &CpuStorage, gl: &Layout, xs: &CpuStorage, xl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (g, x) = (f32_slice(gs, gl, self.name())?, f32_slice(xs, xl, self.name())?);
        if g.len() != x.len() {
            candle_core::bail!("leaky relu backward: gradient {:?} for input {:?}", gl.dims(), xl.dims());
        }
        let slope = self.0;
        let mut out = crate::uninit(g.len());
        out.par_chunks_mut(CHUNK).zip(g.par_chunks(CHUNK).zip(x.par_chunks(CHUNK))).for_each(|(o, (g, x))| {
            for ((o, &g), &x) in o.iter_mut().zip(g).zip(x) {
                *o = if x > 0.0 { g } else { slope * g };
            }
        });
        Ok((CpuStorage::F32(out), gl.shape().clone()))
    }
}

/// PyTorch's `F.leaky_relu(x, slope)` for f32 tensors, differentiable.
pub fn leaky_relu(x: &Tensor, slope: f32) -> Result<Tensor> {
    x.contiguous()?.apply_op1(LeakyRelu(slope))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Values and gradients worked by hand, including 0 (gradient = slope, as PyTorch's).
    #[test]
    fn values_and_gradient_by_hand() {
        let v = Var::new(&[-2.0f32, -0.5, 0.0, 0.25, 3.0], &Device::Cpu).unwrap();
        let y = leaky_relu(v.as_tensor(), 0.1).unwrap();
        assert_eq!(y.to_vec1::<f32>().unwrap(), [0.1f32 * -2.0, 0.1 * -0.5, 0.0, 0.25, 3.0]);
        let w = Tensor::new(&[1.0f32, 2.0, 3.0, 4.0, 5.0], &Device::Cpu).unwrap();
        let g = (y * w).unwrap().sum_all().unwrap().backward().unwrap();
        let g: Vec<f32> = g.get(&v).unwrap().to_vec1().unwrap();
        assert_eq!(g, [0.1f32 * 1.0, 0.1 * 2.0, 0.1 * 3.0, 4.0, 5.0]);
    }
}
