//! The HTML report of `csflow test` (SPEC 3): one self-contained page for an inspection engineer.
//!
//! The page needs nothing else: inline CSS, charts as inline SVG, pictures as base64 PNG data URIs, no
//! scripts and no links out, so it can be mailed or archived with a batch of parts. Everything the caller
//! could not compute (no defects, no masks, an undefined metric) is shown as "—" with a short reason.
//!
//! The caller computes metrics, curves and pictures (see [`crate::metrics`], [`crate::overlay`]); the
//! report computes only what follows from the scores and the threshold: the decisions at the threshold
//! (false rejects, escapes, detection rate per defect type) and the score histograms. An image is flagged
//! as defective when `score >= threshold`, as everywhere in csflow.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use base64::Engine as _;

use crate::evaluate::Metrics;
use crate::Result;

/// The defect-type name of good images in [`ScoredImage`] and [`Example`]; every other name is a defect.
pub const GOOD: &str = "good";

/// Detection quality on one group of test images: one defect type (with all good images, as the MVTec AD
/// per-category tables) or all of them. A metric that is `None` was not computable (see the counts and
/// [`ReportInput::has_masks`] for why).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MetricRow {
    /// Defect type, or "all" for the overall row.
    pub name: String,
    pub metrics: Metrics,
}

/// One test image's score; `defect_type` is [`GOOD`] for good images.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ScoredImage {
    pub path: String,
    pub defect_type: String,
    pub score: f64,
}

/// One image shown with its pictures, already rendered (PNG or JPEG bytes; thumbnails of ~250 px are
/// plenty). `overlay_png` is the heatmap over the image (see [`crate::overlay::heatmap_overlay`]), with the
/// ground-truth outline drawn in when there is a mask ([`crate::overlay::draw_contour`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Example {
    pub path: String,
    pub defect_type: String,
    pub score: f64,
    pub image_png: Option<Vec<u8>>,
    pub overlay_png: Option<Vec<u8>>,
}

/// A curve as points (`x[i]`, `y[i]`) in drawing order: ROC = (false positive rate, true positive rate),
/// PR = (recall, precision).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Curve {
    pub x: Vec<f64>,
    pub y: Vec<f64>,
}

impl From<&crate::metrics::RocCurve> for Curve {
    /// x = false positive rate, y = true positive rate.
    fn from(c: &crate::metrics::RocCurve) -> Self {
        Curve { x: c.fpr.clone(), y: c.tpr.clone() }
    }
}

impl From<&crate::metrics::PrCurve> for Curve {
    /// x = recall, y = precision.
    fn from(c: &crate::metrics::PrCurve) -> Self {
        Curve { x: c.recall.clone(), y: c.precision.clone() }
    }
}

/// Everything the report shows. Text fields are plain text (escaped here).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReportInput {
    /// Page title, e.g. "csflow test report: bottle".
    pub title: String,
    /// Model file (path or name).
    pub model: String,
    /// Test data set (path).
    pub data: String,
    /// When the test ran, as the caller writes dates.
    pub created: String,
    /// Metrics over all test images (its `name` is shown as "all").
    pub overall: MetricRow,
    /// Metrics per defect type.
    pub per_type: Vec<MetricRow>,
    /// Image-level ROC curve (FPR, TPR).
    pub roc: Option<Curve>,
    /// Image-level precision-recall curve (recall, precision).
    pub pr: Option<Curve>,
    /// The operating threshold on image scores (the model's, or the one given at test time).
    pub threshold: Option<f64>,
    /// How that threshold was chosen, in words (e.g. "F1-optimal on the validation set").
    pub threshold_source: Option<String>,
    /// Whether ground-truth masks were available (pixel metrics and outlines need them).
    pub has_masks: bool,
    /// The anomaly-map values at the two ends of the heatmap colour scale (vmin, vmax), for the legend.
    pub heatmap_range: Option<(f64, f64)>,
    /// Every test image's score.
    pub scores: Vec<ScoredImage>,
    /// Good images with the highest scores (shown highest first).
    pub false_positives: Vec<Example>,
    /// Defective images with the lowest scores (shown lowest first).
    pub false_negatives: Vec<Example>,
    /// Remarks shown near the top (warnings, skipped files ...).
    pub notes: Vec<String>,
}

/// Writes the report to `path` (atomically).
pub fn write_report(path: &Path, input: &ReportInput) -> Result<()> {
    crate::io::atomic_write(path, render_html(input).as_bytes())
}

/// The report as one HTML page.
pub fn render_html(input: &ReportInput) -> String {
    let ctx = Context::new(input);
    let mut h = String::with_capacity(64 * 1024);
    let title = if input.title.trim().is_empty() { "csflow test report" } else { input.title.as_str() };
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>{}</title>\n<style>{CSS}</style>\n</head>\n<body>\n<main>\n",
        esc(title)
    );
    header(&mut h, input, title);
    notes(&mut h, input);
    headline(&mut h, input);
    decisions(&mut h, &ctx);
    per_type_table(&mut h, input, &ctx);
    curves(&mut h, input, &ctx);
    histograms(&mut h, &ctx);
    examples(&mut h, input, &ctx);
    all_scores(&mut h, input, &ctx);
    let _ = write!(
        h,
        "<footer>csflow {} · CS-Flow (Rudolph et al., WACV 2022) · This page is self-contained: it loads \
         nothing and runs no scripts.</footer>\n</main>\n</body>\n</html>\n",
        env!("CARGO_PKG_VERSION")
    );
    h
}

