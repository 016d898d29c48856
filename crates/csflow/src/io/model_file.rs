use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::Tensor;
use csflow_kernels::Precision;

use super::{read_safetensors, write_safetensors};
use crate::flow::{CsFlow, FlowConfig, ParamMap};
use crate::train::TrainConfig;
use crate::{Error, Result};

/// Version of the `csflow` metadata entry; bumped when its meaning changes.
pub const FORMAT_VERSION: u32 = 1;

/// The metadata key under which csflow stores [`ModelMeta`] as JSON.
const META_KEY: &str = "csflow";

/// Statistics of good images' scores, for thresholds and normalised scores.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ScoreStats {
    pub count: usize,
    pub mean: f64,
    pub std: f64,
    pub min: f64,
    pub max: f64,
}

impl ScoreStats {
    pub fn from_scores(scores: &[f32]) -> Option<Self> {
        if scores.is_empty() {
            return None;
        }
        let n = scores.len() as f64;
        let mean = scores.iter().map(|&s| s as f64).sum::<f64>() / n;
        let var = scores.iter().map(|&s| (s as f64 - mean).powi(2)).sum::<f64>() / n;
        let min = scores.iter().fold(f64::INFINITY, |m, &s| m.min(s as f64));
        let max = scores.iter().fold(f64::NEG_INFINITY, |m, &s| m.max(s as f64));
        Some(Self { count: scores.len(), mean, std: var.sqrt(), min, max })
    }
}

/// The feature extractor a model needs: backbone by name, tapped block, network input (height, width) and
/// the SHA-256 of the weights file it was made from.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct BackboneMeta {
    pub name: String,
    pub block: usize,
    pub input_size: [usize; 2],
    pub weights_hash: String,
}

/// Prefix of the backbone's tensors in a model file.
pub const BACKBONE_PREFIX: &str = "backbone.";

/// Everything about a model that its tensors do not say.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct ModelMeta {
    pub format_version: u32,
    pub flow: FlowConfig,
    /// Feature map sizes (h, w) per scale the model was trained on, when known.
    #[serde(default)]
    pub map_sizes: Option<[[usize; 2]; 3]>,
    /// Where the training features came from (backbone, feature block, input size, weights hash), as the
    /// features file recorded it; `predict` on images must extract the same way.
    #[serde(default)]
    pub features: BTreeMap<String, String>,
    /// Scores of the training images after training.
    #[serde(default)]
    pub train_scores: Option<ScoreStats>,
    /// The backbone whose features the flow was trained on; its weights are in the file as `backbone.*`.
    #[serde(default)]
    pub backbone: Option<BackboneMeta>,
    /// Decision threshold on the image score, when one was chosen.
    #[serde(default)]
    pub threshold: Option<f64>,
    /// How the threshold was chosen, in words.
    #[serde(default)]
    pub threshold_source: Option<String>,
    /// Scores of held-out good images (the validation split), when there was one.
    #[serde(default)]
    pub validation_scores: Option<ScoreStats>,
    /// Anomaly-map values of good images: (median, maximum) over all their pixels. Heatmaps are drawn on
    /// this fixed range so that images can be compared, and masks default to pixels above the maximum.
    #[serde(default)]
    pub good_map_range: Option<[f64; 2]>,
    /// The same for the product of the three scale maps ([`crate::score::MapMode::Product`]).
    #[serde(default)]
    pub good_product_range: Option<[f64; 2]>,
    /// How the flow was trained, and how far.
    #[serde(default)]
    pub training: Option<TrainConfig>,
    #[serde(default)]
    pub epochs_done: usize,
}

impl ModelMeta {
    /// What in hand-edited or damaged metadata would fail later, far from the file: a threshold or a map
    /// range that is not finite or upside down.
    fn problem(&self) -> Option<String> {
        if let Some(t) = self.threshold.filter(|t| !t.is_finite()) {
            return Some(format!("the threshold {t} is not a finite number"));
        }
        for (what, range) in [("good_map_range", self.good_map_range), ("good_product_range", self.good_product_range)]
        {
            if let Some([lo, hi]) = range.filter(|[lo, hi]| !(lo.is_finite() && hi.is_finite() && lo <= hi)) {
                return Some(format!("{what} [{lo}, {hi}] is not a finite range from low to high"));
            }
        }
        None
    }

    /// The lowest score of any good image seen at training (training and held-out), the 0 of normalised
    /// scores.
    pub fn good_min(&self) -> Option<f64> {
        let mins = [&self.train_scores, &self.validation_scores].into_iter().flatten().map(|s| s.min);
        mins.reduce(f64::min)
    }

