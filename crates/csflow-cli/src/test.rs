use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use csflow::data::Dataset;
use csflow::detector::Detector;
use csflow::evaluate::{evaluate, report_input, test_image, Metrics, TestReport};
use csflow::io::{atomic_write, load_model, save_model};
use csflow::report::write_report;

use crate::extract::progress_bar;
use crate::predict::PrecisionArg;

#[derive(Args)]
pub struct TestArgs {
    /// Model file written by `csflow fit --data`.
    #[arg(long)]
    model: PathBuf,
    /// An MVTec AD category (its test/ and ground_truth/ are used).
    #[arg(long, required_unless_present_any = ["normal", "abnormal"])]
    data: Option<PathBuf>,
    /// Or the folder layout: good test images ...
    #[arg(long, conflicts_with = "data", requires = "abnormal")]
    normal: Option<PathBuf>,
    /// ... defective test images ...
    #[arg(long, conflicts_with = "data", requires = "normal")]
    abnormal: Option<PathBuf>,
    /// ... and optionally their masks (`<name>.png` or `<name>_mask.png`).
    #[arg(long, conflicts_with = "data", requires = "abnormal")]
    mask_dir: Option<PathBuf>,
    /// Threshold for the decisions shown (default: the model's).
    #[arg(long, value_parser = csflow::threshold::parse_finite::<f64>)]
    threshold: Option<f64>,
    /// Store the F1-optimal threshold of this test in the model (rewritten atomically), for predict and serve.
    /// Choosing it on the test set makes these metrics optimistic: prefer a set kept apart for this.
    #[arg(long)]
    store_threshold: bool,
    /// Folder for metrics.json and report.html (created).
    #[arg(long)]
    out: PathBuf,
    /// Arithmetic of the flow's largest products (see `csflow predict --help`).
    #[arg(long, value_enum, default_value = "f32")]
    precision: PrecisionArg,
}

pub fn run(a: TestArgs) -> Result<()> {
    for data in [&a.data, &a.normal, &a.abnormal, &a.mask_dir].into_iter().flatten() {
        let parts: &[&str] = if a.data.is_some() { &["train", "test", "ground_truth"] } else { &[""] };
        crate::outputs::check_outside_data(&a.out, data, parts)?;
    }
    let (ds, shown) = match (&a.data, &a.normal) {
        (Some(d), _) => (Dataset::open(d)?, d.clone()),
        (None, Some(n)) => {
            let mut ds = Dataset::folders(n, a.abnormal.as_deref(), a.mask_dir.as_deref())?;
            // In the folder layout the normal folder holds test images, not training ones.
            let mut test = std::mem::take(&mut ds.train);
            test.append(&mut ds.test);
            (Dataset { train: Vec::new(), test }, n.clone())
        }
        (None, None) => unreachable!("clap requires --data or --normal"),
    };
    if ds.test.is_empty() {
        bail!("{}: no test images (expected test/good and test/<defect> folders)", shown.display());
    }
    let det = Detector::load_in(&a.model, a.precision.into())?;
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let bar = progress_bar(ds.test.len(), "images");
    let (mut images, mut skipped) = (Vec::new(), Vec::new());
    for s in &ds.test {
        bar.set_message(s.path.display().to_string());
        match test_image(&det, s) {
            Ok(t) => images.push(t),
            Err(e) => {
                bar.suspend(|| eprintln!("skipped: {e}"));
                skipped.push(e.to_string());
            }
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    if images.is_empty() {
        bail!("none of the {} test images could be read", ds.test.len());
    }
    let threshold = match (a.threshold, det.threshold()) {
        (Some(t), _) => Some((t, "given with --threshold".to_string())),
        (None, Some(t)) => Some((t, det.meta.threshold_source.clone().unwrap_or_else(|| "the model's".into()))),
        (None, None) => None,
    };
    let mut report: TestReport = evaluate(&images, det.extractor.size[1], threshold);
    report.skipped = skipped;
    let json = serde_json::to_string_pretty(&report)?;
    atomic_write(&a.out.join("metrics.json"), json.as_bytes())?;

    let title = shown.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let mut input = report_input(&det, &images, &report, &format!("csflow test report: {title}"))?;
    input.model = a.model.display().to_string();
    input.data = shown.display().to_string();
    input.created = now_utc();
    let html = a.out.join("report.html");
    write_report(&html, &input)?;

    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{:<20} {:>6} {:>6} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "defect type", "good", "defect", "img AUROC", "img AP", "F1 max", "pix AUROC", "AUPRO"
    )?;
    for (k, m) in &report.per_defect_type {
        writeln!(out, "{}", table_row(k, m))?;
    }
    writeln!(out, "{}", table_row("all", &report.overall))?;
    if let Some(op) = &report.operating_point {
        let pct = |r: Option<f64>| r.map_or("—".into(), |r| format!("{:.1} %", 100.0 * r));
        writeln!(
            out,
            "threshold {:.4} ({}): false rejects {}, escapes {}",
            op.threshold,
            op.source,
            pct(op.false_reject_rate),
            pct(op.escape_rate)
        )?;
    }
    if a.store_threshold {
        let Some(t) = report.overall.threshold else {
            bail!("no F1-optimal threshold (the test set needs good and defective images); the model is unchanged");
        };
        let mut model = load_model(&a.model)?;
        model.meta.threshold = Some(t);
        model.meta.threshold_source = Some(format!(
            "F1-optimal on {} ({} good, {} defective images)",
            shown.display(),
            report.overall.n_good,
            report.overall.n_defect
        ));
        save_model(&a.model, &model.params, &model.other, &model.meta)?;
        eprintln!("stored threshold {t:.4} in {}", a.model.display());
    }
    for n in &report.notes {
        eprintln!("note: {n}");
    }
    eprintln!("wrote {} and {}", a.out.join("metrics.json").display(), html.display());
    if !report.skipped.is_empty() {
        bail!("{} image(s) could not be read", report.skipped.len());
    }
    Ok(())
}

fn table_row(name: &str, m: &Metrics) -> String {
    let f = |v: Option<f64>| v.map_or("—".to_string(), |v| format!("{v:.4}"));
    format!(
        "{:<20} {:>6} {:>6} {:>9} {:>9} {:>9} {:>9} {:>9}",
        name,
        m.n_good,
        m.n_defect,
        f(m.image_auroc),
        f(m.image_ap),
        f(m.image_f1_max),
        f(m.pixel_auroc),
        f(m.aupro)
    )
}

/// The current time as `YYYY-MM-DD HH:MM UTC` (civil date from the Unix day count, Howard Hinnant's
/// algorithm; a date crate for one line of the report is not worth its weight).
fn now_utc() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02} UTC", rem / 3600, rem % 3600 / 60)
}
