use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use clap::Args;
use csflow::data::{validation_split, Dataset};
use csflow::extract::{content_hash, load_backbone_weights, weights_up_to, FeatureExtractor};
use csflow::flow::{CsFlow, FlowConfig, ParamMap};
use csflow::io::{load_features, load_model, save_features, save_model, BackboneMeta, FeatureSet, ModelMeta};
use csflow::train::{calibrate, AdamConfig, Event, TrainConfig, Trainer};

use crate::extract::{extract_with_progress, parse_size, progress_bar};

/// Where the backbone comes from when a command reads images.
#[derive(Args, Clone)]
pub struct BackboneArgs {
    /// efficientnet-lite0 .. efficientnet-lite4 or efficientnet-b0 .. efficientnet-b7.
    #[arg(long, env = "CSFLOW_BACKBONE", default_value = "efficientnet-lite0")]
    pub backbone: String,
    /// Backbone weights: a PyTorch checkpoint (.pth, zip or legacy format) or safetensors
    /// (scripts/setup.sh fetches the Lite0 weights to assets/).
    #[arg(long, env = "CSFLOW_BACKBONE_WEIGHTS", default_value = "assets/efficientnet-lite0-57934424.pth")]
    pub weights: PathBuf,
    /// Network input size, `256` or `HxW`; multiples of 128.
    #[arg(long, default_value = "256", value_parser = parse_size)]
    pub size: [usize; 2],
    /// Feature block (default: the last block at stride 32, e.g. 14 for Lite0, 35 for B5).
    #[arg(long)]
    pub block: Option<usize>,
}

#[derive(Args)]
#[command(group(clap::ArgGroup::new("input").required(true).args(["data", "features"])))]
pub struct FitArgs {
    /// Good images: an MVTec AD category (its train/good is used) or a folder of good images (recursive).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Or a features file of good samples (safetensors with scale_0, scale_1, scale_2); the model then
    /// scores features files only.
    #[arg(long)]
    features: Option<PathBuf>,
    #[command(flatten)]
    backbone: BackboneArgs,
    /// Features cache for --data (default: beside the model, `<model>.features.safetensors`).
    #[arg(long)]
    cache: Option<PathBuf>,
    /// Start from these weights (a csflow model or a state_dict exported from the authors' code).
    #[arg(long, conflicts_with = "resume")]
    init: Option<PathBuf>,
    /// Continue an interrupted run from its checkpoint (`<model>.checkpoint.safetensors`) up to --epochs, with
    /// its settings (learning rate, batch size, seed, validation split, backbone).
    #[arg(long)]
    resume: bool,
    /// Passes over the training set (the paper: 240).
    #[arg(long, default_value_t = 240)]
    epochs: usize,
    #[arg(long, conflicts_with = "resume", default_value_t = 16)]
    batch_size: usize,
    /// Adam learning rate (the paper: 2e-4).
    #[arg(long, conflicts_with = "resume", default_value_t = 2e-4)]
    lr: f64,
    /// Seed of the weight initialisation, the validation split and the batch shuffling.
    #[arg(long, conflicts_with = "resume", default_value_t = 0)]
    seed: u32,
    /// Hidden width of the subnets of a new flow (the paper: 1024; ignored with --init).
    #[arg(long, conflicts_with = "resume", default_value_t = 1024)]
    hidden: usize,
    /// Kernel size of each coupling block of a new flow (ignored with --init).
    #[arg(long, conflicts_with = "resume", value_delimiter = ',', default_value = "3,3,3,5")]
    kernel_sizes: Vec<usize>,
    /// Share of the good images held out to choose the threshold (never trained on; 0 = none, the
    /// threshold then comes from training images and rejects fewer good images than it should).
    #[arg(long, conflicts_with = "resume", default_value_t = 0.1)]
    validation_fraction: f64,
    /// Target share of good images rejected by the stored threshold.
    #[arg(long, default_value_t = 0.01)]
    max_false_reject: f64,
    /// Write a checkpoint every N epochs (atomically; 0 = never), for --resume.
    #[arg(long, default_value_t = 10)]
    checkpoint_every: usize,
    /// Keep the final checkpoint, so that training can later go on with `--resume --epochs <more>`.
    #[arg(long)]
    keep_checkpoint: bool,
    /// Where to write the model (safetensors).
    #[arg(short, long)]
    output: PathBuf,
}

