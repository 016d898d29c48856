//! ONNX export (`csflow export`): a model file's backbone, flow and scores as one ONNX graph (opset 17), for
//! ONNX Runtime, OpenVINO, TensorRT and the like.
//!
//! Input `image` `[N, 3, H, W]` (float32, N given at run time): RGB at the model's input size, prepared as
//! csflow prepares it (antialiased bilinear resize as Pillow's, / 255, minus the ImageNet mean, over its
//! standard deviation). The graph makes the three-scale nearest pyramid, runs the backbone (BatchNorm folded)
//! to the feature block on each scale and the flow on the features. Outputs: `score` `[N]` (mean of z²/2 over
//! all latents, csflow's image score) and `map_scale0`..`map_scale2` `[N, 1, h_s, w_s]` (mean over channels of
//! z_s²): csflow's anomaly map is `map_scale0` resized to the image (bilinear, half-pixel centres), or with
//! `--map-mode product` the product of the three so resized. Weights keep their PyTorch names (`backbone.`
//! and the authors' `module_list.` names); the model's threshold and score statistics are in the metadata.

mod onnx;

use csflow_kernels::{Padding, SOFT_CLAMP_SLOPE};

use crate::backbone::{ConvBn, EfficientNetConfig, Weights};
use crate::flow::permutation::block_permutations;
use crate::flow::FlowConfig;
use crate::io::ModelFile;
use crate::{Error, Result};
use onnx::{Attr, Dim, Graph};

/// The ONNX file's bytes for `model`, which must hold its backbone (written by `csflow fit --data`).
pub fn export_onnx(model: &ModelFile) -> Result<Vec<u8>> {
    let bb = model.meta.backbone.as_ref().ok_or_else(|| {
        Error::Invalid("this model holds no backbone (it was trained on a features file): nothing to export".into())
    })?;
    let config = EfficientNetConfig::from_name(&bb.name)?;
    if bb.block >= config.blocks.len() {
        return Err(Error::Invalid(format!("{} has no block {}", config.name, bb.block)));
    }
    let flow = &model.meta.flow;
    flow.validate()?;
    if config.channels_at(bb.block) != flow.channels {
        return Err(Error::Invalid(format!(
            "the backbone gives {} channels but the flow expects {}",
            config.channels_at(bb.block),
            flow.channels
        )));
    }
    crate::extract::check_size(bb.input_size)?;
    let [h, w] = bb.input_size;
    let mut g = Graph::default();
    let image = g.input("image", &[Dim::Named("N"), Dim::Fixed(3), Dim::Fixed(h), Dim::Fixed(w)]);

    let weights = model.backbone_weights();
    let backbone = Backbone::new(&mut g, &config, &Weights(&weights), bb.block)?;
    let features: Vec<String> = (0..3)
        .map(|s| {
            let level = if s == 0 {
                image.clone()
            } else {
                // Nearest halving picks every 2^s-th row and column, from the first.
                let step = 1i64 << s;
                let (starts, ends, axes, steps) =
                    (g.ints(&[0, 0]), g.ints(&[i64::MAX, i64::MAX]), g.ints(&[2, 3]), g.ints(&[step, step]));
                g.node("Slice", &[&image, &starts, &ends, &axes, &steps], vec![])
            };
            backbone.forward(&mut g, &level)
        })
        .collect();

    // The feature block's stride: the stem's 2 times the blocks' strides (16 or 32); input sizes are
    // multiples of 128, so every level divides exactly.
    let stride = 2 * config.blocks[..=bb.block].iter().map(|b| b.stride).product::<usize>();
    let sizes: [[usize; 2]; 3] = std::array::from_fn(|s| [(h >> s) / stride, (w >> s) / stride]);
    let z = flow_graph(&mut g, flow, model, [&features[0], &features[1], &features[2]], sizes)?;
    let d: usize = sizes.iter().map(|[a, b]| flow.channels * a * b).sum();
    let sums: Vec<String> = z
        .iter()
        .map(|z| g.node("ReduceSumSquare", &[z], vec![Attr::Ints("axes", vec![1, 2, 3]), Attr::Int("keepdims", 0)]))
        .collect();
    let total = g.node("Sum", &[&sums[0], &sums[1], &sums[2]], vec![]);
    let scale = g.floats(&[(0.5 / d as f64) as f32], &[]);
    let score = g.node("Mul", &[&total, &scale], vec![]);
    g.output(&score, "score", &[Dim::Named("N")]);
    for (s, (z, [mh, mw])) in z.iter().zip(&sizes).enumerate() {
        let sq = g.node("Mul", &[z, z], vec![]);
        let map = g.node("ReduceMean", &[&sq], vec![Attr::Ints("axes", vec![1]), Attr::Int("keepdims", 1)]);
        let dims = [Dim::Named("N"), Dim::Fixed(1), Dim::Fixed(*mh), Dim::Fixed(*mw)];
        g.output(&map, &format!("map_scale{s}"), &dims);
    }

    let meta = &model.meta;
    let mut metadata = vec![
        ("backbone".to_string(), bb.name.clone()),
        ("feature_block".to_string(), bb.block.to_string()),
        ("input_size".to_string(), format!("{h}x{w}")),
        ("preprocessing".to_string(), "RGB, Pillow bilinear resize, /255, ImageNet mean and std".to_string()),
    ];
    let mut number = |k: &str, v: Option<f64>| {
        if let Some(v) = v {
            metadata.push((k.to_string(), format!("{v:?}")));
        }
    };
    number("threshold", meta.threshold);
    number("good_score_min", meta.good_min());
    number("good_map_max", meta.good_map_range.map(|r| r[1]));
    let doc = "CS-Flow defect detection exported by csflow: image [N, 3, H, W] (normalised RGB) -> score [N], \
               map_scale0..2 [N, 1, h, w] (mean over channels of z^2)";
    g.encode(doc, &metadata)
}

