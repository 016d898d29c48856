//! The image workflow end to end with the real Lite0 weights: `fit --data` on an MVTec-layout folder,
//! `--resume`, `test`, and `predict` on folders and globs, checked against the features path
//! (`extract` + `predict --features`) and an uninterrupted run.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use base64::Engine;

fn csflow(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_csflow")).args(args).output().expect("runs csflow")
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn asset(name: &str) -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../assets").join(name);
    assert!(p.exists(), "{} is missing: run scripts/setup.sh first", p.display());
    p
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A small MVTec AD category from 128 px crops of brick.png: 10 good training images, 3 good and 3
/// defective test images (bright discs, with masks), and one unreadable test file.
fn make_category(root: &Path) {
    let brick = image::open(asset("brick.png")).unwrap().to_rgb8();
    let crop = |i: u32| image::imageops::crop_imm(&brick, (i * 37) % 384, (i * 53) % 384, 128, 128).to_image();
    for d in ["train/good", "test/good", "test/spot", "ground_truth/spot"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    for i in 0..10 {
        crop(i).save(root.join(format!("train/good/{i:03}.png"))).unwrap();
    }
    for i in 0..3 {
        crop(20 + i).save(root.join(format!("test/good/{i:03}.png"))).unwrap();
        let mut img = crop(30 + i);
        let mut mask = image::GrayImage::new(128, 128);
        let (cx, cy) = (30 + 25 * i as i32, 60);
        for y in 0..128i32 {
            for x in 0..128i32 {
                if (x - cx).pow(2) + (y - cy).pow(2) <= 100 {
                    img.put_pixel(x as u32, y as u32, image::Rgb([250, 250, 250]));
                    mask.put_pixel(x as u32, y as u32, image::Luma([255]));
                }
            }
        }
        img.save(root.join(format!("test/spot/{i:03}.png"))).unwrap();
        mask.save(root.join(format!("ground_truth/spot/{i:03}_mask.png"))).unwrap();
    }
    std::fs::write(root.join("test/good/broken.png"), b"not a png").unwrap();
}

fn json_lines(o: &Output) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(&o.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[test]
fn fit_resume_test_and_predict_on_images() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("brick");
    make_category(&root);
    let weights = asset("efficientnet-lite0-57934424.pth");
    let fit = |epochs: &str, out: &Path, extra: &[&str]| {
        let mut args = vec!["fit", "--data", s(&root), "--weights", s(&weights), "--size", "128", "--epochs", epochs];
        if !extra.contains(&"--resume") {
            // A resumed run takes these from its checkpoint (giving them is an error).
            args.extend(["--hidden", "32", "--batch-size", "4", "--lr", "1e-3", "--validation-fraction", "0.2"]);
        }
        args.extend(["--checkpoint-every", "0", "-o", s(out)]);
        args.extend(extra);
        let o = csflow(&args);
        assert!(o.status.success(), "{}", stderr(&o));
        o
    };

    // An interrupted run continued with --resume equals an uninterrupted one, byte for byte.
    let full = dir.path().join("full.safetensors");
    let part = dir.path().join("part.safetensors");
    fit("3", &full, &[]);
    fit("1", &part, &["--keep-checkpoint"]);
    assert!(dir.path().join("part.checkpoint.safetensors").exists());
    // A fresh run does not overwrite an earlier run's checkpoint.
    let o = csflow(&["fit", "--data", s(&root), "--weights", s(&weights), "--size", "128", "-o", s(&part)]);
    assert!(stderr(&o).contains("continue it with --resume"), "{}", stderr(&o));
    let o = fit("3", &part, &["--resume"]);
    assert!(stderr(&o).contains("resuming at epoch 2 of 3"), "{}", stderr(&o));
    assert_eq!(std::fs::read(&full).unwrap(), std::fs::read(&part).unwrap(), "resumed model differs");

    // The model is self-contained: backbone weights, its settings, threshold and statistics.
    let model = csflow::io::load_model(&full).unwrap();
    let bb = model.meta.backbone.as_ref().expect("backbone recorded");
    assert_eq!((bb.name.as_str(), bb.block, bb.input_size), ("efficientnet-lite0", 14, [128, 128]));
    assert!(model.other.contains_key("backbone._conv_stem.weight"));
    assert!(!model.other.keys().any(|k| k.starts_with("backbone._fc") || k.starts_with("optimizer.")));
    let val = model.meta.validation_scores.as_ref().expect("2 of 10 held out");
    assert_eq!((val.count, model.meta.train_scores.as_ref().unwrap().count), (2, 8));
    // 2 validation scores, quantile 0.99 with linear interpolation: min + 0.99 (max - min).
    let want = val.min + 0.99 * (val.max - val.min);
    assert!((model.meta.threshold.unwrap() - want).abs() < 1e-9 * want.abs());

    // test: metrics and report even with an unreadable image (reported, exit status 1).
    let out = dir.path().join("report");
    let o = csflow(&["test", "--model", s(&full), "--data", s(&root), "--out", s(&out)]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("broken.png"), "{}", stderr(&o));
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("metrics.json")).unwrap()).unwrap();
    assert_eq!((m["n_good"].as_u64(), m["n_defect"].as_u64()), (Some(3), Some(3)));
    for key in ["image_auroc", "image_ap", "image_f1_max", "threshold", "pixel_auroc", "aupro"] {
        let v = m[key].as_f64().unwrap_or_else(|| panic!("{key} missing: {m}"));
        assert!((0.0..=1.0).contains(&v) || key == "threshold", "{key} = {v}");
        assert_eq!(m["per_defect_type"]["spot"][key], m[key], "one defect type: same as overall");
    }
    assert!(m["skipped"][0].as_str().unwrap().contains("broken.png"));
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert!(html.contains("<svg") && html.contains("data:image/png;base64,"));

    // --store-threshold writes the F1-optimal threshold of the test into (a copy of) the model.
    let stored = dir.path().join("stored.safetensors");
    std::fs::copy(&full, &stored).unwrap();
    // Results inside the data set's test/ folder would be read as a defect type by the next run: refused.
    let inside = root.join("test/results");
    let o = csflow(&["test", "--model", s(&full), "--data", s(&root), "--out", s(&inside)]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("inside the data set's test/ folder") && !inside.exists(), "{}", stderr(&o));
    let o = csflow(&["test", "--model", s(&stored), "--data", s(&root), "--out", s(&out), "--store-threshold"]);
    assert!(stderr(&o).contains("stored threshold"), "{}", stderr(&o));
    let meta = csflow::io::load_model(&stored).unwrap().meta;
    assert_eq!(meta.threshold, m["threshold"].as_f64());
    assert!(meta.threshold_source.unwrap().starts_with("F1-optimal"));

    // predict on a folder and a glob: the same scores as the features path (extract, then --features).
    std::fs::remove_file(root.join("test/good/broken.png")).unwrap();
    let heat = dir.path().join("heat");
    let masks = dir.path().join("masks");
    let test_dir = root.join("test");
    let glob = format!("{}/train/good/00[01].png", root.display());
    let same_name = root.join("test/good/000.png");
    let inputs = [s(&test_dir), &glob, s(&same_name)];
    let o = csflow(
        &[&["predict", "--model", s(&full)], &inputs[..], &["--heatmaps", s(&heat), "--masks", s(&masks)]].concat(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let lines = json_lines(&o);
    assert_eq!(lines.len(), 9, "{lines:?}");
    let feats = dir.path().join("test_features.safetensors");
    let e = csflow(&["extract", "--images", s(&test_dir), "--weights", s(&weights), "--size", "128", "-o", s(&feats)]);
    assert!(e.status.success(), "{}", stderr(&e));
    let f = csflow(&["predict", "--model", s(&full), "--features", s(&feats)]);
    assert!(f.status.success(), "{}", stderr(&f));
    let by_path: HashMap<String, serde_json::Value> =
        json_lines(&f).into_iter().map(|l| (l["path"].as_str().unwrap().to_string(), l)).collect();
    assert_eq!(by_path.len(), 6);
    for l in &lines[..6] {
        let other = &by_path[l["path"].as_str().unwrap()];
        let (a, b) = (l["score"].as_f64().unwrap(), other["score"].as_f64().unwrap());
        assert!((a - b).abs() <= 1e-5 * b.abs(), "{a} vs {b}");
        let t = l["threshold"].as_f64().unwrap();
        assert_eq!(l["label"], if a >= t { "defect" } else { "good" });
        assert_eq!(other["true_label"], if l["path"].as_str().unwrap().contains("/good/") { "good" } else { "defect" });
        let n = l["normalized_score"].as_f64().unwrap();
        assert_eq!(n >= 0.5, a >= t, "normalised 0.5 is the threshold");
    }
    // Outputs mirror the input folders, under each folder's own name where several inputs are given, at the
    // image's size.
    let h = image::open(heat.join("test/spot/001.png")).unwrap();
    let k = image::open(masks.join("test/good/000_mask.png")).unwrap();
    assert_eq!((h.width(), h.height(), k.width(), k.height()), (128, 128, 128, 128));
    assert!(heat.join("001.png").exists(), "glob inputs are named by file name");
    // test/good/000.png given once more as a file: `000` is the glob's, so it becomes `000_1`.
    assert!(heat.join("000_1.png").exists(), "same names kept apart");
    // One folder alone: its outputs straight in the output folder.
    let single = dir.path().join("single");
    let o = csflow(&["predict", "--model", s(&full), s(&root.join("test/spot")), "--heatmaps", s(&single)]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(single.join("001.png").exists());
    // An output folder that holds an input is refused before anything is written.
    let o = csflow(&["predict", "--model", s(&full), s(&test_dir), "--heatmaps", s(&test_dir)]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("output folder holds the input"), "{}", stderr(&o));
    // Existing files are not replaced without --overwrite: the run is refused before scoring, the file kept.
    let before = std::fs::read(heat.join("001.png")).unwrap();
    std::fs::write(heat.join("001.png"), b"not a picture of ours").unwrap();
    let o = csflow(
        &[&["predict", "--model", s(&full)], &inputs[..], &["--heatmaps", s(&heat), "--masks", s(&masks)]].concat(),
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("exists") && stderr(&o).contains("--overwrite"), "{}", stderr(&o));
    assert!(json_lines(&o).is_empty(), "refused before scoring");
    assert_eq!(std::fs::read(heat.join("001.png")).unwrap(), b"not a picture of ours");
    let o = csflow(
        &[
            &["predict", "--model", s(&full)],
            &inputs[..],
            &["--heatmaps", s(&heat), "--masks", s(&masks), "--overwrite"],
        ]
        .concat(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(std::fs::read(heat.join("001.png")).unwrap(), before, "the same picture again");
    // Heatmaps and masks in one folder: the mask of `a.png` and the heatmap of `a_mask.png` stay apart.
    let pair = dir.path().join("pair");
    std::fs::create_dir(&pair).unwrap();
    std::fs::copy(root.join("test/spot/000.png"), pair.join("a.png")).unwrap();
    std::fs::copy(root.join("test/good/000.png"), pair.join("a_mask.png")).unwrap();
    let both = dir.path().join("both");
    // The same folder reached two ways (through a symbolic link).
    std::fs::create_dir(&both).unwrap();
    let both_again = dir.path().join("both_link");
    std::os::unix::fs::symlink(&both, &both_again).unwrap();
    let o = csflow(&["predict", "--model", s(&full), s(&pair), "--heatmaps", s(&both), "--masks", s(&both_again)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let written: Vec<String> = json_lines(&o)
        .iter()
        .flat_map(|l| [l["heatmap"].as_str().unwrap().to_string(), l["mask"].as_str().unwrap().to_string()])
        .collect();
    assert!(written.iter().all(|p| Path::new(p).exists()), "{written:?}");
    let distinct: std::collections::HashSet<PathBuf> =
        written.iter().map(|p| Path::new(p).canonicalize().unwrap()).collect();
    assert_eq!((written.len(), distinct.len()), (4, 4), "four files: {written:?}");
    // A heatmap folder that is a file, and a threshold that is not a finite number: refused with their names.
    let plain = dir.path().join("plain.txt");
    std::fs::write(&plain, b"a file").unwrap();
    let o = csflow(&["predict", "--model", s(&full), s(&pair), "--heatmaps", s(&plain)]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("plain.txt: not a folder"), "{}", stderr(&o));
    let o = csflow(&["predict", "--model", s(&full), s(&pair), "--threshold", "nan"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--threshold") && stderr(&o).contains("not a finite number"), "{}", stderr(&o));

    // Images scored in batches through the flow (here 3 + 3 + 1, an unreadable file in the first batch)
    // score as one at a time; the unreadable file fails alone, the others keep their order.
    std::fs::write(root.join("test/good/0011.png"), b"not a png either").unwrap();
    let scores = |batch: &str| {
        let o = csflow(&["predict", "--model", s(&full), s(&test_dir), "--batch-size", batch]);
        assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
        assert!(stderr(&o).contains("0011.png"), "{}", stderr(&o));
        json_lines(&o)
            .iter()
            .map(|l| (l["path"].as_str().unwrap().to_string(), l["score"].as_f64().unwrap()))
            .collect::<Vec<_>>()
    };
    let (one, three) = (scores("1"), scores("3"));
    assert_eq!(one.len(), 6);
    for ((p1, a), (p3, b)) in one.iter().zip(&three) {
        assert_eq!(p1, p3);
        assert!((a - b).abs() <= 1e-5 * a.abs(), "{p1}: {a} alone, {b} in a batch");
    }
    std::fs::remove_file(root.join("test/good/0011.png")).unwrap();

    // A missing input is reported, the rest still scored, the exit status says so.
    let o = csflow(&["predict", "--model", s(&full), s(&root.join("nope.png")), s(&root.join("test/spot/000.png"))]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("nope.png"), "{}", stderr(&o));
    assert_eq!(json_lines(&o).len(), 1);
}

/// A `csflow serve` child process, stopped when dropped.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `csflow serve` on a free port; returns it with the address it logged.
fn serve(args: &[&str]) -> (Server, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_csflow"))
        .args([&["serve", "--port", "0"], args].concat())
        .stderr(Stdio::piped())
        .spawn()
        .expect("runs csflow serve");
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let server = Server(child);
    let addr = loop {
        let line = lines.next().expect("serve logged its address").unwrap();
        if let Some(at) = line.find("listening on http://") {
            break line[at + "listening on http://".len()..].trim().to_string();
        }
    };
    // Keep reading the log so that the server never blocks on a full pipe.
    std::thread::spawn(move || lines.for_each(drop));
    (server, addr)
}

/// One HTTP/1.1 request (the connection closed after it): the status and the body.
fn http(addr: &str, method: &str, target: &str, headers: &str, body: &[u8]) -> (u16, Vec<u8>) {
    let mut stream = TcpStream::connect(addr).unwrap();
    let head = format!(
        "{method} {target} HTTP/1.1\r\nHost: {addr}\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(&[head.as_bytes(), body].concat()).unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).unwrap();
    let end = answer.windows(4).position(|w| w == b"\r\n\r\n").expect("a complete answer");
    let status = String::from_utf8_lossy(&answer[..end]).split(' ').nth(1).unwrap().parse().unwrap();
    (status, answer[end + 4..].to_vec())
}

fn json(body: &[u8]) -> serde_json::Value {
    serde_json::from_slice(body).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(body)))
}

#[test]
fn serve_answers_as_predict_does() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("brick");
    make_category(&root);
    let weights = asset("efficientnet-lite0-57934424.pth");
    let model = dir.path().join("model.safetensors");
    let o = csflow(&[
        "fit",
        "--data",
        s(&root),
        "--weights",
        s(&weights),
        "--size",
        "128",
        "--epochs",
        "1",
        "--hidden",
        "32",
        "--batch-size",
        "4",
        "--checkpoint-every",
        "0",
        "-o",
        s(&model),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let image = root.join("test/spot/001.png");
    let (heat, masks) = (dir.path().join("heat"), dir.path().join("masks"));
    let o = csflow(&["predict", "--model", s(&model), s(&image), "--heatmaps", s(&heat), "--masks", s(&masks)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let want = &json_lines(&o)[0];

    let bytes = std::fs::read(&image).unwrap();
    let (_server, addr) = serve(&["--model", s(&model), "--max-body-bytes", "100000", "--max-pixels", "20000"]);
    let (status, body) = http(&addr, "GET", "/health", "", b"");
    assert_eq!((status, json(&body)), (200, serde_json::json!({"status": "ok"})));
    let (status, body) = http(&addr, "GET", "/info", "", b"");
    let info = json(&body);
    assert_eq!(status, 200);
    assert_eq!(
        (info["backbone"].as_str(), &info["input_size"]),
        (Some("efficientnet-lite0"), &serde_json::json!([128, 128]))
    );
    assert_eq!(info["threshold"], want["threshold"]);

    // The same verdict, heatmap and mask as `csflow predict`.
    let (status, body) = http(&addr, "POST", "/predict?heatmap=true&mask=true", "", &bytes);
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let got = json(&body);
    for key in ["score", "normalized_score", "label", "threshold"] {
        assert_eq!(got[key], want[key], "{key}");
    }
    assert_eq!((got["width"].as_u64(), got["height"].as_u64()), (Some(128), Some(128)));
    let png = |key: &str| {
        let b = base64::engine::general_purpose::STANDARD.decode(got[key].as_str().unwrap()).unwrap();
        image::load_from_memory(&b).unwrap()
    };
    assert_eq!(png("heatmap_png"), image::open(heat.join("001.png")).unwrap());
    assert_eq!(png("mask_png"), image::open(masks.join("001_mask.png")).unwrap());

    // A request's threshold overrides the model's; no pictures unless asked for.
    let (status, body) = http(&addr, "POST", "/predict?threshold=1e9", "Content-Type: image/png\r\n", &bytes);
    let got = json(&body);
    assert_eq!((status, got["label"].as_str(), got["threshold"].as_f64()), (200, Some("good"), Some(1e9)));
    assert_eq!(got["score"], want["score"]);
    assert!(got.get("heatmap_png").is_none() && got.get("mask_png").is_none());

    // Bad requests get a status and a JSON message saying what is wrong.
    let error = |(status, body): (u16, Vec<u8>)| (status, json(&body)["error"].as_str().unwrap().to_string());
    let (status, msg) = error(http(&addr, "POST", "/predict", "", b"not an image"));
    assert_eq!(status, 400);
    assert!(msg.contains("uploaded image") && msg.contains("PNG"), "{msg}");
    assert_eq!(error(http(&addr, "POST", "/predict", "", b"")).0, 400);
    let (status, msg) = error(http(&addr, "POST", "/predict?threshold=high", "", &bytes));
    assert!(status == 400 && msg.contains("threshold"), "{status} {msg}");
    let (status, msg) = error(http(&addr, "POST", "/predict?threshold=NaN", "", &bytes));
    assert!(status == 400 && msg.contains("finite"), "{status} {msg}");
    let (status, msg) = error(http(&addr, "POST", "/predict", "Content-Type: multipart/form-data\r\n", &bytes));
    assert!(status == 415 && msg.contains("--data-binary"), "{status} {msg}");
    let (status, msg) = error(http(&addr, "POST", "/predict", "", &vec![0u8; 100_001]));
    assert!(status == 413 && msg.contains("100000"), "{status} {msg}");
    // An image past --max-pixels (128 x 128 is within 20000) is refused from its header.
    let mut wide = Vec::new();
    image::RgbImage::new(200, 120).write_to(&mut std::io::Cursor::new(&mut wide), image::ImageFormat::Png).unwrap();
    let (status, msg) = error(http(&addr, "POST", "/predict", "", &wide));
    assert!(status == 400 && msg.contains("200 x 120") && msg.contains("at most 20000 pixels"), "{status} {msg}");
    assert_eq!(error(http(&addr, "GET", "/predict", "", b"")).0, 405);
    assert_eq!(error(http(&addr, "GET", "/nope", "", b"")).0, 404);
    // The page for people posts the photo to /predict and shows the heatmap.
    let (status, page) = http(&addr, "GET", "/", "", b"");
    let page = String::from_utf8(page).unwrap();
    assert!(status == 200 && page.contains("fetch('/predict?heatmap=true'") && page.contains("heatmap_png"));
    // The server still answers after all that.
    assert_eq!(http(&addr, "POST", "/predict", "", &bytes).0, 200);

    // /metrics counts those requests by status and the three verdicts by label.
    let (status, text) = http(&addr, "GET", "/metrics", "", b"");
    assert_eq!(status, 200);
    let text = String::from_utf8(text).unwrap();
    let value = |series: &str| -> f64 {
        let line = text.lines().find(|l| l.starts_with(series)).unwrap_or_else(|| panic!("{series}:\n{text}"));
        line[series.len()..].trim().parse().unwrap()
    };
    for (code, n) in [(200, 3.0), (400, 5.0), (413, 1.0), (415, 1.0)] {
        assert_eq!(value(&format!("csflow_requests_total{{status=\"{code}\"}}")), n, "{text}");
    }
    let label = want["label"].as_str().unwrap();
    let good = if label == "good" { 3.0 } else { 1.0 };
    assert_eq!(value("csflow_verdicts_total{label=\"good\"}"), good, "{text}");
    if label == "defect" {
        assert_eq!(value("csflow_verdicts_total{label=\"defect\"}"), 2.0, "{text}");
    }
    assert_eq!((value("csflow_scoring_seconds_count"), value("csflow_batch_size_sum")), (3.0, 3.0));

    // Requests that wait while another is scored are scored together, answering as they would alone; with no
    // queue, one that comes while another is scored is turned away (whichever comes second). A 6000 x 6000
    // image with its heatmap takes about 1 s; the other requests come 0.3 s after it.
    let mut big = Vec::new();
    image::RgbImage::from_pixel(6000, 6000, image::Rgb([120, 110, 100]))
        .write_to(&mut std::io::Cursor::new(&mut big), image::ImageFormat::Png)
        .unwrap();
    let big = std::sync::Arc::new(big);
    let occupy = |addr: &str| {
        let (addr, big) = (addr.to_string(), big.clone());
        let first = std::thread::spawn(move || http(&addr, "POST", "/predict?heatmap=true", "", &big).0);
        std::thread::sleep(std::time::Duration::from_millis(300));
        first
    };
    let (_server, addr) = serve(&["--model", s(&model), "--max-pixels", "40000000"]);
    let first = occupy(&addr);
    let files: Vec<PathBuf> = ["test/good/000.png", "test/spot/000.png", "test/spot/001.png", "train/good/005.png"]
        .iter()
        .map(|f| root.join(f))
        .collect();
    let waiting: Vec<_> = files
        .iter()
        .map(|f| {
            let (addr, bytes) = (addr.clone(), std::fs::read(f).unwrap());
            std::thread::spawn(move || json(&http(&addr, "POST", "/predict", "", &bytes).1))
        })
        .collect();
    let together: Vec<serde_json::Value> = waiting.into_iter().map(|t| t.join().unwrap()).collect();
    assert_eq!(first.join().unwrap(), 200);
    for (f, got) in files.iter().zip(&together) {
        let alone = json(&http(&addr, "POST", "/predict", "", &std::fs::read(f).unwrap()).1);
        assert_eq!((alone["batch_size"].as_u64(), got["batch_size"].as_u64()), (Some(1), Some(4)), "{got}");
        let (a, b) = (alone["score"].as_f64().unwrap(), got["score"].as_f64().unwrap());
        assert!((a - b).abs() <= 1e-5 * a.abs(), "{}: {a} alone, {b} in a batch", f.display());
        assert_eq!(alone["label"], got["label"]);
    }
    let (_server, addr) = serve(&["--model", s(&model), "--max-queue", "0", "--max-pixels", "40000000"]);
    let first = occupy(&addr);
    let mut statuses = [http(&addr, "POST", "/predict", "", &bytes).0, first.join().unwrap()];
    statuses.sort();
    assert_eq!(statuses, [200, 503]);

    // Clients that stall are cut off after --read-timeout: half-sent headers and an idle connection are
    // closed, a half-sent body gets 408; a body declared over --max-body-bytes gets 413 before it is sent.
    let (_server, addr) = serve(&["--model", s(&model), "--read-timeout", "1", "--max-body-bytes", "1000"]);
    let answer_to = |sent: &[u8]| {
        let mut stream = TcpStream::connect(&addr).unwrap();
        stream.set_read_timeout(Some(std::time::Duration::from_secs(20))).unwrap();
        stream.write_all(sent).unwrap();
        let start = std::time::Instant::now();
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer);
        (String::from_utf8_lossy(&answer).to_string(), start.elapsed())
    };
    let (answer, took) = answer_to(b"POST /predict HTTP/1.1\r\nHost: x\r\n");
    assert!(answer.is_empty() && took.as_secs() < 10, "{answer:?} after {took:?}");
    let (answer, took) = answer_to(b"");
    assert!(answer.is_empty() && took.as_secs() < 10, "idle: {answer:?} after {took:?}");
    let (answer, took) = answer_to(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 900\r\n\r\n0123");
    assert!(answer.starts_with("HTTP/1.1 408") && answer.contains("--read-timeout"), "{answer:?}");
    assert!(took.as_secs_f64() >= 0.9 && took.as_secs() < 10, "{took:?}");
    let (answer, took) = answer_to(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 999999999\r\n\r\n");
    assert!(answer.starts_with("HTTP/1.1 413") && took.as_secs_f64() < 0.9, "{answer:?} after {took:?}");

    // SIGTERM: a client that never finishes its request holds the server at most --shutdown-timeout seconds.
    let (mut server, addr) = serve(&["--model", s(&model), "--shutdown-timeout", "1"]);
    let mut stalled = TcpStream::connect(&addr).unwrap();
    stalled.write_all(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n0123").unwrap();
    std::thread::sleep(std::time::Duration::from_millis(200));
    let term = Command::new("kill").args(["-TERM", &server.0.id().to_string()]).status().unwrap();
    assert!(term.success());
    let start = std::time::Instant::now();
    let status = loop {
        if let Some(status) = server.0.try_wait().unwrap() {
            break status;
        }
        assert!(start.elapsed().as_secs() < 20, "still serving 20 s after SIGTERM");
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert!(status.success() && start.elapsed().as_secs_f64() >= 0.9, "{status:?} after {:?}", start.elapsed());
    drop(stalled);

    // export writes the whole model as ONNX (its numbers are checked in csflow's tests/export.rs); a model
    // without backbone is refused, naming the file.
    let onnx = dir.path().join("model.onnx");
    let o = csflow(&["export", "--model", s(&model), "-o", s(&onnx)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let backbone_bytes: usize =
        csflow::io::load_model(&model).unwrap().other.values().map(|t| 4 * t.elem_count()).sum();
    assert!(std::fs::metadata(&onnx).unwrap().len() as usize > backbone_bytes, "{}", stderr(&o));
    let feats = dir.path().join("feats.safetensors");
    let e = csflow(&[
        "extract",
        "--images",
        s(&root.join("train/good")),
        "--weights",
        s(&weights),
        "--size",
        "128",
        "-o",
        s(&feats),
    ]);
    assert!(e.status.success(), "{}", stderr(&e));
    let flow_only = dir.path().join("flow_only.safetensors");
    let f = csflow(&[
        "fit",
        "--features",
        s(&feats),
        "--epochs",
        "1",
        "--hidden",
        "32",
        "--checkpoint-every",
        "0",
        "-o",
        s(&flow_only),
    ]);
    assert!(f.status.success(), "{}", stderr(&f));
    let o = csflow(&["export", "--model", s(&flow_only), "-o", s(&dir.path().join("no.onnx"))]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("flow_only.safetensors") && stderr(&o).contains("no backbone"), "{}", stderr(&o));
    assert!(!dir.path().join("no.onnx").exists());

    // A model file that cannot be read stops the server before it listens, naming the file.
    let junk = dir.path().join("junk.safetensors");
    std::fs::write(&junk, b"junk").unwrap();
    let o = csflow(&["serve", "--model", s(&junk), "--port", "0"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("junk.safetensors"), "{}", stderr(&o));
}

#[test]
fn data_errors_name_the_folder() {
    let dir = tempfile::tempdir().unwrap();
    let weights = asset("efficientnet-lite0-57934424.pth");
    let model = dir.path().join("m.safetensors");
    let o = csflow(&["fit", "--data", s(dir.path()), "--weights", s(&weights), "-o", s(&model)]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("no images found") && stderr(&o).contains(s(dir.path())), "{}", stderr(&o));
    std::fs::create_dir_all(dir.path().join("test/good")).unwrap();
    let o = csflow(&["fit", "--data", s(dir.path()), "--weights", s(&weights), "-o", s(&model)]);
    assert!(stderr(&o).contains("train/good"), "{}", stderr(&o));
    // A model trained on a features file cannot read images, and says so.
    let init = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../csflow/tests/fixtures/training_init.safetensors");
    let o = csflow(&["predict", "--model", s(&init), s(&asset("brick.png"))]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("holds no backbone"), "{}", stderr(&o));
}
