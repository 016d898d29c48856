//! Detection quality measures, each equal to a published reference on the same inputs (checked against
//! scikit-learn and a reference of the MVTec AD definition by `tests/metrics_parity.rs`, fixtures written by
//! `reference/make_metric_fixtures.py`).
//!
//! Conventions: a higher score means more anomalous; image labels are 0 (good) or 1 (defect, the positive
//! class); mask pixels are 0 (good) or anything else (defect); "score >= t" is the prediction "defect" at
//! threshold t. Scores must be finite (scikit-learn rejects NaN and infinity too); -0.0 and +0.0 are one score.
//!
//! - [`auroc`]: `sklearn.metrics.roc_auc_score(labels, scores)`, computed as the Mann-Whitney statistic (the
//!   probability that a defect outscores a good sample, ties counting one half), which is exactly the
//!   trapezoid area under the ROC curve.
//! - [`roc_curve`]: `sklearn.metrics.roc_curve(labels, scores, drop_intermediate=False)`: one point per
//!   distinct score, highest first, after a first point (0, 0) at threshold +inf.
//! - [`pr_curve`]: `sklearn.metrics.precision_recall_curve(labels, scores)` (scikit-learn >= 1.3 output):
//!   thresholds ascending, one per distinct score, then a last point precision 1, recall 0 without threshold.
//! - [`average_precision`]: `sklearn.metrics.average_precision_score(labels, scores)`: the step sum
//!   sum_k (R_k - R_(k-1)) P_k over the distinct thresholds, highest first (no interpolation).
//! - [`f1_max`]: the largest F1 = 2PR / (P + R) over the thresholds of [`pr_curve`] (F1 = 0 where P + R = 0);
//!   on ties the lowest threshold wins (the most recall), which is what `np.argmax` picks on scikit-learn's
//!   ascending thresholds.
//! - [`pixel_auroc`]: `roc_auc_score` of all pixels of all images concatenated.
//! - [`aupro`]: the MVTec AD evaluation's AUPRO (Bergmann et al.): ground-truth regions are the 8-connected
//!   components of each mask (`scipy.ndimage.label` with a 3x3 structure of ones); for a threshold t,
//!   FPR(t) = good pixels with score >= t / all good pixels and PRO(t) = the mean over all regions of all
//!   images of the fraction of the region's pixels with score >= t. The curve has one point per distinct score
//!   (highest first) after (0, 0), values clipped to at most 1; PRO is integrated over FPR in [0, max_fpr]
//!   with the trapezoid rule, the last segment cut at max_fpr by linear interpolation, and divided by max_fpr.
//!   (The MVTec code keeps FPR in float32; here it is float64, a difference far below 1e-6.)
//!
//! Degenerate inputs (empty, lengths that differ, non-finite scores, labels other than 0/1, a class missing
//! where the measure needs it) are `Error::Invalid` with a message saying what is wrong.
//!
//! The pixel measures sort 32-bit keys (LSD radix sort, three passes), so their cost is linear in the number
//! of pixels and their memory about 8 bytes per pixel beyond the inputs (16 per defect pixel in AUPRO).

use crate::{Error, Result};

/// The ROC curve of [`roc_curve`]: `fpr[k]`, `tpr[k]` are the rates at "score >= `thresholds[k]`".
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct RocCurve {
    pub fpr: Vec<f64>,
    pub tpr: Vec<f64>,
    /// Decreasing; the first is +inf (nothing predicted defective).
    pub thresholds: Vec<f64>,
}

/// The precision-recall curve of [`pr_curve`]: one element more in `precision` and `recall` than in
/// `thresholds` (the final point precision 1, recall 0).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct PrCurve {
    pub precision: Vec<f64>,
    pub recall: Vec<f64>,
    /// Increasing: the distinct scores.
    pub thresholds: Vec<f64>,
}

/// The best F1 of [`f1_max`], with the threshold giving it and the precision and recall there.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct F1Max {
    pub f1: f64,
    /// One of the scores: "score >= threshold" is the prediction "defect".
    pub threshold: f64,
    pub precision: f64,
    pub recall: f64,
}

/// Area under the ROC curve of `scores` for `labels` (1 = defect, the positive class), ties counted half:
/// the Mann-Whitney statistic, equal to scikit-learn's `roc_auc_score`.
pub fn auroc(scores: &[f32], labels: &[u8]) -> Result<f64> {
    let s = SortedLabelled::new("AUROC", scores, labels)?;
    s.need_both()?;
    Ok(mann_whitney(&s.good, &s.defect))
}

