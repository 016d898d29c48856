"""Writes the detection-metric fixture of crates/csflow/tests/metrics_parity.rs (run from the repository root):

    python reference/make_metric_fixtures.py

Needs numpy, safetensors, scikit-learn and scipy. Writes crates/csflow/tests/fixtures/metrics.safetensors:

- Image-level cases (metadata `image_cases`, a JSON list of names): `img.<case>.scores` f32 and
  `img.<case>.labels` u8 (1 = defect), and scikit-learn's values on them, all f64:
  `.auroc` (roc_auc_score), `.ap` (average_precision_score), `.roc_fpr` / `.roc_tpr` / `.roc_thr`
  (roc_curve with drop_intermediate=False; the first threshold is +inf), `.pr_precision` / `.pr_recall` /
  `.pr_thr` (precision_recall_curve), `.f1` = [F1, threshold, precision, recall] at the best F1 over the
  PR curve's thresholds (F1 = 2PR / (P + R), 0 where P + R = 0; np.argmax, so the lowest threshold on ties).
  Scores are handed to scikit-learn as float32, exactly what the Rust side reads.
- Pixel-level cases (metadata `pixel_cases`, JSON {case: {"images": n, "max_fpr": [...]}}):
  `px.<case>.map<i>` f32 [H, W] and `px.<case>.mask<i>` u8 [H, W] (0 good, nonzero defect), with
  `px.<case>.auroc` (roc_auc_score of all pixels concatenated) and `px.<case>.aupro` [len(max_fpr)] f64,
  the MVTec AD AUPRO from `aupro_reference` below, checked against `aupro_brute_force` (a separate computation of
  the same curve, threshold by threshold, region by region) before writing.

The AUPRO definition (MVTec AD evaluation, Bergmann et al.): regions are the 8-connected components of each mask
(scipy.ndimage.label with a 3x3 structure of ones). Walking the distinct scores from the highest down, at
threshold t: FPR = good pixels with score >= t / all good pixels; PRO = the mean over all regions of all images of
the fraction of the region's pixels with score >= t. The curve starts at (0, 0), has one point per distinct score
and is clipped to at most 1; PRO is integrated over FPR from 0 to max_fpr with the trapezoid rule, the segment
crossing max_fpr cut by linear interpolation, and divided by max_fpr.
"""
import json
import os

import numpy as np
import scipy.ndimage
from safetensors.numpy import save_file
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

OUT = os.path.join(os.path.dirname(__file__), "..", "crates", "csflow", "tests", "fixtures", "metrics.safetensors")
EIGHT = np.ones((3, 3), dtype=int)


# ---------------------------------------------------------------------------------------------------------------
# Image-level cases.


def image_cases(rng):
    cases = {}
    n = 50
    labels = (rng.random(n) < 0.4).astype(np.uint8)
    cases["random"] = (rng.normal(size=n) + 1.2 * labels, labels)
    n = 60
    labels = (rng.random(n) < 0.5).astype(np.uint8)
    cases["ties"] = (np.round(rng.random(n) * 0.6 + 0.4 * labels, 1), labels)
    n = 500
    labels = (rng.random(n) < 0.3).astype(np.uint8)
    cases["ties_large"] = (np.round(rng.normal(size=n) * 0.5 + 0.8 * labels, 2), labels)
    cases["all_equal"] = (np.full(10, 0.5), np.array([0, 1, 0, 0, 1, 1, 0, 0, 0, 1], dtype=np.uint8))
    labels = np.array([0] * 12 + [1] * 8, dtype=np.uint8)
    perfect = np.concatenate([rng.random(12), 2 + rng.random(8)])
    cases["perfect"] = (perfect, labels)
    cases["reversed"] = (-perfect, labels)
    cases["tiny"] = (np.array([0.2, 0.9]), np.array([1, 0], dtype=np.uint8))
    cases["tiny_right"] = (np.array([0.9, 0.2]), np.array([1, 0], dtype=np.uint8))
    # Negative scores, and -0.0 tied with +0.0 (np.diff sees them equal).
    cases["signed"] = (
        np.array([-0.0, 0.0, -1.5, 2.0, 0.0, -0.0, -3.0, 1e-3, -1e-3, 2.0, 0.0, 5.0]),
        np.array([1, 0, 0, 1, 1, 0, 0, 1, 0, 0, 0, 1], dtype=np.uint8),
    )
    return cases


def f1_max(precision, recall, thresholds):
    p, r = precision[:-1], recall[:-1]
    denom = p + r
    f1 = np.where(denom > 0, 2 * p * r / np.where(denom > 0, denom, 1), 0.0)
    k = int(np.argmax(f1))  # first maximum: thresholds ascend, so the lowest threshold of a tie
    return np.array([f1[k], thresholds[k], p[k], r[k]], dtype=np.float64)


