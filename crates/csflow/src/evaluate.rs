//! A model against a labelled test set (`csflow test`): image and pixel metrics overall and per defect
//! type, the numbers of metrics.json, and the inputs of the HTML report.

use std::collections::BTreeMap;

use crate::data::{load_mask, Sample};
use crate::detector::Detector;
use crate::io::{load_rgb, resize_rgb};
use crate::metrics::{aupro, auroc, average_precision, f1_max, pixel_auroc, pr_curve, roc_curve};
use crate::overlay::{draw_contour, encode_png, heatmap_overlay};
use crate::report::{Curve, Example, MetricRow, ReportInput, ScoredImage};
use crate::score::MapMode;
use crate::Result;

/// The false-positive rate up to which AUPRO integrates (MVTec AD's 30 %).
pub const AUPRO_MAX_FPR: f64 = 0.3;

/// One scored test image. Maps and masks are at the network's input size: pixel metrics compare them there
/// (as anomalib does), so images of any size weigh the same.
pub struct TestImage {
    pub sample: Sample,
    pub score: f32,
    /// Anomaly map (scale 0), input height x width, row-major.
    pub map: Vec<f32>,
    /// Ground truth at the same size (1 = defect); all zero for good images; `None` for a defect image
    /// whose mask is missing.
    pub mask: Option<Vec<u8>>,
}

/// Scores `sample` and reads its mask; errors name the file.
pub fn test_image(det: &Detector, sample: &Sample) -> Result<TestImage> {
    let d = det.detect_file(&sample.path)?;
    let [h, w] = det.extractor.size;
    let map = d.map(MapMode::Scale0, h, w)?;
    let mask = match (&sample.mask, sample.is_good()) {
        (_, true) => Some(vec![0u8; h * w]),
        (Some(p), false) => Some(load_mask(p, h, w)?),
        (None, false) => None,
    };
    Ok(TestImage { sample: sample.clone(), score: d.score, map, mask })
}

/// Detection quality of one group of images; `None` where a metric is undefined (the notes say why).
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct Metrics {
    pub n_good: usize,
    pub n_defect: usize,
    /// Image-level area under the ROC curve.
    pub image_auroc: Option<f64>,
    /// Image-level average precision.
    pub image_ap: Option<f64>,
    /// Image-level best F1 over all thresholds ...
    pub image_f1_max: Option<f64>,
    /// ... and the score threshold that reaches it.
    pub threshold: Option<f64>,
    /// Pixel-level area under the ROC curve.
    pub pixel_auroc: Option<f64>,
    /// Area under the per-region-overlap curve up to 30 % pixel FPR, normalised to [0, 1].
    pub aupro: Option<f64>,
}

impl Metrics {
    /// Metrics of `images` (maps `width` pixels wide); undefined ones are `None` with a reason pushed to
    /// `notes`.
    pub fn of(images: &[&TestImage], width: usize, group: &str, notes: &mut Vec<String>) -> Self {
        let scores: Vec<f32> = images.iter().map(|t| t.score).collect();
        let labels: Vec<u8> = images.iter().map(|t| t.sample.label()).collect();
        let mut m = Metrics {
            n_good: labels.iter().filter(|&&l| l == 0).count(),
            n_defect: labels.iter().filter(|&&l| l == 1).count(),
            ..Default::default()
        };
        let mut note = |what: &str, e: crate::Error| notes.push(format!("{group}: no {what}: {e}"));
        match auroc(&scores, &labels) {
            Ok(v) => {
                m.image_auroc = Some(v);
                m.image_ap = average_precision(&scores, &labels).ok();
                if let Ok(f) = f1_max(&scores, &labels) {
                    m.image_f1_max = Some(f.f1);
                    m.threshold = Some(f.threshold);
                }
            }
            // One reason covers all image metrics (a class is missing); the pixel metrics may still be
            // defined: defective images' masks have good pixels too.
            Err(e) => note("image metrics", e),
        }
        let masked: Option<Vec<&[u8]>> = images.iter().map(|t| t.mask.as_deref()).collect();
        let Some(masks) = masked else {
            let missing = images.iter().filter(|t| t.mask.is_none()).count();
            notes.push(format!("{group}: no pixel metrics: {missing} defective image(s) have no ground-truth mask"));
            return m;
        };
        let maps: Vec<&[f32]> = images.iter().map(|t| t.map.as_slice()).collect();
        match pixel_auroc(&maps, &masks) {
            Ok(v) => m.pixel_auroc = Some(v),
            Err(e) => note("pixel AUROC", e),
        }
        match aupro(&maps, &masks, &vec![width; images.len()], AUPRO_MAX_FPR) {
            Ok(v) => m.aupro = Some(v),
            Err(e) => note("AUPRO", e),
        }
        m
    }
}

