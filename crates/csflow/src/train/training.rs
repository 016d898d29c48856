use candle_core::{Tensor, Var};

use super::optimizer::{Adam, AdamConfig};
use crate::flow::permutation::Mt19937;
use crate::flow::{CsFlow, FlowConfig, ParamMap};
use crate::{Error, Result};

/// How long and how to train.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct TrainConfig {
    pub epochs: usize,
    pub batch_size: usize,
    /// Seed of the batch shuffling (numpy's legacy generator: epoch e uses the e-th `permutation(N)`).
    pub seed: u32,
    pub adam: AdamConfig,
    /// Share of the good images held out for the threshold (split seeded with `seed`); 0 = none.
    #[serde(default)]
    pub validation_fraction: f64,
}

impl TrainConfig {
    /// The paper's run: 240 epochs of batch 16 at learning rate 2e-4.
    pub fn paper() -> Self {
        Self { epochs: 240, batch_size: 16, seed: 0, adam: AdamConfig::paper(2e-4), validation_fraction: 0.0 }
    }

    /// Settings a run can train with, also those read back from a checkpoint's metadata.
    pub fn validate(&self) -> Result<()> {
        let a = &self.adam;
        let problem = if self.epochs == 0 || self.batch_size == 0 {
            Some(format!("epochs {} and batch size {} must be at least 1", self.epochs, self.batch_size))
        } else if !(a.lr > 0.0 && a.lr.is_finite()) {
            Some(format!("the learning rate must be a positive number, got {}", a.lr))
        } else if ![a.beta1, a.beta2].iter().all(|b| (0.0..1.0).contains(b)) {
            Some(format!("Adam's betas must be in [0, 1), got {} and {}", a.beta1, a.beta2))
        } else if !(a.eps > 0.0 && a.eps.is_finite() && a.weight_decay >= 0.0 && a.weight_decay.is_finite()) {
            Some(format!(
                "Adam's eps must be positive and its weight decay not negative, got {} and {}",
                a.eps, a.weight_decay
            ))
        } else if a.max_grad_norm.is_some_and(|n| !(n > 0.0 && n.is_finite())) {
            Some(format!("the gradient clip norm must be positive, got {:?}", a.max_grad_norm))
        } else if !(0.0..1.0).contains(&self.validation_fraction) {
            Some(format!("the validation fraction must be in [0, 1), got {}", self.validation_fraction))
        } else {
            None
        };
        match problem {
            Some(p) => Err(Error::Invalid(format!("training settings: {p}"))),
            None => Ok(()),
        }
    }
}

/// Progress reported to the caller (the CLI draws bars from it; the library prints nothing).
#[derive(Clone, Debug)]
pub enum Event {
    Step { epoch: usize, step: usize, steps_per_epoch: usize, loss: f32 },
    Epoch { epoch: usize, mean_loss: f64 },
}

/// A flow being trained: its parameters as variables, the model reading them, the optimizer.
pub struct Trainer {
    names: Vec<String>,
    vars: Vec<Var>,
    flow: CsFlow,
    adam: Adam,
    shuffler: Mt19937,
    epochs_done: usize,
}

impl Trainer {
    pub fn new(config: FlowConfig, params: &ParamMap, train: &TrainConfig) -> Result<Self> {
        train.validate()?;
        let mut names = Vec::new();
        let mut vars = Vec::new();
        let mut tracked = ParamMap::new();
        for (name, t) in params {
            let v = Var::from_tensor(t)?;
            tracked.insert(name.clone(), v.as_tensor().clone());
            names.push(name.clone());
            vars.push(v);
        }
        let flow = CsFlow::new(config, &tracked)?;
        let adam = Adam::new(train.adam.clone(), vars.clone());
        Ok(Self { names, vars, flow, adam, shuffler: Mt19937::new(train.seed), epochs_done: 0 })
    }

    pub fn flow(&self) -> &CsFlow {
        &self.flow
    }

    pub fn epochs_done(&self) -> usize {
        self.epochs_done
    }