/// A folded convolution's initializers, named `{prefix}.weight` and `.bias`, and how it is applied.
struct ConvInit {
    w: String,
    b: String,
    k: usize,
    stride: usize,
    pad: Padding,
    group: usize,
}

impl ConvInit {
    fn new(g: &mut Graph, prefix: &str, c: &ConvBn, depthwise: bool) -> Result<Self> {
        let (out, k) = (c.weight.dim(0)?, c.weight.dim(3)?);
        Ok(ConvInit {
            w: g.weight(&format!("{prefix}.weight"), &c.weight)?,
            b: g.weight(&format!("{prefix}.bias"), &c.bias)?,
            k,
            stride: c.stride,
            pad: c.pad,
            group: if depthwise { out } else { 1 },
        })
    }

    /// The convolution node on `x`.
    fn apply(&self, g: &mut Graph, x: &str) -> String {
        let pads = [self.pad.top, self.pad.left, self.pad.bottom, self.pad.right].map(|p| p as i64).to_vec();
        let attrs = vec![
            Attr::Ints("kernel_shape", vec![self.k as i64, self.k as i64]),
            Attr::Ints("strides", vec![self.stride as i64, self.stride as i64]),
            Attr::Ints("pads", pads),
            Attr::Int("group", self.group as i64),
        ];
        g.node("Conv", &[x, &self.w, &self.b], attrs)
    }
}

struct BlockInit {
    expand: Option<ConvInit>,
    depthwise: ConvInit,
    /// Squeeze-excitation's two 1x1 convolutions.
    se: Option<[ConvInit; 2]>,
    project: ConvInit,
    skip: bool,
}

/// The backbone's initializers (written once, used by every pyramid level) and activation.
struct Backbone {
    stem: ConvInit,
    blocks: Vec<BlockInit>,
    /// Clip's bounds for ReLU6 (Lite); swish without them.
    relu6: Option<(String, String)>,
}

impl Backbone {
    fn new(g: &mut Graph, config: &EfficientNetConfig, w: &Weights, last_block: usize) -> Result<Self> {
        let stem = ConvInit::new(g, "backbone._conv_stem", &w.stem(config)?, false)?;
        let mut blocks = Vec::new();
        for i in 0..=last_block {
            let f = w.block(config, i)?;
            let p = format!("backbone._blocks.{i}");
            let se = match &f.se {
                Some(se) => {
                    let one = Padding::symmetric(0);
                    let (sq, mid) = se.reduce_w.dims2()?;
                    let reduce = ConvBn {
                        weight: se.reduce_w.reshape((sq, mid, 1, 1))?,
                        bias: se.reduce_b.clone(),
                        stride: 1,
                        pad: one,
                    };
                    let expand = ConvBn {
                        weight: se.expand_w.reshape((mid, sq, 1, 1))?,
                        bias: se.expand_b.clone(),
                        stride: 1,
                        pad: one,
                    };
                    Some([
                        ConvInit::new(g, &format!("{p}._se_reduce"), &reduce, false)?,
                        ConvInit::new(g, &format!("{p}._se_expand"), &expand, false)?,
                    ])
                }
                None => None,
            };
            blocks.push(BlockInit {
                expand: f
                    .expand
                    .as_ref()
                    .map(|c| ConvInit::new(g, &format!("{p}._expand_conv"), c, false))
                    .transpose()?,
                depthwise: ConvInit::new(g, &format!("{p}._depthwise_conv"), &f.depthwise, true)?,
                se,
                project: ConvInit::new(g, &format!("{p}._project_conv"), &f.project, false)?,
                skip: f.skip,
            });
        }
        let relu6 = config.lite.then(|| (g.floats(&[0.0], &[]), g.floats(&[6.0], &[])));
        Ok(Backbone { stem, blocks, relu6 })
    }

