//! Decision thresholds on image scores and scores normalised for people (SPEC 3).

use crate::{Error, Result};

/// The `q`-quantile of `values` with linear interpolation between order statistics (numpy's default).
pub fn quantile(values: &[f32], q: f64) -> Result<f64> {
    if values.is_empty() {
        return Err(Error::Invalid("a quantile of no values".into()));
    }
    if !(0.0..=1.0).contains(&q) {
        return Err(Error::Invalid(format!("quantile {q} is outside [0, 1]")));
    }
    if values.iter().any(|v| v.is_nan()) {
        return Err(Error::Invalid("a score is NaN".into()));
    }
    let mut v: Vec<f64> = values.iter().map(|&x| x as f64).collect();
    v.sort_by(f64::total_cmp);
    let pos = q * (v.len() - 1) as f64;
    let (lo, frac) = (pos.floor() as usize, pos - pos.floor());
    let hi = (lo + 1).min(v.len() - 1);
    Ok(v[lo] + (v[hi] - v[lo]) * frac)
}

/// The threshold that rejects about `max_false_reject` of good images: the (1 - rate) quantile of good
/// images' scores. Used when no defects are labelled (an F1-optimal threshold needs defects).
pub fn false_reject_threshold(good_scores: &[f32], max_false_reject: f64) -> Result<f64> {
    if !(0.0..1.0).contains(&max_false_reject) {
        return Err(Error::Invalid(format!("the false-reject rate {max_false_reject} must be in [0, 1)")));
    }
    quantile(good_scores, 1.0 - max_false_reject)
}

/// A threshold given by a person (a command-line flag): a finite number. NaN would mark every image good
/// and infinity every one good or defective, with no error anywhere.
pub fn parse_finite<T: std::str::FromStr + Copy + Into<f64>>(s: &str) -> std::result::Result<T, String> {
    let v: T = s.trim().parse().map_err(|_| format!("`{s}` is not a number"))?;
    if !v.into().is_finite() {
        return Err(format!("`{s}` is not a finite number"));
    }
    Ok(v)
}

/// A score on [0, 1] for people: 0 at the best good image (`good_min`), 0.5 at the threshold, 1 as far
/// above the threshold as the threshold is above the best good image, clamped. The verdict stays
/// `score >= threshold` (normalised >= 0.5).
pub fn normalized_score(score: f64, threshold: f64, good_min: f64) -> f64 {
    let span = (threshold - good_min).max(f64::EPSILON * threshold.abs().max(1.0));
    (0.5 + 0.5 * (score - threshold) / span).clamp(0.0, 1.0)
}

/// One image's verdict as `predict` and `serve` report it, fields in this order.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Verdict {
    pub score: f64,
    /// [`normalized_score`]: on [0, 1], 0.5 at the threshold; None without a threshold or good-score
    /// statistics.
    pub normalized_score: Option<f64>,
    /// `good` or `defect` (score at or above the threshold); None without a threshold or for a NaN score.
    pub label: Option<&'static str>,
    pub threshold: Option<f64>,
}

