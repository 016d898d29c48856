//! `csflow synth`: a labelled data set with synthetic defects and their masks, from good images only.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use csflow::synth::{good_images, write_dataset, CropSpec, DefectKind, SynthConfig};
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Args)]
pub struct SynthArgs {
    /// Good images: a folder (searched recursively) or an image file; may be given several times.
    #[arg(long, required = true)]
    good: Vec<PathBuf>,
    /// Folder to write the data set into, in the MVTec AD layout: train/good, test/good, test/<defect>,
    /// ground_truth/<defect>/<name>_mask.png, and synth.json (where each file came from). It must be new or
    /// empty (see --force).
    #[arg(short, long)]
    out: PathBuf,
    /// Defective images per defect type.
    #[arg(long, default_value_t = 10)]
    count: usize,
    /// Defect types, comma-separated: scratch, spot, stain, cut_paste, foreign_texture.
    #[arg(long, value_delimiter = ',', default_value = "scratch,spot,stain,cut_paste,foreign_texture")]
    defects: Vec<DefectKind>,
    /// Fraction of the good images that go to train/good; the rest are held out: written to test/good and used
    /// as the bases of the defective images (never a training image).
    #[arg(long, default_value_t = 0.8)]
    train_fraction: f64,
    /// Random seed: the same inputs and seed give byte-identical files.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Cut every good image into square crops of this many pixels first (a non-overlapping grid), e.g. to make
    /// a data set from a few large texture photos.
    #[arg(long, value_name = "PX")]
    crop: Option<u32>,
    /// With --crop: this many random crops per image instead of the grid (crops may overlap, so a test crop
    /// can share pixels with a training crop).
    #[arg(long, requires = "crop", value_name = "N")]
    crops_per_image: Option<usize>,
    /// Images (files or folders) to take foreign textures from. Default: good images of another folder (with
    /// --crop: of another photo) when there are any, and generated textures.
    #[arg(long)]
    foreign: Vec<PathBuf>,
    /// Write into a non-empty output folder: the files a previous run wrote there (NNN.png and NNN_mask.png
    /// under train, test and ground_truth, and synth.json) are deleted first; nothing else is touched.
    #[arg(long)]
    force: bool,
}

pub fn run(a: SynthArgs) -> Result<()> {
    let good = good_images(&a.good)?;
    let foreign = good_images(&a.foreign)?;
    let config = SynthConfig {
        kinds: a.defects.clone(),
        count_per_defect: a.count,
        train_fraction: a.train_fraction,
        seed: a.seed,
        crop: a.crop.map(|size| CropSpec { size, per_image: a.crops_per_image }),
        foreign,
        force: a.force,
    };
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} files, eta {eta}")?
            .progress_chars("=> "),
    );
    let progress = |done: usize, total: usize| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    };
    let result = write_dataset(&good, &a.out, &config, &progress);
    bar.finish_and_clear();
    let s = result?;

    for (_, msg) in &s.skipped {
        eprintln!("skipped: {msg}");
    }
    let unit = if config.crop.is_some() { "crops" } else { "images" };
    eprintln!(
        "wrote {} (MVTec AD layout) from {} good {unit} of {} file(s), seed {}:",
        s.out.display(),
        s.sources,
        good.len(),
        config.seed
    );
    eprintln!("  train/good                  {:>5} images", s.train_good);
    eprintln!("  test/good                   {:>5} images (held out, unchanged)", s.test_good);
    for (kind, n) in &s.defects {
        let dir = format!("test/{}", kind.name());
        eprintln!("  {dir:<27} {n:>5} images, masks in ground_truth/{}", kind.name());
    }
    eprintln!("  synth.json                  where each file came from");
    if !s.skipped.is_empty() {
        anyhow::bail!("{} input image(s) could not be used (listed above); the rest was written", s.skipped.len());
    }
    Ok(())
}
