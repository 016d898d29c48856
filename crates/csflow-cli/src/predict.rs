use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use csflow::data::dataset::images_in;
use csflow::detector::Detector;
use csflow::extract::is_image;
use csflow::io::{atomic_write, load_features, load_model};
use csflow::overlay::encode_png;
use csflow::score::{score_features, MapMode};
use csflow::threshold::Verdict;
use csflow::Precision;
use rayon::prelude::*;

use crate::extract::progress_bar;
use crate::outputs::canonical_lenient;

#[derive(Args)]
#[command(group(clap::ArgGroup::new("input").required(true).args(["inputs", "features"])))]
pub struct PredictArgs {
    /// Model file written by `csflow fit --data` (it holds its backbone).
    #[arg(long)]
    model: PathBuf,
    /// Image files, folders (searched recursively) or glob patterns (`'parts/*.png'`).
    inputs: Vec<String>,
    /// Or a features file to score (any csflow model, or a state_dict exported from the authors' code).
    #[arg(long, conflicts_with = "inputs")]
    features: Option<PathBuf>,
    /// Decision threshold on the score (default: the model's).
    #[arg(long, value_parser = csflow::threshold::parse_finite::<f64>)]
    threshold: Option<f64>,
    /// Write a heatmap overlay per image into this folder (PNG, mirroring the input folders).
    #[arg(long)]
    heatmaps: Option<PathBuf>,
    /// Write a binary defect mask per image into this folder (`<name>_mask.png`, 255 = defect).
    #[arg(long)]
    masks: Option<PathBuf>,
    /// Anomaly-map value from which a pixel is marked defective in --masks (default: the highest value
    /// seen on good images at training).
    #[arg(long, value_parser = csflow::threshold::parse_finite::<f32>)]
    mask_threshold: Option<f32>,
    /// Replace existing files with the pictures of --heatmaps and --masks (else such a run is refused before
    /// scoring).
    #[arg(long)]
    overwrite: bool,
    /// How the per-scale maps become one map: scale0 (the authors') or product (anomalib's).
    #[arg(long, value_enum, default_value = "scale0")]
    map_mode: MapArg,
    /// Images (or features samples) per forward pass of the flow: a batch reads the flow's weights once for
    /// all its images (CPU size: the flow 8.7 ms for one image, 4.6 ms per image in fours); results are printed
    /// a batch at a time.
    #[arg(long, default_value_t = 8, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    batch_size: usize,
    /// Arithmetic of the flow's largest products: f32, or bf16 (3x3 and larger maps' stride-2 layers
    /// rounded to bfloat16, the 5x5 layers' and small maps' weights to f16, summed in f32; on CPUs with
    /// AVX512_BF16, others compute in f32), faster there with scores within about 1e-3 of f32's.
    #[arg(long, value_enum, default_value = "f32")]
    precision: PrecisionArg,
}

#[derive(clap::ValueEnum, Clone, Copy)]
pub enum PrecisionArg {
    F32,
    Bf16,
}

impl From<PrecisionArg> for Precision {
    fn from(p: PrecisionArg) -> Self {
        match p {
            PrecisionArg::F32 => Precision::F32,
            PrecisionArg::Bf16 => Precision::Bf16,
        }
    }
}

#[derive(clap::ValueEnum, Clone, Copy)]
pub enum MapArg {
    Scale0,
    Product,
}

impl From<MapArg> for MapMode {
    fn from(m: MapArg) -> Self {
        match m {
            MapArg::Scale0 => MapMode::Scale0,
            MapArg::Product => MapMode::Product,
        }
    }
}

/// One line of `predict`'s output, fields in this order.
#[derive(serde::Serialize)]
struct Line {
    path: String,
    #[serde(flatten)]
    verdict: Verdict,
    /// The features file's ground truth, when it has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    true_label: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    heatmap: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    mask: Option<String>,
}

