//! A trained, self-contained model applied to images: backbone, flow, image score and anomaly map.

use std::path::Path;

use candle_core::Tensor;
use csflow_kernels::Precision;
use image::{GrayImage, RgbImage};
use rayon::prelude::*;

use crate::extract::FeatureExtractor;
use crate::flow::{CsFlow, FlowOutput};
use crate::io::{load_model, load_rgb, pyramid, resize_rgb, to_normalized_tensor, ModelFile, ModelMeta};
use crate::overlay::{binary_mask, heatmap_overlay};
use crate::score::{anomaly_map, image_scores, MapMode};
use crate::threshold::Verdict;
use crate::{Error, Result};

/// Everything `predict`, `test` and `serve` need, loaded from one model file.
pub struct Detector {
    pub extractor: FeatureExtractor,
    pub flow: CsFlow,
    pub meta: ModelMeta,
}

/// One image's result: its score, the flow's output (for maps) and the decoded image (for overlays).
pub struct Detection {
    pub score: f32,
    pub output: FlowOutput,
    pub image: RgbImage,
}

/// A detection drawn for people, at the image's size: the heatmap overlay and the binary defect mask (255 =
/// defect), each when asked for.
pub struct Pictures {
    pub heatmap: Option<RgbImage>,
    pub mask: Option<GrayImage>,
}

impl Detection {
    /// The anomaly map at `height` x `width`, row-major (SPEC 1.4).
    pub fn map(&self, mode: MapMode, height: usize, width: usize) -> Result<Vec<f32>> {
        Ok(anomaly_map(&self.output, mode, height, width)?.flatten_all()?.to_vec1::<f32>()?)
    }

    /// The anomaly map at the image's own size.
    pub fn map_at_image_size(&self, mode: MapMode) -> Result<Vec<f32>> {
        self.map(mode, self.image.height() as usize, self.image.width() as usize)
    }
}

impl Detector {
    /// Loads a model file that holds its backbone (written by `csflow fit --data`).
    pub fn load(path: &Path) -> Result<Self> {
        Self::load_in(path, Precision::F32)
    }

    /// [`Detector::load`] with the flow's products in `precision` ([`CsFlow::for_inference_in`]).
    ///
    /// [`CsFlow::for_inference_in`]: crate::flow::CsFlow::for_inference_in
    pub fn load_in(path: &Path, precision: Precision) -> Result<Self> {
        let model = load_model(path)?;
        Self::from_model_in(model, precision).map_err(|e| e.at(path))
    }

    pub fn from_model(model: ModelFile) -> Result<Self> {
        Self::from_model_in(model, Precision::F32)
    }

    pub fn from_model_in(model: ModelFile, precision: Precision) -> Result<Self> {
        let Some(bb) = model.meta.backbone.clone() else {
            return Err(Error::Invalid(
                "this model holds no backbone (it was trained on a features file): score features files with \
                 it, or train with `csflow fit --data <images>` to get a model that reads images"
                    .into(),
            ));
        };
        let weights = model.backbone_weights();
        let extractor = FeatureExtractor::new(&bb.name, &weights, Some(bb.block), bb.input_size)?;
        if extractor.channels() != model.meta.flow.channels {
            return Err(Error::Invalid(format!(
                "the backbone gives {} channels but the flow expects {}",
                extractor.channels(),
                model.meta.flow.channels
            )));
        }
        drop(weights);
        let (flow, meta) = model.into_inference_flow_in(precision)?;
        Ok(Self { extractor, flow, meta })
    }

    /// Reads and scores an image file; errors name the file.
    pub fn detect_file(&self, path: &Path) -> Result<Detection> {
        let img = load_rgb(path)?;
        self.detect(img).map_err(|e| e.at(path))
    }

    /// Scores a decoded image.
    pub fn detect(&self, image: RgbImage) -> Result<Detection> {
        Ok(self.detect_batch(vec![image])?.remove(0))
    }

    /// Scores images together: each through the backbone alone, then all through the flow in one batch, which
    /// reads the flow's weights once for all of them (at the CPU size the flow takes 8.7 ms for one image,
    /// 4.6 ms per image in fours, 4.5 in eights: at batch 1 it waits on those reads).
    pub fn detect_batch(&self, images: Vec<RgbImage>) -> Result<Vec<Detection>> {
        if images.is_empty() {
            return Ok(Vec::new());
        }
        let [h, w] = self.extractor.size;
        let (scores, outputs) = csflow_kernels::on_worker(|| {
            let mut levels: [Vec<Tensor>; 3] = Default::default();
            for image in &images {
                let x = to_normalized_tensor(&resize_rgb(image, h, w)?)?;
                for (level, f) in levels.iter_mut().zip(self.extractor.features(&pyramid(&x, 3)?)?) {
                    level.push(f);
                }
            }
            let [a, b, c] = levels.map(|l| Tensor::cat(&l, 0));
            let output = self.flow.forward(&[a?, b?, c?])?;
            let scores = image_scores(&output)?.to_vec1::<f32>()?;
            let outputs = (0..images.len()).map(|i| output.sample(i)).collect::<Result<Vec<_>>>()?;
            Ok::<_, Error>((scores, outputs))
        })?;
        Ok(images
            .into_iter()
            .zip(scores.into_iter().zip(outputs))
            .map(|(image, (score, output))| Detection { score, output, image })
            .collect())
    }

