//! Weights that would give wrong scores instead of errors: non-finite values, another network's tensors.

use std::collections::{BTreeMap, HashMap};

use candle_core::{Device, Tensor};
use csflow::extract::{load_backbone_weights, FeatureExtractor};
use csflow::io::{load_features, load_model, read_safetensors, write_safetensors};

fn fixtures() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// A NaN or an infinity among backbone weights is refused with the tensor's name; large and tiny finite
/// values load.
#[test]
fn non_finite_backbone_weights_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    for (bad, what) in [(f32::NAN, "NaN"), (f32::INFINITY, "inf"), (f32::NEG_INFINITY, "-inf")] {
        let path = dir.path().join(format!("{what}.safetensors"));
        let fine = Tensor::new(&[1f32, 2.0, 3.0], &Device::Cpu).unwrap();
        let damaged = Tensor::new(&[0.5f32, bad, 0.25], &Device::Cpu).unwrap();
        let tensors = BTreeMap::from([("_conv_stem.weight".to_string(), damaged), ("_bn0.bias".to_string(), fine)]);
        write_safetensors(&path, &tensors, HashMap::new()).unwrap();
        let err = load_backbone_weights(&path).unwrap_err().to_string();
        assert!(err.contains("_conv_stem.weight") && err.contains("NaN or infinite"), "{what}: {err}");
        assert!(err.contains(&path.display().to_string()), "{what}: {err}");
        // The file itself reads: a safetensors file may hold anything; the weight and model loaders refuse.
        assert!(read_safetensors(&path).is_ok());
    }
    let path = dir.path().join("finite.safetensors");
    let extreme = Tensor::new(&[1e30f32, -1e-30], &Device::Cpu).unwrap();
    write_safetensors(&path, &BTreeMap::from([("_conv_stem.weight".to_string(), extreme)]), HashMap::new()).unwrap();
    assert_eq!(load_backbone_weights(&path).unwrap()["_conv_stem.weight"].to_vec1::<f32>().unwrap(), [1e30, -1e-30]);
}

/// A model with one NaN among its flow's weights, and a features file with one, are refused by name.
#[test]
fn damaged_models_and_features_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    for (file, victim) in [("training_init.safetensors", None), ("test_features.safetensors", Some("scale_1"))] {
        let (mut tensors, meta) = read_safetensors(&fixtures().join(file)).unwrap();
        let name = victim.map(str::to_string).unwrap_or_else(|| {
            tensors.keys().find(|k| k.ends_with("conv_scale0_0.weight")).expect("a flow weight").clone()
        });
        let t = &tensors[&name];
        let mut v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        let mid = v.len() / 2;
        v[mid] = f32::NAN;
        let damaged = Tensor::from_vec(v, t.dims(), &Device::Cpu).unwrap();
        tensors.insert(name.clone(), damaged);
        let path = dir.path().join(file);
        write_safetensors(&path, &tensors, meta).unwrap();
        let err = match victim {
            None => load_model(&path).err().unwrap().to_string(),
            Some(_) => load_features(&path).err().unwrap().to_string(),
        };
        assert!(err.contains(&name) && err.contains("NaN or infinite") && err.contains(file), "{err}");
    }
}

/// EfficientNet-B weights given for a Lite network: their convolutions have Lite's shapes, so only the
/// squeeze-excitation tensors tell them apart.
#[test]
fn b_weights_are_not_taken_for_lite() {
    let t = Tensor::zeros((8, 32, 1, 1), candle_core::DType::F32, &Device::Cpu).unwrap();
    let weights = BTreeMap::from([("_blocks.0._se_reduce.weight".to_string(), t)]);
    let err = FeatureExtractor::new("efficientnet-lite0", &weights, None, [256, 256]).err().unwrap().to_string();
    assert!(err.contains("_se_reduce") && err.contains("efficientnet-lite0"), "{err}");
}

/// Metadata that would fail far from the file (an upside-down heatmap range failed when drawing, blaming the
/// image) is refused when the model loads, naming the file.
#[test]
fn damaged_metadata_is_refused_by_name() {
    let model = load_model(&fixtures().join("training_init.safetensors")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("edited.safetensors");
    let mut cases = Vec::new();
    let mut m = model.meta.clone();
    m.good_map_range = Some([3.0, 2.0]);
    cases.push((m, "good_map_range"));
    let mut m = model.meta.clone();
    m.good_product_range = Some([1.0, 0.5]);
    cases.push((m, "good_product_range"));
    for (meta, what) in cases {
        csflow::io::save_model(&path, &model.params, &model.other, &meta).unwrap();
        let err = load_model(&path).err().unwrap().to_string();
        assert!(err.contains("edited.safetensors") && err.contains(what), "{what}: {err}");
    }
    let mut meta = model.meta.clone();
    meta.good_map_range = Some([2.0, 3.0]);
    csflow::io::save_model(&path, &model.params, &model.other, &meta).unwrap();
    assert_eq!(load_model(&path).unwrap().meta.good_map_range, Some([2.0, 3.0]));
}
