//! One workload per run, for bench/compare.py (which runs the same workloads in PyTorch and OpenVINO, each in
//! a fresh process, and measures peak memory): prints `{"median": seconds, "what": ...}`.
//! Run: `cargo bench -p csflow --bench workloads -- <workload> [reps]`; workloads: flow-forward-paper (batch 1),
//! flow-step-paper (batch 2), flow-forward-cpu / flow-step-cpu (C 192, hidden 256, maps 8/4/2, batch 16),
//! flow-forward-cpu-1[-bf16] (the same at batch 1, as `predict` runs it),
//! lite0-256 and b5-768 (three-scale extraction, batch 1), lite0-256-level0/1/2 and b5-768-level0/1/2 (one
//! level of it alone),
//! predict[-bf16] (one 512 px PNG to score and full-size map with Lite0 at 256 px and the CPU-size flow),
//! depthwise (5x5, 240 channels, 96x96), pointwise (the 1x1 layers of Lite0 at 256 px and B5 at 768 px, own
//! kernel against the `gemm` crate's product; a table on stderr, the kernel's total as the median),
//! flow-layers[-cpu[-1]] (each convolution shape of the paper-size flow at batch 1, or the CPU-size one at
//! batch 16 (`BATCH` in the environment for another) or 1, through each path: im2col, the narrow kernel, prepared Winograd weights transformed and kept
//! plain, stored in bfloat16 (3x3) or f16 (5x5); a table on stderr).
//! Weights are random (Lite0's are the real ones): time does not depend on their values. `BENCH_DIST=1` prints
//! the deciles of the repetitions' times on stderr.

use std::collections::BTreeMap;
use std::time::Instant;

use candle_core::{Device, Tensor};
use csflow::backbone::{EfficientNet, EfficientNetConfig};
use csflow::detector::Detector;
use csflow::extract::FeatureExtractor;
use csflow::flow::{CsFlow, FlowConfig, ParamMap};
use csflow::io::ModelMeta;
use csflow::score::MapMode;
use csflow::train::{TrainConfig, Trainer};
use csflow_kernels::{
    conv2d_act, conv_bf16, conv_narrow, conv_winograd, depthwise_conv2d, pointwise_conv, Activation, Bf16Weights,
    NarrowWeights, Padding, PointwiseWeights, Precision, WinogradWeights,
};

/// `BATCH` from the environment, else `default`.
fn batch(default: usize) -> usize {
    std::env::var("BATCH").ok().and_then(|b| b.parse().ok()).unwrap_or(default)
}

/// The median; with `BENCH_DIST` set, the deciles on stderr too (this VM's times are often bimodal).
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if std::env::var_os("BENCH_DIST").is_some() {
        let q: Vec<String> = (0..=10).map(|i| format!("{:.2}", v[(v.len() - 1) * i / 10] * 1e3)).collect();
        eprintln!("deciles ms: {}", q.join(" "));
    }
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

/// The three-level extraction as `fit`, `test` and `predict` run it (`FeatureExtractor::features`).
fn extraction(config: EfficientNetConfig, size: usize, reps: usize) -> f64 {
    let weights = if config.name == "efficientnet-lite0" { lite0_weights() } else { random_weights(&config) };
    let extractor = FeatureExtractor::new(&config.name, &weights, None, [size, size]).unwrap();
    let xs: Vec<Tensor> =
        (0..3).map(|s| Tensor::randn(0f32, 1.0, (1, 3, size >> s, size >> s), &Device::Cpu).unwrap()).collect();
    time(reps, || {
        extractor.features(&xs).unwrap();
    })
}

/// Flow parameters with non-zero gammas, so every convolution matters (gradients flow everywhere), as after
/// training.
fn flow_params(config: &FlowConfig) -> ParamMap {
    CsFlow::init_params(config, 0, &Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(n, t)| if n.contains("gamma") { (n, (t + 0.1).unwrap()) } else { (n, t) })
        .collect()
}

