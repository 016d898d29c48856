//! The detection metrics against scikit-learn and a reference of the MVTec AD AUPRO definition
//! (reference/make_metric_fixtures.py): every value and curve point within 1e-6 absolute.
mod common;

use std::collections::BTreeMap;

use candle_core::Tensor;
use common::*;
use csflow::metrics::{aupro, auroc, average_precision, f1_max, pixel_auroc, pr_curve, roc_curve};

const TOL: f64 = 1e-6;

fn f64s(t: &Tensor) -> Vec<f64> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

fn u8s(t: &Tensor) -> Vec<u8> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

/// Largest |got - want| (infinities must match exactly); panics on a length mismatch.
fn max_err(what: &str, got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len(), "{what}: {} points, the reference has {}", got.len(), want.len());
    got.iter()
        .zip(want)
        .map(|(&g, &w)| {
            if g.is_infinite() || w.is_infinite() {
                assert_eq!(g, w, "{what}");
                0.0
            } else {
                (g - w).abs()
            }
        })
        .fold(0.0, f64::max)
}

/// Records the worst error per metric and checks each against the tolerance.
#[derive(Default)]
struct Worst(BTreeMap<&'static str, f64>);

impl Worst {
    fn check(&mut self, metric: &'static str, case: &str, got: &[f64], want: &[f64]) {
        let e = max_err(&format!("{metric} ({case})"), got, want);
        assert!(e <= TOL, "{metric} ({case}): error {e:.3e}\n got {got:?}\nwant {want:?}");
        let w = self.0.entry(metric).or_insert(0.0);
        *w = w.max(e);
    }

    fn print(&self) {
        for (metric, e) in &self.0 {
            println!("{metric}: max abs err {e:.3e}");
        }
    }
}

#[test]
fn image_metrics_equal_scikit_learn() {
    let fx = Fixture::load("metrics.safetensors");
    let cases: Vec<String> = fx.meta_json("image_cases");
    assert!(cases.len() >= 6);
    let mut worst = Worst::default();
    for case in &cases {
        let t = |k: &str| f64s(fx.t(&format!("img.{case}.{k}")));
        let scores = to_vec(fx.t(&format!("img.{case}.scores")));
        let labels = u8s(fx.t(&format!("img.{case}.labels")));
        worst.check("auroc", case, &[auroc(&scores, &labels).unwrap()], &t("auroc"));
        worst.check("average_precision", case, &[average_precision(&scores, &labels).unwrap()], &t("ap"));
        let roc = roc_curve(&scores, &labels).unwrap();
        worst.check("roc_curve.fpr", case, &roc.fpr, &t("roc_fpr"));
        worst.check("roc_curve.tpr", case, &roc.tpr, &t("roc_tpr"));
        worst.check("roc_curve.thresholds", case, &roc.thresholds, &t("roc_thr"));
        let pr = pr_curve(&scores, &labels).unwrap();
        worst.check("pr_curve.precision", case, &pr.precision, &t("pr_precision"));
        worst.check("pr_curve.recall", case, &pr.recall, &t("pr_recall"));
        worst.check("pr_curve.thresholds", case, &pr.thresholds, &t("pr_thr"));
        let f = f1_max(&scores, &labels).unwrap();
        worst.check("f1_max", case, &[f.f1, f.threshold, f.precision, f.recall], &t("f1"));
    }
    worst.print();
}

#[derive(serde::Deserialize)]
struct PixelCase {
    images: usize,
    max_fpr: Vec<f64>,
}

#[test]
fn pixel_metrics_equal_the_references() {
    let fx = Fixture::load("metrics.safetensors");
    let cases: BTreeMap<String, PixelCase> = fx.meta_json("pixel_cases");
    assert!(cases.len() >= 3);
    let mut worst = Worst::default();
    for (case, c) in &cases {
        let (mut maps, mut masks, mut widths) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..c.images {
            let m = fx.t(&format!("px.{case}.map{i}"));
            widths.push(m.dims()[1]);
            maps.push(to_vec(m));
            masks.push(u8s(fx.t(&format!("px.{case}.mask{i}"))));
        }
        let maps: Vec<&[f32]> = maps.iter().map(|m| m.as_slice()).collect();
        let masks: Vec<&[u8]> = masks.iter().map(|m| m.as_slice()).collect();
        let want = f64s(fx.t(&format!("px.{case}.auroc")));
        worst.check("pixel_auroc", case, &[pixel_auroc(&maps, &masks).unwrap()], &want);
        let got: Vec<f64> = c.max_fpr.iter().map(|&f| aupro(&maps, &masks, &widths, f).unwrap()).collect();
        worst.check("aupro", case, &got, &f64s(fx.t(&format!("px.{case}.aupro"))));
    }
    worst.print();
}