/// As `sklearn.metrics.roc_curve(labels, scores, drop_intermediate=False)`: thresholds are +inf then the
/// distinct scores in decreasing order.
pub fn roc_curve(scores: &[f32], labels: &[u8]) -> Result<RocCurve> {
    let s = SortedLabelled::new("ROC curve", scores, labels)?;
    s.need_both()?;
    let (n, p) = (s.good.len() as f64, s.defect.len() as f64);
    let steps = s.steps();
    let mut c = RocCurve {
        fpr: Vec::with_capacity(steps.len() + 1),
        tpr: Vec::with_capacity(steps.len() + 1),
        thresholds: Vec::with_capacity(steps.len() + 1),
    };
    c.fpr.push(0.0);
    c.tpr.push(0.0);
    c.thresholds.push(f64::INFINITY);
    for st in steps {
        c.fpr.push(st.fp as f64 / n);
        c.tpr.push(st.tp as f64 / p);
        c.thresholds.push(st.threshold);
    }
    Ok(c)
}

/// As `sklearn.metrics.precision_recall_curve(labels, scores)`: thresholds are the distinct scores in
/// increasing order, precision and recall at each, then the point precision 1, recall 0. Needs at least one
/// defect; good samples may be absent (precision is then 1 throughout).
pub fn pr_curve(scores: &[f32], labels: &[u8]) -> Result<PrCurve> {
    let s = SortedLabelled::new("precision-recall curve", scores, labels)?;
    s.need_defect()?;
    let p = s.defect.len() as f64;
    let steps = s.steps();
    let mut c = PrCurve {
        precision: Vec::with_capacity(steps.len() + 1),
        recall: Vec::with_capacity(steps.len() + 1),
        thresholds: Vec::with_capacity(steps.len()),
    };
    for st in steps.iter().rev() {
        c.precision.push(st.precision());
        c.recall.push(st.tp as f64 / p);
        c.thresholds.push(st.threshold);
    }
    c.precision.push(1.0);
    c.recall.push(0.0);
    Ok(c)
}

/// As `sklearn.metrics.average_precision_score(labels, scores)`: the sum over distinct thresholds (highest
/// first) of the recall gained there times the precision there. Needs at least one defect.
pub fn average_precision(scores: &[f32], labels: &[u8]) -> Result<f64> {
    let s = SortedLabelled::new("average precision", scores, labels)?;
    s.need_defect()?;
    let mut prev_tp = 0;
    let mut sum = 0.0;
    for st in s.steps() {
        sum += (st.tp - prev_tp) as f64 * st.precision();
        prev_tp = st.tp;
    }
    Ok(sum / s.defect.len() as f64)
}

/// The best F1 over the thresholds of [`pr_curve`], F1 = 2PR / (P + R) (0 where P + R = 0). Among thresholds
/// with the same F1 the lowest wins: it finds the most defects at that F1 (and it is what `np.argmax` gives on
/// scikit-learn's ascending thresholds). Needs at least one defect.
pub fn f1_max(scores: &[f32], labels: &[u8]) -> Result<F1Max> {
    let s = SortedLabelled::new("F1-max", scores, labels)?;
    s.need_defect()?;
    let p = s.defect.len() as f64;
    let mut best: Option<F1Max> = None;
    // Highest threshold first, so ">=" lets a later (lower) threshold with the same F1 win.
    for st in s.steps() {
        let (precision, recall) = (st.precision(), st.tp as f64 / p);
        let f1 = if precision + recall > 0.0 { 2.0 * precision * recall / (precision + recall) } else { 0.0 };
        if best.is_none_or(|b| f1 >= b.f1) {
            best = Some(F1Max { f1, threshold: st.threshold, precision, recall });
        }
    }
    best.ok_or_else(|| Error::Invalid("F1-max: no scores".into()))
}

