use std::cell::RefCell;

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, InplaceOp2, Layout, Storage, Tensor, Var};
use rayon::prelude::*;

use crate::Result;

/// Each variable's first and second moments, flat.
pub type MomentSlices<'a> = Vec<(&'a [f32], &'a [f32])>;

/// Adam exactly as `torch.optim.Adam` (L2 weight decay added to the gradient, not AdamW), preceded by
/// `clip_grad_norm_` over all parameters together.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct AdamConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Global L2 norm the gradients are clipped to before each step; `None` disables clipping.
    pub max_grad_norm: Option<f64>,
}

impl AdamConfig {
    /// The authors' settings (betas 0.9/0.999, eps 1e-4, weight decay 1e-5, clip 1.0) at learning rate `lr`.
    pub fn paper(lr: f64) -> Self {
        Self { lr, beta1: 0.9, beta2: 0.999, eps: 1e-4, weight_decay: 1e-5, max_grad_norm: Some(1.0) }
    }
}

struct Moments {
    m: Vec<f32>,
    v: Vec<f32>,
}

pub struct Adam {
    pub config: AdamConfig,
    vars: Vec<Var>,
    moments: Vec<Moments>,
    steps: u64,
}

/// `torch.lerp`: self + w * (end - self), switching to the other form for w >= 0.5 as PyTorch does.
fn lerp(start: f32, end: f32, w: f32) -> f32 {
    if w.abs() < 0.5 {
        start + w * (end - start)
    } else {
        end - (end - start) * (1.0 - w)
    }
}

impl Adam {
    pub fn new(config: AdamConfig, vars: Vec<Var>) -> Self {
        let moments = vars
            .iter()
            .map(|v| {
                let n = v.elem_count();
                Moments { m: vec![0.0; n], v: vec![0.0; n] }
            })
            .collect();
        Self { config, vars, moments, steps: 0 }
    }

    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// The first and second moments of each variable (flat, in the order of the variables) and the step
    /// count: what a checkpoint needs for `--resume` to continue exactly.
    pub fn state(&self) -> (u64, MomentSlices<'_>) {
        (self.steps, self.moments.iter().map(|m| (m.m.as_slice(), m.v.as_slice())).collect())
    }

    /// Restores a [`Adam::state`]; lengths must match the variables.
    pub fn set_state(&mut self, steps: u64, moments: Vec<(Vec<f32>, Vec<f32>)>) -> Result<()> {
        if moments.len() != self.vars.len() {
            return Err(crate::Error::Invalid(format!(
                "optimizer state has {} tensors, the model {}",
                moments.len(),
                self.vars.len()
            )));
        }
        for (i, ((m, v), var)) in moments.iter().zip(&self.vars).enumerate() {
            if m.len() != var.elem_count() || v.len() != var.elem_count() {
                return Err(crate::Error::Invalid(format!(
                    "optimizer state of tensor {i} has {} values, the parameter {}",
                    m.len(),
                    var.elem_count()
                )));
            }
        }
        self.moments = moments.into_iter().map(|(m, v)| Moments { m, v }).collect();
        self.steps = steps;
        Ok(())
    }

    /// Back-propagates `loss` and takes one step; returns the gradient norm before clipping. Takes the loss so
    /// that the forward graph (every saved activation) is freed before the update allocates.
    pub fn backward_step(&mut self, loss: Tensor) -> Result<f64> {
        let grads = loss.backward()?;
        drop(loss);
        self.step(grads)
    }