fn flow_input(config: &FlowConfig, batch: usize, map: usize) -> [Tensor; 3] {
    let x = |s: usize| Tensor::randn(0f32, 1.0, (batch, config.channels, map >> s, map >> s), &Device::Cpu).unwrap();
    [x(0), x(1), x(2)]
}

fn flow_forward(config: FlowConfig, batch: usize, map: usize, reps: usize, precision: Precision) -> f64 {
    // Prepared once, as a loaded model is (after the parameter map is gone, as there).
    let flow = CsFlow::new(config.clone(), &flow_params(&config)).unwrap();
    let flow = flow.for_inference_in(Some([0, 1, 2].map(|s| [map >> s; 2])), precision).unwrap();
    let x = flow_input(&config, batch, map);
    time(reps, || {
        flow.forward(&x).unwrap().z[0].sum_all().unwrap().to_scalar::<f32>().unwrap();
    })
}

fn flow_step(config: FlowConfig, batch: usize, map: usize, reps: usize) -> f64 {
    let mut trainer = Trainer::new(config.clone(), &flow_params(&config), &TrainConfig::paper()).unwrap();
    let x = flow_input(&config, batch, map);
    time(reps, || {
        trainer.step(&x).unwrap();
    })
}

/// One pyramid level of an extraction alone (Lite0: 256, 128 or 64 px; B5: 768, 384 or 192 px), on one worker
/// as `features` runs it.
fn level(config: EfficientNetConfig, size: usize, level: usize, reps: usize) -> f64 {
    let block = config.feature_block;
    let weights = if config.name == "efficientnet-lite0" { lite0_weights() } else { random_weights(&config) };
    let weights = csflow::extract::weights_up_to(&weights, block);
    let net = EfficientNet::load(config, &weights, Some(block)).unwrap();
    let x = Tensor::randn(0f32, 1.0, (1, 3, size >> level, size >> level), &Device::Cpu).unwrap();
    time(reps, || {
        csflow_kernels::on_worker(|| net.features(&x, block).unwrap());
    })
}

/// The real Lite0 weights (scripts/setup.sh): random ones give vanishing activations, and denormal numbers
/// would time something no user runs.
fn lite0_weights() -> BTreeMap<String, Tensor> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../assets/efficientnet-lite0-57934424.pth");
    csflow::extract::load_backbone_weights(std::path::Path::new(path)).expect("run scripts/setup.sh first")
}

/// `predict` on a folder: `batch` image files per [`Detector::detect_files`] call, each to its score and
/// full-size map; the time per image.
fn predict(image: &str, batch: usize, reps: usize, precision: Precision) -> f64 {
    let extractor = FeatureExtractor::new("efficientnet-lite0", &lite0_weights(), None, [256, 256]).unwrap();
    let flow_config = FlowConfig::new(extractor.channels(), 256);
    let flow = CsFlow::new(flow_config.clone(), &flow_params(&flow_config)).unwrap();
    // Lite0 at 256 px: latent maps 8, 4 and 2.
    let flow = flow.for_inference_in(Some([[8, 8], [4, 4], [2, 2]]), precision).unwrap();
    let det = Detector { extractor, flow, meta: ModelMeta::new(flow_config) };
    let paths = vec![std::path::Path::new(image); batch];
    time(reps, || {
        for d in det.detect_files(&paths) {
            d.unwrap().map_at_image_size(MapMode::Scale0).unwrap();
        }
    }) / batch as f64
}

/// Images per call in `predict-batch`, as `csflow predict --batch-size 8` (the default) scores a folder.
const PREDICT_BATCH: usize = 8;