/// Pixel-level AUROC: `roc_auc_score` over all pixels of all images, `maps[i]` and `masks[i]` one image each
/// (same length, any layout); mask 0 = good, nonzero = defect. Linear time (radix sort), about 8 bytes per
/// pixel of extra memory.
pub fn pixel_auroc(maps: &[&[f32]], masks: &[&[u8]]) -> Result<f64> {
    let what = "pixel AUROC";
    check_images(what, maps, masks, None)?;
    let n_defect: usize = masks.iter().map(|m| m.iter().filter(|&&v| v != 0).count()).sum();
    let n_good: usize = masks.iter().map(|m| m.len()).sum::<usize>() - n_defect;
    need_pixels(what, n_good, n_defect)?;
    let mut good = Vec::with_capacity(n_good);
    let mut defect = Vec::with_capacity(n_defect);
    for (i, (map, mask)) in maps.iter().zip(masks).enumerate() {
        for (&s, &m) in map.iter().zip(mask.iter()) {
            let k = desc_key(s).ok_or_else(|| non_finite_pixel(what, i, s))?;
            if m == 0 {
                good.push(k);
            } else {
                defect.push(k);
            }
        }
    }
    radix_sort_by_key(&mut good, |k| k);
    radix_sort_by_key(&mut defect, |k| k);
    Ok(mann_whitney(&good, &defect))
}

/// MVTec AD AUPRO: the area under the per-region-overlap curve from FPR 0 to `max_fpr` (0.3 in the MVTec AD
/// evaluation), divided by `max_fpr` (see the module documentation for the definition). `maps[i]` and
/// `masks[i]` are image i in row-major order, `width[i]` pixels wide; mask 0 = good, nonzero = defect,
/// regions are 8-connected. Images without defects contribute good pixels only. Linear time, about 8 bytes per
/// good pixel and 16 per defect pixel of extra memory.
pub fn aupro(maps: &[&[f32]], masks: &[&[u8]], width: &[usize], max_fpr: f64) -> Result<f64> {
    let what = "AUPRO";
    if !(max_fpr > 0.0 && max_fpr <= 1.0) {
        return Err(Error::Invalid(format!("{what}: the FPR limit must be in (0, 1], got {max_fpr}")));
    }
    check_images(what, maps, masks, Some(width))?;
    let n_defect: usize = masks.iter().map(|m| m.iter().filter(|&&v| v != 0).count()).sum();
    let n_good: usize = masks.iter().map(|m| m.len()).sum::<usize>() - n_defect;
    need_pixels(what, n_good, n_defect)?;

    let mut good: Vec<u32> = Vec::with_capacity(n_good);
    // Defect pixels: the score key in the high half, the global region index in the low half.
    let mut defect: Vec<u64> = Vec::with_capacity(n_defect);
    let mut inv_size: Vec<f64> = Vec::new();
    let mut labels = Vec::new();
    let mut stack = Vec::new();
    for (i, ((map, mask), &w)) in maps.iter().zip(masks).zip(width).enumerate() {
        let base = inv_size.len();
        label_regions(mask, w, &mut labels, &mut stack, |size| inv_size.push(1.0 / size as f64));
        if inv_size.len() > u32::MAX as usize {
            return Err(Error::Invalid(format!("{what}: more than {} defect regions", u32::MAX)));
        }
        for ((&s, &m), &l) in map.iter().zip(mask.iter()).zip(&labels) {
            let k = desc_key(s).ok_or_else(|| non_finite_pixel(what, i, s))?;
            if m == 0 {
                good.push(k);
            } else {
                defect.push(((k as u64) << 32) | (base + l as usize - 1) as u64);
            }
        }
    }
    drop((labels, stack));
    radix_sort_by_key(&mut good, |k| k);
    radix_sort_by_key(&mut defect, |d| (d >> 32) as u32);

    let (ng, nr) = (n_good as f64, inv_size.len() as f64);
    let (mut fp, mut overlap) = (0usize, 0f64);
    let (mut x0, mut y0, mut area) = (0f64, 0f64, 0f64);
    for_each_tie(
        &good,
        &defect,
        |d| (d >> 32) as u32,
        |_, n_good_here, defects_here| {
            fp += n_good_here;
            for &d in defects_here {
                overlap += inv_size[d as u32 as usize];
            }
            let x = (fp as f64 / ng).min(1.0);
            let y = (overlap / nr).min(1.0);
            if x <= max_fpr {
                area += 0.5 * (y + y0) * (x - x0);
                (x0, y0) = (x, y);
                true
            } else {
                // x0 <= max_fpr < x: cut the segment at max_fpr (nothing to add when x0 == max_fpr).
                let y_cut = y0 + (y - y0) * (max_fpr - x0) / (x - x0);
                area += 0.5 * (y_cut + y0) * (max_fpr - x0);
                false
            }
        },
    );
    Ok(area / max_fpr)
}

