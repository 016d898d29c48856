//! Shared test helpers: fixture loading, the seeded weight formula of reference/csflow_ref.py, errors.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use candle_core::{Device, Tensor};
use csflow::flow::{FlowConfig, ParamMap};

pub fn fixture_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

pub struct Fixture {
    pub tensors: HashMap<String, Tensor>,
    pub meta: HashMap<String, String>,
}

impl Fixture {
    pub fn load(name: &str) -> Self {
        let path = fixture_path(name);
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let (_, m) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        let meta = m.metadata().clone().unwrap_or_default();
        let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).unwrap();
        Self { tensors, meta }
    }

    pub fn t(&self, name: &str) -> &Tensor {
        self.tensors.get(name).unwrap_or_else(|| panic!("fixture has no tensor {name}"))
    }

    pub fn meta_usize(&self, key: &str) -> usize {
        self.meta[key].parse().unwrap()
    }

    pub fn meta_json<T: serde::de::DeserializeOwned>(&self, key: &str) -> T {
        serde_json::from_str(&self.meta[key]).unwrap()
    }
}

pub fn fnv1a64(s: &str) -> u64 {
    let mut h: u64 = 0xCBF2_9CE4_8422_2325;
    for b in s.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x100_0000_01B3);
    }
    h
}

pub fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// `formula_uniform` of csflow_ref.py: n values in (-1, 1) with 24-bit resolution, exact in f32.
pub fn formula_uniform(name: &str, n: usize, seed: u64) -> Vec<f32> {
    let key = fnv1a64(name) ^ seed;
    (0..n as u64)
        .map(|i| {
            let u = (splitmix64(key.wrapping_add(i)) >> 40) as f32 / (1u32 << 24) as f32;
            2.0 * u - 1.0
        })
        .collect()
}

/// The reference script's formula weights: bound * (2u - 1), u with 24 bits from splitmix64.
pub fn formula_params(config: &FlowConfig, seed: u64) -> ParamMap {
    let shapes = config.param_shapes();
    let shape_of = |n: &str| shapes.iter().find(|(m, _)| m == n).unwrap().1.clone();
    let mut out = ParamMap::new();
    for (name, shape) in &shapes {
        let bound = if name.ends_with(".gamma0") || name.ends_with(".gamma1") || name.ends_with(".gamma2") {
            1.0f32
        } else {
            let w = if name.ends_with(".bias") { shape_of(&name.replace(".bias", ".weight")) } else { shape.clone() };
            (1.0 / ((w[1] * w[2] * w[3]) as f64).sqrt()) as f32
        };
        let n: usize = shape.iter().product();
        let v: Vec<f32> = formula_uniform(name, n, seed).into_iter().map(|u| u * bound).collect();
        out.insert(name.clone(), Tensor::from_vec(v, shape.as_slice(), &Device::Cpu).unwrap());
    }
    out
}

/// Indices the reference stores for large tensors (`sample_index` in make_fixtures.py).
pub fn sample_index(name: &str, n: usize) -> Vec<usize> {
    let key = fnv1a64(&format!("sample:{name}"));
    (0..64u64).map(|i| (splitmix64(key.wrapping_add(i)) % n as u64) as usize).collect()
}

pub fn to_vec(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

/// max |a - b| / max |b|: the error relative to the reference tensor's scale.
pub fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    rel_err_vec(&to_vec(a), &to_vec(b))
}

pub fn rel_err_vec(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f64, |m, &x| m.max((x as f64).abs()));
    let diff = a.iter().zip(b).fold(0f64, |m, (&x, &y)| m.max((x as f64 - y as f64).abs()));
    if scale == 0.0 {
        diff
    } else {
        diff / scale
    }
}

/// The fixture script's `spread`: (centre, half width) per tensor role.
fn spread(name: &str, shape: &[usize]) -> (f32, f32) {
    if shape.len() >= 2 {
        let fan_in: usize = shape[1..].iter().product();
        return (0.0, (3.0 / fan_in as f64).sqrt() as f32);
    }
    if name.ends_with("running_var") || (name.ends_with(".weight") && name.contains("_bn")) {
        return (1.0, 0.5);
    }
    (0.0, 0.1)
}

/// A backbone fixture's weights, from the seeded formula and the shapes it records.
pub fn backbone_weights(fx: &Fixture) -> BTreeMap<String, Tensor> {
    let shapes: HashMap<String, Vec<usize>> = fx.meta_json("shapes");
    let seed = fx.meta_usize("seed") as u64;
    shapes
        .iter()
        .map(|(name, shape)| {
            let (c, h) = spread(name, shape);
            let v: Vec<f32> =
                formula_uniform(name, shape.iter().product(), seed).into_iter().map(|u| c + h * u).collect();
            (name.clone(), Tensor::from_vec(v, shape.as_slice(), &Device::Cpu).unwrap())
        })
        .collect()
}
