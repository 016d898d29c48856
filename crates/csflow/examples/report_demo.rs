//! Writes a demo `csflow test` report with made-up scores and heatmaps over the images in `assets/`, to look
//! at the layout: `cargo run --release -p csflow --example report_demo -- /tmp/report_look/report.html`.

use std::path::{Path, PathBuf};

use csflow::evaluate::Metrics;
use csflow::metrics;
use csflow::overlay::{draw_contour, encode_jpeg, heatmap_overlay};
use csflow::report::{write_report, Curve, Example, MetricRow, ReportInput, ScoredImage, GOOD};
use image::{GrayImage, Luma, RgbImage};

/// xorshift64* with Box-Muller normals: deterministic made-up data without extra dependencies.
struct Rng(u64);

impl Rng {
    fn uniform(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        ((self.0.wrapping_mul(0x2545F4914F6CDD1D) >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    fn normal(&mut self) -> f64 {
        (-2.0 * self.uniform().ln()).sqrt() * (2.0 * std::f64::consts::PI * self.uniform()).cos()
    }
}

const SIDE: u32 = 256;

fn thumbnail(path: &Path) -> RgbImage {
    let img = image::open(path).unwrap_or_else(|e| panic!("{}: {e} (run scripts/setup.sh)", path.display())).to_rgb8();
    image::imageops::resize(&img, SIDE, SIDE, image::imageops::FilterType::Triangle)
}

/// A smooth background map with an optional blob at (cx, cy) of radius r and height `peak`.
fn fake_map(rng: &mut Rng, blob: Option<(f32, f32, f32, f32)>) -> Vec<f32> {
    let (w, h) = (SIDE as usize, SIDE as usize);
    let (fx, fy, ph) = (rng.uniform() as f32 * 0.05, rng.uniform() as f32 * 0.05, rng.uniform() as f32 * 6.0);
    let mut m = vec![0f32; w * h];
    for y in 0..h {
        for x in 0..w {
            let mut v = 0.45 + 0.12 * ((x as f32 * fx + ph).sin() * (y as f32 * fy).cos());
            if let Some((cx, cy, r, peak)) = blob {
                let d2 = ((x as f32 - cx).powi(2) + (y as f32 - cy).powi(2)) / (r * r);
                v += peak * (-d2).exp();
            }
            m[y * w + x] = v;
        }
    }
    m
}

fn ellipse_mask(cx: f32, cy: f32, rx: f32, ry: f32) -> GrayImage {
    GrayImage::from_fn(SIDE, SIDE, |x, y| {
        let d = ((x as f32 - cx) / rx).powi(2) + ((y as f32 - cy) / ry).powi(2);
        Luma([if d <= 1.0 { 255 } else { 0 }])
    })
}

fn without_defects(mut input: ReportInput) -> ReportInput {
    input.scores.retain(|s| s.defect_type == GOOD);
    let mut good: Vec<f64> = input.scores.iter().map(|s| s.score).collect();
    good.sort_by(f64::total_cmp);
    let metrics = Metrics { n_good: good.len(), n_defect: 0, ..Default::default() };
    input.overall = MetricRow { name: "all".into(), metrics };
    input.per_type.clear();
    (input.roc, input.pr, input.has_masks) = (None, None, false);
    input.threshold = Some(good[(good.len() as f64 * 0.97) as usize]);
    input.threshold_source = Some("97 % quantile of good images' scores (no defects labelled)".into());
    input.false_negatives.clear();
    input.notes = vec!["No defective images: only false rejects can be measured.".into()];
    input
}

fn main() {
    // `--good-only`: a test set without defects (no curves, no pixel metrics, threshold from good scores).
    let good_only = std::env::args().any(|a| a == "--good-only");
    let out = std::env::args().skip(1).find(|a| !a.starts_with("--"));
    let out = PathBuf::from(out.unwrap_or_else(|| "/tmp/report_look/report.html".into()));
    let assets = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets");
    let mut rng = Rng(0x9E3779B97F4A7C15);

    // Scores: good images around 0.6, defects higher with some overlap; one type that the model finds hard.
    let types =
        [("crack", 17, 4.5, 0.5), ("glue_strip", 18, 2.2, 0.45), ("gray_stroke", 16, 1.5, 0.5), ("oil", 18, 3.5, 0.4)];
    let mut scores = Vec::new();
    for i in 0..33 {
        scores.push(ScoredImage {
            path: format!("/data/mvtec/tile/test/good/{i:03}.png"),
            defect_type: GOOD.into(),
            score: (0.6 * (0.25 * rng.normal()).exp()) as f32 as f64, // scores are f32 in csflow
        });
    }
    for (name, n, centre, spread) in types {
        for i in 0..n {
            scores.push(ScoredImage {
                path: format!("/data/mvtec/tile/test/{name}/{i:03}.png"),
                defect_type: name.into(),
                score: (centre * (spread * rng.normal()).exp()) as f32 as f64,
            });
        }
    }
    let labelled = |filter: &dyn Fn(&ScoredImage) -> bool| -> Vec<(f64, bool)> {
        scores.iter().filter(|s| filter(s)).map(|s| (s.score, s.defect_type != GOOD)).collect()
    };
    let split = |v: &[(f64, bool)]| -> (Vec<f32>, Vec<u8>) { v.iter().map(|x| (x.0 as f32, x.1 as u8)).unzip() };
    let row = |name: &str, v: &[(f64, bool)], pixel: (f64, f64)| -> MetricRow {
        let (s, l) = split(v);
        let f1 = metrics::f1_max(&s, &l).ok();
        let metrics = Metrics {
            n_good: v.iter().filter(|x| !x.1).count(),
            n_defect: v.iter().filter(|x| x.1).count(),
            image_auroc: metrics::auroc(&s, &l).ok(),
            image_ap: metrics::average_precision(&s, &l).ok(),
            image_f1_max: f1.map(|f| f.f1),
            threshold: f1.map(|f| f.threshold),
            pixel_auroc: Some(pixel.0),
            aupro: Some(pixel.1),
        };
        MetricRow { name: name.into(), metrics }
    };
    let all = labelled(&|_| true);
    let (s, l) = split(&all);
    let roc = Curve::from(&metrics::roc_curve(&s, &l).unwrap());
    let pr = Curve::from(&metrics::pr_curve(&s, &l).unwrap());
    let overall = row("all", &all, (0.953, 0.871));
    let mut per_type: Vec<MetricRow> = types
        .iter()
        .zip([(0.982, 0.934), (0.941, 0.852), (0.902, 0.788), (0.967, 0.903)])
        .map(|((name, ..), px)| row(name, &labelled(&|s| s.defect_type == GOOD || s.defect_type == *name), px))
        .collect();
    // One type without masks, to show the missing-value display.
    per_type[2].metrics.pixel_auroc = None;
    per_type[2].metrics.aupro = None;
    let threshold = overall.metrics.threshold;

    // Pictures: the asset images as stand-ins for parts, with made-up heatmaps.
    let (vmin, vmax) = (0.45f32, 2.0f32);
    let pics = ["brick.png", "gravel.png", "grass.png", "coffee.png", "chelsea.png", "brick.png"];
    let mut examples = |want_good: bool| -> Vec<Example> {
        let mut list: Vec<&ScoredImage> = scores.iter().filter(|s| (s.defect_type == GOOD) == want_good).collect();
        list.sort_by(|a, b| if want_good { b.score.total_cmp(&a.score) } else { a.score.total_cmp(&b.score) });
        list.iter()
            .take(6)
            .enumerate()
            .map(|(i, s)| {
                let img = thumbnail(&assets.join(pics[i % pics.len()]));
                let (cx, cy) = (60.0 + 25.0 * i as f32, 180.0 - 20.0 * i as f32);
                let peak = if want_good { 0.9 + 0.2 * i as f32 } else { 0.5 };
                let map = fake_map(&mut rng, Some((cx, cy, 22.0, peak)));
                let mut overlay = heatmap_overlay(&img, &map, vmin, vmax, 0.5).unwrap();
                if !want_good {
                    // The real defect sits elsewhere than the weak blob: the model missed it.
                    draw_contour(&mut overlay, &ellipse_mask(190.0 - 10.0 * i as f32, 70.0, 30.0, 14.0), [0, 255, 0])
                        .unwrap();
                }
                Example {
                    path: s.path.clone(),
                    defect_type: s.defect_type.clone(),
                    score: s.score,
                    image_png: Some(encode_jpeg(&img, 90).unwrap()),
                    overlay_png: Some(encode_jpeg(&overlay, 90).unwrap()),
                }
            })
            .collect()
    };
    let false_positives = examples(true);
    let false_negatives = examples(false);

    let input = ReportInput {
        title: "csflow test report: tile".into(),
        model: "/models/tile/csflow-tile.safetensors".into(),
        data: "/data/mvtec/tile (MVTec AD layout)".into(),
        created: "2024-05-14 09:32 UTC".into(),
        overall,
        per_type,
        roc: Some(roc),
        pr: Some(pr),
        threshold,
        threshold_source: Some("F1-optimal on this test set".into()),
        has_masks: true,
        heatmap_range: Some((vmin as f64, vmax as f64)),
        scores,
        false_positives,
        false_negatives,
        notes: vec!["gray_stroke: no ground-truth masks found; its pixel metrics are not computed.".into()],
    };
    let input = if good_only { without_defects(input) } else { input };
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).unwrap();
    }
    write_report(&out, &input).unwrap();
    println!("{}", out.display());
}