/// Image-level inputs checked and split by class, each class's keys sorted (highest score first).
struct SortedLabelled {
    what: &'static str,
    good: Vec<u32>,
    defect: Vec<u32>,
}

/// Cumulative counts at one distinct score (scikit-learn's `_binary_clf_curve`): `fp` good and `tp` defective
/// samples score >= `threshold`.
struct Step {
    threshold: f64,
    fp: usize,
    tp: usize,
}

impl Step {
    fn precision(&self) -> f64 {
        // fp + tp > 0: every step holds at least one sample.
        self.tp as f64 / (self.tp + self.fp) as f64
    }
}

impl SortedLabelled {
    fn new(what: &'static str, scores: &[f32], labels: &[u8]) -> Result<Self> {
        if scores.len() != labels.len() {
            return Err(Error::Invalid(format!("{what}: {} scores for {} labels", scores.len(), labels.len())));
        }
        if scores.is_empty() {
            return Err(Error::Invalid(format!("{what}: no scores")));
        }
        let (mut good, mut defect) = (Vec::new(), Vec::new());
        for (i, (&s, &l)) in scores.iter().zip(labels).enumerate() {
            let k = desc_key(s).ok_or_else(|| Error::Invalid(format!("{what}: score {i} is {s} (not finite)")))?;
            match l {
                0 => good.push(k),
                1 => defect.push(k),
                _ => return Err(Error::Invalid(format!("{what}: label {i} is {l} (labels are 0 good, 1 defect)"))),
            }
        }
        radix_sort_by_key(&mut good, |k| k);
        radix_sort_by_key(&mut defect, |k| k);
        Ok(Self { what, good, defect })
    }

    fn need_both(&self) -> Result<()> {
        if self.good.is_empty() || self.defect.is_empty() {
            return Err(Error::Invalid(format!(
                "{} needs both good and defective samples (got {} good, {} defective)",
                self.what,
                self.good.len(),
                self.defect.len()
            )));
        }
        Ok(())
    }

    fn need_defect(&self) -> Result<()> {
        if self.defect.is_empty() {
            return Err(Error::Invalid(format!(
                "{} needs defective samples (got {} good, 0 defective)",
                self.what,
                self.good.len()
            )));
        }
        Ok(())
    }

    /// One step per distinct score, highest first.
    fn steps(&self) -> Vec<Step> {
        let mut out = Vec::new();
        let (mut fp, mut tp) = (0, 0);
        for_each_tie(
            &self.good,
            &self.defect,
            |k| k,
            |key, n_good, defects| {
                fp += n_good;
                tp += defects.len();
                out.push(Step { threshold: key_score(key) as f64, fp, tp });
                true
            },
        );
        out
    }
}

/// Mann-Whitney AUROC of sorted keys: each good sample counts the defects scoring higher, plus half those
/// scoring the same; exact integer sums, one division.
fn mann_whitney(good: &[u32], defect: &[u32]) -> f64 {
    let mut tp = 0u128;
    let mut twice_area = 0u128; // 2 * (pairs ranked right + half the tied pairs)
    for_each_tie(
        good,
        defect,
        |k| k,
        |_, n_good, defects| {
            twice_area += n_good as u128 * (2 * tp + defects.len() as u128);
            tp += defects.len() as u128;
            true
        },
    );
    twice_area as f64 / (2.0 * good.len() as f64 * defect.len() as f64)
}

/// Calls `f(key, good count, defects)` for each distinct key of two ascending key lists (highest score first),
/// until `f` returns false.
fn for_each_tie<D: Copy>(
    good: &[u32],
    defect: &[D],
    key: impl Fn(D) -> u32,
    mut f: impl FnMut(u32, usize, &[D]) -> bool,
) {
    let (mut i, mut j) = (0, 0);
    loop {
        let k = match (good.get(i), defect.get(j)) {
            (Some(&g), Some(&d)) => g.min(key(d)),
            (Some(&g), None) => g,
            (None, Some(&d)) => key(d),
            (None, None) => return,
        };
        let (i0, j0) = (i, j);
        while i < good.len() && good[i] == k {
            i += 1;
        }
        while j < defect.len() && key(defect[j]) == k {
            j += 1;
        }
        if !f(k, i - i0, &defect[j0..j]) {
            return;
        }
    }
}