/// Refuses an output that is a folder, read-only, or a file that is no csflow model, and makes the model's
/// folder, before any work (else writing the model, and a checkpoint next to it, would fail after training,
/// or replace a file that is not ours).
fn prepare_output(output: &Path) -> Result<()> {
    if output.is_dir() {
        bail!("{}: is a folder; name the model file to write", output.display());
    }
    // An earlier model is replaced (a run again) unless read-only; anything else there is kept.
    if std::fs::metadata(output).is_ok_and(|m| m.permissions().readonly()) {
        bail!("{}: the file is read-only; not replaced", output.display());
    }
    if output.is_file() {
        if let Err(e) = load_model(output) {
            bail!("{}: exists and is not a csflow model ({e}); delete it or choose another -o", output.display());
        }
    }
    if let Some(dir) = output.parent().filter(|d| !d.as_os_str().is_empty()) {
        if dir.exists() && !dir.is_dir() {
            bail!("{}: not a folder", dir.display());
        }
        std::fs::create_dir_all(dir).with_context(|| format!("creating the folder {}", dir.display()))?;
    }
    Ok(())
}

/// `<model>.<suffix>` beside the model (`model.safetensors` -> `model.checkpoint.safetensors`).
pub fn beside(model: &Path, suffix: &str) -> PathBuf {
    let stem = model.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
    model.with_file_name(format!("{stem}.{suffix}"))
}

/// A loaded backbone and what identifies it.
pub struct Backbone {
    pub extractor: FeatureExtractor,
    pub weights: BTreeMap<String, Tensor>,
    pub hash: String,
}

impl BackboneArgs {
    pub fn load(&self) -> Result<Backbone> {
        let w = &self.weights;
        let bytes = std::fs::read(w).with_context(|| {
            format!("reading backbone weights {} (run scripts/setup.sh, or pass --weights)", w.display())
        })?;
        let weights = load_backbone_weights(w)?;
        let extractor = FeatureExtractor::new(&self.backbone, &weights, self.block, self.size)
            .with_context(|| format!("{} as {}", w.display(), self.backbone))?;
        Ok(Backbone { weights: weights_up_to(&weights, extractor.block), extractor, hash: content_hash(&bytes) })
    }
}

/// Features of `images` through the cache file at `cache` (rewritten with what was extracted); unreadable
/// images are reported and skipped.
pub fn extract_cached(bb: &Backbone, images: &[(PathBuf, Option<u8>)], cache: &Path) -> Result<(FeatureSet, usize)> {
    let (set, reused, failed) = extract_with_progress(&bb.extractor, &bb.hash, images, cache)?;
    if reused < set.len() {
        save_features(cache, &set)?;
    }
    eprintln!("features of {} images ({reused} from the cache {})", set.len(), cache.display());
    Ok((set, failed))
}

