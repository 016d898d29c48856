//! Flow forward and training-step times (medians). Run: `cargo bench -p csflow --bench flow_step -- [paper|cpu] [batch] [reps]`.
//! The PyTorch side of the same workload is bench/flow_step.py; compare on the same machine and thread count.

use std::time::Instant;

use candle_core::{Device, Tensor};
use csflow::flow::{CsFlow, FlowConfig};
use csflow::train::{TrainConfig, Trainer};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() -> csflow::Result<()> {
    csflow::memory::retain_freed_memory();
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let size = args.first().map(String::as_str).unwrap_or("paper");
    let batch: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(1);
    let reps: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(3);
    let (config, map) = match size {
        "paper" => (FlowConfig::paper(), 24),
        _ => (FlowConfig::new(192, 256), 8),
    };
    let dev = Device::Cpu;
    let params = CsFlow::init_params(&config, 0, &dev)?;
    // Non-zero gammas, so every convolution matters (gradients flow everywhere), as after training.
    let params = params
        .into_iter()
        .map(|(n, t)| if n.contains("gamma") { Ok((n, (t + 0.1)?)) } else { Ok((n, t)) })
        .collect::<csflow::Result<_>>()?;
    let x = [
        Tensor::randn(0f32, 1.0, (batch, config.channels, map, map), &dev)?,
        Tensor::randn(0f32, 1.0, (batch, config.channels, map / 2, map / 2), &dev)?,
        Tensor::randn(0f32, 1.0, (batch, config.channels, map / 4, map / 4), &dev)?,
    ];
    let flow = CsFlow::new(config.clone(), &params)?;
    let mut fwd = Vec::new();
    for _ in 0..reps + 1 {
        let t = Instant::now();
        let out = flow.forward(&x)?;
        out.z[0].sum_all()?.to_scalar::<f32>()?;
        fwd.push(t.elapsed().as_secs_f64());
    }
    fwd.remove(0);
    let mut trainer = Trainer::new(config.clone(), &params, &TrainConfig::paper())?;
    let mut step = Vec::new();
    for _ in 0..reps + 1 {
        let t = Instant::now();
        trainer.step(&x)?;
        step.push(t.elapsed().as_secs_f64());
    }
    step.remove(0);
    println!(
        "csflow {size} C={} hidden={} maps {map}/{}/{} batch {batch} threads {}: forward {:.3} s, train step {:.3} s (median of {reps})",
        config.channels,
        config.hidden,
        map / 2,
        map / 4,
        rayon::current_num_threads(),
        median(fwd),
        median(step)
    );
    Ok(())
}