    /// Reads `paths` (in parallel) and scores the images together ([`Detector::detect_batch`]): one result
    /// per path, in order; a file that cannot be read fails alone, naming itself.
    pub fn detect_files(&self, paths: &[&Path]) -> Vec<Result<Detection>> {
        self.detect_decoded(paths, |p| load_rgb(p), |p, e| Error::format(*p, e.to_string()))
    }

    /// Decodes `inputs` in parallel with `decode`, then scores the images in one batch
    /// ([`Detector::detect_batch`]): one result per input, in order. An input that cannot be decoded fails
    /// alone with `decode`'s error; when the batch fails, each decoded input gets `failed(input, error)`.
    pub fn detect_decoded<T: Sync, E: Send>(
        &self,
        inputs: &[T],
        decode: impl Fn(&T) -> std::result::Result<RgbImage, E> + Sync,
        failed: impl Fn(&T, &Error) -> E,
    ) -> Vec<std::result::Result<Detection, E>> {
        let mut decoded: Vec<_> = csflow_kernels::on_worker(|| inputs.par_iter().map(&decode).collect());
        let images: Vec<RgbImage> = decoded.iter_mut().filter_map(|d| d.as_mut().ok().map(std::mem::take)).collect();
        let (mut detections, error) = match self.detect_batch(images) {
            Ok(d) => (d.into_iter(), None),
            Err(e) => (Vec::new().into_iter(), Some(e)),
        };
        decoded
            .into_iter()
            .zip(inputs)
            .map(|(d, input)| {
                d?;
                match &error {
                    Some(e) => Err(failed(input, e)),
                    None => Ok(detections.next().expect("one detection per decoded image")),
                }
            })
            .collect()
    }

    /// The good images' (median, maximum) map values for `mode`, when the model records them.
    pub fn good_range(&self, mode: MapMode) -> Option<[f64; 2]> {
        match mode {
            MapMode::Scale0 => self.meta.good_map_range,
            MapMode::Product => self.meta.good_product_range,
        }
    }

    /// The anomaly-map values at the two ends of the heatmap colours: the good images' median, and twice
    /// their highest value (a defect is clearly hotter than any good region). (0, 1) without statistics.
    pub fn heatmap_range(&self, mode: MapMode) -> (f32, f32) {
        match self.good_range(mode) {
            Some([median, max]) => (median as f32, (2.0 * max) as f32),
            None => (0.0, 1.0),
        }
    }

    /// The stored threshold, if the model has one.
    pub fn threshold(&self) -> Option<f64> {
        self.meta.threshold
    }

    /// The verdict on `score` at `threshold`, or at the model's threshold when that is None.
    pub fn verdict(&self, score: f64, threshold: Option<f64>) -> Verdict {
        Verdict::new(score, threshold.or(self.threshold()), self.meta.good_min())
    }

    /// The anomaly-map value from which a pixel is marked defective: `given`, else the highest value seen on
    /// good images at training (None when the model records none).
    pub fn mask_threshold(&self, mode: MapMode, given: Option<f32>) -> Option<f32> {
        given.or(self.good_range(mode).map(|r| r[1] as f32))
    }

    /// From one map of `d` at the image's size: the heatmap overlay (colours over [`Detector::heatmap_range`],
    /// half transparent) when `heatmap`, the mask of values at or above `mask_threshold` when given.
    pub fn pictures(
        &self,
        d: &Detection,
        mode: MapMode,
        heatmap: bool,
        mask_threshold: Option<f32>,
    ) -> Result<Pictures> {
        if !heatmap && mask_threshold.is_none() {
            return Ok(Pictures { heatmap: None, mask: None });
        }
        let map = d.map_at_image_size(mode)?;
        let (vmin, vmax) = self.heatmap_range(mode);
        let heatmap = if heatmap { Some(heatmap_overlay(&d.image, &map, vmin, vmax, 0.5)?) } else { None };
        let (w, h) = d.image.dimensions();
        let mask = mask_threshold.map(|t| binary_mask(&map, h as usize, w as usize, t)).transpose()?;
        Ok(Pictures { heatmap, mask })
    }
}