impl Line {
    fn new(path: String, verdict: Verdict) -> Self {
        Line { path, verdict, true_label: None, heatmap: None, mask: None }
    }
}

/// Files named by `inputs`, each with the name its outputs get: its path relative to a folder input (so that
/// `test/scratch/000.png` and `test/good/000.png` stay apart), under the folder's own name where several
/// inputs are given (`good/000`, `scratch/000` for `test/good test/scratch`), its file name for a file;
/// without extension, made unique with `_1`, `_2`, ... A folder matched by a pattern is searched like a
/// folder argument; files a pattern matches that are not images are left out. Returns also one message per
/// input that names nothing.
pub fn expand_inputs(inputs: &[String]) -> (Vec<(PathBuf, PathBuf)>, Vec<String>) {
    // (path, is a folder) for each argument or pattern match.
    let (mut roots, mut bad) = (Vec::new(), Vec::new());
    for input in inputs {
        let p = Path::new(input);
        if p.exists() {
            roots.push((p.to_path_buf(), p.is_dir()));
            continue;
        }
        match glob::glob(input) {
            Ok(paths) => {
                let before = roots.len();
                for m in paths.filter_map(|m| m.ok()) {
                    if m.is_dir() {
                        roots.push((m, true));
                    } else if is_image(&m) {
                        roots.push((m, false));
                    }
                }
                if roots.len() == before {
                    bad.push(format!("{input}: no such file, and no file matches it as a pattern"));
                }
            }
            Err(e) => bad.push(format!("{input}: no such file, and not a valid pattern ({e})")),
        }
    }
    let named = roots.len() > 1;
    let mut out = Vec::new();
    for (root, is_dir) in roots {
        let own_name = PathBuf::from(root.file_name().unwrap_or(root.as_os_str()));
        if !is_dir {
            out.push((root, own_name));
            continue;
        }
        match images_in(&root, true) {
            Ok(files) => out.extend(files.into_iter().map(|f| {
                let rel = f.strip_prefix(&root).unwrap_or(&f).to_path_buf();
                let rel = if named && root.file_name().is_some() { own_name.join(rel) } else { rel };
                (f, rel)
            })),
            Err(e) => bad.push(e.to_string()),
        }
    }
    let mut seen = std::collections::HashSet::new();
    for (_, rel) in &mut out {
        // Only plain components: an output never lands outside its folder.
        let base: PathBuf = rel
            .with_extension("")
            .components()
            .filter_map(|c| match c {
                std::path::Component::Normal(n) => Some(n),
                _ => None,
            })
            .collect();
        let mut k = 0;
        while !seen.insert(suffixed(&base, k, "")) {
            k += 1;
        }
        *rel = suffixed(&base, k, "");
    }
    (out, bad)
}

/// `base` with `_k` (for k > 0) and `tail` appended to its last component, byte for byte (names that are not
/// UTF-8 stay apart).
fn suffixed(base: &Path, k: usize, tail: &str) -> PathBuf {
    let mut name = base.as_os_str().to_owned();
    if k > 0 {
        name.push(format!("_{k}"));
    }
    name.push(tail);
    PathBuf::from(name)
}

/// Where one image's pictures go.
struct Outputs {
    heatmap: Option<PathBuf>,
    mask: Option<PathBuf>,
}