fn main() {
    csflow::memory::retain_freed_memory();
    csflow::threads::settle_candle_workers();
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let workload = args.first().map(String::as_str).unwrap_or("flow-forward-cpu");
    let reps: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(3);
    let cpu = || FlowConfig::new(192, 256);
    let median = match workload {
        "flow-forward-paper" => flow_forward(FlowConfig::paper(), 1, 24, reps, Precision::F32),
        "flow-forward-paper-bf16" => flow_forward(FlowConfig::paper(), 1, 24, reps, Precision::Bf16),
        "flow-step-paper" => flow_step(FlowConfig::paper(), 2, 24, reps),
        "flow-forward-cpu" => flow_forward(cpu(), batch(16), 8, reps, Precision::F32),
        "flow-forward-cpu-bf16" => flow_forward(cpu(), batch(16), 8, reps, Precision::Bf16),
        "flow-step-cpu" => flow_step(cpu(), 16, 8, reps),
        "flow-forward-cpu-1" => flow_forward(cpu(), 1, 8, reps, Precision::F32),
        "flow-forward-cpu-1-bf16" => flow_forward(cpu(), 1, 8, reps, Precision::Bf16),
        "lite0-256" => extraction(EfficientNetConfig::lite0(), 256, reps),
        "lite0-256-level0" => level(EfficientNetConfig::lite0(), 256, 0, reps),
        "lite0-256-level1" => level(EfficientNetConfig::lite0(), 256, 1, reps),
        "lite0-256-level2" => level(EfficientNetConfig::lite0(), 256, 2, reps),
        "b5-768-level0" => level(EfficientNetConfig::b5(), 768, 0, reps),
        "b5-768-level1" => level(EfficientNetConfig::b5(), 768, 1, reps),
        "b5-768-level2" => level(EfficientNetConfig::b5(), 768, 2, reps),
        "b5-768" => extraction(EfficientNetConfig::b5(), 768, reps),
        "predict" | "predict-bf16" | "predict-batch" => {
            let default = concat!(env!("CARGO_MANIFEST_DIR"), "/../../assets/brick.png");
            let precision = if workload == "predict-bf16" { Precision::Bf16 } else { Precision::F32 };
            let batch = if workload == "predict-batch" { PREDICT_BATCH } else { 1 };
            predict(args.get(2).map(String::as_str).unwrap_or(default), batch, reps, precision)
        }
        "depthwise" => {
            let dev = Device::Cpu;
            let x = Tensor::randn(0f32, 1.0, (1, 240, 96, 96), &dev).unwrap();
            let w = Tensor::randn(0f32, 0.2, (240, 1, 5, 5), &dev).unwrap();
            let b = Tensor::zeros(240, candle_core::DType::F32, &dev).unwrap();
            time(reps, || {
                depthwise_conv2d(&x, &w, &b, 1, Padding::symmetric(2), Activation::Identity).unwrap();
            })
        }
        "pointwise" => pointwise(reps),
        "flow-layers" => flow_layers(FlowConfig::paper(), 1, 24, reps),
        "flow-layers-cpu" => flow_layers(cpu(), batch(16), 8, reps),
        "flow-layers-cpu-1" => flow_layers(cpu(), 1, 8, reps),
        other => {
            eprintln!("unknown workload `{other}`");
            std::process::exit(2);
        }
    };
    println!(r#"{{"median": {median}, "threads": {}}}"#, rayon::current_num_threads());
}

/// Each 1x1 layer shape (out, in, pixels) of Lite0 at 256 px and B5 at 768 px, timed (minimum of `reps`)
/// through [`pointwise_conv`] and through the im2col convolution's `gemm` product; prints one line per shape
/// and returns the kernel's total.
fn pointwise(reps: usize) -> f64 {
    let dev = Device::Cpu;
    let shapes = [
        (16, 32, 16384),
        (96, 16, 16384),
        (24, 96, 4096),
        (144, 24, 4096),
        (24, 144, 4096),
        (40, 144, 1024),
        (240, 40, 1024),
        (80, 240, 256),
        (480, 80, 256),
        (112, 480, 256),
        (672, 112, 256),
        (192, 672, 64),
        (1152, 192, 64),
        (192, 1152, 64),
        (144, 24, 147456),
        (40, 144, 36864),
        (240, 40, 36864),
        (384, 64, 9216),
        (64, 384, 9216),
        (768, 128, 2304),
        (128, 768, 2304),
        (1056, 176, 2304),
        (176, 1056, 2304),
        (1824, 304, 576),
        (304, 1824, 576),
    ];
    let min = |f: &mut dyn FnMut()| {
        f();
        (0..reps)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64()
            })
            .fold(f64::MAX, f64::min)
    };
    let mut total = 0.0;
    for (o, c, hw) in shapes {
        let x = Tensor::randn(0f32, 1.0, (1, c, hw, 1), &dev).unwrap();
        let w = Tensor::randn(0f32, 0.1, (o, c, 1, 1), &dev).unwrap();
        let b = Tensor::zeros(o, candle_core::DType::F32, &dev).unwrap();
        let packed = PointwiseWeights::new(&w, &b).unwrap();
        let ours = min(&mut || {
            pointwise_conv(&x, &packed, Activation::Relu6, None, None).unwrap();
        });
        let gemm = min(&mut || {
            conv2d_act(&x, &w, &b, 1, 0, Activation::Relu6).unwrap();
        });
        let gflops = |t: f64| 2.0 * (o * c * hw) as f64 / t / 1e9;
        eprintln!(
            "{o:>5} x {c:>5} x {hw:>6}: pointwise {:>8.3} ms {:>6.1} GFLOPS | gemm {:>8.3} ms {:>6.1} GFLOPS",
            ours * 1e3,
            gflops(ours),
            gemm * 1e3,
            gflops(gemm)
        );
        total += ours;
    }
    total
}

