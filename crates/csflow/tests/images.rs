//! Image decoding and preprocessing against PIL, torchvision and PyTorch (fixtures from
//! reference/make_image_fixtures.py: skimage's CC0 photos in every format and mode csflow reads).
//!
//! Run with `--nocapture` to see the measured differences.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use csflow::io::{check_input_size, decode_rgb, load_rgb, preprocess, pyramid, resize_rgb, to_normalized_tensor};
use csflow::Error;
use image::RgbImage;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/images/parity")
}

struct Expected {
    tensors: HashMap<String, Tensor>,
    meta: HashMap<String, String>,
}

impl Expected {
    fn load() -> Self {
        let path = dir().join("expected.safetensors");
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let (_, m) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        let meta = m.metadata().clone().unwrap_or_default();
        let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).unwrap();
        Self { tensors, meta }
    }

    fn json<T: serde::de::DeserializeOwned>(&self, key: &str) -> T {
        serde_json::from_str(&self.meta[key]).unwrap()
    }

    fn get(&self, key: &str) -> Option<&Tensor> {
        self.tensors.get(key)
    }

    fn t(&self, key: &str) -> &Tensor {
        self.get(key).unwrap_or_else(|| panic!("fixture has no tensor {key}"))
    }

    /// An [H, W, 3] or [H, W, 1] (gray, stored once) u8 tensor as an RGB image.
    fn rgb(&self, key: &str) -> RgbImage {
        let t = self.t(key);
        assert_eq!(t.dtype(), DType::U8, "{key}");
        let (h, w, c) = t.dims3().unwrap();
        let v: Vec<u8> = t.flatten_all().unwrap().to_vec1().unwrap();
        let raw = if c == 1 { v.iter().flat_map(|&g| [g, g, g]).collect() } else { v };
        RgbImage::from_raw(w as u32, h as u32, raw).unwrap()
    }
}

/// (mean |a - b|, max |a - b|, number of differing samples) over all samples.
fn diff(a: &RgbImage, b: &RgbImage) -> (f64, u8, usize) {
    assert_eq!(a.dimensions(), b.dimensions());
    let (mut sum, mut max, mut n) = (0u64, 0u8, 0usize);
    for (x, y) in a.as_raw().iter().zip(b.as_raw()) {
        let d = x.abs_diff(*y);
        sum += d as u64;
        max = max.max(d);
        n += (d > 0) as usize;
    }
    (sum as f64 / a.as_raw().len() as f64, max, n)
}

fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
    let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
    a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// JPEG is decoded by zune-jpeg, PIL uses libjpeg-turbo; the JPEG standard does not define the decoder's
/// output exactly (the IDCT may differ by one level per sample, T.81 / IEEE 1180; chroma upsampling and the
/// YCbCr -> RGB rounding are left to the decoder). Allowed (mean, max) grey levels, from the measured causes:
/// - gray: IDCT rounding only, max 1 (measured mean 0.009, max 1);
/// - 4:4:4: IDCT rounding of Cb / Cr, times up to 1.772 in B = Y + 1.772 (Cb - 128), max 2 (measured 0.017, 2);
/// - 4:2:0: in addition, zune-jpeg upsamples chroma in two rounded steps ((3a + b + 2) >> 2 vertically, then
///   horizontally) where libjpeg-turbo's "fancy" upsampling rounds once ((3 * colsum + next + 8) >> 4): one
///   more level of chroma, max 3 (measured mean 0.37, max 3; ~40 % of the samples differ).
///
/// WebP lossy (image-webp against libwebp) measured exact, so it is held exact like the lossless formats.
fn lossy_tolerance(file: &str) -> Option<(f64, u8)> {
    match file {
        "brick_gray.jpg" => Some((0.05, 1)),
        "coffee_444.jpg" => Some((0.05, 2)),
        "coffee_q90.jpg" | "chelsea_progressive.jpg" => Some((0.5, 3)),
        f if f.ends_with(".jpg") => panic!("{f}: no tolerance set"),
        _ => None,
    }
}

#[test]
fn decoding_matches_pil_convert_rgb() {
    let fx = Expected::load();
    let decode: HashMap<String, String> = fx.json("decode");
    let mut files: Vec<_> = decode.keys().cloned().collect();
    files.sort();
    assert!(files.len() >= 25, "{files:?}");
    for file in files {
        let got = load_rgb(&dir().join(&file)).unwrap_or_else(|e| panic!("{e}"));
        let pil = fx.rgb(&decode[&file]);
        let want_key = format!("want.{file}");
        let want = if fx.get(&want_key).is_some() { fx.rgb(&want_key) } else { pil.clone() };
        let (mean, max, n) = diff(&got, &want);
        match lossy_tolerance(&file) {
            Some((tol_mean, tol_max)) => {
                println!(
                    "{file:28} {}x{}: mean |diff| {mean:.4}, max {max}, {n} samples differ",
                    got.height(),
                    got.width()
                );
                assert!(mean <= tol_mean && max <= tol_max, "{file}: mean {mean}, max {max}");
            }
            None => {
                let note = if want != pil {
                    let (_, _, n_pil) = diff(&got, &pil);
                    format!(" (PIL clips 16-bit gray at 255: {n_pil} samples differ from PIL, by design)")
                } else {
                    String::new()
                };
                println!("{file:28} {}x{}: exact{note}", got.height(), got.width());
                assert_eq!(n, 0, "{file}: {n} samples differ (mean {mean}, max {max})");
            }
        }
    }
}

