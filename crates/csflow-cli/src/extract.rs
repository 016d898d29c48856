use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use csflow::extract::{
    assemble, check_size, content_hash, list_images, load_backbone_weights, Cache, FeatureExtractor,
};
use csflow::io::{preprocess, save_features, write_safetensors};
use indicatif::{ProgressBar, ProgressStyle};

/// Parses `256` or `384x256` (height x width).
pub fn parse_size(s: &str) -> Result<[usize; 2], String> {
    let parse = |v: &str| {
        v.trim().parse::<usize>().map_err(|_| format!("`{s}` is not a size: use 256 or 384x256 (height x width)"))
    };
    let size = match s.split_once(['x', 'X']) {
        Some((h, w)) => [parse(h)?, parse(w)?],
        None => [parse(s)?; 2],
    };
    check_size(size).map_err(|e| e.to_string())?;
    Ok(size)
}

#[derive(Args)]
pub struct ExtractArgs {
    /// Folder of images, searched recursively (a folder with a `good` subfolder gives labels: good 0, others 1).
    #[arg(long)]
    images: PathBuf,
    /// efficientnet-lite0 .. efficientnet-lite4 or efficientnet-b0 .. efficientnet-b7.
    #[arg(long, default_value = "efficientnet-lite0")]
    backbone: String,
    /// Backbone weights: a PyTorch checkpoint (.pth, zip or legacy format) or safetensors.
    #[arg(long)]
    weights: PathBuf,
    /// Network input size, `256` or `HxW`; multiples of 128.
    #[arg(long, default_value = "256", value_parser = parse_size)]
    size: [usize; 2],
    /// Feature block (default: the last block at stride 32, e.g. 14 for Lite0, 35 for B5).
    #[arg(long)]
    block: Option<usize>,
    /// Features file to write; an existing one made with the same settings serves as a cache.
    #[arg(short, long)]
    output: PathBuf,
}

pub fn run(a: ExtractArgs) -> Result<()> {
    let weights = load_backbone_weights(&a.weights)?;
    let ex = FeatureExtractor::new(&a.backbone, &weights, a.block, a.size)
        .with_context(|| format!("{} as {}", a.weights.display(), a.backbone))?;
    let images = list_images(&a.images)?;
    let settings: BTreeMap<String, String> = [
        ("backbone".to_string(), a.backbone.clone()),
        ("feature_block".to_string(), ex.block.to_string()),
        ("input_size".to_string(), format!("{}x{}", a.size[0], a.size[1])),
        (
            "weights_hash".to_string(),
            content_hash(&std::fs::read(&a.weights).with_context(|| format!("{}", a.weights.display()))?),
        ),
    ]
    .into();
    let cache = Cache::open(&a.output, &settings);
    let bar = ProgressBar::new(images.len() as u64);
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} images, eta {eta} {msg}")?
            .progress_chars("=> "),
    );
    let (mut rows, mut failed, mut reused) = (Vec::new(), 0usize, 0usize);
    for (path, label) in &images {
        let shown = path.display().to_string();
        bar.set_message(shown.clone());
        let result = (|| -> csflow::Result<(String, [candle_core::Tensor; 3])> {
            let bytes = std::fs::read(path).map_err(|e| csflow::Error::io(path, e))?;
            let hash = content_hash(&bytes);
            if let Some(row) = cache.get(&shown, &hash) {
                reused += 1;
                return Ok((hash, row));
            }
            let (pyramid, _) = preprocess(path, a.size[0], a.size[1], 3)?;
            let features = ex.features(&pyramid).map_err(|e| csflow::Error::format(path, e.to_string()))?;
            Ok((hash, features))
        })();
        match result {
            Ok((hash, f)) => rows.push((shown, hash, *label, f)),
            Err(e) => {
                failed += 1;
                bar.suspend(|| eprintln!("skipped: {e}"));
            }
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    let set = assemble(rows, &settings)?;
    save_features(&a.output, &set)?;
    eprintln!(
        "wrote {} ({} images, {} from the cache, {failed} unreadable; {} channels)",
        a.output.display(),
        set.len(),
        reused,
        ex.channels()
    );
    if failed > 0 {
        anyhow::bail!("{failed} image(s) could not be read");
    }
    Ok(())
}

#[derive(Args)]
pub struct ImportArgs {
    /// Backbone weights to convert: a PyTorch checkpoint (.pth, zip or legacy format).
    #[arg(long)]
    weights: PathBuf,
    /// Safetensors file to write.
    #[arg(short, long)]
    output: PathBuf,
}

/// Converts a backbone checkpoint to safetensors (names kept, f32).
pub fn import(a: ImportArgs) -> Result<()> {
    let tensors = load_backbone_weights(&a.weights)?;
    write_safetensors(&a.output, &tensors, Default::default())?;
    eprintln!("wrote {} ({} tensors)", a.output.display(), tensors.len());
    Ok(())
}