    pub fn new(flow: FlowConfig) -> Self {
        Self {
            format_version: FORMAT_VERSION,
            flow,
            map_sizes: None,
            features: BTreeMap::new(),
            train_scores: None,
            backbone: None,
            threshold: None,
            threshold_source: None,
            validation_scores: None,
            good_map_range: None,
            good_product_range: None,
            training: None,
            epochs_done: 0,
        }
    }
}

/// A loaded model file: the flow's parameters, its metadata and any other tensors the file holds.
#[derive(Debug)]
pub struct ModelFile {
    pub meta: ModelMeta,
    pub params: ParamMap,
    /// Tensors that are not part of the flow (kept, not interpreted here).
    pub other: BTreeMap<String, Tensor>,
}

impl ModelFile {
    /// The flow with the file's weights as they are (trainable).
    pub fn flow(&self) -> Result<CsFlow> {
        CsFlow::new(self.meta.flow.clone(), &self.params)
    }

    /// The flow for scoring ([`CsFlow::for_inference`]), made after the file's own copy of the weights is
    /// released, so each plain weight is freed as its transform is made and the two are never all held at once.
    pub fn into_inference_flow(self) -> Result<(CsFlow, ModelMeta)> {
        self.into_inference_flow_in(Precision::F32)
    }

    /// [`ModelFile::into_inference_flow`] with products in `precision` ([`CsFlow::for_inference_in`]).
    pub fn into_inference_flow_in(self, precision: Precision) -> Result<(CsFlow, ModelMeta)> {
        let flow = self.flow()?;
        let meta = self.meta;
        drop(self.params);
        Ok((flow.for_inference_in(meta.map_sizes, precision)?, meta))
    }
}

/// Reads a csflow model, or a state_dict exported from the authors' code (no csflow metadata: the shapes come
/// from the tensors, the clamp is 3). A leading `nf.` (the authors' wrapper module) is accepted.
pub fn load_model(path: &Path) -> Result<ModelFile> {
    let (tensors, meta) = read_safetensors(path)?;
    let mut params = ParamMap::new();
    let mut other = BTreeMap::new();
    for (name, t) in tensors {
        let stripped = name.strip_prefix("nf.").unwrap_or(&name);
        if stripped.starts_with("module_list.") {
            params.insert(stripped.to_string(), t);
        } else {
            other.insert(name, t);
        }
    }
    let wrap = |e: Error| e.at(path);
    let meta = match meta.get(META_KEY) {
        Some(json) => {
            let m: ModelMeta = serde_json::from_str(json)
                .map_err(|e| Error::format(path, format!("metadata `{META_KEY}` is not valid ({e})")))?;
            if let Some(problem) = m.problem() {
                return Err(Error::format(path, format!("metadata `{META_KEY}`: {problem}")));
            }
            if m.format_version > FORMAT_VERSION {
                return Err(Error::format(
                    path,
                    format!(
                        "model format version {} is newer than this csflow understands ({FORMAT_VERSION})",
                        m.format_version
                    ),
                ));
            }
            m
        }
        None => ModelMeta::new(CsFlow::config_from_params(&params).map_err(wrap)?),
    };
    // Every tensor: the flow's and the rest (backbone, optimizer state).
    super::check_finite(path, params.iter().chain(&other))?;
    let model = ModelFile { meta, params, other };
    model.flow().map_err(wrap)?;
    Ok(model)
}

/// Writes a model atomically: the flow tensors under the authors' names, `extra` tensors (the backbone as
/// `backbone.*`, optimizer state in checkpoints) under their own, metadata as JSON.
pub fn save_model(path: &Path, params: &ParamMap, extra: &BTreeMap<String, Tensor>, meta: &ModelMeta) -> Result<()> {
    let mut m = HashMap::new();
    m.insert(META_KEY.to_string(), serde_json::to_string(meta).expect("metadata serialises"));
    if extra.is_empty() {
        return write_safetensors(path, params, m);
    }
    let mut all = params.clone();
    for (k, v) in extra {
        if all.insert(k.clone(), v.clone()).is_some() {
            return Err(Error::Invalid(format!("tensor `{k}` given twice")));
        }
    }
    write_safetensors(path, &all, m)
}

impl ModelFile {
    /// The backbone's tensors (prefix removed), empty when the model holds none.
    pub fn backbone_weights(&self) -> BTreeMap<String, Tensor> {
        self.other
            .iter()
            .filter_map(|(k, v)| k.strip_prefix(BACKBONE_PREFIX).map(|n| (n.to_string(), v.clone())))
            .collect()
    }
}
