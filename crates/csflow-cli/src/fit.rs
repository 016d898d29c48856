use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use clap::Args;
use csflow::flow::{CsFlow, FlowConfig};
use csflow::io::{load_features, load_model, save_model, ModelMeta, ScoreStats};
use csflow::score::image_scores;
use csflow::train::{AdamConfig, Event, TrainConfig, Trainer};
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Args)]
pub struct FitArgs {
    /// Features file of good samples (safetensors with scale_0, scale_1, scale_2).
    #[arg(long)]
    features: PathBuf,
    /// Start from these weights (a csflow model or a state_dict exported from the authors' code).
    #[arg(long)]
    init: Option<PathBuf>,
    /// Passes over the training set (the paper: 240).
    #[arg(long, default_value_t = 240)]
    epochs: usize,
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    /// Adam learning rate (the paper: 2e-4).
    #[arg(long, default_value_t = 2e-4)]
    lr: f64,
    /// Seed of the weight initialisation and of the batch shuffling.
    #[arg(long, default_value_t = 0)]
    seed: u32,
    /// Hidden width of the subnets of a new flow (the paper: 1024; ignored with --init).
    #[arg(long, default_value_t = 1024)]
    hidden: usize,
    /// Kernel size of each coupling block of a new flow (ignored with --init).
    #[arg(long, value_delimiter = ',', default_value = "3,3,3,5")]
    kernel_sizes: Vec<usize>,
    /// Also write the model every N epochs (atomically), so an interrupted run loses little.
    #[arg(long)]
    checkpoint_every: Option<usize>,
    /// Where to write the model (safetensors).
    #[arg(short, long)]
    output: PathBuf,
}

pub fn run(a: FitArgs) -> Result<()> {
    let data = load_features(&a.features)?;
    let (init_meta, params) = match &a.init {
        Some(p) => {
            let m = load_model(p)?;
            (Some(m.meta), m.params)
        }
        None => {
            let mut config = FlowConfig::new(data.channels(), a.hidden);
            config.kernel_sizes = a.kernel_sizes.clone();
            config.validate()?;
            let params = CsFlow::init_params(&config, a.seed as u64, &Device::Cpu)?;
            (None, params)
        }
    };
    let config = match &init_meta {
        Some(m) => m.flow.clone(),
        None => CsFlow::config_from_params(&params)?,
    };
    if config.channels != data.channels() {
        bail!(
            "{}: features have {} channels but the model expects {}",
            a.features.display(),
            data.channels(),
            config.channels
        );
    }
    let train = TrainConfig { epochs: a.epochs, batch_size: a.batch_size, seed: a.seed, adam: AdamConfig::paper(a.lr) };
    let mut trainer = Trainer::new(config.clone(), &params, &train)?;
    trainer.flow().check_input(&data.scales).with_context(|| format!("{}", a.features.display()))?;

    let steps_per_epoch = data.len().div_ceil(a.batch_size.max(1));
    let bar = ProgressBar::new((a.epochs * steps_per_epoch) as u64);
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} steps, eta {eta} {msg}")?
            .progress_chars("=> "),
    );
    let mut meta = init_meta.unwrap_or_else(|| ModelMeta::new(config.clone()));
    let dims = |i: usize| [data.scales[i].dims()[2], data.scales[i].dims()[3]];
    meta.map_sizes = Some([dims(0), dims(1), dims(2)]);
    meta.training = Some(train.clone());
    // A threshold and score statistics belong to the weights they were measured on.
    meta.threshold = None;
    meta.train_scores = None;
    meta.features =
        data.extra.iter().filter(|(k, _)| k.as_str() != "hashes").map(|(k, v)| (k.clone(), v.clone())).collect();
    let start_epochs = meta.epochs_done;

    for epoch in 0..a.epochs {
        let mean = trainer.epoch(&data.scales, a.batch_size, &mut |e| match e {
            Event::Step { loss, .. } => {
                bar.inc(1);
                bar.set_message(format!("loss {loss:.4}"));
            }
            Event::Epoch { epoch, mean_loss } => {
                bar.suspend(|| eprintln!("epoch {:>4}  loss {mean_loss:.6}", epoch + 1))
            }
        })?;
        if !mean.is_finite() {
            bail!("the loss is not finite");
        }
        if a.checkpoint_every.is_some_and(|n| n > 0 && (epoch + 1) % n == 0 && epoch + 1 < a.epochs) {
            meta.epochs_done = start_epochs + epoch + 1;
            save_model(&a.output, &trainer.params(), &meta)?;
        }
    }
    bar.finish_and_clear();

    let params = trainer.params();
    let flow = CsFlow::new(config, &params)?;
    let scores = score_all(&flow, &data.scales, a.batch_size)?;
    meta.train_scores = ScoreStats::from_scores(&scores);
    meta.epochs_done = start_epochs + a.epochs;
    save_model(&a.output, &params, &meta)?;
    if let Some(s) = &meta.train_scores {
        eprintln!("training scores: mean {:.4}, std {:.4}, max {:.4}", s.mean, s.std, s.max);
    }
    eprintln!("wrote {}", a.output.display());
    Ok(())
}

/// Image scores of all samples, in batches.
pub fn score_all(flow: &CsFlow, scales: &[candle_core::Tensor; 3], batch: usize) -> Result<Vec<f32>> {
    let n = scales[0].dim(0)?;
    let mut out = Vec::with_capacity(n);
    let batch = batch.max(1);
    for start in (0..n).step_by(batch) {
        let len = batch.min(n - start);
        let x = [scales[0].narrow(0, start, len)?, scales[1].narrow(0, start, len)?, scales[2].narrow(0, start, len)?];
        let o = flow.forward(&x)?;
        out.extend(image_scores(&o)?.to_vec1::<f32>()?);
    }
    Ok(out)
}
