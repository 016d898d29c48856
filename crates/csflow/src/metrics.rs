//! Detection quality measures.

use crate::{Error, Result};

/// Area under the ROC curve of `scores` for `labels` (1 = defect, the positive class), ties counted half:
/// the Mann-Whitney statistic, equal to scikit-learn's `roc_auc_score`.
pub fn auroc(scores: &[f32], labels: &[u8]) -> Result<f64> {
    if scores.len() != labels.len() {
        return Err(Error::Invalid(format!("{} scores for {} labels", scores.len(), labels.len())));
    }
    let pos = labels.iter().filter(|&&l| l == 1).count();
    let neg = labels.len() - pos;
    if pos == 0 || neg == 0 {
        return Err(Error::Invalid(format!(
            "AUROC needs both good and defective samples (got {neg} good, {pos} defective)"
        )));
    }
    if scores.iter().any(|s| s.is_nan()) {
        return Err(Error::Invalid("AUROC: a score is NaN".into()));
    }
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    // Sum of the positives' average ranks (1-based), ties sharing their mean rank.
    let mut rank_sum = 0f64;
    let mut i = 0;
    while i < idx.len() {
        let mut j = i;
        while j + 1 < idx.len() && scores[idx[j + 1]] == scores[idx[i]] {
            j += 1;
        }
        let mean_rank = (i + j) as f64 / 2.0 + 1.0;
        rank_sum += mean_rank * idx[i..=j].iter().filter(|&&k| labels[k] == 1).count() as f64;
        i = j + 1;
    }
    let (p, n) = (pos as f64, neg as f64);
    Ok((rank_sum - p * (p + 1.0) / 2.0) / (p * n))
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
}