def write_image_case(out, name, scores, labels):
    s = scores.astype(np.float32)
    fpr, tpr, thr = roc_curve(labels, s, drop_intermediate=False)
    precision, recall, pthr = precision_recall_curve(labels, s)
    f64 = lambda a: np.asarray(a, dtype=np.float64)
    out.update({
        f"img.{name}.scores": s,
        f"img.{name}.labels": labels.astype(np.uint8),
        f"img.{name}.auroc": f64([roc_auc_score(labels, s)]),
        f"img.{name}.ap": f64([average_precision_score(labels, s)]),
        f"img.{name}.roc_fpr": f64(fpr),
        f"img.{name}.roc_tpr": f64(tpr),
        f"img.{name}.roc_thr": f64(thr),
        f"img.{name}.pr_precision": f64(precision),
        f"img.{name}.pr_recall": f64(recall),
        f"img.{name}.pr_thr": f64(pthr),
        f"img.{name}.f1": f1_max(f64(precision), f64(recall), f64(pthr)),
    })
    assert np.isinf(thr[0]) and len(pthr) + 1 == len(precision)


# ---------------------------------------------------------------------------------------------------------------
# AUPRO: a direct implementation of the definition, and a brute-force check of it.


def pro_curve_reference(maps, masks):
    """(FPR, PRO) points, one per distinct score (highest first) after (0, 0), clipped to at most 1."""
    scores, good, weight = [], [], []
    n_regions = 0
    for m, g in zip(maps, masks):
        lab, n = scipy.ndimage.label(g != 0, structure=EIGHT)
        sizes = np.bincount(lab.ravel(), minlength=n + 1).astype(np.float64)
        w = np.zeros(lab.shape, dtype=np.float64)
        w[lab > 0] = 1.0 / sizes[lab[lab > 0]]
        scores.append(m.ravel().astype(np.float64))
        good.append((lab == 0).ravel())
        weight.append(w.ravel())
        n_regions += n
    s, good, weight = np.concatenate(scores), np.concatenate(good), np.concatenate(weight)
    order = np.argsort(-s, kind="stable")
    s, good, weight = s[order], good[order], weight[order]
    fpr = np.cumsum(good) / good.sum()
    pro = np.cumsum(weight) / n_regions
    last_of_tie = np.append(s[1:] != s[:-1], True)
    fpr = np.minimum(np.concatenate([[0.0], fpr[last_of_tie]]), 1.0)
    pro = np.minimum(np.concatenate([[0.0], pro[last_of_tie]]), 1.0)
    return fpr, pro


def integrate_to(fpr, pro, max_fpr):
    """Trapezoid area under pro(fpr) for fpr in [0, max_fpr] (fpr ascending, repeats allowed), / max_fpr."""
    k = int(np.searchsorted(fpr, max_fpr, side="right"))  # points with fpr <= max_fpr
    x, y = fpr[:k], pro[:k]
    area = float(np.sum(0.5 * (y[1:] + y[:-1]) * np.diff(x)))
    if k < len(fpr):  # the next point lies beyond max_fpr: cut the segment there
        x0, y0, x1, y1 = fpr[k - 1], pro[k - 1], fpr[k], pro[k]
        y_cut = y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0)
        area += 0.5 * (y_cut + y0) * (max_fpr - x0)
    return area / max_fpr


def aupro_reference(maps, masks, max_fpr):
    fpr, pro = pro_curve_reference(maps, masks)
    return integrate_to(fpr, pro, max_fpr)


def aupro_brute_force(maps, masks, max_fpr):
    """The curve threshold by threshold: counts of pixels >= t over each region's own pixels and over good
    pixels (no cumulative sums, no sorting of pixels); integrated with np.interp for the cut point."""
    regions, goods = [], []
    for m, g in zip(maps, masks):
        lab, n = scipy.ndimage.label(g != 0, structure=EIGHT)
        regions += [m[lab == r].astype(np.float64) for r in range(1, n + 1)]
        goods.append(m[lab == 0].astype(np.float64))
    goods = np.concatenate(goods)
    thresholds = np.unique(np.concatenate([m.ravel() for m in maps]).astype(np.float64))[::-1]
    xs, ys = [0.0], [0.0]
    for t in thresholds:
        xs.append(min(np.mean(goods >= t), 1.0))
        ys.append(min(np.mean([np.mean(r >= t) for r in regions]), 1.0))
    xs, ys = np.array(xs), np.array(ys)
    inside = xs <= max_fpr
    x, y = xs[inside], ys[inside]
    if x[-1] < max_fpr:
        # np.interp at the first x beyond the limit, from the last point at or below it.
        j = int(np.argmax(~inside))
        y_end = np.interp(max_fpr, [xs[j - 1], xs[j]], [ys[j - 1], ys[j]])
        x, y = np.append(x, max_fpr), np.append(y, y_end)
    return np.trapezoid(y, x) / max_fpr