/// A key whose ascending order is the scores' descending order, -0.0 and +0.0 one key; None for NaN and
/// infinities.
fn desc_key(s: f32) -> Option<u32> {
    if !s.is_finite() {
        return None;
    }
    let b = if s == 0.0 { 0 } else { s.to_bits() };
    let ascending = if b >> 31 == 1 { !b } else { b | 0x8000_0000 };
    Some(!ascending)
}

/// The score of a [`desc_key`].
fn key_score(k: u32) -> f32 {
    let ascending = !k;
    f32::from_bits(if ascending >> 31 == 1 { ascending & 0x7FFF_FFFF } else { !ascending })
}

/// Stable LSD radix sort by a 32-bit key: three passes of 11, 11 and 10 bits (a pass whose digit is the same
/// for all elements is skipped); one buffer as large as `v`.
fn radix_sort_by_key<T: Copy>(v: &mut Vec<T>, key: impl Fn(T) -> u32) {
    const RADIX: usize = 1 << 11;
    if v.len() <= 64 {
        v.sort_by_key(|&x| key(x));
        return;
    }
    let mut hist = vec![[0usize; RADIX]; 3];
    for &x in v.iter() {
        let k = key(x) as usize;
        hist[0][k & (RADIX - 1)] += 1;
        hist[1][(k >> 11) & (RADIX - 1)] += 1;
        hist[2][k >> 22] += 1;
    }
    let mut buf: Vec<T> = Vec::new();
    for (pass, h) in hist.iter().enumerate() {
        if h.contains(&v.len()) {
            continue;
        }
        if buf.is_empty() {
            buf = v.clone();
        }
        let mut offset = [0usize; RADIX];
        let mut sum = 0;
        for (o, &c) in offset.iter_mut().zip(h.iter()) {
            *o = sum;
            sum += c;
        }
        let shift = 11 * pass;
        for &x in v.iter() {
            let d = (key(x) as usize >> shift) & (RADIX - 1);
            buf[offset[d]] = x;
            offset[d] += 1;
        }
        std::mem::swap(v, &mut buf);
    }
}

/// Labels the 8-connected defect regions of one row-major mask `width` pixels wide: `labels[p]` is 0 for a good
/// pixel, else r + 1 for the image's region r; `region(size)` is called for each region in label order.
fn label_regions(
    mask: &[u8],
    width: usize,
    labels: &mut Vec<u32>,
    stack: &mut Vec<usize>,
    mut region: impl FnMut(usize),
) {
    labels.clear();
    labels.resize(mask.len(), 0);
    let height = mask.len().checked_div(width).unwrap_or(0);
    let mut next = 0u32;
    for start in 0..mask.len() {
        if mask[start] == 0 || labels[start] != 0 {
            continue;
        }
        next += 1;
        labels[start] = next;
        stack.clear();
        stack.push(start);
        let mut size = 0;
        while let Some(p) = stack.pop() {
            size += 1;
            let (y, x) = (p / width, p % width);
            for ny in y.saturating_sub(1)..(y + 2).min(height) {
                for nx in x.saturating_sub(1)..(x + 2).min(width) {
                    let q = ny * width + nx;
                    if mask[q] != 0 && labels[q] == 0 {
                        labels[q] = next;
                        stack.push(q);
                    }
                }
            }
        }
        region(size);
    }
}

fn check_images(what: &str, maps: &[&[f32]], masks: &[&[u8]], width: Option<&[usize]>) -> Result<()> {
    if maps.len() != masks.len() {
        return Err(Error::Invalid(format!("{what}: {} maps for {} masks", maps.len(), masks.len())));
    }
    if let Some(width) = width {
        if width.len() != maps.len() {
            return Err(Error::Invalid(format!("{what}: {} widths for {} maps", width.len(), maps.len())));
        }
        for (i, (&w, m)) in width.iter().zip(maps).enumerate() {
            if !m.is_empty() && (w == 0 || m.len() % w != 0) {
                return Err(Error::Invalid(format!("{what}: image {i} has {} pixels, not rows of {w}", m.len())));
            }
        }
    }
    for (i, (map, mask)) in maps.iter().zip(masks).enumerate() {
        if map.len() != mask.len() {
            return Err(Error::Invalid(format!(
                "{what}: image {i} has {} scores for {} mask pixels",
                map.len(),
                mask.len()
            )));
        }
    }
    Ok(())
}

