//! The `csflow` binary end to end, against the PyTorch reference's training run
//! (reference/make_fixtures.py, `training_case`).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::Device;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../csflow/tests/fixtures")
}

fn csflow(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_csflow")).args(args).output().expect("runs csflow")
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn fit_from_authors_weights_then_predict_equals_pytorch() {
    let f = fixtures();
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model.safetensors");
    let out = csflow(&[
        "fit",
        "--features",
        s(&f.join("train_features.safetensors")),
        "--init",
        s(&f.join("training_init.safetensors")),
        "--epochs",
        "4",
        "--batch-size",
        "4",
        "--lr",
        "1e-3",
        "--seed",
        "3",
        "--validation-fraction",
        "0",
        "-o",
        s(&model),
    ]);
    assert!(out.status.success(), "fit failed: {}", String::from_utf8_lossy(&out.stderr));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let expected = candle_core::safetensors::load(f.join("training_expected.safetensors"), &Device::Cpu).unwrap();
    let losses: Vec<f32> = expected["epoch_losses"].to_vec1().unwrap();
    for (e, l) in losses.iter().enumerate() {
        let line = stderr.lines().find(|x| x.starts_with(&format!("epoch {:>4}", e + 1))).expect("epoch line");
        let got: f64 = line.split_whitespace().last().unwrap().parse().unwrap();
        assert!((got - *l as f64).abs() <= 1e-5 * l.abs() as f64 + 1e-6, "epoch {e}: loss {got} vs {l}");
    }

    let out = csflow(&["predict", "--model", s(&model), "--features", s(&f.join("test_features.safetensors"))]);
    assert!(out.status.success(), "predict failed: {}", String::from_utf8_lossy(&out.stderr));
    let want: Vec<f32> = expected["score"].to_vec1().unwrap();
    let lines: Vec<serde_json::Value> =
        String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), want.len());
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
    for (i, (line, w)) in lines.iter().zip(&want).enumerate() {
        assert_eq!(line["path"], format!("test/{i:03}.png"));
        assert_eq!(line["true_label"], if i < 3 { "good" } else { "defect" });
        let got = line["score"].as_f64().unwrap();
        let err = (got - *w as f64).abs() / scale;
        println!("sample {i}: csflow {got:.7} pytorch {w:.7} rel err {err:.2e}");
        assert!(err <= 1e-5, "sample {i}: score {got} vs PyTorch {w}");
    }

    // With bfloat16 products (f32 on CPUs without AVX512_BF16) the scores stay within 1e-3 of PyTorch's.
    let features = f.join("test_features.safetensors");
    let out = csflow(&["predict", "--model", s(&model), "--features", s(&features), "--precision", "bf16"]);
    assert!(out.status.success(), "predict --precision bf16 failed: {}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<serde_json::Value> =
        String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), want.len());
    for (i, (line, w)) in lines.iter().zip(&want).enumerate() {
        let got = line["score"].as_f64().unwrap();
        let err = (got - *w as f64).abs() / scale;
        println!("sample {i}: csflow bf16 {got:.7} pytorch {w:.7} rel err {err:.2e}");
        assert!(err <= 1e-3, "sample {i}: bf16 score {got} vs PyTorch {w}");
    }
}

/// `--threads` (or `CSFLOW_THREADS`) sizes the pool the kernels run on; zero threads is refused by name. The log
/// written to a pipe carries no colour codes.
#[test]
fn threads_flag_sizes_the_worker_pool() {
    let model = fixtures().join("training_init.safetensors");
    let run = |args: &[&str], env: Option<&str>| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_csflow"));
        c.args(args).env("RUST_LOG", "debug").env_remove("RAYON_NUM_THREADS").env_remove("CSFLOW_THREADS");
        if let Some(n) = env {
            c.env("CSFLOW_THREADS", n);
        }
        c.output().expect("runs csflow")
    };
    for (args, env, want) in [
        (vec!["--threads", "1", "info", s(&model)], None, "threads=1"),
        (vec!["info", s(&model), "--threads", "3"], None, "threads=3"),
        (vec!["info", s(&model)], Some("2"), "threads=2"),
    ] {
        let out = run(&args, env);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{args:?}: {err}");
        assert!(err.lines().any(|l| l.contains("worker pool") && l.contains(want)), "{args:?} {env:?}: {err}");
        // Not a terminal: no colour codes in the log.
        assert!(!err.contains('\x1b'), "{err}");
    }
    let out = run(&["--threads", "0", "info", s(&model)], None);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--threads") && err.contains("0"), "{err}");
}