    /// One optimizer step from computed gradients; returns the global gradient norm before clipping.
    /// Parameters without a gradient are left alone, as PyTorch does.
    pub fn step(&mut self, mut grads: GradStore) -> Result<f64> {
        let gs: Vec<Option<Tensor>> = self
            .vars
            .iter()
            .map(|v| grads.remove(v.as_tensor()).map(|g| g.contiguous()).transpose())
            .collect::<candle_core::Result<_>>()?;
        drop(grads);
        // clip_grad_norm_: per-tensor norms, then the norm of those norms.
        let norms: Vec<f64> = gs
            .par_iter()
            .map(|g| g.as_ref().map_or(Ok(0.0), |g| with_values(g, csflow_kernels::sum_of_squares)))
            .collect::<Result<_>>()?;
        let total = norms.iter().sum::<f64>().sqrt();
        if !total.is_finite() {
            return Err(crate::Error::Diverged(format!(
                "the gradient norm became {total} at optimizer step {}; the parameters were not changed",
                self.steps + 1
            )));
        }
        let coef = match self.config.max_grad_norm {
            Some(max) => ((max as f32) / (total as f32 + 1e-6)).min(1.0),
            None => 1.0,
        };

        self.steps += 1;
        let c = &self.config;
        let t = self.steps as f64;
        let bc1 = 1.0 - c.beta1.powf(t);
        let bc2_sqrt = (1.0 - c.beta2.powf(t)).sqrt();
        let rule = Rule {
            coef,
            step_size: (c.lr / bc1) as f32,
            b2: c.beta2 as f32,
            wd: c.weight_decay as f32,
            eps: c.eps as f32,
            one_minus_b1: (1.0 - c.beta1) as f32,
            one_minus_b2: (1.0 - c.beta2) as f32,
            bc2_sqrt: bc2_sqrt as f32,
        };
        for ((var, mom), g) in self.vars.iter().zip(self.moments.iter_mut()).zip(gs) {
            let Some(g) = g else { continue };
            var.as_tensor().inplace_op2(&g, &Update { rule, moments: RefCell::new(mom) })?;
        }
        Ok(total)
    }
}

/// Runs `f` on a contiguous f32 CPU tensor's values, without copying them.
fn with_values<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        return Err(crate::Error::Invalid("the optimizer runs on the CPU only".into()));
    };
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| crate::Error::Invalid("the optimizer needs contiguous gradients".into()))?;
    Ok(f(&cpu.as_slice::<f32>()?[start..end]))
}

/// One step's constants of the Adam update.
#[derive(Clone, Copy)]
struct Rule {
    /// The clipping factor of every gradient.
    coef: f32,
    step_size: f32,
    b2: f32,
    wd: f32,
    eps: f32,
    one_minus_b1: f32,
    one_minus_b2: f32,
    bc2_sqrt: f32,
}

/// The update of one parameter, written into its storage from its gradient: copying both out and the result
/// back in was 4 % of the paper-size training step.
struct Update<'a> {
    rule: Rule,
    moments: RefCell<&'a mut Moments>,
}

impl InplaceOp2 for Update<'_> {
    fn name(&self) -> &'static str {
        "csflow-adam"
    }

    fn cpu_fwd(&self, ps: &mut CpuStorage, pl: &Layout, gs: &CpuStorage, gl: &Layout) -> candle_core::Result<()> {
        let (CpuStorage::F32(p), CpuStorage::F32(g)) = (ps, gs) else {
            candle_core::bail!("adam: parameters and gradients must be f32");
        };
        let (Some((p0, p1)), Some((g0, g1))) = (pl.contiguous_offsets(), gl.contiguous_offsets()) else {
            candle_core::bail!("adam: parameters and gradients must be contiguous");
        };
        let mut moments = self.moments.borrow_mut();
        let Moments { m, v } = &mut **moments;
        let (p, g) = (&mut p[p0..p1], &g[g0..g1]);
        if g.len() != p.len() || m.len() != p.len() {
            candle_core::bail!("adam: {} parameters, {} gradients, {} moments", p.len(), g.len(), m.len());
        }
        let r = self.rule;
        const CHUNK: usize = 1 << 15;
        p.par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK))
            .zip(m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK)))
            .for_each(|((p, g), (m, v))| {
                for i in 0..p.len() {
                    let grad = g[i] * r.coef + r.wd * p[i];
                    m[i] = lerp(m[i], grad, r.one_minus_b1);
                    v[i] = v[i] * r.b2 + r.one_minus_b2 * grad * grad;
                    let denom = v[i].sqrt() / r.bc2_sqrt + r.eps;
                    p[i] += -r.step_size * m[i] / denom;
                }
            });
        Ok(())
    }
}
