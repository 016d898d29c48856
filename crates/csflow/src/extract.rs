//! Images to the three-scale feature maps the flow consumes (SPEC 1.1), with the features file as a cache.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::Tensor;

use crate::backbone::{EfficientNet, EfficientNetConfig};
use crate::io::{load_features, read_pth, read_safetensors, FeatureSet};
use crate::{Error, Result};

/// Reads backbone weights from a PyTorch checkpoint (zip or legacy) or a safetensors file, by content.
pub fn load_backbone_weights(path: &Path) -> Result<BTreeMap<String, Tensor>> {
    let mut head = [0u8; 9];
    let n = {
        use std::io::Read;
        let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        f.read(&mut head).map_err(|e| Error::io(path, e))?
    };
    // A safetensors file is an 8-byte header length followed by a JSON header; anything else is taken for a
    // PyTorch checkpoint (zip or legacy pickle), whose reader names what it finds wrong.
    let tensors = if n == 9 && head[8] == b'{' { read_safetensors(path)?.0 } else { read_pth(path)? };
    // Checkpoints saved from wrappers prefix every name; the EfficientNet names start at `_conv_stem`.
    let prefix = tensors
        .keys()
        .find_map(|k| k.strip_suffix("_conv_stem.weight").map(str::to_string))
        .ok_or_else(|| Error::format(path, "no EfficientNet weights in this file (no `_conv_stem.weight` tensor)"))?;
    let weights: BTreeMap<String, Tensor> =
        tensors.into_iter().filter_map(|(k, v)| k.strip_prefix(&prefix).map(|s| (s.to_string(), v))).collect();
    crate::io::check_finite(path, &weights)?;
    Ok(weights)
}

/// A frozen backbone tapped at one block, applied to every scale of an image pyramid.
pub struct FeatureExtractor {
    /// The backbone's name (`efficientnet-lite0`).
    pub name: String,
    pub net: EfficientNet,
    pub block: usize,
    /// Network input (height, width).
    pub size: [usize; 2],
}

impl FeatureExtractor {
    /// `backbone` as the packages name it (`efficientnet-lite0`), weights by their PyTorch names, the
    /// feature block (default: the last block at stride 32) and the input size.
    pub fn new(
        backbone: &str,
        weights: &BTreeMap<String, Tensor>,
        block: Option<usize>,
        size: [usize; 2],
    ) -> Result<Self> {
        let config = EfficientNetConfig::from_name(backbone)?;
        // Lite and B networks share their convolutions' shapes at the same width; only B has
        // squeeze-excitation, so B weights would otherwise load as Lite with those tensors ignored.
        if let (true, Some(se)) = (config.lite, weights.keys().find(|k| k.contains("._se_reduce."))) {
            return Err(Error::Invalid(format!(
                "the weights hold squeeze-excitation tensors (`{se}`): EfficientNet-B weights, not {backbone}'s"
            )));
        }
        check_size(size)?;
        let block = block.unwrap_or(config.feature_block);
        let net = EfficientNet::load(config, weights, Some(block))?;
        Ok(Self { name: backbone.to_string(), net, block, size })
    }

    /// What decides the features, as recorded in features files and models (the cache key's settings).
    pub fn settings(&self, weights_hash: &str) -> BTreeMap<String, String> {
        [
            ("backbone".to_string(), self.name.clone()),
            ("feature_block".to_string(), self.block.to_string()),
            ("input_size".to_string(), format!("{}x{}", self.size[0], self.size[1])),
            ("weights_hash".to_string(), weights_hash.to_string()),
            ("preprocessing".to_string(), PREPROCESSING.to_string()),
        ]
        .into()
    }

    /// Preprocesses an image file and extracts its features; errors name the file.
    pub fn extract_file(&self, path: &Path) -> Result<[Tensor; 3]> {
        let (pyramid, _) = crate::io::preprocess(path, self.size[0], self.size[1], 3)?;
        self.features(&pyramid).map_err(|e| Error::format(path, e.to_string()))
    }

    pub fn channels(&self) -> usize {
        self.net.config.channels_at(self.block)
    }