#[test]
fn bad_files_get_clear_errors() {
    let f = fixtures();
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.safetensors");
    std::fs::write(&junk, b"this is not a model").unwrap();
    let out = csflow(&["predict", "--model", s(&junk), "--features", s(&f.join("test_features.safetensors"))]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("junk.safetensors") && err.contains("not a valid safetensors file"), "{err}");

    // A features file given as the model: it has no flow tensors.
    let feats = f.join("test_features.safetensors");
    let out = csflow(&["predict", "--model", s(&feats), "--features", s(&feats)]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("test_features.safetensors") && err.contains("no CS-Flow coupling block"), "{err}");

    // A model file given as features.
    let init = f.join("training_init.safetensors");
    let out = csflow(&["predict", "--model", s(&init), "--features", s(&init)]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("training_init.safetensors") && err.contains("no tensor `scale_0`"), "{err}");

    let missing = dir.path().join("nope.safetensors");
    let out = csflow(&["predict", "--model", s(&init), "--features", s(&missing)]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("nope.safetensors") && err.contains("No such file"), "{err}");
}

#[test]
fn channel_mismatch_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let out = csflow(&[
        "demo-features",
        "--out",
        s(dir.path()),
        "--train",
        "4",
        "--test",
        "2",
        "--channels",
        "8",
        "--map",
        "8",
    ]);
    assert!(out.status.success());
    let init = fixtures().join("training_init.safetensors");
    let feats = dir.path().join("test.safetensors");
    let out = csflow(&["predict", "--model", s(&init), "--features", s(&feats)]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("test.safetensors") && err.contains("[B, 16, h, w]"), "{err}");
}

fn asset(name: &str) -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../assets").join(name);
    assert!(p.exists(), "{} is missing: run scripts/setup.sh first", p.display());
    p
}

/// `extract` on an MVTec-style test folder with real photos and real Lite0 weights: labels from the folders,
/// a bad file reported and skipped, and the output reused as a cache on the next run.
#[test]
fn extract_labels_skips_bad_files_and_caches() {
    let dir = tempfile::tempdir().unwrap();
    let test = dir.path().join("test");
    for (sub, name) in [("good", "brick.png"), ("good", "grass.png"), ("scratch", "gravel.png")] {
        std::fs::create_dir_all(test.join(sub)).unwrap();
        std::fs::copy(asset(name), test.join(sub).join(name)).unwrap();
    }
    std::fs::write(test.join("scratch/broken.png"), b"not an image").unwrap();
    let out = dir.path().join("features.safetensors");
    let weights = asset("efficientnet-lite0-57934424.pth");
    let args = ["extract", "--images", s(&test), "--weights", s(&weights), "--size", "128x256", "-o", s(&out)];
    let run = csflow(&args);
    let err = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(1), "{err}");
    assert!(err.contains("broken.png") && err.contains("3 images, 0 from the cache, 1 unreadable"), "{err}");

    let set = csflow::io::load_features(&out).unwrap();
    assert_eq!(set.scales[0].dims(), &[3, 192, 4, 8]);
    assert_eq!(set.scales[2].dims(), &[3, 192, 1, 2]);
    assert_eq!(set.labels, Some(vec![0, 0, 1]));
    assert!(set.paths[2].ends_with("scratch/gravel.png"));
    assert_eq!(set.extra["backbone"], "efficientnet-lite0");

    std::fs::remove_file(test.join("scratch/broken.png")).unwrap();
    std::fs::copy(asset("coffee.png"), test.join("good/grass.png")).unwrap();
    let run = csflow(&args);
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{err}");
    assert!(err.contains("3 images, 2 from the cache, 0 unreadable"), "{err}");
    let again = csflow::io::load_features(&out).unwrap();
    let diff = |a: &candle_core::Tensor, b: &candle_core::Tensor| -> f32 {
        (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap()
    };
    let row = |t: &candle_core::Tensor, i: usize| t.narrow(0, i, 1).unwrap();
    assert_eq!(diff(&row(&again.scales[0], 0), &row(&set.scales[0], 0)), 0.0, "unchanged image reused");
    assert!(diff(&row(&again.scales[0], 1), &row(&set.scales[0], 1)) > 0.0, "changed image recomputed");

    // The output is also the cache, rewritten after extraction: a file there that is not a features file (a
    // model given by mistake) is refused before any work and kept as it was.
    let model = dir.path().join("model.safetensors");
    std::fs::copy(fixtures().join("training_init.safetensors"), &model).unwrap();
    let before = std::fs::read(&model).unwrap();
    let args = ["extract", "--images", s(&test), "--weights", s(&weights), "--size", "128", "-o", s(&model)];
    let run = csflow(&args);
    let err = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(1), "{err}");
    assert!(err.contains("model.safetensors") && err.contains("not one"), "{err}");
    assert_eq!(std::fs::read(&model).unwrap(), before);
    // A size past the pixel limit is refused when parsed.
    let args = ["extract", "--images", s(&test), "--weights", s(&weights), "--size", "1280000", "-o", s(&out)];
    let run = csflow(&args);
    let err = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(2), "{err}");
    assert!(err.contains("1280000") && err.contains("more than 268435456 pixels"), "{err}");
}