/// Each convolution shape of a flow's subnets (in, out, map, stride, count per subnet) at batch n, timed
/// (minimum of `reps`) with `copies` weight sets in turn so that, as in the flow, the weights come from memory
/// rather than cache: through the plain weights (im2col, or from 32 tiles Winograd with the weight transform
/// made per call, as in training) and, for stride-1 layers, through prepared Winograd weights, transformed
/// and kept plain. Prints one line per shape and returns the total of the faster of the first two over all
/// subnets (three 3x3 blocks, one 5x5).
fn flow_layers(config: FlowConfig, n: usize, map: usize, reps: usize) -> f64 {
    let dev = Device::Cpu;
    let mut total = 0.0;
    let (half, hidden) = (config.channels / 2, config.hidden);
    let c = config.channels;
    for (k, subnets) in [(3, 6), (5, 2)] {
        let shapes = [
            (half, hidden, map, 1, 1),
            (half, hidden, map / 2, 1, 1),
            (half, hidden, map / 4, 1, 1),
            (hidden, c, map, 1, 2),
            (hidden, c, map / 2, 1, 2),
            (hidden, c, map / 4, 1, 1),
            (hidden, c, map, 2, 1),
            (hidden, c, map / 2, 2, 1),
        ];
        let copies = 6;
        for (c, o, hw, stride, count) in shapes {
            let x = Tensor::randn(0f32, 1.0, (n, c, hw, hw), &dev).unwrap();
            let ws: Vec<Tensor> = (0..copies).map(|_| Tensor::randn(0f32, 0.02, (o, c, k, k), &dev).unwrap()).collect();
            let b = Tensor::zeros(o, candle_core::DType::F32, &dev).unwrap();
            let min = |run: &mut dyn FnMut(usize)| {
                run(0);
                (1..=reps)
                    .map(|i| {
                        let t = Instant::now();
                        run(i);
                        t.elapsed().as_secs_f64()
                    })
                    .fold(f64::MAX, f64::min)
            };
            let plain = min(&mut |i| {
                conv2d_act(&x, &ws[i % copies], &b, stride, k / 2, Activation::Identity).unwrap();
            });
            let out = hw / stride;
            let gflops = |t: f64| 2.0 * (n * o * c * k * k * out * out) as f64 / t / 1e9;
            let mut line = format!(
                "{k}x{k} {c:>5} -> {o:>5} on {hw:>2}x{hw:<2} stride {stride} (x{count}): plain {:>7.3} ms {:>6.1} GFLOPS",
                plain * 1e3,
                gflops(plain)
            );
            let mut best = plain;
            for half in [false, true] {
                let nws: Vec<_> = ws.iter().map(|w| NarrowWeights::new(w, &b, half).unwrap()).collect();
                let narrow = min(&mut |i| {
                    conv_narrow(&x, &nws[i % copies], stride, Activation::Identity).unwrap();
                });
                line += &format!(" | narrow{} {:>7.3} ms", if half { " f16" } else { "" }, narrow * 1e3);
            }
            if Precision::Bf16.supported() {
                let bws: Vec<_> = ws.iter().map(|w| Bf16Weights::new(w, &b).unwrap()).collect();
                let t = min(&mut |i| {
                    conv_bf16(&x, &bws[i % copies], stride, Activation::Identity).unwrap();
                });
                line += &format!(" | bf16 {:>7.3} ms", t * 1e3);
            }
            if stride == 1 {
                let us: Vec<_> = ws.iter().map(|w| WinogradWeights::new(w).unwrap().unwrap()).collect();
                let wino = min(&mut |i| {
                    conv_winograd(&x, &us[i % copies], &b, Activation::Identity).unwrap();
                });
                line += &format!(" | winograd {:>7.3} ms {:>6.1} direct-GFLOPS", wino * 1e3, gflops(wino));
                best = best.min(wino);
                let us: Vec<_> =
                    ws.iter().map(|w| WinogradWeights::plain(w, Precision::F32).unwrap().unwrap()).collect();
                let kept = min(&mut |i| {
                    conv_winograd(&x, &us[i % copies], &b, Activation::Identity).unwrap();
                });
                line += &format!(" | kept plain {:>7.3} ms", kept * 1e3);
                if WinogradWeights::plain_in_bf16(k, Precision::Bf16) {
                    let us: Vec<_> =
                        ws.iter().map(|w| WinogradWeights::plain(w, Precision::Bf16).unwrap().unwrap()).collect();
                    let t = min(&mut |i| {
                        conv_winograd(&x, &us[i % copies], &b, Activation::Identity).unwrap();
                    });
                    line += &format!(" | winograd bf16 {:>7.3} ms", t * 1e3);
                }
                let stored: Option<Vec<_>> = ws.iter().map(|w| WinogradWeights::stored_bf16(w).unwrap()).collect();
                if let Some(us) = stored {
                    let t = min(&mut |i| {
                        conv_winograd(&x, &us[i % copies], &b, Activation::Identity).unwrap();
                    });
                    line += &format!(" | stored bf16 {:>7.3} ms", t * 1e3);
                }
                for m in [2, 4] {
                    if k == 3 && m == 4 {
                        continue;
                    }
                    let stored: Option<Vec<_>> =
                        ws.iter().map(|w| WinogradWeights::stored_f16(w, m).unwrap()).collect();
                    if let Some(us) = stored {
                        let t = min(&mut |i| {
                            conv_winograd(&x, &us[i % copies], &b, Activation::Identity).unwrap();
                        });
                        line += &format!(" | F({m}x{m}) f16 {:>7.3} ms", t * 1e3);
                    }
                }
                if k == 5 {
                    for (name, plain) in [("F(4x4) transformed", false), ("F(4x4) plain", true)] {
                        let us: Vec<_> = ws
                            .iter()
                            .map(|w| {
                                let u = if plain {
                                    WinogradWeights::plain_tiles(w, Precision::F32, 4)
                                } else {
                                    WinogradWeights::new_tiles(w, 4)
                                };
                                u.unwrap().unwrap()
                            })
                            .collect();
                        let t = min(&mut |i| {
                            conv_winograd(&x, &us[i % copies], &b, Activation::Identity).unwrap();
                        });
                        line += &format!(" | {name} {:>7.3} ms", t * 1e3);
                    }
                }
            }
            eprintln!("{line}");
            total += best * (count * subnets) as f64;
        }
    }
    total
}