# ---------------------------------------------------------------------------------------------------------------
# Pixel-level cases.


def draw_masks(rng, n, h, w):
    masks = []
    for i in range(n):
        g = np.zeros((h, w), dtype=np.uint8)
        if i % 3 == 1:  # some images without any defect
            masks.append(g)
            continue
        y, x = rng.integers(2, h - 10), rng.integers(2, w - 12)
        g[y:y + rng.integers(3, 8), x:x + rng.integers(3, 10)] = 255  # a blob
        g[0, 0] = 1  # a corner pixel (a region of its own)
        for k in range(5):  # a diagonal chain: one region with 8-connectivity, five with 4-connectivity
            g[h - 1 - k, 2 + k] = 1
        g[h - 8, w - 4:w] = 1  # an L touching the right border
        g[h - 8:h - 3, w - 4] = 1
        g[h - 2, w - 2] = 7  # touches nothing
        # Two blocks touching only at one corner: one region.
        g[3:5, w - 9:w - 7] = 1
        g[5:7, w - 7:w - 5] = 1
        masks.append(g)
    return masks


def pixel_cases(rng):
    cases = {}
    masks = draw_masks(rng, 5, 32, 40)
    maps = [(rng.normal(size=g.shape) + 1.5 * (g != 0)).astype(np.float32) for g in masks]
    cases["mixed"] = (maps, masks, [0.3, 0.05, 1.0])
    # Heavy ties: scores quantized to steps of 0.25.
    cases["tied"] = ([np.round(m * 4) / 4 for m in maps], masks, [0.3, 0.5])
    # Different sizes per image, scores rounded to 2 decimals, one region covering most of an image.
    sizes = [(17, 23), (20, 9), (8, 8), (12, 30)]
    masks = []
    for k, (h, w) in enumerate(sizes):
        g = (rng.random((h, w)) < [0.08, 0.0, 0.7, 0.2][k]).astype(np.uint8)
        masks.append(g)
    maps = [np.round(rng.random(g.shape) + 0.5 * g, 2).astype(np.float32) for g in masks]
    cases["sizes"] = (maps, masks, [0.3, 0.01])
    # FPR steps of 1/10, so 0.3 falls exactly on a point (3 / 10 == 0.3 in float64).
    g = np.array([[1, 1, 0, 0, 0], [1, 0, 0, 0, 1], [0, 0, 1, 1, 0], [1, 0, 1, 1, 1]], dtype=np.uint8)
    m = (rng.permutation(20) / 20).astype(np.float32).reshape(4, 5)
    cases["exact"] = ([m], [g], [0.3, 0.5])
    return cases


def main():
    rng = np.random.default_rng(20240611)
    out, image_names, pixel_meta = {}, [], {}
    for name, (scores, labels) in image_cases(rng).items():
        write_image_case(out, name, scores, labels)
        image_names.append(name)
    worst = 0.0
    for name, (maps, masks, max_fprs) in pixel_cases(rng).items():
        for i, (m, g) in enumerate(zip(maps, masks)):
            out[f"px.{name}.map{i}"] = m.astype(np.float32)
            out[f"px.{name}.mask{i}"] = g.astype(np.uint8)
        scores = np.concatenate([m.ravel() for m in maps])
        truth = np.concatenate([(g.ravel() != 0) for g in masks]).astype(np.uint8)
        out[f"px.{name}.auroc"] = np.array([roc_auc_score(truth, scores)], dtype=np.float64)
        values = []
        for f in max_fprs:
            a, b = aupro_reference(maps, masks, f), aupro_brute_force(maps, masks, f)
            worst = max(worst, abs(a - b))
            assert abs(a - b) < 1e-12, (name, f, a, b)
            values.append(a)
        out[f"px.{name}.aupro"] = np.array(values, dtype=np.float64)
        if name == "exact":
            assert 0.3 in pro_curve_reference(maps, masks)[0]
        regions = sum(scipy.ndimage.label(g != 0, structure=EIGHT)[1] for g in masks)
        pixel_meta[name] = {"images": len(maps), "max_fpr": max_fprs}
        print(f"{name}: {len(maps)} images, {regions} regions, pixel AUROC {out[f'px.{name}.auroc'][0]:.6f}, "
              f"AUPRO {dict(zip(max_fprs, np.round(values, 6)))}")
    print(f"AUPRO reference vs brute force: max |diff| {worst:.2e}")
    meta = {"image_cases": json.dumps(image_names), "pixel_cases": json.dumps(pixel_meta)}
    save_file(out, OUT, metadata=meta)
    print(f"wrote {OUT} ({os.path.getsize(OUT)} bytes)")


if __name__ == "__main__":
    main()