impl Verdict {
    /// The verdict on `score` at `threshold`, normalised with the best good image's score `good_min`.
    pub fn new(score: f64, threshold: Option<f64>, good_min: Option<f64>) -> Self {
        // A score that is not a number gets no verdict (`NaN >= t` is false: it would read "good").
        let judged = threshold.filter(|_| !score.is_nan());
        Verdict {
            score,
            normalized_score: judged.zip(good_min).map(|(t, m)| normalized_score(score, t, m)),
            label: judged.map(|t| if score >= t { "defect" } else { "good" }),
            threshold,
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_nan_score_gets_no_verdict() {
        let v = super::Verdict::new(f64::NAN, Some(1.0), Some(0.0));
        assert_eq!((v.label, v.normalized_score), (None, None));
        let v = super::Verdict::new(2.0, Some(1.0), Some(0.0));
        assert_eq!((v.label, v.normalized_score), (Some("defect"), Some(1.0)));
        assert_eq!(super::Verdict::new(0.5, Some(1.0), Some(0.0)).label, Some("good"));
    }

    #[test]
    fn thresholds_from_people_are_finite_numbers() {
        assert_eq!(super::parse_finite::<f64>("0.25"), Ok(0.25));
        assert_eq!(super::parse_finite::<f32>(" -3e2 "), Ok(-300.0));
        for bad in ["nan", "NaN", "inf", "-inf", "infinity", "1e400", "", "abc"] {
            assert!(super::parse_finite::<f64>(bad).is_err(), "{bad}");
        }
        // 1e39 is finite as f64 but not as f32.
        assert!(super::parse_finite::<f32>("1e39").is_err());
    }

    use super::*;

    #[test]
    fn quantiles_match_numpy_linear() {
        // numpy.quantile([1, 2, 3, 4], q): 0 -> 1, 0.5 -> 2.5, 0.9 -> 3.7, 1 -> 4.
        let v = [3.0, 1.0, 4.0, 2.0];
        assert_eq!(quantile(&v, 0.0).unwrap(), 1.0);
        assert_eq!(quantile(&v, 0.5).unwrap(), 2.5);
        assert!((quantile(&v, 0.9).unwrap() - 3.7).abs() < 1e-12);
        assert_eq!(quantile(&v, 1.0).unwrap(), 4.0);
        assert!(quantile(&[], 0.5).is_err());
        assert!(quantile(&[1.0, f32::NAN], 0.5).is_err());
    }

    #[test]
    fn false_reject_rate_of_one_in_ten() {
        // Scores 1..=10: the 0.9 quantile is 9.1, so only the image scoring 10 is rejected (10 %).
        let v: Vec<f32> = (1..=10).map(|i| i as f32).collect();
        let t = false_reject_threshold(&v, 0.1).unwrap();
        assert!((t - 9.1).abs() < 1e-12);
        assert_eq!(v.iter().filter(|&&s| s as f64 >= t).count(), 1);
        assert!(false_reject_threshold(&v, 1.0).is_err());
    }

    #[test]
    fn normalised_scores_put_the_threshold_at_one_half() {
        assert_eq!(normalized_score(3.0, 3.0, 1.0), 0.5);
        assert_eq!(normalized_score(1.0, 3.0, 1.0), 0.0);
        assert_eq!(normalized_score(5.0, 3.0, 1.0), 1.0);
        assert_eq!(normalized_score(4.0, 3.0, 1.0), 0.75);
        assert_eq!(normalized_score(100.0, 3.0, 1.0), 1.0);
        assert_eq!(normalized_score(-5.0, 3.0, 1.0), 0.0);
        // A degenerate span (threshold at the minimum) still orders scores around the threshold.
        assert_eq!(normalized_score(3.0, 3.0, 3.0), 0.5);
        assert_eq!(normalized_score(3.1, 3.0, 3.0), 1.0);
    }

    #[test]
    fn verdicts_label_at_or_above_the_threshold() {
        let v = Verdict::new(4.0, Some(3.0), Some(1.0));
        assert_eq!((v.normalized_score, v.label, v.threshold), (Some(0.75), Some("defect"), Some(3.0)));
        assert_eq!(Verdict::new(3.0, Some(3.0), None).label, Some("defect"));
        assert_eq!(Verdict::new(3.0, Some(3.0), None).normalized_score, None);
        assert_eq!(Verdict::new(2.0, Some(3.0), Some(1.0)).label, Some("good"));
        let none = Verdict::new(2.0, None, Some(1.0));
        assert_eq!((none.normalized_score, none.label, none.threshold), (None, None, None));
        let json = serde_json::to_string(&Verdict::new(2.0, Some(3.0), Some(1.0))).unwrap();
        assert_eq!(json, r#"{"score":2.0,"normalized_score":0.25,"label":"good","threshold":3.0}"#);
    }
}