/// Each file's heatmap `<name>.png` and mask `<name>_mask.png`, unique across both kinds (in one folder the
/// mask of `a.png` and the heatmap of `a_mask.png` would be one file): a taken path gets `_1`, `_2`, ...
fn plan_outputs(files: &[(PathBuf, PathBuf)], heatmaps: Option<&Path>, masks: Option<&Path>) -> Vec<Outputs> {
    // Taken paths as canonical folders: `out` and `./out` are one folder.
    let folder = |d: Option<&Path>| d.map(|d| (d.to_path_buf(), canonical_lenient(d).unwrap_or_else(|| d.into())));
    let (heatmaps, masks) = (folder(heatmaps), folder(masks));
    let mut taken = std::collections::HashSet::new();
    let mut place = |dir: &Option<(PathBuf, PathBuf)>, rel: &Path, tail: &str| {
        dir.as_ref().map(|(d, key)| {
            let mut k = 0;
            while !taken.insert(key.join(suffixed(rel, k, tail))) {
                k += 1;
            }
            d.join(suffixed(rel, k, tail))
        })
    };
    files
        .iter()
        .map(|(_, rel)| Outputs { heatmap: place(&heatmaps, rel, ".png"), mask: place(&masks, rel, "_mask.png") })
        .collect()
}

/// Makes the folders the pictures go into, before any scoring; without `overwrite`, refuses pictures that
/// would replace existing files (a folder of ground-truth masks given as `--masks`, an earlier run's output).
fn prepare_outputs(outputs: &[Outputs], overwrite: bool) -> Result<()> {
    let paths = || outputs.iter().flat_map(|o| o.heatmap.iter().chain(&o.mask));
    let existing: Vec<&PathBuf> = paths().filter(|p| p.exists()).collect();
    if let (Some(first), false) = (existing.first(), overwrite) {
        bail!(
            "{}: exists ({} of the pictures to write exist); pass --overwrite to replace them, or choose another \
             folder",
            first.display(),
            existing.len()
        );
    }
    let folders: std::collections::BTreeSet<&Path> = paths().filter_map(|p| p.parent()).collect();
    for dir in folders {
        if dir.exists() && !dir.is_dir() {
            bail!("{}: not a folder", dir.display());
        }
        std::fs::create_dir_all(dir).with_context(|| format!("creating the folder {}", dir.display()))?;
    }
    Ok(())
}

/// Refuses an output folder that holds any input: writing there could replace an image being scored.
fn check_output_dir(dir: &Path, files: &[(PathBuf, PathBuf)]) -> Result<()> {
    let Ok(out) = dir.canonicalize() else { return Ok(()) };
    if let Some((f, _)) = files.iter().find(|(f, _)| f.canonicalize().is_ok_and(|c| c.starts_with(&out))) {
        bail!("{}: the output folder holds the input {}; choose another folder", dir.display(), f.display());
    }
    Ok(())
}

