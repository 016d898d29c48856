use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::Tensor;

use super::{read_safetensors, write_safetensors};
use crate::{Error, Result};

/// Pre-extracted features: three scales [N, C, h, w] with each sample's source and optional label.
#[derive(Clone, Debug)]
pub struct FeatureSet {
    pub scales: [Tensor; 3],
    /// Source of each sample; `<file>#<i>` when the file names none.
    pub paths: Vec<String>,
    /// 0 = good, 1 = defect, when known.
    pub labels: Option<Vec<u8>>,
    /// Any other metadata entries (backbone, input size, ...), kept as written.
    pub extra: BTreeMap<String, String>,
}

impl FeatureSet {
    pub fn len(&self) -> usize {
        self.paths.len()
    }

    pub fn is_empty(&self) -> bool {
        self.paths.is_empty()
    }

    /// Feature channels C.
    pub fn channels(&self) -> usize {
        self.scales[0].dims()[1]
    }

    /// The samples at `indices`, in that order (metadata other than paths and labels is kept).
    pub fn select(&self, indices: &[usize]) -> Result<FeatureSet> {
        if let Some(&bad) = indices.iter().find(|&&i| i >= self.len()) {
            return Err(Error::Invalid(format!("sample {bad} of {}", self.len())));
        }
        let idx = Tensor::from_vec(
            indices.iter().map(|&i| i as u32).collect::<Vec<_>>(),
            indices.len(),
            self.scales[0].device(),
        )?;
        let pick = |t: &Tensor| t.index_select(&idx, 0);
        Ok(FeatureSet {
            scales: [pick(&self.scales[0])?, pick(&self.scales[1])?, pick(&self.scales[2])?],
            paths: indices.iter().map(|&i| self.paths[i].clone()).collect(),
            labels: self.labels.as_ref().map(|l| indices.iter().map(|&i| l[i]).collect()),
            extra: self
                .extra
                .iter()
                .filter(|(k, _)| k.as_str() != "hashes")
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        })
    }
}

/// Reads a features file (`scale_0..2`, metadata `paths` and `labels` optional) and checks its shapes.
pub fn load_features(path: &Path) -> Result<FeatureSet> {
    let (mut tensors, mut meta) = read_safetensors(path)?;
    let bad = |m: String| Error::format(path, m);
    let mut take = |i: usize| {
        tensors
            .remove(&format!("scale_{i}"))
            .ok_or_else(|| bad(format!("no tensor `scale_{i}` (a features file has scale_0, scale_1, scale_2)")))
    };
    let scales = [take(0)?, take(1)?, take(2)?];
    super::check_finite(path, scales.iter().enumerate().map(|(i, t)| (format!("scale_{i}"), t)))?;
    let dims: Vec<Vec<usize>> = scales.iter().map(|t| t.dims().to_vec()).collect();
    for (i, d) in dims.iter().enumerate() {
        if d.len() != 4 {
            return Err(bad(format!("`scale_{i}` has shape {d:?}, expected [N, C, h, w]")));
        }
        if d[0] != dims[0][0] || d[1] != dims[0][1] {
            return Err(bad(format!("scales disagree on samples or channels: {dims:?}")));
        }
        if i > 0 && (dims[i - 1][2] != 2 * d[2] || dims[i - 1][3] != 2 * d[3]) {
            return Err(bad(format!("each scale must be half the size of the previous one, got {dims:?}")));
        }
    }
    let n = dims[0][0];
    if n == 0 {
        return Err(bad("the file holds no samples".into()));
    }
    let paths = match meta.remove("paths") {
        Some(s) => {
            let p: Vec<String> = serde_json::from_str(&s)
                .map_err(|e| bad(format!("metadata `paths` is not a JSON array of strings ({e})")))?;
            if p.len() != n {
                return Err(bad(format!("metadata `paths` has {} entries for {n} samples", p.len())));
            }
            p
        }
        None => (0..n).map(|i| format!("{}#{i}", path.display())).collect(),
    };
    let labels = match meta.remove("labels") {
        Some(s) => {
            let l: Vec<u8> = serde_json::from_str(&s)
                .map_err(|e| bad(format!("metadata `labels` is not a JSON array of 0/1 ({e})")))?;
            if l.len() != n || l.iter().any(|&v| v > 1) {
                return Err(bad(format!("metadata `labels` must hold {n} values, each 0 (good) or 1 (defect)")));
            }
            Some(l)
        }
        None => None,
    };
    Ok(FeatureSet { scales, paths, labels, extra: meta.into_iter().collect() })
}

/// Writes a features file atomically.
pub fn save_features(path: &Path, set: &FeatureSet) -> Result<()> {
    let tensors: BTreeMap<String, Tensor> =
        set.scales.iter().enumerate().map(|(i, t)| (format!("scale_{i}"), t.clone())).collect();
    let mut meta: HashMap<String, String> = set.extra.clone().into_iter().collect();
    meta.insert("paths".into(), serde_json::to_string(&set.paths).expect("strings serialise"));
    if let Some(l) = &set.labels {
        meta.insert("labels".into(), serde_json::to_string(l).expect("integers serialise"));
    }
    write_safetensors(path, &tensors, meta)
}