/// Settings that cannot work are refused before extraction or training: a flow shape, a learning rate; the
/// model's folder is made first, so that writing it after training cannot fail on it.
#[test]
fn fit_checks_its_settings_first() {
    let f = fixtures();
    let dir = tempfile::tempdir().unwrap();
    let feats = f.join("train_features.safetensors");
    let fit = |extra: &[&str], out: &Path| {
        csflow(&[&["fit", "--features", s(&feats), "--epochs", "1", "-o", s(out)], extra].concat())
    };
    let out = dir.path().join("m.safetensors");
    for (extra, want) in [
        (&["--hidden", "0"][..], "hidden width must be positive"),
        (&["--hidden", "8", "--kernel-sizes", "4"][..], "kernel sizes must be odd"),
        (&["--lr", "nan"][..], "--lr must be a positive number"),
        (&["--lr=-1"][..], "--lr must be a positive number"),
    ] {
        let run = fit(extra, &out);
        let err = String::from_utf8_lossy(&run.stderr);
        assert_eq!(run.status.code(), Some(1), "{extra:?}: {err}");
        assert!(err.contains(want) && !err.contains("epoch"), "{extra:?}: {err}");
    }
    let run = fit(&[], dir.path());
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(err.contains("is a folder") && !err.contains("epoch"), "{err}");
    let nested = dir.path().join("new/folder/m.safetensors");
    let run = fit(&["--hidden", "8", "--validation-fraction", "0", "--keep-checkpoint"], &nested);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    assert!(csflow::io::load_model(&nested).is_ok());

    // An output that is one of the inputs, or a file that is no model, is refused before any work, and kept.
    let before = std::fs::read(&feats).unwrap();
    let run = fit(&["--hidden", "8"], &feats);
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(err.contains("is also --features") && !err.contains("epoch"), "{err}");
    let photo = dir.path().join("photo.png");
    std::fs::write(&photo, b"a picture").unwrap();
    let run = fit(&["--hidden", "8"], &photo);
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(err.contains("photo.png: exists and is not a csflow model") && !err.contains("epoch"), "{err}");
    let model = f.join("training_init.safetensors");
    let onnx_over_model = csflow(&["export", "--model", s(&model), "-o", s(&model)]);
    let err = String::from_utf8_lossy(&onnx_over_model.stderr);
    assert!(err.contains("is also --model"), "{err}");
    let pth = dir.path().join("weights.pth");
    std::fs::write(&pth, b"not read").unwrap();
    let import = csflow(&["import", "--weights", s(&pth), "-o", s(&pth)]);
    assert!(String::from_utf8_lossy(&import.stderr).contains("is also --weights"));
    assert_eq!(std::fs::read(&pth).unwrap(), b"not read");
    assert_eq!(std::fs::read(&photo).unwrap(), b"a picture");
    assert_eq!(std::fs::read(&feats).unwrap(), before);

    // A checkpoint's settings are read back as the run's: checked as the flags are (batch size 0 divided by
    // zero, a panic).
    let checkpoint = dir.path().join("new/folder/m.checkpoint.safetensors");
    let (tensors, mut meta) = csflow::io::read_safetensors(&checkpoint).unwrap();
    let json = meta.get_mut("csflow").expect("model metadata");
    assert!(json.contains("\"batch_size\":"), "{json}");
    let edited = json.replacen("\"batch_size\":", "\"batch_size\":0,\"was\":", 1);
    *json = edited;
    csflow::io::write_safetensors(&checkpoint, &tensors, meta).unwrap();
    let run = fit(&["--resume"], &nested);
    let err = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(1), "{err}");
    assert!(err.contains("m.checkpoint.safetensors") && err.contains("batch size 0"), "{err}");
}