    /// ReLU6 (Lite) or swish.
    fn act(&self, g: &mut Graph, x: &str) -> String {
        match &self.relu6 {
            Some((lo, hi)) => g.node("Clip", &[x, lo, hi], vec![]),
            None => {
                let s = g.node("Sigmoid", &[x], vec![]);
                g.node("Mul", &[x, &s], vec![])
            }
        }
    }

    /// The feature block's output for the image batch `x`.
    fn forward(&self, g: &mut Graph, x: &str) -> String {
        let y = self.stem.apply(g, x);
        let mut x = self.act(g, &y);
        for b in &self.blocks {
            let mut y = x.clone();
            if let Some(e) = &b.expand {
                let t = e.apply(g, &y);
                y = self.act(g, &t);
            }
            let t = b.depthwise.apply(g, &y);
            y = self.act(g, &t);
            if let Some([reduce, expand]) = &b.se {
                let m = g.node("GlobalAveragePool", &[&y], vec![]);
                let r = reduce.apply(g, &m);
                let r = self.act(g, &r);
                let e = expand.apply(g, &r);
                let gates = g.node("Sigmoid", &[&e], vec![]);
                y = g.node("Mul", &[&y, &gates], vec![]);
            }
            y = b.project.apply(g, &y);
            if b.skip {
                y = g.node("Add", &[&y, &x], vec![]);
            }
            x = y;
        }
        x
    }
}

/// Channels `from..from + n` of `x` [N, C, h, w].
fn channels(g: &mut Graph, x: &str, from: usize, n: usize) -> String {
    let (starts, ends, axes) = (g.ints(&[from as i64]), g.ints(&[(from + n) as i64]), g.ints(&[1]));
    g.node("Slice", &[x, &starts, &ends, &axes], vec![])
}

/// The flow on the three feature maps; returns z per scale. Initializers keep the authors' names.
fn flow_graph(
    g: &mut Graph,
    config: &FlowConfig,
    model: &ModelFile,
    x: [&str; 3],
    sizes: [[usize; 2]; 3],
) -> Result<[String; 3]> {
    let param = |g: &mut Graph, name: &str| -> Result<String> {
        let t = model.params.get(name).ok_or_else(|| Error::Invalid(format!("missing parameter `{name}`")))?;
        g.weight(name, t)
    };
    let half = config.channels / 2;
    let mut x: [String; 3] = x.map(String::from);
    let clamp = config.clamp;
    let (inv_clamp, out_scale) =
        (g.floats(&[(1.0 / clamp) as f32], &[]), g.floats(&[(clamp * SOFT_CLAMP_SLOPE) as f32], &[]));
    let (lo, hi) =
        (g.floats(&[-crate::flow::OUTPUT_LIMIT as f32], &[]), g.floats(&[crate::flow::OUTPUT_LIMIT as f32], &[]));
    // y = x · exp(a · 0.636 · atan(s / a)) + t, with [s | t] the subnet's output r.
    let affine = |g: &mut Graph, x: &str, r: &str| {
        let (s, t) = (channels(g, r, 0, half), channels(g, r, half, half));
        let u = g.node("Mul", &[&s, &inv_clamp], vec![]);
        let a = g.node("Atan", &[&u], vec![]);
        let l = g.node("Mul", &[&a, &out_scale], vec![]);
        let e = g.node("Exp", &[&l], vec![]);
        let y = g.node("Mul", &[x, &e], vec![]);
        g.node("Add", &[&y, &t], vec![])
    };
    for (b, &k) in config.kernel_sizes.iter().enumerate() {
        let perms = block_permutations(config.channels, b, 3);
        let permuted: Vec<String> = (0..3)
            .map(|s| {
                let idx = g.ints(&perms[s].iter().map(|&i| i as i64).collect::<Vec<_>>());
                g.node("Gather", &[&x[s], &idx], vec![Attr::Int("axis", 1)])
            })
            .collect();
        let prefix = format!("module_list.{}", FlowConfig::module_index(b));
        let x1: Vec<String> = permuted.iter().map(|p| channels(g, p, 0, half)).collect();
        let x2: Vec<String> = permuted.iter().map(|p| channels(g, p, half, half)).collect();
        let r2 = subnet(g, &format!("{prefix}.s2"), k, &x2, sizes, &param)?;
        let y1: Vec<String> = (0..3).map(|s| affine(g, &x1[s], &r2[s])).collect();
        let r1 = subnet(g, &format!("{prefix}.s1"), k, &y1, sizes, &param)?;
        x = std::array::from_fn(|s| {
            let y2 = affine(g, &x2[s], &r1[s]);
            let y = g.node("Concat", &[&y1[s], &y2], vec![Attr::Int("axis", 1)]);
            g.node("Clip", &[&y, &lo, &hi], vec![])
        });
    }
    Ok(x)
}