#[test]
fn decoding_from_memory_equals_decoding_the_file() {
    for file in ["coffee.bmp", "chelsea_rgba16.png", "coffee_q90.jpg", "chelsea_rgba_lossless.webp", "grass_gray16.tif"]
    {
        let path = dir().join(file);
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(decode_rgb(&bytes, Path::new(file)).unwrap(), load_rgb(&path).unwrap(), "{file}");
    }
    let e = decode_rgb(b"", Path::new("upload.png")).unwrap_err().to_string();
    assert!(e.contains("upload.png") && e.contains("empty"), "{e}");
    let e = decode_rgb(b"GIF89a junk", Path::new("upload")).unwrap_err().to_string();
    assert!(e.contains("upload") && e.contains("PNG, JPEG, BMP, TIFF and WebP"), "{e}");
}

#[test]
fn resize_matches_pil_bilinear() {
    let fx = Expected::load();
    let cases: Vec<(String, usize, usize, Option<String>)> = fx.json("resize");
    assert!(cases.len() >= 15);
    let mut worst = 0f64;
    for (src, h, w, key) in cases {
        let img = load_rgb(&dir().join(&src)).unwrap();
        let got = resize_rgb(&img, h, w).unwrap();
        let want = match &key {
            Some(k) => fx.rgb(k),
            None => img.clone(), // the same size: PIL returns a copy
        };
        let (mean, max, n) = diff(&got, &want);
        let kind = match (h.cmp(&(img.height() as usize)), w.cmp(&(img.width() as usize))) {
            (std::cmp::Ordering::Equal, std::cmp::Ordering::Equal) => "same size",
            (a, b) if a.is_eq() || b.is_eq() => "one axis",
            (a, b) if a.is_le() && b.is_le() => "down",
            (a, b) if a.is_ge() && b.is_ge() => "up",
            _ => "mixed",
        };
        println!(
            "{src:18} {:>3}x{:<3} -> {h:>3}x{w:<3} ({kind:9}): mean |diff| {mean:.4}, max {max}, {n} of {} samples differ",
            img.height(),
            img.width(),
            got.as_raw().len()
        );
        worst = worst.max(mean);
        // csflow ports Pillow's fixed-point algorithm, so the result is the same bytes.
        assert_eq!(n, 0, "{src} -> {h}x{w}: mean difference {mean}, max {max} grey levels");
    }
    println!("worst mean |diff|: {worst:.4}");
}

#[test]
fn resize_rejects_empty_sizes() {
    let img = RgbImage::new(4, 3);
    assert!(matches!(resize_rgb(&img, 0, 5), Err(Error::Invalid(_))));
    assert!(matches!(resize_rgb(&img, 5, 0), Err(Error::Invalid(_))));
    assert!(matches!(resize_rgb(&RgbImage::new(0, 0), 5, 5), Err(Error::Invalid(_))));
}

#[test]
fn normalized_tensor_and_pyramid_match_torch() {
    let fx = Expected::load();
    let cases: Vec<(String, String, usize, usize)> = fx.json("norm");
    for (name, src, h, w) in cases {
        let img = resize_rgb(&load_rgb(&dir().join(&src)).unwrap(), h, w).unwrap();
        let x = to_normalized_tensor(&img).unwrap();
        assert_eq!(x.dims(), &[1, 3, h, w]);
        assert_eq!(x.dtype(), DType::F32);
        let d = max_abs(&x, fx.t(&format!("norm.{name}")));
        println!("{name}: normalized max |diff| {d:e}");
        assert!(d <= 1e-6, "{name}: {d}");
        // The pyramid of csflow's tensor and of torch's own tensor.
        for input in [x.clone(), fx.t(&format!("norm.{name}")).clone()] {
            let pyr = pyramid(&input, 4).unwrap();
            assert_eq!(pyr.len(), 4);
            assert_eq!(max_abs(&pyr[0], &input), 0.0);
            for (s, level) in pyr.iter().enumerate().skip(1) {
                let want = fx.t(&format!("pyr.{name}.{s}"));
                assert_eq!(level.dims(), &[1, 3, h >> s, w >> s]);
                let d = max_abs(level, want);
                println!("{name}: scale {s} {:?} max |diff| {d:e}", level.dims());
                assert!(d <= 1e-6, "{name} scale {s}: {d}");
            }
        }
    }
}

#[test]
fn pyramid_rejects_impossible_scales() {
    let x = Tensor::zeros((1, 3, 4, 4), DType::F32, &Device::Cpu).unwrap();
    assert!(pyramid(&x, 0).is_err());
    assert!(pyramid(&x, 4).is_err()); // 4 / 2^3 = 0 rows
    assert_eq!(pyramid(&x, 3).unwrap()[2].dims(), &[1, 3, 1, 1]);
}

