//! The ONNX export run by tract, an ONNX implementation independent of csflow's kernels: the graph's scores
//! and per-scale maps equal the detector's, on real photos, with Lite0's real weights (ReLU6, no
//! squeeze-excitation) and with B0's fixture weights (swish, squeeze-excitation, asymmetric "same" padding).

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;

use csflow::backbone::EfficientNetConfig;
use csflow::detector::Detector;
use csflow::export::export_onnx;
use csflow::extract::{load_backbone_weights, weights_up_to};
use csflow::flow::FlowConfig;
use csflow::io::{resize_rgb, to_normalized_tensor, BackboneMeta, ModelFile, ModelMeta};
use csflow::score::scale_maps;
use tract_onnx::prelude::*;

/// The backbone's parity bound against PyTorch (`backbone_parity.rs`, `real_images.rs`): the graph and
/// csflow differ by rounding in the backbone's blocks, carried through the flow (measured: 1.2e-5 at most).
const TOL: f64 = 1e-4;

fn asset(name: &str) -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../assets").join(name);
    assert!(p.exists(), "{} is missing: run scripts/setup.sh first", p.display());
    p
}

/// `backbone` (weights by PyTorch name) to its feature block at 256 px (latent maps 8, 4 and 2), then a
/// four-block flow with hidden width 32 and the reference script's formula weights (gammas up to 1, so every
/// cross-scale path counts). Not at 128 px: tract 0.21 corrupts its heap on the 5x5 convolution of a 1x1
/// map (OpenVINO computes that graph as csflow does).
fn model(backbone: Option<(&str, BTreeMap<String, candle_core::Tensor>)>, block: Option<usize>) -> ModelFile {
    let name = backbone.as_ref().map_or("efficientnet-lite0", |b| b.0);
    let config = EfficientNetConfig::from_name(name).unwrap();
    let block = block.unwrap_or(config.feature_block);
    let flow = FlowConfig::new(config.channels_at(block), 32);
    let mut meta = ModelMeta::new(flow.clone());
    let mut other = BTreeMap::new();
    if let Some((name, weights)) = backbone {
        other = weights_up_to(&weights, block).into_iter().map(|(k, v)| (format!("backbone.{k}"), v)).collect();
        meta.backbone =
            Some(BackboneMeta { name: name.into(), block, input_size: [256, 256], weights_hash: String::new() });
    }
    ModelFile { meta, params: common::formula_params(&flow, 11), other }
}

/// Exports `model`, runs the graph in tract on two photo crops at once, and compares with csflow; `map` is
/// the size of the largest latent map.
fn check(model: ModelFile, map: usize) {
    let bytes = export_onnx(&model).unwrap();
    let images: Vec<image::RgbImage> = [("brick.png", 40, 100), ("gravel.png", 200, 10)]
        .iter()
        .map(|&(name, x, y)| {
            let img = image::open(asset(name)).unwrap().to_rgb8();
            image::imageops::crop_imm(&img, x, y, 300, 260).to_image()
        })
        .collect();
    let input: Vec<f32> = images
        .iter()
        .flat_map(|i| common::to_vec(&to_normalized_tensor(&resize_rgb(i, 256, 256).unwrap()).unwrap()))
        .collect();
    let detections = Detector::from_model(model).unwrap().detect_batch(images).unwrap();

    let onnx = tract_onnx::onnx()
        .model_for_read(&mut bytes.as_slice())
        .unwrap()
        .with_input_fact(0, f32::fact([2, 3, 256, 256]).into())
        .unwrap()
        .into_optimized()
        .unwrap()
        .into_runnable()
        .unwrap();
    let x = tract_ndarray::Array4::from_shape_vec((2, 3, 256, 256), input).unwrap();
    let out = onnx.run(tvec!(x.into_tensor().into())).unwrap();
    let values = |i: usize| out[i].to_array_view::<f32>().unwrap().iter().copied().collect::<Vec<f32>>();

    let scores = values(0);
    assert_eq!(scores.len(), 2);
    for (d, &s) in detections.iter().zip(&scores) {
        let err = ((s - d.score) / d.score).abs() as f64;
        assert!(err < TOL, "score {s} from ONNX, {} from csflow ({err:.1e})", d.score);
    }
    for (scale, size) in [(0, map), (1, map / 2), (2, map / 4)] {
        assert_eq!(out[1 + scale].shape(), &[2, 1, size, size]);
        let want: Vec<f32> =
            detections.iter().flat_map(|d| common::to_vec(&scale_maps(&d.output).unwrap()[scale])).collect();
        let err = common::rel_err_vec(&values(1 + scale), &want);
        assert!(err < TOL, "map of scale {scale}: {err:.1e}");
    }
}

#[test]
fn lite0_graph_scores_as_csflow() {
    let weights = load_backbone_weights(&asset("efficientnet-lite0-57934424.pth")).unwrap();
    check(model(Some(("efficientnet-lite0", weights)), None), 8);
}

/// A feature block at stride 16 (Lite0's block 10, 112 channels): latent maps 16, 8 and 4.
#[test]
fn lite0_stride_16_graph_scores_as_csflow() {
    let weights = load_backbone_weights(&asset("efficientnet-lite0-57934424.pth")).unwrap();
    check(model(Some(("efficientnet-lite0", weights)), Some(10)), 16);
}

#[test]
fn b0_graph_scores_as_csflow() {
    let fx = common::Fixture::load("backbone_b0.safetensors");
    check(model(Some(("efficientnet-b0", common::backbone_weights(&fx))), None), 8);
}

#[test]
fn a_model_without_backbone_is_refused() {
    let msg = export_onnx(&model(None, None)).unwrap_err().to_string();
    assert!(msg.contains("no backbone"), "{msg}");
    let mut beyond = model(None, None);
    beyond.meta.backbone = Some(BackboneMeta {
        name: "efficientnet-lite0".into(),
        block: 16,
        input_size: [256, 256],
        weights_hash: String::new(),
    });
    let msg = export_onnx(&beyond).unwrap_err().to_string();
    assert!(msg.contains("no block 16"), "{msg}");
}