    /// Features of each pyramid level ([1, 3, H / 2^s, W / 2^s] each), as [1, C, h_s, w_s].
    pub fn features(&self, pyramid: &[Tensor]) -> Result<[Tensor; 3]> {
        if pyramid.len() != 3 {
            return Err(Error::Invalid(format!("expected 3 pyramid levels, got {}", pyramid.len())));
        }
        let f = |levels: &[Tensor]| self.net.features_of(levels, self.block);
        // The two smaller levels run beside the largest: each thread then runs its own sequence of kernels and
        // steals from the other's when done, instead of both meeting at every small kernel's end.
        let (a, bc) = csflow_kernels::on_worker(|| rayon::join(|| f(&pyramid[..1]), || f(&pyramid[1..])));
        let (mut a, mut bc) = (a?, bc?);
        Ok([a.remove(0), bc.remove(0), bc.remove(0)])
    }
}

/// Version of csflow's preprocessing (decoding, Pillow-exact resize, ImageNet normalisation, nearest
/// pyramid); part of the cache key so that a change never reuses stale features.
pub const PREPROCESSING: &str = "1";

/// The weights a backbone needs to reach `block`: the stem and blocks up to it (the head and classifier
/// are left out of models).
pub fn weights_up_to(weights: &BTreeMap<String, Tensor>, block: usize) -> BTreeMap<String, Tensor> {
    weights
        .iter()
        .filter(|(k, _)| match k.strip_prefix("_blocks.") {
            Some(rest) => rest.split('.').next().and_then(|i| i.parse::<usize>().ok()).is_some_and(|i| i <= block),
            None => k.starts_with("_conv_stem.") || k.starts_with("_bn0."),
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// Features of many images through a cache: each image's row is reused when its path and content hash are
/// in `cache`, extracted otherwise. Unreadable images are returned in `failed` (the rest go on);
/// `on_image` sees every image with its error, if any.
pub fn extract_images(
    ex: &FeatureExtractor,
    images: &[(PathBuf, Option<u8>)],
    settings: &BTreeMap<String, String>,
    cache: &Cache,
    on_image: &mut dyn FnMut(&Path, Option<&Error>),
) -> Result<Extraction> {
    let (mut rows, mut failed, mut reused) = (Vec::new(), Vec::new(), 0usize);
    for (path, label) in images {
        let shown = path.display().to_string();
        let result = std::fs::read(path).map_err(|e| Error::io(path, e)).and_then(|bytes| {
            let hash = content_hash(&bytes);
            if let Some(row) = cache.get(&shown, &hash) {
                reused += 1;
                return Ok((hash, row));
            }
            Ok((hash, ex.extract_file(path)?))
        });
        match result {
            Ok((hash, f)) => {
                on_image(path, None);
                rows.push((shown, hash, *label, f));
            }
            Err(e) => {
                on_image(path, Some(&e));
                failed.push(e);
            }
        }
    }
    let set = if rows.is_empty() { None } else { Some(assemble(rows, settings)?) };
    Ok(Extraction { set, failed, reused })
}

/// What [`extract_images`] made.
pub struct Extraction {
    /// The features, `None` when no image could be read.
    pub set: Option<FeatureSet>,
    /// One error per unreadable image, naming it.
    pub failed: Vec<Error>,
    /// Rows taken from the cache.
    pub reused: usize,
}

/// H and W must be multiples of 128 (stride 32 at the coarsest of three scales).
pub fn check_size(size: [usize; 2]) -> Result<()> {
    crate::io::check_input_size(size[0], size[1], 3)
}

/// What a previous run of `extract` left, usable as a cache when backbone, block and size match.
pub struct Cache {
    rows: HashMap<(String, String), [Tensor; 3]>,
}

impl Cache {
    /// Loads `path` if it exists and was made with the same settings (a features file made with others gives
    /// an empty cache: it is rewritten). A file there that is not a features file is an error naming it: the
    /// cache is rewritten after extraction, and that must not replace a model or anything else given by
    /// mistake.
    pub fn open(path: &Path, settings: &BTreeMap<String, String>) -> Result<Self> {
        let mut rows = HashMap::new();
        if path.exists() {
            let set = load_features(path).map_err(|e| {
                Error::Invalid(format!(
                    "{e}\n{}: the features cache is rewritten after extraction, and this file is not one; delete \
                     it or choose another path",
                    path.display()
                ))
            })?;
            let same = settings.iter().all(|(k, v)| set.extra.get(k) == Some(v));
            let hashes: Option<Vec<String>> = set.extra.get("hashes").and_then(|h| serde_json::from_str(h).ok());
            if let (true, Some(hashes)) = (same, hashes) {
                for (i, (p, h)) in set.paths.iter().zip(hashes).enumerate() {
                    let row = |s: usize| set.scales[s].narrow(0, i, 1);
                    if let (Ok(a), Ok(b), Ok(c)) = (row(0), row(1), row(2)) {
                        rows.insert((p.clone(), h), [a, b, c]);
                    }
                }
            }
        }
        Ok(Self { rows })
    }

    pub fn get(&self, path: &str, hash: &str) -> Option<[Tensor; 3]> {
        self.rows.get(&(path.to_string(), hash.to_string())).cloned()
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }
}

/// SHA-256 of a file's bytes, hex: the cache key of its features.
pub fn content_hash(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// Builds a features file from per-image rows, recording settings and content hashes in the metadata.
pub fn assemble(
    rows: Vec<(String, String, Option<u8>, [Tensor; 3])>,
    settings: &BTreeMap<String, String>,
) -> Result<FeatureSet> {
    if rows.is_empty() {
        return Err(Error::Invalid("no image could be read, so there are no features to write".into()));
    }
    let cat = |s: usize| -> Result<Tensor> {
        let parts: Vec<&Tensor> = rows.iter().map(|r| &r.3[s]).collect();
        Ok(Tensor::cat(&parts, 0)?)
    };
    let labels: Option<Vec<u8>> = rows.iter().map(|r| r.2).collect();
    let mut extra = settings.clone();
    extra.insert(
        "hashes".into(),
        serde_json::to_string(&rows.iter().map(|r| &r.1).collect::<Vec<_>>()).expect("strings"),
    );
    Ok(FeatureSet {
        scales: [cat(0)?, cat(1)?, cat(2)?],
        paths: rows.iter().map(|r| r.0.clone()).collect(),
        labels,
        extra,
    })
}

/// Image files under `dir` (recursively, sorted), with labels when the layout gives them: a folder that
/// has a `good` subfolder labels `good` images 0 and images in its other subfolders 1 (an MVTec `test`
/// folder); otherwise no labels.
pub fn list_images(dir: &Path) -> Result<Vec<(PathBuf, Option<u8>)>> {
    fn walk(d: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(d)?.filter_map(|e| e.ok().map(|e| e.path())).collect();
        entries.sort();
        for p in entries {
            if p.is_dir() {
                walk(&p, out)?;
            } else if is_image(&p) {
                out.push(p);
            }
        }
        Ok(())
    }
    let mut files = Vec::new();
    walk(dir, &mut files).map_err(|e| Error::io(dir, e))?;
    if files.is_empty() {
        return Err(Error::format(
            dir,
            "no images found (looked for png, jpg, jpeg, bmp, tif, tiff, webp, recursively)",
        ));
    }
    let labelled = dir.join("good").is_dir();
    Ok(files
        .into_iter()
        .map(|p| {
            let label = labelled.then(|| {
                let top =
                    p.strip_prefix(dir).ok().and_then(|r| r.components().next()).map(|c| c.as_os_str().to_owned());
                u8::from(top.as_deref() != Some(std::ffi::OsStr::new("good")))
            });
            (p, label)
        })
        .collect())
}

/// Whether a path has one of the image extensions csflow reads.
pub fn is_image(p: &Path) -> bool {
    matches!(
        p.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).as_deref(),
        Some("png" | "jpg" | "jpeg" | "bmp" | "tif" | "tiff" | "webp")
    )
}
