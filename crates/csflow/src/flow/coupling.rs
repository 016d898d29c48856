use candle_core::{Tensor, D};
use csflow_kernels::{atan, soft_affine, SOFT_CLAMP_SLOPE};

use super::model::ParamMap;
use super::subnet::CrossConvolutions;
use crate::Result;

/// log e(s) = a * 0.636 * atan(s / a): bounds the log-scale to about +-a so training cannot blow up.
pub fn soft_clamp(s: &Tensor, a: f64) -> Result<Tensor> {
    Ok((atan(&(s / a)?)? * (a * SOFT_CLAMP_SLOPE))?)
}

/// Bound applied to the coupling outputs, as the authors do.
pub(crate) const OUTPUT_LIMIT: f64 = 1e6;

/// A parallel affine coupling layer over three scales: the second half of the channels conditions the first
/// (subnet `s2`), then the transformed first half conditions the second (subnet `s1`).
#[derive(Clone, Debug)]
pub struct Coupling {
    pub s1: CrossConvolutions,
    pub s2: CrossConvolutions,
    pub clamp: f64,
}

/// Splits a subnet output [B, C, h, w] into the log-scale and shift halves.
fn split(r: &Tensor, half: usize) -> Result<(Tensor, Tensor)> {
    Ok((r.narrow(1, 0, half)?, r.narrow(1, half, half)?))
}

fn halves(x: &[Tensor; 3]) -> Result<([Tensor; 3], [Tensor; 3])> {
    let half = x[0].dim(1)? / 2;
    let a = |i: usize, from| x[i].narrow(1, from, half);
    Ok(([a(0, 0)?, a(1, 0)?, a(2, 0)?], [a(0, half)?, a(1, half)?, a(2, half)?]))
}

impl Coupling {
    pub fn load(params: &ParamMap, prefix: &str, clamp: f64) -> Result<Self> {
        Ok(Self {
            s1: CrossConvolutions::load(params, &format!("{prefix}.s1"))?,
            s2: CrossConvolutions::load(params, &format!("{prefix}.s2"))?,
            clamp,
        })
    }

    /// One affine half-step: y = e(s) * x + t with (s, t) from the subnet output `r`; returns y and log e(s).
    fn affine(&self, x: &Tensor, r: &Tensor) -> Result<(Tensor, Tensor)> {
        let c = x.dim(1)?;
        let yl = soft_affine(x, r, self.clamp)?;
        Ok((yl.narrow(1, 0, c)?, yl.narrow(1, c, c)?))
    }

    /// Forward: outputs per scale and the log-determinant per sample and scale, [B, 3].
    pub fn forward(&self, x: &[Tensor; 3]) -> Result<([Tensor; 3], Tensor)> {
        let (x1, x2) = halves(x)?;
        let r2 = self.s2.forward(&x2)?;
        let mut y1: Vec<Tensor> = Vec::with_capacity(3);
        let mut log1 = Vec::with_capacity(3);
        for i in 0..3 {
            let (y, l) = self.affine(&x1[i], &r2[i])?;
            y1.push(y);
            log1.push(l);
        }
        let y1: [Tensor; 3] = [y1[0].clone(), y1[1].clone(), y1[2].clone()];
        let r1 = self.s1.forward(&y1)?;
        let mut out = Vec::with_capacity(3);
        let mut jac = Vec::with_capacity(3);
        for i in 0..3 {
            let (y2, l2) = self.affine(&x2[i], &r1[i])?;
            let y = Tensor::cat(&[&y1[i], &y2], 1)?.clamp(-OUTPUT_LIMIT, OUTPUT_LIMIT)?;
            out.push(y);
            jac.push((log1[i].flatten_from(1)?.sum(D::Minus1)? + l2.flatten_from(1)?.sum(D::Minus1)?)?);
        }
        let logdet = Tensor::stack(&jac, 1)?;
        Ok(([out[0].clone(), out[1].clone(), out[2].clone()], logdet))
    }

    /// Inverse of [`forward`](Self::forward) (exact up to rounding; the clamp at 1e6 is not undone).
    pub fn inverse(&self, y: &[Tensor; 3]) -> Result<[Tensor; 3]> {
        let (y1, y2) = halves(y)?;
        let r1 = self.s1.forward(&y1)?;
        let undo = |y: &Tensor, r: &Tensor| -> Result<Tensor> {
            let (s, t) = split(r, y.dim(1)?)?;
            Ok(((y - t)? * soft_clamp(&s, self.clamp)?.neg()?.exp()?)?)
        };
        let x2 = [undo(&y2[0], &r1[0])?, undo(&y2[1], &r1[1])?, undo(&y2[2], &r1[2])?];
        let r2 = self.s2.forward(&x2)?;
        let mut x = Vec::with_capacity(3);
        for i in 0..3 {
            x.push(Tensor::cat(&[&undo(&y1[i], &r2[i])?, &x2[i]], 1)?);
        }
        Ok([x[0].clone(), x[1].clone(), x[2].clone()])
    }
}