    /// Optimizer state as tensors `optimizer.<param>.exp_avg` / `.exp_avg_sq` (PyTorch's names for Adam's
    /// moments) and the optimizer's step count.
    pub fn optimizer_state(&self) -> Result<(u64, ParamMap)> {
        let (steps, moments) = self.adam.state();
        let mut out = ParamMap::new();
        for ((name, var), (m, v)) in self.names.iter().zip(&self.vars).zip(moments) {
            out.insert(format!("optimizer.{name}.exp_avg"), Tensor::from_slice(m, var.shape(), var.device())?);
            out.insert(format!("optimizer.{name}.exp_avg_sq"), Tensor::from_slice(v, var.shape(), var.device())?);
        }
        Ok((steps, out))
    }

    /// Continues a run: restores the optimizer state written by [`Trainer::optimizer_state`] and advances
    /// the shuffling stream past `epochs_done` epochs over `n` samples, so the next epoch draws the batches
    /// an uninterrupted run would have drawn.
    pub fn resume(&mut self, epochs_done: usize, n: usize, steps: u64, state: &ParamMap) -> Result<()> {
        let mut moments = Vec::with_capacity(self.names.len());
        for name in &self.names {
            let get = |suffix: &str| -> Result<Vec<f32>> {
                let key = format!("optimizer.{name}.{suffix}");
                let t = state.get(&key).ok_or_else(|| Error::Invalid(format!("optimizer state lacks `{key}`")))?;
                Ok(t.flatten_all()?.to_vec1::<f32>()?)
            };
            moments.push((get("exp_avg")?, get("exp_avg_sq")?));
        }
        self.adam.set_state(steps, moments)?;
        for _ in 0..epochs_done {
            self.shuffler.permutation(n);
        }
        self.epochs_done = epochs_done;
        Ok(())
    }

    /// The current parameters, detached from the training graph.
    pub fn params(&self) -> ParamMap {
        self.names.iter().zip(&self.vars).map(|(n, v)| (n.clone(), v.as_tensor().detach())).collect()
    }

    /// One optimizer step on a batch; a non-finite loss stops before the parameters change.
    pub fn step(&mut self, batch: &[Tensor; 3]) -> Result<f32> {
        csflow_kernels::on_worker(|| self.step_here(batch))
    }

    /// [`Trainer::step`] on the calling thread.
    fn step_here(&mut self, batch: &[Tensor; 3]) -> Result<f32> {
        let loss = self.flow.forward(batch)?.loss()?;
        let value: f32 = loss.to_scalar()?;
        if !value.is_finite() {
            return Err(Error::Diverged(format!(
                "the loss became {value} at optimizer step {}; the parameters were not changed",
                self.adam.steps() + 1
            )));
        }
        self.adam.backward_step(loss)?;
        Ok(value)
    }

    /// One epoch over `data` ([N, C, h, w] per scale) in shuffled batches, the last partial batch kept.
    /// Returns the mean loss per sample.
    pub fn epoch(&mut self, data: &[Tensor; 3], batch_size: usize, on_event: &mut dyn FnMut(Event)) -> Result<f64> {
        let n = data[0].dim(0)?;
        if n == 0 {
            return Err(Error::Invalid("no training samples".into()));
        }
        if batch_size == 0 {
            return Err(Error::Invalid("the batch size must be positive".into()));
        }
        let order: Vec<u32> = self.shuffler.permutation(n).into_iter().map(|i| i as u32).collect();
        let steps_per_epoch = n.div_ceil(batch_size);
        let mut total = 0f64;
        for (step, chunk) in order.chunks(batch_size).enumerate() {
            let idx = Tensor::from_vec(chunk.to_vec(), chunk.len(), data[0].device())?;
            let batch =
                [data[0].index_select(&idx, 0)?, data[1].index_select(&idx, 0)?, data[2].index_select(&idx, 0)?];
            let loss = self.step(&batch)?;
            total += loss as f64 * chunk.len() as f64;
            on_event(Event::Step { epoch: self.epochs_done, step, steps_per_epoch, loss });
        }
        let mean_loss = total / n as f64;
        on_event(Event::Epoch { epoch: self.epochs_done, mean_loss });
        self.epochs_done += 1;
        Ok(mean_loss)
    }
}
