use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;
use csflow::extract::{
    check_size, content_hash, extract_images, list_images, load_backbone_weights, Cache, FeatureExtractor,
};
use csflow::io::{save_features, write_safetensors, FeatureSet};
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
    let hash = content_hash(&std::fs::read(&a.weights).with_context(|| format!("{}", a.weights.display()))?);
    let (set, reused, failed) = extract_with_progress(&ex, &hash, &images, &a.output)?;
    save_features(&a.output, &set)?;
    eprintln!(
        "wrote {} ({} images, {reused} from the cache, {failed} unreadable; {} channels)",
        a.output.display(),
        set.len(),
        ex.channels()
    );
    if failed > 0 {
        anyhow::bail!("{failed} image(s) could not be read");
    }
    Ok(())
}

/// Features of `images` with a progress bar, reusing rows of the features file `cache` made with the same
/// settings; unreadable images are reported and skipped. Returns the features, how many rows came from the
/// cache and how many images could not be read; none readable is an error.
pub fn extract_with_progress(
    ex: &FeatureExtractor,
    weights_hash: &str,
    images: &[(PathBuf, Option<u8>)],
    cache: &Path,
) -> Result<(FeatureSet, usize, usize)> {
    let settings = ex.settings(weights_hash);
    let cached = Cache::open(cache, &settings)?;
    let bar = progress_bar(images.len(), "images");
    let out = extract_images(ex, images, &settings, &cached, &mut |path, err| {
        bar.set_message(path.display().to_string());
        if let Some(e) = err {
            bar.suspend(|| eprintln!("skipped: {e}"));
        }
        bar.inc(1);
    })?;
    bar.finish_and_clear();
    let Some(set) = out.set else { anyhow::bail!("none of the {} images could be read", images.len()) };
    Ok((set, out.reused, out.failed.len()))
}

/// A progress bar over `len` items of `unit`, drawn on stderr.
pub fn progress_bar(len: usize, unit: &str) -> ProgressBar {
    let bar = ProgressBar::new(len as u64);
    let style = ProgressStyle::with_template(&format!(
        "{{elapsed_precise}} [{{bar:30}}] {{pos}}/{{len}} {unit}, eta {{eta}} {{msg}}"
    ))
    .expect("valid template")
    .progress_chars("=> ");
    bar.set_style(style);
    bar
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
    crate::outputs::check_not_an_input(&a.output, &[("--weights", Some(&a.weights))])?;
    let tensors = load_backbone_weights(&a.weights)?;
    write_safetensors(&a.output, &tensors, Default::default())?;
    eprintln!("wrote {} ({} tensors)", a.output.display(), tensors.len());
    Ok(())
}
