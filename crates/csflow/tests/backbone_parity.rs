//! EfficientNet features against efficientnet_pytorch / efficientnet_lite_pytorch
//! (reference/make_backbone_fixtures.py): random weights and BatchNorm statistics from the seeded formula.
mod common;

use candle_core::{Device, Tensor};
use common::*;
use csflow::backbone::{EfficientNet, EfficientNetConfig};

/// ||a - b|| / ||b||.
fn norm_err(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims());
    let (a, b) = (to_vec(a), to_vec(b));
    let d: f64 = a.iter().zip(&b).map(|(x, y)| (*x as f64 - *y as f64).powi(2)).sum::<f64>().sqrt();
    d / b.iter().map(|y| (*y as f64).powi(2)).sum::<f64>().sqrt()
}

/// PyTorch's default nearest downscale by 2^s: source index floor(dst * 2^s).
fn nearest_down(x: &Tensor, s: usize) -> Tensor {
    let f = 1usize << s;
    let (_, _, h, w) = x.dims4().unwrap();
    let rows = Tensor::from_vec((0..h / f).map(|i| (i * f) as u32).collect::<Vec<_>>(), h / f, &Device::Cpu).unwrap();
    let cols = Tensor::from_vec((0..w / f).map(|i| (i * f) as u32).collect::<Vec<_>>(), w / f, &Device::Cpu).unwrap();
    x.index_select(&rows, 2).unwrap().index_select(&cols, 3).unwrap()
}

fn check(tag: &str, config: EfficientNetConfig, with_logits: bool) {
    let fx = Fixture::load(&format!("backbone_{tag}.safetensors"));
    let block = fx.meta_usize("block");
    assert_eq!(config.feature_block, block);
    let w = backbone_weights(&fx);
    let net = EfficientNet::load(config.clone(), &w, if with_logits { None } else { Some(block) }).unwrap();
    let sizes: Vec<[usize; 2]> = fx.meta_json("sizes");
    for [h, wd] in sizes {
        let v: Vec<f32> = formula_uniform(&format!("input{h}x{wd}"), 3 * h * wd, fx.meta_usize("seed") as u64)
            .into_iter()
            .map(|u| 2.0 * u)
            .collect();
        let x = Tensor::from_vec(v, (1, 3, h, wd), &Device::Cpu).unwrap();
        let levels: Vec<Tensor> = (0..3).map(|s| nearest_down(&x, s)).collect();
        // One level at a time, and the three block by block.
        let together = net.features_of(&levels, block).unwrap();
        for (s, level) in levels.iter().enumerate() {
            let want = fx.t(&format!("feat_{h}x{wd}_scale{s}"));
            let got = net.features(level, block).unwrap();
            let err = norm_err(&got, want);
            println!("{tag} {h}x{wd} scale {s}: {:?} rel err {err:.2e}", got.dims());
            assert!(err <= 1e-4, "{tag} {h}x{wd} scale {s}: relative error {err:.2e}");
            let err = norm_err(&together[s], want);
            assert!(err <= 1e-4, "{tag} {h}x{wd} scale {s} with the other levels: relative error {err:.2e}");
        }
        if with_logits {
            let err = norm_err(&net.logits(&x).unwrap(), fx.t(&format!("logits_{h}x{wd}")));
            println!("{tag} {h}x{wd} logits rel err {err:.2e}");
            assert!(err <= 1e-4, "{tag} logits: relative error {err:.2e}");
        }
    }
}

#[test]
fn b0_features_and_logits() {
    check("b0", EfficientNetConfig::b0(), true);
}

#[test]
fn b5_features() {
    check("b5", EfficientNetConfig::b5(), false);
}

#[test]
fn lite0_features_and_logits() {
    check("lite0", EfficientNetConfig::lite0(), true);
}

#[test]
fn missing_and_mismatched_tensors_are_named() {
    let fx = Fixture::load("backbone_b0.safetensors");
    let mut w = backbone_weights(&fx);
    w.remove("_blocks.3._bn1.running_var");
    let e = EfficientNet::load(EfficientNetConfig::b0(), &w, None).unwrap_err().to_string();
    assert!(e.contains("_blocks.3._bn1.running_var"), "{e}");
    // B0 weights are not B5 weights: the first mismatch is named with both shapes.
    let e = EfficientNet::load(EfficientNetConfig::b5(), &backbone_weights(&fx), Some(35)).unwrap_err().to_string();
    assert!(e.contains("_conv_stem.weight") && e.contains("[32, 3, 3, 3]") && e.contains("[48, 3, 3, 3]"), "{e}");
}
