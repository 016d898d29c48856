//! Real photos and real weights (assets/ from scripts/setup.sh): EfficientNet-Lite0's ImageNet logits equal
//! PyTorch's, and csflow's resize equals PIL's (reference/make_lite0_fixtures.py).
mod common;

use std::path::{Path, PathBuf};

use common::*;
use csflow::backbone::{EfficientNet, EfficientNetConfig};
use csflow::extract::load_backbone_weights;
use csflow::io::{load_rgb, preprocess, resize_rgb, to_normalized_tensor};

fn asset(name: &str) -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../assets").join(name);
    assert!(p.exists(), "{} is missing: run scripts/setup.sh first", p.display());
    p
}

fn lite0() -> EfficientNet {
    let w = load_backbone_weights(&asset("efficientnet-lite0-57934424.pth")).unwrap();
    EfficientNet::load(EfficientNetConfig::lite0(), &w, None).unwrap()
}

fn argmax(v: &[f32]) -> usize {
    v.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0
}

#[test]
fn lite0_logits_equal_pytorch_on_the_same_input() {
    let net = lite0();
    let fx = Fixture::load("lite0_real_logits.safetensors");
    for (name, class) in [("chelsea", 285), ("coffee", 967)] {
        let img = load_rgb(&fixture_path(&format!("images/{name}_224_pil.png"))).unwrap();
        let logits = net.logits(&to_normalized_tensor(&img).unwrap()).unwrap();
        let want = fx.t(name);
        let got = to_vec(&logits);
        let (d, n): (f64, f64) = got
            .iter()
            .zip(to_vec(want))
            .fold((0.0, 0.0), |(d, n), (a, b)| (d + (*a as f64 - b as f64).powi(2), n + (b as f64).powi(2)));
        let err = (d / n).sqrt();
        println!("{name}: class {} (PyTorch {class}), logits rel err {err:.2e}", argmax(&got));
        assert_eq!(argmax(&got), class);
        assert!(err <= 1e-4, "{name}: logits relative error {err:.2e}");
    }
}

#[test]
fn lite0_classifies_the_photos_through_csflows_own_preprocessing() {
    let net = lite0();
    for (name, class) in [("chelsea", 285), ("coffee", 967)] {
        let (pyr, orig) = preprocess(&asset(&format!("{name}.png")), 224, 224, 1).unwrap();
        let got = to_vec(&net.logits(&pyr[0]).unwrap());
        println!("{name} ({}x{}): class {}", orig.0, orig.1, argmax(&got));
        assert_eq!(argmax(&got), class);
    }
}

fn mean_max_diff(a: &image::RgbImage, b: &image::RgbImage) -> (f64, u8) {
    assert_eq!(a.dimensions(), b.dimensions());
    let (mut sum, mut max) = (0u64, 0u8);
    for (x, y) in a.as_raw().iter().zip(b.as_raw()) {
        let d = x.abs_diff(*y);
        sum += d as u64;
        max = max.max(d);
    }
    (sum as f64 / a.as_raw().len() as f64, max)
}

#[test]
fn resize_equals_pil() {
    // (photo, PIL's output, crop [x, y, w, h] before resizing, height, width)
    type Case<'a> = (&'a str, &'a str, Option<[u32; 4]>, usize, usize);
    let cases: [Case; 5] = [
        ("chelsea", "chelsea_224_pil.png", None, 224, 224),
        ("coffee", "resize_coffee_384x256.png", None, 384, 256),
        ("brick", "resize_brick_256x256.png", None, 256, 256),
        ("grass", "resize_grass_256x384.png", None, 256, 384),
        ("gravel", "resize_gravel_256x256.png", Some([100, 60, 96, 80]), 256, 256),
    ];
    for (name, file, crop, h, w) in cases {
        let mut src = load_rgb(&asset(&format!("{name}.png"))).unwrap();
        if let Some([x, y, cw, ch]) = crop {
            src = image::imageops::crop_imm(&src, x, y, cw, ch).to_image();
        }
        let ours = resize_rgb(&src, h, w).unwrap();
        let pil = load_rgb(&fixture_path(&format!("images/{file}"))).unwrap();
        let (mean, max) = mean_max_diff(&ours, &pil);
        println!("{name} {}x{} -> {h}x{w}: mean |diff| {mean:.4}, max {max}", src.height(), src.width());
        assert!(mean <= 1.0, "{name}: mean difference {mean} grey levels");
    }
}

#[test]
fn unreadable_files_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.png");
    std::fs::write(&junk, b"\x89PNG\r\n\x1a\nnot really").unwrap();
    let e = load_rgb(&junk).unwrap_err().to_string();
    assert!(e.contains("junk.png") && e.contains("cannot decode"), "{e}");
    let text = dir.path().join("notes.png");
    std::fs::write(&text, b"hello").unwrap();
    let e = load_rgb(&text).unwrap_err().to_string();
    assert!(e.contains("notes.png"), "{e}");
    let e = load_rgb(Path::new("/nonexistent/x.png")).unwrap_err().to_string();
    assert!(e.contains("/nonexistent/x.png"), "{e}");
}

#[test]
fn sizes_must_be_multiples_of_128() {
    let e = csflow::extract::check_size([300, 256]).unwrap_err().to_string();
    assert!(e.contains("300x256") && e.contains("multiples of 128") && e.contains("height 256 or 384"), "{e}");
    assert!(csflow::extract::check_size([384, 256]).is_ok());
}