/// Everything `csflow test` reports, as metrics.json holds it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct TestReport {
    #[serde(flatten)]
    pub overall: Metrics,
    pub per_defect_type: BTreeMap<String, Metrics>,
    /// The model's own threshold (or the one given) and what it does on this test set.
    pub operating_point: Option<OperatingPoint>,
    /// Images that could not be read, with the reason.
    pub skipped: Vec<String>,
    /// Why a metric is missing, and other remarks.
    pub notes: Vec<String>,
}

/// Decisions at one threshold.
#[derive(Clone, Debug, serde::Serialize)]
pub struct OperatingPoint {
    pub threshold: f64,
    pub source: String,
    /// Share of good images flagged as defective.
    pub false_reject_rate: Option<f64>,
    /// Share of defective images passed as good.
    pub escape_rate: Option<f64>,
}

/// Computes all metrics of the scored test images, `width` being the maps' row length.
pub fn evaluate(images: &[TestImage], width: usize, threshold: Option<(f64, String)>) -> TestReport {
    let mut notes = Vec::new();
    let all: Vec<&TestImage> = images.iter().collect();
    let overall = Metrics::of(&all, width, "all", &mut notes);
    let mut kinds: Vec<&str> = images.iter().filter(|t| !t.sample.is_good()).map(|t| t.sample.kind.as_str()).collect();
    kinds.sort_unstable();
    kinds.dedup();
    let mut per_defect_type = BTreeMap::new();
    for kind in kinds {
        let group: Vec<&TestImage> = images.iter().filter(|t| t.sample.is_good() || t.sample.kind == kind).collect();
        per_defect_type.insert(kind.to_string(), Metrics::of(&group, width, kind, &mut notes));
    }
    let operating_point = threshold.map(|(t, source)| {
        let rate = |good: bool, flagged: bool| {
            let group: Vec<f32> = images.iter().filter(|i| i.sample.is_good() == good).map(|i| i.score).collect();
            let n = group.iter().filter(|&&s| (s as f64 >= t) == flagged).count();
            (!group.is_empty()).then(|| n as f64 / group.len() as f64)
        };
        OperatingPoint { threshold: t, source, false_reject_rate: rate(true, true), escape_rate: rate(false, false) }
    });
    TestReport { overall, per_defect_type, operating_point, skipped: Vec::new(), notes }
}

impl From<(&str, &Metrics)> for MetricRow {
    fn from((name, m): (&str, &Metrics)) -> Self {
        MetricRow { name: name.to_string(), metrics: m.clone() }
    }
}

/// Fewer held-out good images than this make a quantile threshold unreliable; the report says so.
pub const FEW_GOOD: usize = 20;

/// How many worst false positives and false negatives the report shows.
pub const EXAMPLES: usize = 6;

