//! Backbone times (medians): three-scale extraction for B5 at 768 px and Lite0 at 256 px, and one depthwise
//! 5x5 convolution (240 channels, 96x96). PyTorch side: bench/backbone.py. Weights are random: time does not
//! depend on their values.
//! Run: `cargo bench -p csflow --bench backbone -- [reps]`.

use std::collections::BTreeMap;
use std::time::Instant;

use candle_core::{Device, Tensor};
use csflow::backbone::{EfficientNet, EfficientNetConfig};
use csflow_kernels::{depthwise_conv2d, Activation, Padding};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn time(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    median(
        (0..reps)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64()
            })
            .collect(),
    )
}

/// Random weights with the names and shapes a config needs (BatchNorm statistics near identity).
fn random_weights(c: &EfficientNetConfig) -> BTreeMap<String, Tensor> {
    let dev = Device::Cpu;
    let mut w = BTreeMap::new();
    let mut conv = |name: &str, shape: &[usize]| {
        let fan: usize = shape[1..].iter().product();
        w.insert(
            format!("{name}.weight"),
            (Tensor::randn(0f32, 1.0, shape, &dev).unwrap() / (fan as f64).sqrt()).unwrap(),
        );
    };
    conv("_conv_stem", &[c.stem_channels, 3, 3, 3]);
    let mut bns = vec![("_bn0".to_string(), c.stem_channels)];
    let mut biases = Vec::new();
    for (i, b) in c.blocks.iter().enumerate() {
        let mid = b.input_filters * b.expand_ratio;
        if b.expand_ratio != 1 {
            conv(&format!("_blocks.{i}._expand_conv"), &[mid, b.input_filters, 1, 1]);
            bns.push((format!("_blocks.{i}._bn0"), mid));
        }
        conv(&format!("_blocks.{i}._depthwise_conv"), &[mid, 1, b.kernel, b.kernel]);
        bns.push((format!("_blocks.{i}._bn1"), mid));
        if let Some(sq) = b.se_channels {
            conv(&format!("_blocks.{i}._se_reduce"), &[sq, mid, 1, 1]);
            conv(&format!("_blocks.{i}._se_expand"), &[mid, sq, 1, 1]);
            biases.push((format!("_blocks.{i}._se_reduce.bias"), sq));
            biases.push((format!("_blocks.{i}._se_expand.bias"), mid));
        }
        conv(&format!("_blocks.{i}._project_conv"), &[b.output_filters, mid, 1, 1]);
        bns.push((format!("_blocks.{i}._bn2"), b.output_filters));
    }
    for (name, n) in biases {
        w.insert(name, Tensor::zeros(n, candle_core::DType::F32, &dev).unwrap());
    }
    for (name, n) in bns {
        let ones = Tensor::ones(n, candle_core::DType::F32, &dev).unwrap();
        let zeros = Tensor::zeros(n, candle_core::DType::F32, &dev).unwrap();
        w.insert(format!("{name}.weight"), ones.clone());
        w.insert(format!("{name}.bias"), zeros.clone());
        w.insert(format!("{name}.running_mean"), zeros);
        w.insert(format!("{name}.running_var"), ones);
    }
    w
}

fn extraction(config: EfficientNetConfig, size: usize, reps: usize) -> f64 {
    let block = config.feature_block;
    let net = EfficientNet::load(config.clone(), &random_weights(&config), Some(block)).unwrap();
    let xs: Vec<Tensor> =
        (0..3).map(|s| Tensor::randn(0f32, 1.0, (1, 3, size >> s, size >> s), &Device::Cpu).unwrap()).collect();
    time(reps, || {
        for x in &xs {
            net.features(x, block).unwrap();
        }
    })
}

fn main() {
    csflow::memory::retain_freed_memory();
    let reps: usize = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(5);
    let dev = Device::Cpu;
    let x = Tensor::randn(0f32, 1.0, (1, 240, 96, 96), &dev).unwrap();
    let w = Tensor::randn(0f32, 0.2, (240, 1, 5, 5), &dev).unwrap();
    let b = Tensor::zeros(240, candle_core::DType::F32, &dev).unwrap();
    let dw = time(reps * 20, || {
        depthwise_conv2d(&x, &w, &b, 1, Padding::symmetric(2), Activation::Identity).unwrap();
    });
    println!("csflow threads {}: depthwise 5x5 240ch 96x96 {:.2} ms", rayon::current_num_threads(), dw * 1e3);
    if std::env::args().any(|a| a == "depthwise") {
        return;
    }
    println!("csflow lite0 256px 3 scales: {:.3} s", extraction(EfficientNetConfig::lite0(), 256, reps));
    println!("csflow b5 768px 3 scales: {:.3} s", extraction(EfficientNetConfig::b5(), 768, reps.min(3)));
}