/// Bilinear upsampling by 2 with half-pixel centres (PyTorch's `align_corners=False`, source positions
/// clamped to the edges) along an axis of `n` values, as an [n, 2n] matrix: output j takes
/// in[floor(j / 2 - 1 / 4)] and its right neighbour with weights 3/4 and 1/4 or 1/4 and 3/4. As matrix
/// products rather than a Resize node, every runtime computes it alike (tract 0.21 extrapolates at the
/// edges instead of clamping).
fn up2_matrix(n: usize) -> Vec<f32> {
    let mut m = vec![0f32; n * 2 * n];
    for j in 0..2 * n {
        let src = ((j as f64 + 0.5) / 2.0 - 0.5).max(0.0);
        let left = (src.floor() as usize).min(n - 1);
        let right = (left + 1).min(n - 1);
        let frac = (src - left as f64) as f32;
        m[left * 2 * n + j] += 1.0 - frac;
        m[right * 2 * n + j] += frac;
    }
    m
}

/// A CrossConvolutions subnet (`prefix` = `module_list.4.s1`, ...) on three scales.
fn subnet(
    g: &mut Graph,
    prefix: &str,
    k: usize,
    x: &[String],
    sizes: [[usize; 2]; 3],
    param: &dyn Fn(&mut Graph, &str) -> Result<String>,
) -> Result<[String; 3]> {
    let same = Padding::symmetric(k / 2);
    let apply = |g: &mut Graph, name: &str, x: &str, stride: usize| -> Result<String> {
        let (w, b) = (param(g, &format!("{prefix}.{name}.weight"))?, param(g, &format!("{prefix}.{name}.bias"))?);
        Ok(ConvInit { w, b, k, stride, pad: same, group: 1 }.apply(g, x))
    };
    let mut h = Vec::new();
    for (s, x) in x.iter().enumerate() {
        let c = apply(g, &format!("conv_scale{s}_0"), x, 1)?;
        h.push(g.node("LeakyRelu", &[&c], vec![Attr::Float("alpha", crate::flow::LEAKY_SLOPE)]));
    }
    // Along the columns, then (transposed) along the rows: each product has its constant on the right, as a
    // linear layer does.
    let up = |g: &mut Graph, x: &str, [h, w]: [usize; 2]| {
        let (rows, cols) = (g.floats(&up2_matrix(h), &[h, 2 * h]), g.floats(&up2_matrix(w), &[w, 2 * w]));
        let y = g.node("MatMul", &[x, &cols], vec![]);
        let t = g.node("Transpose", &[&y], vec![Attr::Ints("perm", vec![0, 1, 3, 2])]);
        let z = g.node("MatMul", &[&t, &rows], vec![]);
        g.node("Transpose", &[&z], vec![Attr::Ints("perm", vec![0, 1, 3, 2])])
    };
    let own: Vec<String> = (0..3).map(|s| apply(g, &format!("conv_scale{s}_1"), &h[s], 1)).collect::<Result<_>>()?;
    let (u1, u2) = (up(g, &h[1], sizes[1]), up(g, &h[2], sizes[2]));
    let up10 = apply(g, "up_conv10", &u1, 1)?;
    let up21 = apply(g, "up_conv21", &u2, 1)?;
    let down01 = apply(g, "down_conv01", &h[0], 2)?;
    let down12 = apply(g, "down_conv12", &h[1], 2)?;
    let o0 = g.node("Add", &[&own[0], &up10], vec![]);
    let o1 = g.node("Add", &[&own[1], &down01], vec![]);
    let o1 = g.node("Add", &[&o1, &up21], vec![]);
    let o2 = g.node("Add", &[&own[2], &down12], vec![]);
    let mut out = Vec::new();
    for (s, o) in [o0, o1, o2].iter().enumerate() {
        let gamma = param(g, &format!("{prefix}.gamma{s}"))?;
        out.push(g.node("Mul", &[o, &gamma], vec![]));
    }
    Ok([out[0].clone(), out[1].clone(), out[2].clone()])
}