/// The report's inputs: curves, scores, and the worst good and defective images with their heatmaps.
pub fn report_input(det: &Detector, images: &[TestImage], report: &TestReport, title: &str) -> Result<ReportInput> {
    let scores: Vec<f32> = images.iter().map(|t| t.score).collect();
    let labels: Vec<u8> = images.iter().map(|t| t.sample.label()).collect();
    let roc = roc_curve(&scores, &labels).ok().map(|c| Curve { x: c.fpr, y: c.tpr });
    let pr = pr_curve(&scores, &labels).ok().map(|c| Curve { x: c.recall, y: c.precision });
    let (vmin, vmax) = det.heatmap_range(MapMode::Scale0);
    let mut good: Vec<&TestImage> = images.iter().filter(|t| t.sample.is_good()).collect();
    good.sort_by(|a, b| b.score.total_cmp(&a.score));
    let mut bad: Vec<&TestImage> = images.iter().filter(|t| !t.sample.is_good()).collect();
    bad.sort_by(|a, b| a.score.total_cmp(&b.score));
    let example = |t: &TestImage| -> Result<Example> {
        let [h, w] = det.extractor.size;
        let img = resize_rgb(&load_rgb(&t.sample.path)?, h, w)?;
        let mut overlay = heatmap_overlay(&img, &t.map, vmin, vmax, 0.5)?;
        if let (Some(mask), false) = (&t.mask, t.sample.is_good()) {
            let gray = image::GrayImage::from_raw(w as u32, h as u32, mask.iter().map(|&m| m * 255).collect())
                .expect("mask has the map's size");
            draw_contour(&mut overlay, &gray, [255, 255, 255])?;
        }
        Ok(Example {
            path: t.sample.path.display().to_string(),
            defect_type: t.sample.kind.clone(),
            score: t.score as f64,
            image_png: Some(encode_png(&img)?),
            overlay_png: Some(encode_png(&overlay)?),
        })
    };
    let false_positives = good.iter().take(EXAMPLES).map(|t| example(t)).collect::<Result<Vec<_>>>()?;
    let false_negatives = bad.iter().take(EXAMPLES).map(|t| example(t)).collect::<Result<Vec<_>>>()?;
    let op = report.operating_point.as_ref();
    let mut notes = report.notes.clone();
    if let Some(n) = det.meta.validation_scores.as_ref().map(|v| v.count).filter(|&n| n < FEW_GOOD) {
        notes.push(format!(
            "the model's threshold was set on only {n} held-out good image(s): its false-reject rate on the line \
             can differ a lot from the target; hold out more good images (fit --validation-fraction) or set the \
             threshold from a labelled test (the F1-optimal one above)"
        ));
    }
    notes.extend(report.skipped.iter().map(|s| format!("skipped: {s}")));
    Ok(ReportInput {
        title: title.to_string(),
        model: String::new(),
        data: String::new(),
        created: String::new(),
        overall: ("all", &report.overall).into(),
        per_type: report.per_defect_type.iter().map(|(k, m)| (k.as_str(), m).into()).collect(),
        roc,
        pr,
        threshold: op.map(|o| o.threshold),
        threshold_source: op.map(|o| o.source.clone()),
        has_masks: images.iter().all(|t| t.mask.is_some()),
        heatmap_range: Some((vmin as f64, vmax as f64)),
        scores: images
            .iter()
            .map(|t| ScoredImage {
                path: t.sample.path.display().to_string(),
                defect_type: t.sample.kind.clone(),
                score: t.score as f64,
            })
            .collect(),
        false_positives,
        false_negatives,
        notes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(kind: &str, score: f32, map: &[f32], mask: &[u8]) -> TestImage {
        let sample = Sample { path: format!("{kind}.png").into(), kind: kind.into(), mask: None };
        TestImage { sample, score, map: map.to_vec(), mask: Some(mask.to_vec()) }
    }

    /// Without good images the image metrics are undefined, but the masks still hold good pixels: the
    /// pixel AUROC is computed (it was dropped with the image metrics). Hand-worked: defect pixels 0.9,
    /// 0.6 and 0.8 against good pixels 0.1, 0.7, 0.2, 0.3, 0.5: 3 * 5 = 15 pairs, the defect pixel
    /// ranks above in 14 (0.6 < 0.7 only): 14 / 15.
    #[test]
    fn pixel_metrics_without_good_images() {
        let a = image("crack", 2.0, &[0.9, 0.1, 0.6, 0.7], &[1, 0, 1, 0]);
        let b = image("crack", 3.0, &[0.2, 0.8, 0.3, 0.5], &[0, 1, 0, 0]);
        let mut notes = Vec::new();
        let m = Metrics::of(&[&a, &b], 2, "all", &mut notes);
        assert_eq!((m.n_good, m.n_defect, m.image_auroc, m.image_ap), (0, 2, None, None));
        assert!((m.pixel_auroc.unwrap() - 14.0 / 15.0).abs() < 1e-12, "{:?}", m.pixel_auroc);
        assert!(notes.iter().any(|n| n.contains("no image metrics")), "{notes:?}");
    }
}