pub fn run(a: FitArgs) -> Result<()> {
    // Settings are checked before any work, so that a run never fails after hours of training.
    if a.batch_size == 0 || a.epochs == 0 {
        bail!("--batch-size and --epochs must be at least 1");
    }
    if !(0.0..1.0).contains(&a.max_false_reject) || !(0.0..1.0).contains(&a.validation_fraction) {
        bail!("--max-false-reject and --validation-fraction must be in [0, 1)");
    }
    if !(a.lr > 0.0 && a.lr.is_finite()) {
        bail!("--lr must be a positive number, got {}", a.lr);
    }
    if a.init.is_none() && !a.resume {
        // The flow's channels come from the features; the rest of its shape is checked now.
        let mut shape = FlowConfig::new(2, a.hidden);
        shape.kernel_sizes = a.kernel_sizes.clone();
        shape.validate().context("--hidden and --kernel-sizes")?;
    }
    let cache = a.cache.clone().unwrap_or_else(|| beside(&a.output, "features.safetensors"));
    crate::outputs::check_not_an_input(
        &a.output,
        &[
            ("--weights", a.data.as_ref().map(|_| a.backbone.weights.as_path())),
            ("--features", a.features.as_deref()),
            ("--init", a.init.as_deref()),
            ("the features cache (--cache)", a.data.as_ref().map(|_| cache.as_path())),
        ],
    )?;
    prepare_output(&a.output)?;
    let checkpoint = beside(&a.output, "checkpoint.safetensors");
    for written in [&a.output, &checkpoint] {
        csflow::io::remove_stale_temporaries(written);
    }
    let resumed = if a.resume {
        let m = load_model(&checkpoint)
            .with_context(|| format!("--resume needs the checkpoint {} of an earlier run", checkpoint.display()))?;
        if a.epochs < m.meta.epochs_done {
            bail!("{}: already {} epochs done; ask for more with --epochs", checkpoint.display(), m.meta.epochs_done);
        }
        Some(m)
    } else {
        if checkpoint.exists() {
            bail!(
                "{} of an earlier run exists: continue it with --resume, or delete it to start again",
                checkpoint.display()
            );
        }
        None
    };
    let previous = resumed.as_ref().and_then(|m| m.meta.training.clone());
    if let Some(t) = &previous {
        // A checkpoint's metadata is read back as the run's settings: checked as the flags are.
        t.validate().with_context(|| format!("{}: the checkpoint's settings", checkpoint.display()))?;
    }
    let (seed, fraction) =
        previous.as_ref().map_or((a.seed, a.validation_fraction), |t| (t.seed, t.validation_fraction));

    let (mut data, backbone, failed) = match (&a.data, &a.features) {
        (Some(dir), _) => {
            let ds = Dataset::open(dir)?;
            let bb = a.backbone.load()?;
            if let Some(was) = resumed.as_ref().and_then(|m| m.meta.backbone.as_ref()) {
                let now = (&bb.extractor.name, bb.extractor.block, bb.extractor.size, &bb.hash);
                if (&was.name, was.block, was.input_size, &was.weights_hash) != now {
                    bail!(
                        "{}: the run was started with {} block {} at {}x{} (other weights or settings); resume with \
                         the same --backbone, --weights, --block and --size",
                        checkpoint.display(),
                        was.name,
                        was.block,
                        was.input_size[0],
                        was.input_size[1]
                    );
                }
            }
            let images: Vec<_> = ds.train.iter().map(|s| (s.path.clone(), Some(0))).collect();
            eprintln!("{}: {} good training images", dir.display(), images.len());
            let (set, failed) = extract_cached(&bb, &images, &cache)?;
            (set, Some(bb), failed)
        }
        (None, Some(f)) => (load_features(f)?, None, 0),
        (None, None) => unreachable!("clap requires one input"),
    };
    if let Some(labels) = data.labels.clone() {
        let good: Vec<usize> = (0..data.len()).filter(|&i| labels[i] == 0).collect();
        if good.len() < data.len() {
            eprintln!(
                "training on the {} good samples only ({} labelled defective left out)",
                good.len(),
                data.len() - good.len()
            );
            if good.is_empty() {
                bail!("no good samples to train on");
            }
            data = data.select(&good)?;
        }
    }
    // What the run trains on (contents, not path spellings), so --resume can refuse a different training set.
    let identity = data.extra.get("hashes").cloned().unwrap_or_else(|| data.paths.join("\n"));
    let train_set = content_hash(identity.as_bytes());
    let (train_idx, val_idx) = validation_split(data.len(), fraction, seed);
    let (train, validation) =
        if val_idx.is_empty() { (data, None) } else { (data.select(&train_idx)?, Some(data.select(&val_idx)?)) };

    let (mut meta, params, optimizer) = match resumed {
        Some(m) => {
            if m.meta.features.get("train_set") != Some(&train_set) {
                bail!(
                    "{}: the checkpoint was trained on other images; resume with the same data",
                    checkpoint.display()
                );
            }
            let opt: ParamMap = m
                .other
                .iter()
                .filter(|(k, _)| k.starts_with("optimizer."))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            (m.meta, m.params, Some(opt))
        }
        None => match &a.init {
            Some(p) => {
                let m = load_model(p)?;
                (m.meta, m.params, None)
            }
            None => {
                let mut config = FlowConfig::new(train.channels(), a.hidden);
                config.kernel_sizes = a.kernel_sizes.clone();
                config.validate()?;
                let params = CsFlow::init_params(&config, a.seed as u64, &Device::Cpu)?;
                (ModelMeta::new(CsFlow::config_from_params(&params)?), params, None)
            }
        },
    };
    let config = meta.flow.clone();
    if config.channels != train.channels() {
        bail!(
            "{}: features have {} channels but the model expects {}",
            a.data.as_ref().or(a.features.as_ref()).unwrap().display(),
            train.channels(),
            config.channels
        );
    }
    let train_config = match previous {
        Some(t) => TrainConfig { epochs: a.epochs, ..t },
        None => TrainConfig {
            epochs: a.epochs,
            batch_size: a.batch_size,
            seed: a.seed,
            adam: AdamConfig::paper(a.lr),
            validation_fraction: a.validation_fraction,
        },
    };
    let mut trainer = Trainer::new(config.clone(), &params, &train_config)?;
    trainer.flow().check_input(&train.scales).context("training features")?;
    let first_epoch = match &optimizer {
        Some(state) => {
            let done = meta.epochs_done;
            let steps = (done * train.len().div_ceil(train_config.batch_size)) as u64;
            trainer.resume(done, train.len(), steps, state)?;
            eprintln!("resuming at epoch {} of {}", done + 1, a.epochs);
            done
        }
        None => {
            // A threshold and score statistics belong to the weights they were measured on.
            meta.threshold = None;
            meta.threshold_source = None;
            meta.train_scores = None;
            meta.validation_scores = None;
            meta.good_map_range = None;
            meta.good_product_range = None;
            meta.epochs_done = 0;
            0
        }
    };
    let dims = |i: usize| [train.scales[i].dims()[2], train.scales[i].dims()[3]];
    meta.map_sizes = Some([dims(0), dims(1), dims(2)]);
    meta.training = Some(train_config.clone());
    meta.features =
        train.extra.iter().filter(|(k, _)| k.as_str() != "hashes").map(|(k, v)| (k.clone(), v.clone())).collect();
    meta.features.insert("train_set".into(), train_set);
    meta.backbone = backbone.as_ref().map(|bb| BackboneMeta {
        name: bb.extractor.name.clone(),
        block: bb.extractor.block,
        input_size: bb.extractor.size,
        weights_hash: bb.hash.clone(),
    });
    let backbone_tensors: BTreeMap<String, Tensor> = backbone
        .as_ref()
        .map(|bb| bb.weights.iter().map(|(k, v)| (format!("{}{k}", csflow::io::BACKBONE_PREFIX), v.clone())).collect())
        .unwrap_or_default();

    let steps_per_epoch = train.len().div_ceil(train_config.batch_size.max(1));
    let bar = progress_bar(a.epochs.saturating_sub(first_epoch) * steps_per_epoch, "steps");
    for epoch in first_epoch..a.epochs {
        let result = trainer.epoch(&train.scales, train_config.batch_size, &mut |e| match e {
            Event::Step { loss, .. } => {
                bar.inc(1);
                bar.set_message(format!("loss {loss:.4}"));
            }
            Event::Epoch { epoch, mean_loss } => {
                bar.suspend(|| eprintln!("epoch {:>4}  loss {mean_loss:.6}", epoch + 1))
            }
        });
        match result {
            Err(e @ csflow::Error::Diverged(_)) => {
                bar.abandon();
                let advice = if checkpoint.exists() {
                    format!(
                        "the checkpoint {} keeps the last good weights; train again with a lower --lr, from them with \
                         --init {0} -o <new model>",
                        checkpoint.display()
                    )
                } else {
                    "no checkpoint was written yet; train again with a lower --lr".into()
                };
                bail!("{e}\n{advice}");
            }
            Err(e) => return Err(e.into()),
            Ok(_) => {}
        }
        let done = epoch + 1;
        let periodic = a.checkpoint_every > 0 && done % a.checkpoint_every == 0;
        // The last epoch is checkpointed too, so that nothing after training (scoring, writing) can lose it.
        if periodic || ((a.checkpoint_every > 0 || a.keep_checkpoint) && done == a.epochs) {
            meta.epochs_done = done;
            let (_, opt) = trainer.optimizer_state()?;
            let mut extra = backbone_tensors.clone();
            extra.extend(opt);
            save_model(&checkpoint, &trainer.params(), &extra, &meta)?;
        }
    }
    bar.finish_and_clear();

    let params = trainer.params();
    let flow = CsFlow::new(config, &params)?.for_inference(meta.map_sizes)?;
    // The good maps' range on the finest latent grid: bilinear upsampling cannot exceed its maximum, and the
    // grid is small at any input size.
    let map_size = (dims(0)[0], dims(0)[1]);
    let val_scales = validation.as_ref().map(|v| &v.scales);
    calibrate(&mut meta, &flow, &train.scales, val_scales, map_size, a.max_false_reject, train_config.batch_size)?;
    meta.epochs_done = a.epochs;
    save_model(&a.output, &params, &backbone_tensors, &meta)?;
    if checkpoint.exists() && !a.keep_checkpoint {
        std::fs::remove_file(&checkpoint).with_context(|| format!("removing {}", checkpoint.display()))?;
    }
    if let Some(s) = &meta.train_scores {
        eprintln!("training scores: mean {:.4}, std {:.4}, max {:.4}", s.mean, s.std, s.max);
    }
    if let Some(s) = &meta.validation_scores {
        eprintln!("validation scores ({} held-out good images): mean {:.4}, max {:.4}", s.count, s.mean, s.max);
    }
    if let (Some(t), Some(src)) = (meta.threshold, &meta.threshold_source) {
        eprintln!("threshold {t:.4}: {src}");
    }
    eprintln!("wrote {}", a.output.display());
    if failed > 0 {
        bail!("{failed} image(s) could not be read (skipped; the model was trained on the rest)");
    }
    Ok(())
}