#[test]
fn preprocess_combines_decode_resize_normalize_and_pyramid() {
    let fx = Expected::load();
    let (pyr, orig) = preprocess(&dir().join("chelsea_rgb.png"), 32, 32, 1).unwrap();
    assert_eq!(orig, (80, 96));
    assert_eq!(pyr.len(), 1);
    assert!(max_abs(&pyr[0], fx.t("norm.chelsea_32x32")) <= 1e-6);
    let (pyr, orig) = preprocess(&dir().join("coffee.tif"), 256, 128, 3).unwrap();
    assert_eq!(orig, (48, 64));
    let dims: Vec<_> = pyr.iter().map(|t| t.dims().to_vec()).collect();
    assert_eq!(dims, [vec![1, 3, 256, 128], vec![1, 3, 128, 64], vec![1, 3, 64, 32]]);
    // The size is checked before the file is read.
    let e = preprocess(Path::new("/nonexistent/x.png"), 32, 32, 2).unwrap_err();
    assert!(matches!(e, Error::Invalid(_)), "{e}");
}

#[test]
fn input_sizes_must_be_multiples_of_32_times_2_to_the_scales_minus_1() {
    for (h, w, n) in [(768, 768, 3), (256, 384, 3), (128, 128, 3), (224, 224, 1), (64, 192, 2), (1024, 512, 4)] {
        check_input_size(h, w, n).unwrap_or_else(|e| panic!("{h}x{w}, {n} scales: {e}"));
    }
    let msg = |h, w, n| match check_input_size(h, w, n) {
        Err(Error::Invalid(m)) => m,
        other => panic!("{h}x{w}, {n} scales: {other:?}"),
    };
    let m = msg(700, 768, 3);
    println!("{m}");
    assert!(m.contains("700x768") && m.contains("multiples of 128") && m.contains("640 or 768"), "{m}");
    let m = msg(100, 300, 3);
    assert!(m.contains("height 128") && m.contains("width 256 or 384"), "{m}");
    let m = msg(224, 224, 3);
    assert!(m.contains("128 or 256"), "{m}");
    let m = msg(96, 64, 2);
    assert!(m.contains("multiples of 64") && m.contains("64 or 128"), "{m}");
    let m = msg(0, 128, 3);
    assert!(m.contains("height 128"), "{m}");
    assert!(check_input_size(128, 128, 0).is_err());
}

#[test]
fn broken_files_give_errors_that_name_the_file() {
    let expect = |path: &Path, words: &[&str]| {
        let t = std::time::Instant::now();
        let e = load_rgb(path).expect_err(&path.display().to_string());
        let msg = e.to_string();
        println!("{msg}");
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        for w in words {
            assert!(msg.contains(w), "{msg}: expected {w:?}");
        }
        assert!(t.elapsed().as_secs_f64() < 2.0, "{msg}: took {:?}", t.elapsed());
        e
    };
    for f in ["bad_truncated.png", "bad_garbage.png"] {
        assert!(matches!(expect(&dir().join(f), &["cannot decode PNG"]), Error::Format { .. }));
    }
    expect(&dir().join("bad_text.jpg"), &["cannot decode JPEG"]);
    expect(&dir().join("bad_unsupported.gif"), &["PNG, JPEG, BMP, TIFF and WebP"]);
    // Headers that declare 60000 x 60000 pixels (65000 x 65000 for the JPEG): refused before allocating.
    for f in ["huge_dims.png", "huge_dims.bmp", "huge_dims.jpg", "huge_dims.tif"] {
        expect(&dir().join(f), &["too large"]);
    }
    let tmp = tempfile::tempdir().unwrap();
    let empty = tmp.path().join("empty.png");
    std::fs::write(&empty, b"").unwrap();
    expect(&empty, &["empty"]);
    let no_ext = tmp.path().join("notes");
    std::fs::write(&no_ext, b"hello, world").unwrap();
    expect(&no_ext, &["PNG, JPEG, BMP, TIFF and WebP"]);
    expect(tmp.path(), &["folder"]);
    let missing = tmp.path().join("missing.png");
    assert!(matches!(expect(&missing, &[]), Error::Io { .. }));
}

/// Every truncation of every test image gives an error or an image, never a panic.
#[test]
fn truncated_files_never_panic() {
    let tmp = tempfile::tempdir().unwrap();
    let mut files: Vec<_> = std::fs::read_dir(dir()).unwrap().map(|e| e.unwrap().path()).collect();
    files.retain(|p| p.extension().is_some_and(|e| e != "safetensors") && !p.to_string_lossy().contains("huge"));
    files.sort();
    for path in files {
        let bytes = std::fs::read(&path).unwrap();
        let name = path.file_name().unwrap();
        for cut in [1, 8, 16, 33, 100, bytes.len() / 3, bytes.len() / 2, bytes.len().saturating_sub(1)] {
            if cut >= bytes.len() {
                continue;
            }
            let p = tmp.path().join(name);
            std::fs::write(&p, &bytes[..cut]).unwrap();
            if let Err(e) = load_rgb(&p) {
                assert!(e.to_string().contains(&p.display().to_string()), "{e}");
            }
        }
    }
}