pub fn run(a: PredictArgs) -> Result<()> {
    if let Some(f) = &a.features {
        return predict_features(&a, f);
    }
    let det = Detector::load_in(&a.model, a.precision.into())?;
    let (files, bad_inputs) = expand_inputs(&a.inputs);
    for b in &bad_inputs {
        eprintln!("skipped: {b}");
    }
    for dir in a.heatmaps.iter().chain(&a.masks) {
        check_output_dir(dir, &files)?;
    }
    let mode = MapMode::from(a.map_mode);
    let mask_threshold = a.masks.as_ref().and(det.mask_threshold(mode, a.mask_threshold));
    if a.masks.is_some() && mask_threshold.is_none() {
        bail!("{}: the model records no good-image map range; pass --mask-threshold", a.model.display());
    }
    let outputs = plan_outputs(&files, a.heatmaps.as_deref(), a.masks.as_deref());
    prepare_outputs(&outputs, a.overwrite)?;
    let bar = progress_bar(files.len(), "images");
    let mut out = std::io::stdout().lock();
    let (mut failed, mut unwritten) = (0usize, 0usize);
    for (chunk, places) in files.chunks(a.batch_size).zip(outputs.chunks(a.batch_size)) {
        bar.set_message(chunk[0].0.display().to_string());
        let paths: Vec<&Path> = chunk.iter().map(|(p, _)| p.as_path()).collect();
        // Each image's pictures drawn, encoded and written in parallel (PNG encoding took longer than scoring).
        // A picture that cannot be written is reported apart: the image's line still says its verdict.
        let results: Vec<Result<(Line, Vec<anyhow::Error>)>> = chunk
            .par_iter()
            .zip(places)
            .zip(det.detect_files(&paths))
            .map(|(((path, _), place), detection)| {
                let d = detection?;
                let mut line = Line::new(path.display().to_string(), det.verdict(d.score as f64, a.threshold));
                let pictures = det.pictures(&d, mode, a.heatmaps.is_some(), mask_threshold)?;
                let mut errors = Vec::new();
                if let (Some(dest), Some(img)) = (&place.heatmap, pictures.heatmap) {
                    match atomic_write(dest, &encode_png(&img)?) {
                        Ok(()) => line.heatmap = Some(dest.display().to_string()),
                        Err(e) => errors.push(e.into()),
                    }
                }
                if let (Some(dest), Some(m)) = (&place.mask, pictures.mask) {
                    match atomic_write(dest, &encode_png(&m)?) {
                        Ok(()) => line.mask = Some(dest.display().to_string()),
                        Err(e) => errors.push(e.into()),
                    }
                }
                Ok((line, errors))
            })
            .collect();
        for result in results {
            match result {
                Ok((line, errors)) => {
                    bar.suspend(|| writeln!(out, "{}", serde_json::to_string(&line).expect("serialises")))?;
                    unwritten += errors.len();
                    for e in errors {
                        bar.suspend(|| eprintln!("not written: {}", crate::message(&e)));
                    }
                }
                Err(e) => {
                    failed += 1;
                    bar.suspend(|| eprintln!("skipped: {}", crate::message(&e)));
                }
            }
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    let failed = failed + bad_inputs.len();
    match (failed, unwritten) {
        (0, 0) => Ok(()),
        (f, 0) => bail!("{f} input(s) could not be scored"),
        (0, u) => bail!("{u} picture(s) could not be written"),
        (f, u) => bail!("{f} input(s) could not be scored, {u} picture(s) could not be written"),
    }
}

/// Scores a features file: `{"path", "score", "normalized_score", "label", "threshold"}` per sample, plus
/// the file's ground truth as `true_label` when it has labels.
fn predict_features(a: &PredictArgs, features: &Path) -> Result<()> {
    let (flow, meta) = load_model(&a.model)?.into_inference_flow_in(a.precision.into())?;
    let data = load_features(features)?;
    flow.check_input(&data.scales).with_context(|| format!("{}", features.display()))?;
    let (scores, _) = score_features(&flow, &data.scales, a.batch_size, None)?;
    let threshold = a.threshold.or(meta.threshold);
    let good_min = meta.good_min();
    let mut out = std::io::stdout().lock();
    for (i, (path, &score)) in data.paths.iter().zip(&scores).enumerate() {
        let mut line = Line::new(path.clone(), Verdict::new(score as f64, threshold, good_min));
        line.true_label = data.labels.as_ref().map(|l| if l[i] == 0 { "good" } else { "defect" });
        writeln!(out, "{}", serde_json::to_string(&line)?)?;
    }
    if let Some(labels) = &data.labels {
        match csflow::metrics::auroc(&scores, labels) {
            Ok(a) => eprintln!("image AUROC {a:.4} over {} samples", scores.len()),
            Err(e) => eprintln!("no AUROC: {e}"),
        }
    }
    Ok(())
}

#[derive(Args)]
pub struct InfoArgs {
    /// Model file.
    model: PathBuf,
}

pub fn info(a: InfoArgs) -> Result<()> {
    let model = load_model(&a.model)?;
    let n: usize = model.params.values().map(|t| t.elem_count()).sum();
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", serde_json::to_string_pretty(&model.meta)?)?;
    writeln!(out, "flow parameters: {n} in {} tensors", model.params.len())?;
    let bb: usize = model.backbone_weights().values().map(|t| t.elem_count()).sum();
    if bb > 0 {
        writeln!(out, "backbone parameters: {bb}")?;
    }
    Ok(())
}
