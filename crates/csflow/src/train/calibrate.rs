//! After training: good images' score statistics, the decision threshold and the heatmap range.

use candle_core::Tensor;

use crate::flow::CsFlow;
use crate::io::{ModelMeta, ScoreStats};
use crate::score::{score_features, MapMode};
use crate::threshold::{false_reject_threshold, quantile};
use crate::Result;

/// Scores the training (and validation) features with the trained flow and records in `meta`: score
/// statistics, the threshold for a `max_false_reject` rate of good images (from validation images when
/// there are any: training images score optimistically low), and the good images' map ranges (scale 0 and
/// product).
pub fn calibrate(
    meta: &mut ModelMeta,
    flow: &CsFlow,
    train: &[Tensor; 3],
    validation: Option<&[Tensor; 3]>,
    map_size: (usize, usize),
    max_false_reject: f64,
    batch: usize,
) -> Result<()> {
    let scale0 = (MapMode::Scale0, map_size.0, map_size.1);
    let (train_scores, train_maps) = score_features(flow, train, batch, validation.is_none().then_some(scale0))?;
    meta.train_scores = ScoreStats::from_scores(&train_scores);
    let (good_scores, good_maps, from) = match validation {
        Some(v) => {
            let (s, m) = score_features(flow, v, batch, Some(scale0))?;
            meta.validation_scores = ScoreStats::from_scores(&s);
            (s, m, "validation")
        }
        None => {
            meta.validation_scores = None;
            (train_scores, train_maps, "training")
        }
    };
    meta.threshold = Some(false_reject_threshold(&good_scores, max_false_reject)?);
    meta.threshold_source = Some(format!(
        "{:.4} quantile of {} {from} good images' scores (target false-reject rate {max_false_reject})",
        1.0 - max_false_reject,
        good_scores.len()
    ));
    let range = |maps: Vec<Vec<f32>>| -> Result<[f64; 2]> {
        let pixels = maps.concat();
        Ok([quantile(&pixels, 0.5)?, quantile(&pixels, 1.0)?])
    };
    meta.good_map_range = Some(range(good_maps)?);
    let good = validation.unwrap_or(train);
    let product = (MapMode::Product, map_size.0, map_size.1);
    meta.good_product_range = Some(range(score_features(flow, good, batch, Some(product))?.1)?);
    Ok(())
}