fn need_pixels(what: &str, n_good: usize, n_defect: usize) -> Result<()> {
    if n_good == 0 && n_defect == 0 {
        return Err(Error::Invalid(format!("{what}: no pixels")));
    }
    if n_good == 0 || n_defect == 0 {
        return Err(Error::Invalid(format!(
            "{what} needs both good and defect pixels (got {n_good} good, {n_defect} defect)"
        )));
    }
    Ok(())
}

fn non_finite_pixel(what: &str, image: usize, s: f32) -> Error {
    Error::Invalid(format!("{what}: image {image} has a score {s} (not finite)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_worked_values() {
        // Perfect, reversed, and the classic 3-of-4 pair ordering.
        assert_eq!(auroc(&[0.1, 0.2, 0.8, 0.9], &[0, 0, 1, 1]).unwrap(), 1.0);
        assert_eq!(auroc(&[0.9, 0.8, 0.2, 0.1], &[0, 0, 1, 1]).unwrap(), 0.0);
        assert_eq!(auroc(&[0.1, 0.4, 0.35, 0.8], &[0, 0, 1, 1]).unwrap(), 0.75);
        // A tie between a good and a defective sample counts one half: pairs (d=0.5 vs g=0.5) 0.5,
        // (d=0.5 vs g=0.2) 1, (d=0.9 vs both) 2 -> 3.5 / 4.
        assert_eq!(auroc(&[0.5, 0.2, 0.5, 0.9], &[0, 0, 1, 1]).unwrap(), 0.875);
    }

    #[test]
    fn one_class_is_an_error_not_a_panic() {
        let e = auroc(&[0.1, 0.2], &[0, 0]).unwrap_err().to_string();
        assert!(e.contains("both good and defective"), "{e}");
    }

    fn close(a: &[f64], b: &[f64]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x == y || (x - y).abs() < 1e-12)
    }

    #[test]
    fn curves_of_the_scikit_learn_documentation_example() {
        let (s, l) = ([0.1f32, 0.4, 0.35, 0.8], [0u8, 0, 1, 1]);
        let roc = roc_curve(&s, &l).unwrap();
        assert!(close(&roc.fpr, &[0.0, 0.0, 0.5, 0.5, 1.0]), "{roc:?}");
        assert!(close(&roc.tpr, &[0.0, 0.5, 0.5, 1.0, 1.0]), "{roc:?}");
        let t: Vec<f64> = [0.8f32, 0.4, 0.35, 0.1].iter().map(|&v| v as f64).collect();
        assert_eq!(roc.thresholds[0], f64::INFINITY);
        assert_eq!(&roc.thresholds[1..], &t[..]);
        let pr = pr_curve(&s, &l).unwrap();
        assert!(close(&pr.precision, &[0.5, 2.0 / 3.0, 0.5, 1.0, 1.0]), "{pr:?}");
        assert!(close(&pr.recall, &[1.0, 1.0, 0.5, 0.5, 0.0]), "{pr:?}");
        assert_eq!(pr.thresholds, t.iter().rev().copied().collect::<Vec<_>>());
    }

    #[test]
    fn hand_worked_average_precision() {
        // Highest first: 0.8 defect (P 1, R 1/2), 0.4 good, 0.35 defect (P 2/3, R 1), 0.1 good:
        // AP = 1/2 * 1 + 1/2 * 2/3 = 5/6.
        let ap = average_precision(&[0.1, 0.4, 0.35, 0.8], &[0, 0, 1, 1]).unwrap();
        assert!((ap - 5.0 / 6.0).abs() < 1e-15, "{ap}");
        // With a tie: 0.9 good (P 0, R 0), {0.5 good, 0.5 defect} one threshold (P 1/3, R 1/2), 0.2 defect
        // (P 1/2, R 1): AP = 1/2 * 1/3 + 1/2 * 1/2 = 5/12.
        let ap = average_precision(&[0.9, 0.5, 0.5, 0.2], &[0, 0, 1, 1]).unwrap();
        assert!((ap - 5.0 / 12.0).abs() < 1e-15, "{ap}");
        // Only defects: precision 1 everywhere, as scikit-learn.
        assert_eq!(average_precision(&[0.3, 0.1], &[1, 1]).unwrap(), 1.0);
    }

    #[test]
    fn f1_max_takes_the_lowest_of_tied_thresholds() {
        // F1 at 0.8: 2/3, at 0.4: 1/2, at 0.35: 4/5, at 0.1: 2/3.
        let f = f1_max(&[0.1, 0.4, 0.35, 0.8], &[0, 0, 1, 1]).unwrap();
        assert!((f.f1 - 0.8).abs() < 1e-15 && f.threshold == 0.35f32 as f64, "{f:?}");
        assert!((f.precision - 2.0 / 3.0).abs() < 1e-15 && f.recall == 1.0, "{f:?}");
        // 0.9: P 1, R 1/2 and 0.2: P 1/2, R 1 both give F1 2/3; the lower threshold wins.
        let f = f1_max(&[0.9, 0.5, 0.3, 0.2], &[1, 0, 0, 1]).unwrap();
        assert_eq!((f.threshold, f.precision, f.recall), (0.2f32 as f64, 0.5, 1.0), "{f:?}");
        assert!((f.f1 - 2.0 / 3.0).abs() < 1e-15);
        // 0.9 finds nothing (P 0, R 0: F1 0); 0.5 takes the defect with both good samples: P 1/3, R 1, F1 1/2.
        let f = f1_max(&[0.5, 0.5, 0.9], &[0, 1, 0]).unwrap();
        assert!((f.f1 - 0.5).abs() < 1e-15 && f.threshold == 0.5, "{f:?}");
    }

    #[test]
    fn minus_zero_ties_with_zero() {
        let roc = roc_curve(&[-0.0, 0.0, 1.0], &[0, 1, 1]).unwrap();
        assert_eq!(roc.thresholds, vec![f64::INFINITY, 1.0, 0.0]);
        assert_eq!(auroc(&[-0.0, 0.0], &[0, 1]).unwrap(), 0.5);
    }

    #[test]
    fn degenerate_image_inputs_are_errors() {
        let msg = |r: Result<f64>| r.unwrap_err().to_string();
        assert!(msg(auroc(&[], &[])).contains("no scores"));
        assert!(msg(average_precision(&[0.1], &[1, 0])).contains("1 scores for 2 labels"));
        assert!(msg(auroc(&[0.1, f32::NAN], &[0, 1])).contains("score 1 is NaN"));
        assert!(msg(auroc(&[0.1, f32::INFINITY], &[0, 1])).contains("not finite"));
        assert!(msg(auroc(&[0.1, 0.2], &[0, 2])).contains("label 1 is 2"));
        assert!(msg(average_precision(&[0.1, 0.2], &[0, 0])).contains("needs defective samples"));
        assert!(roc_curve(&[0.1, 0.2], &[1, 1]).unwrap_err().to_string().contains("both good and defective"));
        assert!(pr_curve(&[0.1, 0.2], &[0, 0]).is_err());
        assert!(f1_max(&[], &[]).is_err());
    }

    #[test]
    fn regions_are_eight_connected() {
        // Two diagonal chains (one region each), a pixel touching nothing, and a blob touching the first chain
        // only at a corner (so it joins it).
        #[rustfmt::skip]
        let mask = [
            1, 0, 0, 0, 0, 1,
            0, 1, 0, 0, 1, 0,
            0, 0, 1, 0, 0, 0,
            0, 0, 0, 1, 1, 0,
            1, 0, 0, 1, 1, 0,
        ];
        let (mut labels, mut stack, mut sizes) = (Vec::new(), Vec::new(), Vec::new());
        label_regions(&mask, 6, &mut labels, &mut stack, |s| sizes.push(s));
        assert_eq!(sizes, vec![7, 2, 1]);
        #[rustfmt::skip]
        let want = [
            1, 0, 0, 0, 0, 2,
            0, 1, 0, 0, 2, 0,
            0, 0, 1, 0, 0, 0,
            0, 0, 0, 1, 1, 0,
            3, 0, 0, 1, 1, 0,
        ];
        assert_eq!(labels, want);
    }

    #[test]
    fn hand_worked_aupro() {
        // One row: defects at 0 and 3 are two regions of one pixel. Highest first: 0.9 (region A) -> (0, 1/2),
        // 0.8 good -> (1/2, 1/2), 0.5 (region B) -> (1/2, 1), 0.1 good -> (1, 1).
        let (map, mask) = ([0.9f32, 0.8, 0.1, 0.5], [1u8, 0, 0, 1]);
        // Up to 0.3: the segment (0, 1/2)-(1/2, 1/2) cut at 0.3: area 0.15, / 0.3.
        let a = aupro(&[&map], &[&mask], &[4], 0.3).unwrap();
        assert!((a - 0.5).abs() < 1e-15, "{a}");
        // Up to 1: 1/4 + 1/2.
        let a = aupro(&[&map], &[&mask], &[4], 1.0).unwrap();
        assert!((a - 0.75).abs() < 1e-15, "{a}");
        // Exactly on a point (x = 1/2): the same area as the cut, 1/4, / 0.5; as two rows of two, the defects
        // touch diagonally and are one region of two pixels: (0, 1/2), (1/2, 1/2), (1/2, 1), (1, 1) again.
        let a = aupro(&[&map], &[&mask], &[4], 0.5).unwrap();
        assert!((a - 0.5).abs() < 1e-15, "{a}");
        let a = aupro(&[&map], &[&mask], &[2], 1.0).unwrap();
        assert!((a - 0.75).abs() < 1e-15, "{a}");
        // An image without defects only adds good pixels: 0.8 -> (1/4, 1/2), 0.6 -> (1/2, 1/2), ...
        let clean = [0.6f32, 0.0];
        let a = aupro(&[&map, &clean], &[&mask, &[0; 2]], &[4, 2], 0.5).unwrap();
        // (0, 0) (0, 1/2) (1/4, 1/2) (1/2, 1/2) (1/2, 1) (3/4, 1) (1, 1) -> area 1/4 over [0, 1/2].
        assert!((a - 0.5).abs() < 1e-15, "{a}");
        assert!((pixel_auroc(&[&map], &[&mask]).unwrap() - 0.75).abs() < 1e-15);
    }

    #[test]
    fn degenerate_pixel_inputs_are_errors() {
        let (map, mask) = ([0.9f32, 0.8, 0.1, 0.5], [1u8, 0, 0, 1]);
        let msg = |r: Result<f64>| r.unwrap_err().to_string();
        assert!(msg(pixel_auroc(&[], &[])).contains("no pixels"));
        assert!(msg(aupro(&[], &[], &[], 0.3)).contains("no pixels"));
        assert!(msg(pixel_auroc(&[&map], &[&[0; 4]])).contains("both good and defect pixels"));
        assert!(msg(aupro(&[&map], &[&[1; 4]], &[2], 0.3)).contains("both good and defect pixels"));
        assert!(msg(pixel_auroc(&[&map], &[&mask[..3]])).contains("image 0 has 4 scores for 3 mask pixels"));
        assert!(msg(pixel_auroc(&[&map, &map], &[&mask])).contains("2 maps for 1 masks"));
        assert!(msg(aupro(&[&map], &[&mask], &[3], 0.3)).contains("not rows of 3"));
        assert!(msg(aupro(&[&map], &[&mask], &[0], 0.3)).contains("not rows of 0"));
        assert!(msg(aupro(&[&map], &[&mask], &[], 0.3)).contains("0 widths for 1 maps"));
        for bad in [0.0, -0.1, 1.5, f64::NAN] {
            assert!(msg(aupro(&[&map], &[&mask], &[4], bad)).contains("FPR limit"));
        }
        let nan = [0.9f32, f32::NAN, 0.1, 0.5];
        assert!(msg(pixel_auroc(&[&map, &nan], &[&mask, &mask])).contains("image 1 has a score NaN"));
        assert!(msg(aupro(&[&nan], &[&mask], &[4], 0.3)).contains("image 0 has a score NaN"));
    }

    #[test]
    fn radix_sort_matches_a_comparison_sort() {
        let mut x = 0x1234_5678_9ABC_DEF0u64;
        let mut v: Vec<u64> = (0..5000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x
            })
            .collect();
        let mut want = v.clone();
        want.sort_by_key(|&d| (d >> 32) as u32); // stable, like the radix sort
        radix_sort_by_key(&mut v, |d| (d >> 32) as u32);
        assert_eq!(v, want);
        let scores = [3.5f32, -2.0, 0.0, -0.0, 1e-30, -1e-30, f32::MAX, f32::MIN, 7.0];
        let mut keys: Vec<u32> = scores.iter().map(|&s| desc_key(s).unwrap()).collect();
        keys.sort();
        let back: Vec<f32> = keys.iter().map(|&k| key_score(k)).collect();
        assert_eq!(back, vec![f32::MAX, 7.0, 3.5, 1e-30, 0.0, 0.0, -1e-30, -2.0, f32::MIN]);
    }
}