const CSS: &str = r#"
:root { --ink:#1f2933; --muted:#616e7c; --line:#d9e2ec; --bg:#f5f7fa; --card:#fff; --good:#2f6fba; --bad:#e8590c; --alert:#c92a2a; }
* { box-sizing:border-box; }
body { margin:0; background:var(--bg); color:var(--ink); font:15px/1.45 "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width:1200px; margin:0 auto; padding:24px 28px 40px; }
h1 { font-size:26px; margin:0 0 10px; }
h2 { font-size:20px; margin:34px 0 6px; padding-bottom:4px; border-bottom:2px solid var(--line); }
p.lead { margin:4px 0 14px; color:var(--muted); }
.meta { display:grid; grid-template-columns:max-content 1fr; gap:3px 16px; background:var(--card); border:1px solid var(--line); border-radius:8px; padding:12px 16px; }
.meta dt { color:var(--muted); } .meta dd { margin:0; overflow-wrap:anywhere; }
.mono { font-family:"SFMono-Regular", Consolas, "Liberation Mono", monospace; font-size:13px; }
.notes { background:#fff8e1; border:1px solid #f0c36d; border-radius:8px; padding:10px 16px; margin-top:14px; }
.notes ul { margin:4px 0; padding-left:20px; }
.cards { display:grid; grid-template-columns:repeat(auto-fit, minmax(200px, 1fr)); gap:12px; margin-top:16px; }
.card { background:var(--card); border:1px solid var(--line); border-radius:8px; padding:12px 14px; }
.card .label { font-weight:600; font-size:14px; }
.card .value { font-size:36px; font-weight:700; line-height:1.15; margin:4px 0; font-variant-numeric:tabular-nums; }
.card .sub { font-size:13px; color:var(--ink); }
.card .explain { font-size:12.5px; color:var(--muted); margin-top:6px; }
.na { color:#9aa5b1; }
.why { display:block; font-size:11.5px; color:var(--muted); font-weight:400; line-height:1.2; white-space:normal; }
.card .value .why { font-size:12.5px; margin-top:2px; }
.verdicts { display:grid; grid-template-columns:repeat(auto-fit, minmax(260px, 1fr)); gap:12px; margin-top:10px; }
.verdict { background:var(--card); border:1px solid var(--line); border-left:6px solid var(--line); border-radius:8px; padding:10px 14px; }
.verdict.bad { border-left-color:var(--alert); } .verdict.ok { border-left-color:#2b8a3e; }
.verdict .big { font-size:26px; font-weight:700; font-variant-numeric:tabular-nums; }
.verdict .what { font-weight:600; } .verdict .explain { font-size:12.5px; color:var(--muted); }
table { border-collapse:collapse; width:100%; background:var(--card); margin-top:10px; font-variant-numeric:tabular-nums; }
th, td { border:1px solid var(--line); padding:6px 9px; text-align:right; vertical-align:top; }
th { background:#eef2f7; font-size:13px; text-align:center; }
td:first-child, th:first-child { text-align:left; }
.scroll { overflow-x:auto; }
table.metrics td, table.metrics th { white-space:nowrap; }
tr.total td { font-weight:700; background:#f8fafc; border-top:2px solid #9fb3c8; }
table.confusion { width:auto; } table.confusion td { min-width:150px; }
.charts { display:flex; flex-wrap:wrap; gap:16px; margin-top:10px; }
.chart { background:var(--card); border:1px solid var(--line); border-radius:8px; padding:8px; flex:1 1 420px; max-width:560px; }
.chart h3, .hist h3 { font-size:15px; margin:2px 6px 4px; }
svg { display:block; width:100%; height:auto; font-family:inherit; }
svg text { fill:#334e68; font-size:13px; }
svg .axis-label { font-size:14px; fill:var(--ink); font-weight:600; }
svg .ann { font-size:13px; font-weight:600; paint-order:stroke; stroke:#fff; stroke-width:4px; stroke-linejoin:round; }
.placeholder { display:flex; align-items:center; justify-content:center; min-height:160px; color:var(--muted); text-align:center; padding:20px; }
.hist { background:var(--card); border:1px solid var(--line); border-radius:8px; padding:8px 8px 2px; margin-top:10px; }
.legend { display:flex; flex-wrap:wrap; gap:18px; align-items:center; margin:8px 2px; font-size:13.5px; }
.swatch { display:inline-block; width:14px; height:14px; border-radius:3px; vertical-align:-2px; margin-right:6px; }
.colorbar { display:flex; align-items:center; gap:10px; margin:8px 2px; font-size:13px; flex-wrap:wrap; }
.colorbar .bar { width:260px; height:14px; border-radius:3px; border:1px solid #9fb3c8; }
.examples { display:grid; grid-template-columns:repeat(auto-fill, minmax(330px, 1fr)); gap:14px; margin-top:10px; }
.example { background:var(--card); border:1px solid var(--line); border-radius:8px; padding:8px; }
.pics { display:grid; grid-template-columns:1fr 1fr; gap:6px; }
.pics figure { margin:0; } .pics figcaption { font-size:11.5px; color:var(--muted); text-align:center; }
.pics img { width:100%; height:auto; display:block; border-radius:4px; image-rendering:auto; background:#e4e7eb; }
.noimg { aspect-ratio:1; display:flex; align-items:center; justify-content:center; background:#eef2f7; color:var(--muted); font-size:12px; border-radius:4px; }
.caption { margin-top:6px; font-size:13.5px; }
.caption .score { font-size:17px; font-weight:700; font-variant-numeric:tabular-nums; }
.caption .path { font-size:12px; color:var(--muted); overflow-wrap:anywhere; }
.badge { display:inline-block; border-radius:10px; padding:0 8px; font-size:12px; font-weight:600; margin-left:4px; }
.badge.flag { background:#ffe3e3; color:var(--alert); } .badge.pass { background:#e6fcf5; color:#087f5b; }
.badge.type { background:#e7f5ff; color:#1864ab; }
details { margin-top:10px; background:var(--card); border:1px solid var(--line); border-radius:8px; padding:8px 12px; }
summary { cursor:pointer; font-weight:600; }
footer { margin-top:36px; color:var(--muted); font-size:12px; text-align:center; }
@media print { body { background:#fff; } main { max-width:none; padding:0; } .card, .chart, .hist, .example, .verdict { break-inside:avoid; } details { display:none; } }
"#;

// ---------------------------------------------------------------------------------------------------
// Facts derived from the input.

/// Counts at the operating threshold (positive = defective, flagged = score >= threshold).
#[derive(Debug, Clone, Copy, Default)]
struct Confusion {
    tp: usize,
    fp: usize,
    tn: usize,
    fn_: usize,
}

struct Context {
    /// Finite scores of good images and of each defect type (sorted by name).
    good: Vec<f64>,
    defects: BTreeMap<String, Vec<f64>>,
    n_nonfinite: usize,
    threshold: Option<f64>,
    confusion: Option<Confusion>,
}

impl Context {
    fn new(input: &ReportInput) -> Self {
        let mut good = Vec::new();
        let mut defects: BTreeMap<String, Vec<f64>> = BTreeMap::new();
        let mut n_nonfinite = 0;
        for s in &input.scores {
            if !s.score.is_finite() {
                n_nonfinite += 1;
            } else if s.defect_type == GOOD {
                good.push(s.score);
            } else {
                defects.entry(s.defect_type.clone()).or_default().push(s.score);
            }
        }
        let threshold = input.threshold.filter(|t| t.is_finite());
        let confusion = threshold.filter(|_| !input.scores.is_empty()).map(|t| {
            let mut c = Confusion::default();
            for s in &input.scores {
                let flagged = s.score >= t; // NaN: not flagged
                match (s.defect_type != GOOD, flagged) {
                    (true, true) => c.tp += 1,
                    (true, false) => c.fn_ += 1,
                    (false, true) => c.fp += 1,
                    (false, false) => c.tn += 1,
                }
            }
            c
        });
        Context { good, defects, n_nonfinite, threshold, confusion }
    }

    fn all_defects(&self) -> Vec<f64> {
        self.defects.values().flatten().copied().collect()
    }

    /// (detected, total) of a defect type ("all": every defect) at the threshold.
    fn detected(&self, name: &str, is_all: bool) -> Option<(usize, usize)> {
        let t = self.threshold?;
        let v: Vec<f64> = if is_all { self.all_defects() } else { self.defects.get(name)?.clone() };
        (!v.is_empty()).then(|| (v.iter().filter(|&&s| s >= t).count(), v.len()))
    }
}

// ---------------------------------------------------------------------------------------------------
// Text helpers.

/// `s` safe inside HTML text and attribute values.
fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            _ => o.push(c),
        }
    }
    o
}

/// A metric on [0, 1] with three decimals.
fn fmt_metric(v: f64) -> String {
    format!("{v:.3}")
}

/// A score or threshold with four significant digits (scientific notation when very large or small).
fn fmt_num(v: f64) -> String {
    if !v.is_finite() {
        return format!("{v}");
    }
    if v == 0.0 {
        return "0".into();
    }
    let mag = v.abs().log10().floor() as i32;
    if !(-3..6).contains(&mag) {
        return format!("{v:.3e}");
    }
    format!("{:.*}", (3 - mag).max(0) as usize, v)
}

/// A short number for axis ticks: up to four significant digits, trailing zeros dropped.
fn fmt_tick(v: f64) -> String {
    let s = fmt_num(v);
    if s.contains('.') && !s.contains('e') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

fn fmt_count(k: usize, n: usize) -> String {
    if n == 0 {
        return format!("{k} of 0");
    }
    format!("{k} of {n} ({:.1} %)", 100.0 * k as f64 / n as f64)
}

/// "—" with a short reason, as HTML.
fn missing(reason: &str) -> String {
    format!("<span class=\"na\">—</span><span class=\"why\">{}</span>", esc(reason))
}

#[derive(Clone, Copy)]
enum Kind {
    Image,
    Pixel,
}

/// Why a metric of `row` is missing (or not finite).
fn reason(row: &Metrics, kind: Kind, has_masks: bool, value: Option<f64>) -> &'static str {
    if value.is_some() {
        return "undefined (not a finite number)";
    }
    match kind {
        Kind::Pixel if !has_masks => "no ground-truth masks",
        _ if row.n_defect == 0 => "no defective images",
        _ if row.n_good == 0 => "no good images",
        Kind::Pixel => "no masks for these images",
        Kind::Image => "not computed",
    }
}

fn metric_cell(row: &Metrics, v: Option<f64>, kind: Kind, has_masks: bool, fmt: fn(f64) -> String) -> String {
    match v {
        Some(x) if x.is_finite() => fmt(x),
        _ => missing(reason(row, kind, has_masks, v)),
    }
}

fn data_uri(bytes: &[u8]) -> String {
    let mime = if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) { "image/jpeg" } else { "image/png" };
    format!("data:{mime};base64,{}", base64::engine::general_purpose::STANDARD.encode(bytes))
}

// ---------------------------------------------------------------------------------------------------
// Sections.

fn header(h: &mut String, input: &ReportInput, title: &str) {
    let o = &input.overall.metrics;
    let n_types = input.per_type.len();
    let _ = write!(
        h,
        "<h1>{}</h1>\n<dl class=\"meta\">\
         <dt>Model</dt><dd class=\"mono\">{}</dd>\
         <dt>Test data</dt><dd class=\"mono\">{}</dd>\
         <dt>Created</dt><dd>{}</dd>\
         <dt>Test images</dt><dd><b>{}</b> good, <b>{}</b> defective{}</dd>",
        esc(title),
        if input.model.is_empty() { "—".into() } else { esc(&input.model) },
        if input.data.is_empty() { "—".into() } else { esc(&input.data) },
        if input.created.is_empty() { "—".into() } else { esc(&input.created) },
        o.n_good,
        o.n_defect,
        match n_types {
            0 => String::new(),
            1 => " (1 defect type)".into(),
            n => format!(" ({n} defect types)"),
        }
    );
    let _ = writeln!(
        h,
        "<dt>Threshold</dt><dd>{}</dd></dl>",
        match input.threshold {
            Some(t) if t.is_finite() => format!(
                "<b>{}</b> — an image is flagged as defective when its score is at or above it{}",
                fmt_num(t),
                input.threshold_source.as_deref().map(|s| format!(" ({})", esc(s))).unwrap_or_default()
            ),
            _ => missing("no threshold: the model has none and none was given"),
        }
    );
}

fn notes(h: &mut String, input: &ReportInput) {
    if input.notes.is_empty() {
        return;
    }
    h.push_str("<div class=\"notes\"><b>Notes</b><ul>");
    for n in &input.notes {
        let _ = write!(h, "<li>{}</li>", esc(n));
    }
    h.push_str("</ul></div>\n");
}

fn headline(h: &mut String, input: &ReportInput) {
    let o = &input.overall.metrics;
    h.push_str("<h2>Detection quality</h2>\n<p class=\"lead\">Measured on all test images; 1.000 is perfect.</p>\n<div class=\"cards\">\n");
    let thr = match o.threshold {
        Some(t) if t.is_finite() && o.image_f1_max.is_some_and(f64::is_finite) => {
            format!("<div class=\"sub\">at score threshold {}</div>", fmt_num(t))
        }
        _ => String::new(),
    };
    let chance = if o.n_good > 0 && o.n_defect > 0 {
        format!(" Chance level here: {:.3}.", o.n_defect as f64 / (o.n_good + o.n_defect) as f64)
    } else {
        String::new()
    };
    let cards: [(&str, Option<f64>, Kind, String, String); 5] = [
        (
            "Image AUROC",
            o.image_auroc,
            Kind::Image,
            String::new(),
            "Chance that a random defective image scores higher than a random good one (0.5 = guessing).".into(),
        ),
        (
            "Average precision",
            o.image_ap,
            Kind::Image,
            String::new(),
            format!("How clean the top of the list is when images are sorted by score.{chance}"),
        ),
        (
            "F1-max",
            o.image_f1_max,
            Kind::Image,
            thr,
            "Best balance of precision (flags that are real) and recall (defects found) over all thresholds.".into(),
        ),
        (
            "Pixel AUROC",
            o.pixel_auroc,
            Kind::Pixel,
            String::new(),
            "Chance that a random defect pixel scores higher than a random good pixel.".into(),
        ),
        (
            "AUPRO (30 % FPR)",
            o.aupro,
            Kind::Pixel,
            String::new(),
            "Share of each defect region covered by the heatmap, averaged over regions, up to 30 % false \
             pixels (MVTec AD). Small defects count as much as large ones."
                .into(),
        ),
    ];
    for (label, v, kind, sub, explain) in cards {
        let _ = writeln!(
            h,
            "<div class=\"card\"><div class=\"label\">{label}</div><div class=\"value\">{}</div>{sub}\
             <div class=\"explain\">{}</div></div>",
            metric_cell(o, v, kind, input.has_masks, fmt_metric),
            esc(&explain)
        );
    }
    h.push_str("</div>\n");
}

fn decisions(h: &mut String, ctx: &Context) {
    h.push_str("<h2>Decisions at the threshold</h2>\n");
    let (Some(t), Some(c)) = (ctx.threshold, ctx.confusion) else {
        let why = if ctx.threshold.is_none() { "no threshold" } else { "no scored images" };
        let _ = writeln!(h, "<p>{}</p>", missing(why));
        return;
    };
    let _ = writeln!(
        h,
        "<p class=\"lead\">What the line would do with these images at threshold {}: flag every image whose \
         score is at or above it.</p>",
        fmt_num(t)
    );
    let n_good = c.fp + c.tn;
    let n_def = c.tp + c.fn_;
    h.push_str("<div class=\"verdicts\">");
    let verdict = |h: &mut String, what: &str, k: usize, n: usize, none: &str, explain: &str| {
        let class = if n == 0 {
            ""
        } else if k == 0 {
            "ok"
        } else {
            "bad"
        };
        let big = if n == 0 { missing(none) } else { fmt_count(k, n) };
        let _ = write!(
            h,
            "<div class=\"verdict {class}\"><div class=\"what\">{what}</div><div class=\"big\">{big}</div>\
             <div class=\"explain\">{explain}</div></div>"
        );
    };
    verdict(
        h,
        "False rejects",
        c.fp,
        n_good,
        "no good images",
        "Good images flagged as defective (extra manual checks, scrap).",
    );
    verdict(
        h,
        "Escapes",
        c.fn_,
        n_def,
        "no defective images",
        "Defective images passed as good (defects that reach the customer).",
    );
    let precision = if n_def == 0 {
        missing("no defective images")
    } else if c.tp + c.fp > 0 {
        format!("{:.1} %", 100.0 * c.tp as f64 / (c.tp + c.fp) as f64)
    } else {
        missing("nothing flagged")
    };
    let _ = write!(
        h,
        "<div class=\"verdict\"><div class=\"what\">Flags that are real defects</div><div class=\"big\">{precision}\
         </div><div class=\"explain\">{}</div></div>",
        if n_def == 0 {
            "Precision: needs defective images.".to_string()
        } else {
            format!("Precision: of {} flagged image{}, {} are defective.", c.tp + c.fp, plural(c.tp + c.fp), c.tp)
        }
    );
    h.push_str("</div>\n");
    let _ = write!(
        h,
        "<table class=\"confusion\"><tr><th></th><th>flagged (score ≥ {t})</th><th>passed (score &lt; {t})</th></tr>",
        t = fmt_num(t)
    );
    if n_good > 0 {
        let _ = write!(
            h,
            "<tr><td><b>good</b> ({n_good})</td><td>{} false reject{}</td><td>{} correct</td></tr>",
            c.fp,
            plural(c.fp),
            c.tn
        );
    }
    if n_def > 0 {
        let _ = write!(
            h,
            "<tr><td><b>defective</b> ({n_def})</td><td>{} correct</td><td>{} escape{}</td></tr>",
            c.tp,
            c.fn_,
            plural(c.fn_)
        );
    }
    h.push_str("</table>\n");
    if ctx.n_nonfinite > 0 {
        let _ = writeln!(
            h,
            "<p class=\"lead\">{} image(s) have a score that is not a finite number; they count as passed.</p>",
            ctx.n_nonfinite
        );
    }
}

fn per_type_table(h: &mut String, input: &ReportInput, ctx: &Context) {
    h.push_str(
        "<h2>Per defect type</h2>\n<p class=\"lead\">Each row: all good images against the images of one \
                defect type. Detected = defective images at or above the threshold.</p>\n",
    );
    h.push_str(
        "<div class=\"scroll\"><table class=\"metrics\"><tr><th>Defect type</th><th>Good</th><th>Defective</th><th>Image<br>AUROC</th><th>AP</th>\
         <th>F1-max</th><th>F1<br>threshold</th><th>Pixel<br>AUROC</th><th>AUPRO</th><th>Detected at<br>threshold</th></tr>\n",
    );
    let row = |h: &mut String, r: &MetricRow, is_all: bool| {
        let (m, v) = (input.has_masks, &r.metrics);
        let detected = match ctx.detected(&r.name, is_all) {
            Some((k, n)) => fmt_count(k, n),
            None if ctx.threshold.is_none() => missing("no threshold"),
            None if ctx.defects.is_empty() => missing("no defective images"),
            None => missing("no scores"),
        };
        let _ = writeln!(
            h,
            "<tr{}><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>\
             <td>{}</td></tr>",
            if is_all { " class=\"total\"" } else { "" },
            if is_all { "all".into() } else { esc(&r.name) },
            v.n_good,
            v.n_defect,
            metric_cell(v, v.image_auroc, Kind::Image, m, fmt_metric),
            metric_cell(v, v.image_ap, Kind::Image, m, fmt_metric),
            metric_cell(v, v.image_f1_max, Kind::Image, m, fmt_metric),
            metric_cell(v, v.threshold, Kind::Image, m, fmt_num),
            metric_cell(v, v.pixel_auroc, Kind::Pixel, m, fmt_metric),
            metric_cell(v, v.aupro, Kind::Pixel, m, fmt_metric),
            detected
        );
    };
    for r in &input.per_type {
        row(h, r, false);
    }
    row(h, &input.overall, true);
    h.push_str("</table></div>\n");
}

// ---------------------------------------------------------------------------------------------------
// Charts (inline SVG).

/// A chart axis mapping data values to SVG user units (`p0` = position of `lo`, `p1` of `hi`).
#[derive(Debug, Clone, Copy)]
struct Axis {
    lo: f64,
    hi: f64,
    log: bool,
    p0: f64,
    p1: f64,
    /// About how many tick intervals a linear axis gets.
    n_ticks: f64,
}

impl Axis {
    /// Position of `v` on [0, 1] of the axis (not clamped).
    fn frac(&self, v: f64) -> f64 {
        if self.log {
            let v = v.max(f64::MIN_POSITIVE);
            (v.log10() - self.lo.log10()) / (self.hi.log10() - self.lo.log10())
        } else {
            (v - self.lo) / (self.hi - self.lo)
        }
    }

    fn px(&self, v: f64) -> f64 {
        self.p0 + (self.p1 - self.p0) * self.frac(v)
    }

    fn ticks(&self) -> Vec<f64> {
        // An infinite end would make the loops below endless (a threshold near f64::MAX, padded).
        if !(self.lo.is_finite() && self.hi.is_finite()) {
            return Vec::new();
        }
        if self.log {
            // Decades of finite f64 only (a subnormal end's log10 is near -324).
            let decade = |v: f64| v.log10().clamp(-330.0, 310.0);
            let (a, b) = (decade(self.lo).floor() as i32, decade(self.hi).ceil() as i32);
            let with = |mults: &[f64]| -> Vec<f64> {
                (a..=b)
                    .flat_map(|k| mults.iter().map(move |m| m * 10f64.powi(k)))
                    .filter(|&v| v.is_finite() && v >= self.lo * (1.0 - 1e-9) && v <= self.hi * (1.0 + 1e-9))
                    .collect()
            };
            let t = with(&[1.0, 2.0, 5.0]);
            if t.len() > 10 {
                with(&[1.0])
            } else if t.len() < 2 {
                with(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0])
            } else {
                t
            }
        } else {
            // The span in halves: hi - lo itself overflows for ends near ±f64::MAX.
            let step = nice_step((self.hi * 0.5 - self.lo * 0.5) * 2.0 / self.n_ticks);
            let mut t = Vec::new();
            let mut k = (self.lo / step).ceil();
            // At most a few dozen ticks: past 2^53, k + 1 == k and the loop would not end.
            while k * step <= self.hi + step * 1e-9 && t.len() < 64 {
                let v = k * step;
                t.push(if v.abs() < step * 1e-9 { 0.0 } else { v });
                k += 1.0;
            }
            t
        }
    }
}

/// 1, 2 or 5 times a power of ten, near `raw`.
fn nice_step(raw: f64) -> f64 {
    if !(raw.is_finite() && raw > 0.0) {
        return 1.0;
    }
    let p = 10f64.powf(raw.log10().floor());
    let m = raw / p;
    p * if m < 1.5 {
        1.0
    } else if m < 3.5 {
        2.0
    } else if m < 7.5 {
        5.0
    } else {
        10.0
    }
}

fn svg_open(h: &mut String, w: f64, ht: f64, label: &str) {
    let _ = write!(h, "<svg viewBox=\"0 0 {w} {ht}\" role=\"img\" aria-label=\"{}\">", esc(label));
}

/// Plot background, grid, ticks with labels, axis lines and axis titles.
fn frame(h: &mut String, x: &Axis, y: &Axis, xlabel: &str, ylabel: &str, ytick: &dyn Fn(f64) -> String) {
    let (x0, x1, y0, y1) = (x.p0, x.p1, y.p0, y.p1); // y0 = bottom
    let _ = write!(
        h,
        "<rect x=\"{x0}\" y=\"{y1}\" width=\"{}\" height=\"{}\" fill=\"#fbfcfe\" stroke=\"none\"/>",
        x1 - x0,
        y0 - y1
    );
    for v in x.ticks() {
        let px = x.px(v);
        let _ = write!(
            h,
            "<line x1=\"{px:.1}\" y1=\"{y1}\" x2=\"{px:.1}\" y2=\"{y0}\" stroke=\"#e4e7eb\"/>\
             <line x1=\"{px:.1}\" y1=\"{y0}\" x2=\"{px:.1}\" y2=\"{}\" stroke=\"#52606d\"/>\
             <text x=\"{px:.1}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
            y0 + 5.0,
            y0 + 19.0,
            fmt_tick(v)
        );
    }
    for v in y.ticks() {
        let py = y.px(v);
        let _ = write!(
            h,
            "<line x1=\"{x0}\" y1=\"{py:.1}\" x2=\"{x1}\" y2=\"{py:.1}\" stroke=\"#e4e7eb\"/>\
             <line x1=\"{}\" y1=\"{py:.1}\" x2=\"{x0}\" y2=\"{py:.1}\" stroke=\"#52606d\"/>\
             <text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            x0 - 5.0,
            x0 - 8.0,
            py + 4.5,
            ytick(v)
        );
    }
    let _ = write!(
        h,
        "<path d=\"M{x0},{y1} V{y0} H{x1}\" fill=\"none\" stroke=\"#52606d\" stroke-width=\"1.2\"/>\
         <text class=\"axis-label\" x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>\
         <text class=\"axis-label\" transform=\"translate(16,{:.1}) rotate(-90)\" text-anchor=\"middle\">{}</text>",
        (x0 + x1) / 2.0,
        y0 + 40.0,
        esc(xlabel),
        (y0 + y1) / 2.0,
        esc(ylabel)
    );
}

/// SVG path data of a curve, skipping points that move less than half a unit.
fn polyline(c: &Curve, x: &Axis, y: &Axis) -> String {
    let mut d = String::new();
    let mut last: Option<(f64, f64)> = None;
    let n = c.x.len().min(c.y.len());
    for i in 0..n {
        let (vx, vy) = (c.x[i], c.y[i]);
        if !(vx.is_finite() && vy.is_finite()) {
            continue;
        }
        let (px, py) = (x.px(vx), y.px(vy));
        let keep = i + 1 == n || last.is_none_or(|(lx, ly)| (px - lx).abs() >= 0.5 || (py - ly).abs() >= 0.5);
        if keep {
            let _ = write!(d, "{}{px:.1},{py:.1}", if last.is_none() { "M" } else { " L" });
            last = Some((px, py));
        }
    }
    d
}

fn valid_curve(c: &Option<Curve>) -> std::result::Result<&Curve, &'static str> {
    match c {
        None => Err("not available"),
        Some(c) if c.x.len() != c.y.len() => Err("invalid curve data (x and y differ in length)"),
        Some(c) if c.x.iter().zip(&c.y).filter(|(a, b)| a.is_finite() && b.is_finite()).count() < 2 => {
            Err("fewer than two points")
        }
        Some(c) => Ok(c),
    }
}

fn placeholder(h: &mut String, title: &str, why: &str) {
    let _ = writeln!(
        h,
        "<div class=\"chart\"><h3>{}</h3><div class=\"placeholder\"><div>{}</div></div></div>",
        esc(title),
        missing(why)
    );
}

fn curves(h: &mut String, input: &ReportInput, ctx: &Context) {
    h.push_str(
        "<h2>ROC and precision-recall curves</h2>\n<p class=\"lead\">Every possible threshold at once; \
                the dot is the operating threshold.</p>\n<div class=\"charts\">\n",
    );
    let no_data_reason = |c: &Option<Curve>| -> String {
        let o = &input.overall.metrics;
        match valid_curve(c) {
            Err("not available") if o.n_defect == 0 => "needs defective images".into(),
            Err("not available") if o.n_good == 0 => "needs good images".into(),
            Err(e) => e.into(),
            Ok(_) => String::new(),
        }
    };
    let op = ctx.confusion.filter(|c| c.tp + c.fn_ > 0 && c.fp + c.tn > 0);
    let (w, ht) = (440.0, 440.0);
    let x = Axis { lo: 0.0, hi: 1.0, log: false, p0: 64.0, p1: w - 20.0, n_ticks: 5.0 };
    let y = Axis { lo: 0.0, hi: 1.0, log: false, p0: ht - 62.0, p1: 16.0, n_ticks: 5.0 };

    // ROC
    match valid_curve(&input.roc) {
        Err(_) => placeholder(h, "ROC curve", &no_data_reason(&input.roc)),
        Ok(c) => {
            h.push_str("<div class=\"chart\"><h3>ROC curve (images)</h3>");
            svg_open(h, w, ht, "ROC curve");
            frame(
                h,
                &x,
                &y,
                "False positive rate (good images flagged)",
                "True positive rate (defects found)",
                &fmt_tick,
            );
            let _ = write!(
                h,
                "<line x1=\"{}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"#9aa5b1\" stroke-dasharray=\"5 4\"/>\
                 <text x=\"{:.1}\" y=\"{:.1}\" transform=\"rotate(-45 {:.1} {:.1})\" \
                 text-anchor=\"middle\" style=\"fill:#7b8794\">guessing</text>",
                x.px(0.0),
                y.px(0.0),
                x.px(1.0),
                y.px(1.0),
                x.px(0.62),
                y.px(0.62) + 14.0,
                x.px(0.62),
                y.px(0.62) + 14.0,
            );
            let d = polyline(c, &x, &y);
            let _ = write!(h, "<path d=\"{d}\" fill=\"none\" stroke=\"#1f5fa8\" stroke-width=\"2.5\"/>");
            if let Some(a) = input.overall.metrics.image_auroc.filter(|a| a.is_finite()) {
                let _ = write!(
                    h,
                    "<text class=\"ann\" x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">AUROC {}</text>",
                    x.px(1.0) - 8.0,
                    y.px(0.0) - 12.0,
                    fmt_metric(a)
                );
            }
            if let Some(c) = op {
                let fpr = c.fp as f64 / (c.fp + c.tn) as f64;
                let tpr = c.tp as f64 / (c.tp + c.fn_) as f64;
                op_dot(h, x.px(fpr), y.px(tpr), ctx.threshold.unwrap_or(f64::NAN), &x);
            }
            h.push_str("</svg></div>\n");
        }
    }

    // PR
    match valid_curve(&input.pr) {
        Err(_) => placeholder(h, "Precision-recall curve", &no_data_reason(&input.pr)),
        Ok(c) => {
            h.push_str("<div class=\"chart\"><h3>Precision-recall curve (images)</h3>");
            svg_open(h, w, ht, "Precision-recall curve");
            frame(h, &x, &y, "Recall (defects found)", "Precision (flags that are real defects)", &fmt_tick);
            let o = &input.overall.metrics;
            if o.n_good + o.n_defect > 0 {
                let base = o.n_defect as f64 / (o.n_good + o.n_defect) as f64;
                let _ = write!(
                    h,
                    "<line x1=\"{}\" y1=\"{py:.1}\" x2=\"{}\" y2=\"{py:.1}\" stroke=\"#9aa5b1\" stroke-dasharray=\"5 4\"/>\
                     <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\" style=\"fill:#7b8794\">guessing ({})</text>",
                    x.px(0.0),
                    x.px(1.0),
                    x.px(1.0) - 6.0,
                    if base > 0.85 { y.px(base) + 16.0 } else { y.px(base) - 6.0 },
                    fmt_metric(base),
                    py = y.px(base)
                );
            }
            let d = polyline(c, &x, &y);
            let _ = write!(h, "<path d=\"{d}\" fill=\"none\" stroke=\"#1f5fa8\" stroke-width=\"2.5\"/>");
            if let Some(a) = o.image_ap.filter(|a| a.is_finite()) {
                let _ = write!(
                    h,
                    "<text class=\"ann\" x=\"{:.1}\" y=\"{:.1}\">AP {}</text>",
                    x.px(0.0) + 10.0,
                    y.px(0.0) - 12.0,
                    fmt_metric(a)
                );
            }
            if let Some(c) = op.filter(|c| c.tp + c.fp > 0) {
                let recall = c.tp as f64 / (c.tp + c.fn_) as f64;
                let precision = c.tp as f64 / (c.tp + c.fp) as f64;
                op_dot(h, x.px(recall), y.px(precision), ctx.threshold.unwrap_or(f64::NAN), &x);
            }
            h.push_str("</svg></div>\n");
        }
    }
    h.push_str("</div>\n");
}

/// The operating point: a dot with the threshold written beside it (left of the dot near the right edge).
fn op_dot(h: &mut String, px: f64, py: f64, threshold: f64, x: &Axis) {
    let right_side = px < (x.p0 + x.p1) / 2.0;
    let (tx, anchor) = if right_side { (px + 10.0, "start") } else { (px - 10.0, "end") };
    let ty = if py < 220.0 { py + 24.0 } else { py - 10.0 }; // below the dot in the upper half
    let _ = write!(
        h,
        "<circle cx=\"{px:.1}\" cy=\"{py:.1}\" r=\"6\" fill=\"#c92a2a\" stroke=\"#fff\" stroke-width=\"2\"/>\
         <text class=\"ann\" x=\"{tx:.1}\" y=\"{ty:.1}\" text-anchor=\"{anchor}\" style=\"fill:#c92a2a\">threshold {}</text>",
        fmt_num(threshold)
    );
}

const GOOD_COLOUR: &str = "#2f6fba";
const DEFECT_COLOUR: &str = "#e8590c";
const BINS: usize = 40;

fn histograms(h: &mut String, ctx: &Context) {
    h.push_str("<h2>Score distributions</h2>\n");
    let mut all: Vec<f64> = ctx.good.clone();
    all.extend(ctx.all_defects());
    if all.is_empty() {
        let _ = writeln!(h, "<p>{}</p>", missing("no scores"));
        return;
    }
    let mut lo = all.iter().copied().fold(f64::INFINITY, f64::min);
    let mut hi = all.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if let Some(t) = ctx.threshold {
        lo = lo.min(t);
        hi = hi.max(t);
    }
    let log = lo > 0.0 && hi / lo >= 10.0;
    // Padded, but kept finite: scores or a threshold near f64::MAX would overflow.
    if log {
        // In logs: hi / lo itself can overflow.
        let pad = (0.03 * (hi.ln() - lo.ln())).exp();
        lo /= pad;
        hi = (hi * pad).min(f64::MAX);
    } else {
        let pad = if hi > lo { 0.03 * (hi - lo) } else { 0.5 * lo.abs().max(1.0) };
        lo = (lo - pad).max(f64::MIN);
        hi = (hi + pad).min(f64::MAX);
    }
    let _ = writeln!(
        h,
        "<p class=\"lead\">Share of each group's images per score bin{}.{}</p>",
        if log { " (score axis logarithmic: scores span more than a factor of 10)" } else { "" },
        if ctx.defects.is_empty() {
            " Good images right of the threshold are false rejects."
        } else {
            " All charts share the x axis; a good model puts the orange bars right of the threshold and the blue \
             ones left of it."
        }
    );
    let _ = writeln!(
        h,
        "<div class=\"legend\"><span><span class=\"swatch\" style=\"background:{GOOD_COLOUR}\"></span>good images \
         ({})</span>{}{}</div>",
        ctx.good.len(),
        if ctx.defects.is_empty() {
            String::new()
        } else {
            format!(
                "<span><span class=\"swatch\" style=\"background:{DEFECT_COLOUR}\"></span>defective images \
                 ({})</span>",
                ctx.defects.values().map(Vec::len).sum::<usize>()
            )
        },
        if ctx.threshold.is_some() {
            "<span><svg width=\"26\" height=\"14\" style=\"display:inline;width:26px;vertical-align:-2px\">\
             <line x1=\"13\" y1=\"0\" x2=\"13\" y2=\"14\" stroke=\"#c92a2a\" stroke-width=\"2.5\" \
             stroke-dasharray=\"4 3\"/></svg>threshold</span>"
        } else {
            ""
        }
    );
    let (w, ht) = (1000.0, 200.0);
    let x = Axis { lo, hi, log, p0: 70.0, p1: w - 20.0, n_ticks: 8.0 };
    let mut panels: Vec<(String, Option<&[f64]>)> = Vec::new();
    let every = ctx.all_defects();
    if ctx.defects.is_empty() {
        panels.push(("Good images (no defective images in the test set)".into(), None));
    } else {
        if ctx.defects.len() > 1 {
            panels.push(("All defect types".into(), Some(&every)));
        }
        for (name, v) in &ctx.defects {
            panels.push((name.clone(), Some(v)));
        }
    }
    for (name, defect) in panels {
        let mut title = esc(&name);
        if let (Some(d), Some(t)) = (defect, ctx.threshold) {
            let k = d.iter().filter(|&&s| s >= t).count();
            let _ = write!(
                title,
                " <span class=\"why\" style=\"display:inline\">— {} detected</span>",
                fmt_count(k, d.len())
            );
        } else if let Some(d) = defect {
            let _ = write!(title, " <span class=\"why\" style=\"display:inline\">— {} images</span>", d.len());
        }
        let _ = write!(h, "<div class=\"hist\"><h3>{title}</h3>");
        let good_h = bin(&ctx.good, &x);
        let def_h = defect.map(|d| bin(d, &x));
        let ymax = good_h.iter().chain(def_h.iter().flatten()).copied().fold(0.0, f64::max).max(1e-9);
        let y = Axis { lo: 0.0, hi: nice_ceil(ymax, 3.0), log: false, p0: ht - 52.0, p1: 28.0, n_ticks: 3.0 };
        svg_open(h, w, ht, &format!("score histogram: {name}"));
        frame(h, &x, &y, if log { "image score (log scale)" } else { "image score" }, "% of group", &|v| {
            fmt_tick(v * 100.0)
        });
        for (hist, colour) in [(Some(good_h), GOOD_COLOUR), (def_h, DEFECT_COLOUR)] {
            let Some(hist) = hist else { continue };
            for (i, &f) in hist.iter().enumerate() {
                if f <= 0.0 {
                    continue;
                }
                let xa = x.p0 + (x.p1 - x.p0) * i as f64 / BINS as f64;
                let xb = x.p0 + (x.p1 - x.p0) * (i + 1) as f64 / BINS as f64;
                let _ = write!(
                    h,
                    "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{colour}\" fill-opacity=\"0.6\" \
                     stroke=\"{colour}\" stroke-width=\"1\"/>",
                    xa + 0.5,
                    y.px(f),
                    (xb - xa - 1.0).max(0.5),
                    y.p0 - y.px(f)
                );
            }
        }
        if let Some(t) = ctx.threshold {
            let px = x.px(t);
            let _ = write!(
                h,
                "<line x1=\"{px:.1}\" y1=\"{}\" x2=\"{px:.1}\" y2=\"{}\" stroke=\"#c92a2a\" stroke-width=\"2.5\" \
                 stroke-dasharray=\"6 4\"/><text class=\"ann\" x=\"{:.1}\" y=\"{}\" text-anchor=\"{}\" \
                 style=\"fill:#c92a2a\">threshold {}</text>",
                y.p1 - 8.0,
                y.p0,
                if x.frac(t) > 0.8 { px - 6.0 } else { px + 6.0 },
                y.p1 - 10.0,
                if x.frac(t) > 0.8 { "end" } else { "start" },
                fmt_num(t)
            );
        }
        h.push_str("</svg></div>\n");
    }
}

/// Fraction of `v` in each of [`BINS`] equal bins along the axis (clamped to the end bins).
fn bin(v: &[f64], x: &Axis) -> Vec<f64> {
    let mut c = vec![0.0; BINS];
    if v.is_empty() {
        return c;
    }
    for &s in v {
        let i = (x.frac(s) * BINS as f64).floor().clamp(0.0, (BINS - 1) as f64) as usize;
        c[i] += 1.0;
    }
    c.iter().map(|k| k / v.len() as f64).collect()
}

/// A round number at or above `v` (for the top of a share axis).
fn nice_ceil(v: f64, n_ticks: f64) -> f64 {
    let step = nice_step(v / n_ticks);
    ((v / step - 1e-9).ceil() * step).clamp(step, 1.0)
}

// ---------------------------------------------------------------------------------------------------
// Example images.

fn examples(h: &mut String, input: &ReportInput, ctx: &Context) {
    h.push_str("<h2>Images to look at</h2>\n");
    if let Some((vmin, vmax)) = input.heatmap_range.filter(|(a, b)| a.is_finite() && b.is_finite()) {
        let stops: Vec<String> = (0..=8)
            .map(|i| {
                let [r, g, b] = crate::overlay::turbo(i as f32 / 8.0);
                format!("rgb({r},{g},{b}) {}%", i * 100 / 8)
            })
            .collect();
        let _ = writeln!(
            h,
            "<div class=\"colorbar\"><span><b>Heatmap colours</b> (one scale for every picture): anomaly-map value</span>\
             <span>≤ {}</span><span class=\"bar\" style=\"background:linear-gradient(to right, {})\"></span>\
             <span>≥ {}</span>{}</div>",
            fmt_tick(vmin),
            stops.join(", "),
            fmt_tick(vmax),
            if input.has_masks { "<span>· outline: ground-truth defect region</span>" } else { "" }
        );
    } else if input.has_masks {
        h.push_str("<p class=\"lead\">Outline in the heatmaps: ground-truth defect region.</p>\n");
    }
    let t = ctx.threshold;
    let mut fps: Vec<&Example> = input.false_positives.iter().collect();
    fps.sort_by(|a, b| b.score.total_cmp(&a.score));
    let mut fns: Vec<&Example> = input.false_negatives.iter().collect();
    fns.sort_by(|a, b| a.score.total_cmp(&b.score));

    let _ = writeln!(h, "<h3>Worst false positives: good images with the highest scores</h3>");
    if let Some(t) = t {
        let above = ctx.good.iter().filter(|&&s| s >= t).count();
        let _ = writeln!(
            h,
            "<p class=\"lead\">{above} of {} good images are at or above the threshold (false rejects). The \
             highest-scored are shown; a heatmap spot shows what the model took for a defect.</p>",
            ctx.good.len()
        );
    }
    example_grid(h, &fps, t, if ctx.good.is_empty() { "no good images" } else { "none given" });

    let _ = writeln!(h, "<h3>Worst false negatives: defective images with the lowest scores</h3>");
    if let Some(t) = t {
        let d = ctx.all_defects();
        let below = d.iter().filter(|&&s| s < t).count();
        let _ = writeln!(
            h,
            "<p class=\"lead\">{below} of {} defective images are below the threshold (escapes). The \
             lowest-scored are shown.</p>",
            d.len()
        );
    }
    example_grid(h, &fns, t, if ctx.defects.is_empty() { "no defective images" } else { "none given" });
}

fn example_grid(h: &mut String, list: &[&Example], threshold: Option<f64>, empty: &str) {
    if list.is_empty() {
        let _ = writeln!(h, "<p>{}</p>", missing(empty));
        return;
    }
    h.push_str("<div class=\"examples\">\n");
    for (i, e) in list.iter().enumerate() {
        let pic = |bytes: &Option<Vec<u8>>, caption: &str| match bytes {
            Some(b) if !b.is_empty() => format!(
                "<figure><img alt=\"{} of {}\" src=\"{}\"><figcaption>{caption}</figcaption></figure>",
                caption,
                esc(&e.path),
                data_uri(b)
            ),
            _ => format!("<figure><div class=\"noimg\">no picture</div><figcaption>{caption}</figcaption></figure>"),
        };
        let verdict = match threshold {
            Some(t) if e.score >= t => "<span class=\"badge flag\">flagged</span>".to_string(),
            Some(_) => "<span class=\"badge pass\">passed</span>".to_string(),
            None => String::new(),
        };
        let ratio = match threshold {
            Some(t) if t > 0.0 && e.score.is_finite() => {
                format!(" <span class=\"why\" style=\"display:inline\">({:.2} × threshold)</span>", e.score / t)
            }
            _ => String::new(),
        };
        let _ = writeln!(
            h,
            "<div class=\"example\"><div class=\"pics\">{}{}</div><div class=\"caption\">#{} \
             <span class=\"score\">{}</span>{ratio} <span class=\"badge type\">{}</span>{verdict}\
             <div class=\"path mono\">{}</div></div></div>",
            pic(&e.image_png, "image"),
            pic(&e.overlay_png, "heatmap"),
            i + 1,
            fmt_num(e.score),
            esc(&e.defect_type),
            esc(&e.path)
        );
    }
    h.push_str("</div>\n");
}

fn all_scores(h: &mut String, input: &ReportInput, ctx: &Context) {
    if input.scores.is_empty() {
        return;
    }
    let mut v: Vec<&ScoredImage> = input.scores.iter().collect();
    v.sort_by(|a, b| b.score.total_cmp(&a.score));
    let _ = writeln!(
        h,
        "<details><summary>All {} scores, highest first</summary><table><tr><th>#</th><th>Image</th><th>Type</th>\
         <th>Score</th><th>Decision</th></tr>",
        v.len()
    );
    for (i, s) in v.iter().enumerate() {
        let decision = match ctx.threshold {
            None => "—",
            Some(t) => match (s.defect_type != GOOD, s.score >= t) {
                (true, true) => "flagged ✓",
                (false, false) => "passed ✓",
                (false, true) => "<b>flagged ✗ (false reject)</b>",
                (true, false) => "<b>passed ✗ (escape)</b>",
            },
        };
        let _ = writeln!(
            h,
            "<tr><td>{}</td><td class=\"mono\" style=\"text-align:left;overflow-wrap:anywhere\">{}</td>\
             <td style=\"text-align:left\">{}</td><td>{}</td><td style=\"text-align:left\">{decision}</td></tr>",
            i + 1,
            esc(&s.path),
            esc(&s.defect_type),
            fmt_num(s.score)
        );
    }
    h.push_str("</table></details>\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(name: &str, n_good: usize, n_defect: usize, v: f64) -> MetricRow {
        let metrics = Metrics {
            n_good,
            n_defect,
            image_auroc: Some(v),
            image_ap: Some(v - 0.01),
            image_f1_max: Some(v - 0.02),
            threshold: Some(1.234567),
            pixel_auroc: Some(0.9712),
            aupro: Some(0.8888),
        };
        MetricRow { name: name.into(), metrics }
    }

    fn scored(path: &str, t: &str, score: f64) -> ScoredImage {
        ScoredImage { path: path.into(), defect_type: t.into(), score }
    }

    fn full_input() -> ReportInput {
        let png = crate::overlay::encode_png(&image::RgbImage::from_pixel(4, 4, image::Rgb([200, 10, 10]))).unwrap();
        ReportInput {
            title: "csflow test report: bottle".into(),
            model: "models/bottle.safetensors".into(),
            data: "/data/mvtec/bottle".into(),
            created: "2024-05-01 10:00".into(),
            overall: row("all", 4, 3, 0.9876),
            per_type: vec![row("crack", 4, 2, 0.95), row("scratch", 4, 1, 1.0)],
            roc: Some(Curve { x: vec![0.0, 0.0, 0.25, 1.0], y: vec![0.0, 0.6667, 1.0, 1.0] }),
            pr: Some(Curve { x: vec![0.0, 0.6667, 1.0], y: vec![1.0, 1.0, 0.75] }),
            threshold: Some(2.0),
            threshold_source: Some("F1-optimal on the test set".into()),
            has_masks: true,
            heatmap_range: Some((0.5, 4.0)),
            scores: vec![
                scored("good/000.png", GOOD, 0.5),
                scored("good/001.png", GOOD, 0.7),
                scored("good/002.png", GOOD, 0.9),
                scored("good/003.png", GOOD, 2.5),
                scored("crack/000.png", "crack", 3.0),
                scored("crack/001.png", "crack", 1.5),
                scored("scratch/000.png", "scratch", 20.0),
            ],
            false_positives: vec![Example {
                path: "good/003.png".into(),
                defect_type: GOOD.into(),
                score: 2.5,
                image_png: Some(png.clone()),
                overlay_png: Some(png.clone()),
            }],
            false_negatives: vec![Example {
                path: "crack/001.png".into(),
                defect_type: "crack".into(),
                score: 1.5,
                image_png: None,
                overlay_png: Some(png),
            }],
            notes: vec!["2 files could not be read".into()],
        }
    }

    fn no_external(html: &str) {
        assert!(!html.contains("http"), "no URL of any kind");
        assert!(!html.contains("<script"));
        assert!(!html.contains("<link"));
        for attr in ["src=\"", "href=\""] {
            for (i, _) in html.match_indices(attr) {
                assert!(html[i + attr.len()..].starts_with("data:"), "{attr} must be a data URI");
            }
        }
    }

    /// Every opened tag of the elements we emit in pairs is closed.
    fn balanced(html: &str) {
        for tag in ["svg", "table", "div", "tr", "td", "th", "figure", "details", "span", "h2", "h3", "dl", "ul"] {
            let open = html.matches(&format!("<{tag}>")).count() + html.matches(&format!("<{tag} ")).count();
            let close = html.matches(&format!("</{tag}>")).count();
            assert_eq!(open, close, "<{tag}> opened {open} times, closed {close} times");
        }
        assert!(html.starts_with("<!DOCTYPE html>") && html.trim_end().ends_with("</html>"));
    }

    #[test]
    fn full_report_has_numbers_charts_and_pictures() {
        let html = render_html(&full_input());
        balanced(&html);
        no_external(&html);
        // Headline and table numbers, three decimals; thresholds four significant digits.
        for s in ["0.988", "0.978", "0.968", "0.971", "0.889", "0.950", "1.000", "1.235"] {
            assert!(html.contains(s), "missing {s}");
        }
        // Decisions at threshold 2: good 2.5 is a false reject, crack 1.5 an escape.
        assert!(html.contains("1 of 4 (25.0 %)"), "false rejects");
        assert!(html.contains("1 of 3 (33.3 %)"), "escapes");
        assert!(html.contains("1 of 2 (50.0 %)"), "crack detection");
        assert!(html.contains("66.7 %"), "precision: 2 of 3 flags");
        // Charts: ROC, PR, histograms for all/crack/scratch.
        assert_eq!(html.matches("<svg viewBox=").count(), 5);
        assert!(html.contains("ROC curve") && html.contains("Precision-recall curve"));
        assert!(html.contains("<circle"), "operating point");
        assert!(html.contains("stroke-dasharray"), "diagonal / threshold line");
        assert!(html.contains("score axis logarithmic"), "0.5 .. 20 spans more than 10x");
        // Pictures as data URIs, the missing one as a placeholder.
        assert_eq!(html.matches("src=\"data:image/png;base64,iVBORw0KGgo").count(), 3);
        assert!(html.contains("no picture"));
        assert!(html.contains("2 files could not be read"));
        assert!(html.contains("linear-gradient"), "heatmap colour bar");
    }

    /// A threshold near f64::MAX (a model's, or given) padded the log axis to infinity and its ticks ran
    /// without end.
    #[test]
    fn extreme_thresholds_draw_finite_axes() {
        for t in [1e300, f64::MAX, 1e-300, -1.79e308, f64::MIN] {
            let mut input = full_input();
            input.threshold = Some(t);
            let html = render_html(&input);
            balanced(&html);
            for bad in ["inf", "NaN"] {
                if let Some(i) = html.find(bad) {
                    panic!("threshold {t}: {}", &html[i.saturating_sub(200)..(i + 100).min(html.len())]);
                }
            }
        }
    }

    #[test]
    fn text_is_escaped() {
        let mut input = full_input();
        input.title = "a <b> & \"c\"".into();
        input.data = "/data/<script>alert(1)</script>&x".into();
        input.scores.push(scored("weird/<&>.png", "<bad>", 5.0));
        input.false_negatives[0].path = "x/<&>'.png".into();
        input.notes.push("<i>note</i>".into());
        let html = render_html(&input);
        balanced(&html);
        no_external(&html);
        assert!(!html.contains("<script>") && !html.contains("<bad>") && !html.contains("<i>note"));
        assert!(html.contains("a &lt;b&gt; &amp; &quot;c&quot;"));
        assert!(html.contains("/data/&lt;script&gt;alert(1)&lt;/script&gt;&amp;x"));
        assert!(html.contains("weird/&lt;&amp;&gt;.png") && html.contains("&lt;bad&gt;"));
        assert!(html.contains("x/&lt;&amp;&gt;&#39;.png"));
    }

    #[test]
    fn no_defects_gives_only_the_good_histogram_and_reasons() {
        let metrics = Metrics { n_good: 3, n_defect: 0, ..Default::default() };
        let good_row = MetricRow { name: "all".into(), metrics };
        let input = ReportInput {
            title: "good only".into(),
            overall: good_row,
            threshold: Some(0.8),
            threshold_source: Some("99 % quantile of good scores".into()),
            scores: vec![scored("a.png", GOOD, 0.5), scored("b.png", GOOD, 0.6), scored("c.png", GOOD, 0.9)],
            ..Default::default()
        };
        let html = render_html(&input);
        balanced(&html);
        no_external(&html);
        assert_eq!(html.matches("<svg viewBox=").count(), 1, "one histogram, no curves");
        assert!(html.contains("no defective images in the test set"));
        assert!(html.contains("no defective images") && html.contains("no ground-truth masks"));
        assert!(html.contains("needs defective images"));
        assert!(html.contains("1 of 3 (33.3 %)"), "false rejects still counted");
        assert!(!html.contains("<circle"), "no operating point without defects");
    }

    #[test]
    fn empty_and_broken_input_never_panics() {
        let html = render_html(&ReportInput::default());
        balanced(&html);
        no_external(&html);
        assert!(html.contains("no threshold") && html.contains("no scores"));
        let input = ReportInput {
            overall: MetricRow {
                name: "all".into(),
                metrics: Metrics { n_good: 2, n_defect: 2, image_auroc: Some(f64::NAN), ..Default::default() },
            },
            roc: Some(Curve { x: vec![0.0, 1.0], y: vec![0.0] }),
            pr: Some(Curve { x: vec![f64::NAN, 0.5], y: vec![1.0, 1.0] }),
            threshold: Some(f64::INFINITY),
            scores: vec![scored("a", GOOD, 1.0), scored("b", GOOD, 1.0), scored("c", "x", f64::NAN)],
            ..Default::default()
        };
        let html = render_html(&input);
        balanced(&html);
        assert!(html.contains("undefined (not a finite number)"));
        assert!(html.contains("x and y differ") && html.contains("fewer than two points"));
    }

    #[test]
    fn numbers_are_formatted_for_people() {
        assert_eq!(fmt_num(1.234567), "1.235");
        assert_eq!(fmt_num(123.456), "123.5");
        assert_eq!(fmt_num(0.012345), "0.01235");
        assert_eq!(fmt_num(1234567.0), "1.235e6");
        assert_eq!(fmt_num(0.0), "0");
        assert_eq!(fmt_tick(0.2), "0.2");
        assert_eq!(fmt_tick(50.0), "50");
        assert_eq!(fmt_count(1, 3), "1 of 3 (33.3 %)");
        let labels = |a: &Axis| a.ticks().into_iter().map(fmt_tick).collect::<Vec<_>>().join(" ");
        let lin = Axis { lo: 0.0, hi: 1.0, log: false, p0: 0.0, p1: 100.0, n_ticks: 5.0 };
        assert_eq!(labels(&lin), "0 0.2 0.4 0.6 0.8 1");
        let lin = Axis { lo: -0.07, hi: 13.0, log: false, p0: 0.0, p1: 100.0, n_ticks: 5.0 };
        assert_eq!(labels(&lin), "0 2 4 6 8 10 12");
        let log = Axis { lo: 0.3, hi: 40.0, log: true, p0: 0.0, p1: 100.0, n_ticks: 5.0 };
        assert_eq!(labels(&log), "0.5 1 2 5 10 20");
        let log = Axis { lo: 0.01, hi: 1000.0, log: true, p0: 0.0, p1: 100.0, n_ticks: 5.0 };
        assert_eq!(labels(&log), "0.01 0.1 1 10 100 1000");
        assert!((log.px(1.0) - 40.0).abs() < 1e-9);
    }

    #[test]
    fn curves_come_from_the_metrics() {
        let (scores, labels) = ([0.1f32, 0.4, 0.35, 0.8], [0u8, 0, 1, 1]);
        let roc = crate::metrics::roc_curve(&scores, &labels).unwrap();
        let c = Curve::from(&roc);
        assert_eq!((c.x.clone(), c.y.clone()), (roc.fpr.clone(), roc.tpr.clone()));
        let pr = crate::metrics::pr_curve(&scores, &labels).unwrap();
        let c = Curve::from(&pr);
        assert_eq!((c.x, c.y), (pr.recall, pr.precision));
    }

    #[test]
    fn write_report_writes_the_page() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("report.html");
        write_report(&p, &full_input()).unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), render_html(&full_input()));
    }
}
