use std::collections::BTreeMap;

use candle_core::{DType, Tensor};
use csflow_kernels::{
    conv2d_act, stem_conv, Activation, DepthwiseWeights, InvertedResidual, Padding, PointwiseWeights,
};

use super::config::{same_padding, EfficientNetConfig};
use crate::{Error, Result};

/// BatchNorm epsilon of both packages.
const BN_EPS: f64 = 1e-3;

/// A bias-free convolution with its BatchNorm folded in: w' = w * g / sqrt(v + eps), b' = beta - m * g / sqrt(v + eps).
#[derive(Clone, Debug)]
pub(crate) struct ConvBn {
    pub weight: Tensor,
    pub bias: Tensor,
    pub stride: usize,
    pub pad: Padding,
}

/// Looks tensors up by their PyTorch names, with errors that name the missing or mismatched one.
pub(crate) struct Weights<'a>(pub &'a BTreeMap<String, Tensor>);

/// One MBConv block with its BatchNorms folded, as plain tensors: what [`EfficientNet::load`] packs for the
/// kernels and what the ONNX export writes.
pub(crate) struct FoldedBlock {
    pub expand: Option<ConvBn>,
    pub depthwise: ConvBn,
    pub se: Option<SqueezeExcite>,
    pub project: ConvBn,
    pub skip: bool,
}

impl Weights<'_> {
    fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self.0.get(name).ok_or_else(|| Error::Invalid(format!("missing tensor `{name}`")))?;
        if t.dims() != shape {
            return Err(Error::Invalid(format!("tensor `{name}` has shape {:?}, expected {shape:?}", t.dims())));
        }
        Ok(t.to_dtype(DType::F32)?)
    }

    /// Conv `conv` ([out, in/groups, k, k], no bias) followed by BatchNorm `bn`, folded.
    fn conv_bn(&self, conv: &str, bn: &str, shape: [usize; 4], stride: usize, pad: Padding) -> Result<ConvBn> {
        let out = shape[0];
        let w = self.get(&format!("{conv}.weight"), &shape)?.to_dtype(DType::F64)?;
        let g = self.get(&format!("{bn}.weight"), &[out])?.to_dtype(DType::F64)?;
        let beta = self.get(&format!("{bn}.bias"), &[out])?.to_dtype(DType::F64)?;
        let mean = self.get(&format!("{bn}.running_mean"), &[out])?.to_dtype(DType::F64)?;
        let var = self.get(&format!("{bn}.running_var"), &[out])?.to_dtype(DType::F64)?;
        let scale = (g / (var + BN_EPS)?.sqrt()?)?;
        let weight = w.broadcast_mul(&scale.reshape((out, 1, 1, 1))?)?.to_dtype(DType::F32)?;
        let bias = (beta - (mean * &scale)?)?.to_dtype(DType::F32)?;
        Ok(ConvBn { weight, bias, stride, pad })
    }

    /// The stem convolution, folded.
    pub(crate) fn stem(&self, config: &EfficientNetConfig) -> Result<ConvBn> {
        let n = config.native_size;
        self.conv_bn("_conv_stem", "_bn0", [config.stem_channels, 3, 3, 3], 2, pad2([n, n], 3, 2))
    }

    /// Block `i` of `config` (`_blocks.{i}.*`), folded.
    pub(crate) fn block(&self, config: &EfficientNetConfig, i: usize) -> Result<FoldedBlock> {
        let b = &config.blocks[i];
        let p = format!("_blocks.{i}");
        let mid = b.input_filters * b.expand_ratio;
        let one = Padding::symmetric(0);
        let expand = (b.expand_ratio != 1)
            .then(|| {
                self.conv_bn(&format!("{p}._expand_conv"), &format!("{p}._bn0"), [mid, b.input_filters, 1, 1], 1, one)
            })
            .transpose()?;
        let shape = [mid, 1, b.kernel, b.kernel];
        let pad = pad2(b.native_in, b.kernel, b.stride);
        let depthwise = self.conv_bn(&format!("{p}._depthwise_conv"), &format!("{p}._bn1"), shape, b.stride, pad)?;
        let se = match b.se_channels {
            Some(sq) => Some(SqueezeExcite {
                reduce_w: self.get(&format!("{p}._se_reduce.weight"), &[sq, mid, 1, 1])?.reshape((sq, mid))?,
                reduce_b: self.get(&format!("{p}._se_reduce.bias"), &[sq])?,
                expand_w: self.get(&format!("{p}._se_expand.weight"), &[mid, sq, 1, 1])?.reshape((mid, sq))?,
                expand_b: self.get(&format!("{p}._se_expand.bias"), &[mid])?,
            }),
            None => None,
        };
        let project =
            self.conv_bn(&format!("{p}._project_conv"), &format!("{p}._bn2"), [b.output_filters, mid, 1, 1], 1, one)?;
        Ok(FoldedBlock { expand, depthwise, se, project, skip: b.skip })
    }
}

impl ConvBn {
    /// Dense convolution (any kernel size), then the activation (the classifier head's 1x1).
    fn forward(&self, x: &Tensor, act: Activation) -> Result<Tensor> {
        let p = self.pad;
        let x = if p == Padding::symmetric(0) {
            x.clone()
        } else {
            x.pad_with_zeros(2, p.top, p.bottom)?.pad_with_zeros(3, p.left, p.right)?
        };
        Ok(conv2d_act(&x, &self.weight, &self.bias, self.stride, 0, act)?)
    }

    /// The stem's dense convolution (3 input channels, padding inside the kernel), then the activation.
    fn stem(&self, x: &Tensor, act: Activation) -> Result<Tensor> {
        Ok(stem_conv(x, &self.weight, &self.bias, self.stride, self.pad, act)?)
    }
}

/// Squeeze-excitation: channel gates from the spatial mean, through a swish bottleneck and a sigmoid. The
/// gates multiply the projection's input channels inside [`pointwise_conv`].
#[derive(Clone, Debug)]
pub(crate) struct SqueezeExcite {
    /// [squeezed, channels]
    pub reduce_w: Tensor,
    pub reduce_b: Tensor,
    /// [channels, squeezed]
    pub expand_w: Tensor,
    pub expand_b: Tensor,
}

impl SqueezeExcite {
    /// The gates [N, C] for the per-channel means [N, C] of the depthwise output.
    fn gates(&self, means: &Tensor) -> candle_core::Result<Tensor> {
        let s = means.matmul(&self.reduce_w.t()?)?.broadcast_add(&self.reduce_b)?.silu()?;
        let s = s.matmul(&self.expand_w.t()?)?.broadcast_add(&self.expand_b)?;
        (s.neg()?.exp()? + 1.0)?.recip() // sigmoid
    }
}

#[derive(Clone, Debug)]
struct MbConv {
    expand: Option<PointwiseWeights>,
    depthwise: DepthwiseWeights,
    stride: usize,
    pad: Padding,
    se: Option<SqueezeExcite>,
    project: PointwiseWeights,
    skip: bool,
}

/// An EfficientNet in inference form (BatchNorm folded). Blocks beyond the ones loaded are absent.
#[derive(Clone, Debug)]
pub struct EfficientNet {
    pub config: EfficientNetConfig,
    stem: ConvBn,
    blocks: Vec<MbConv>,
    /// Head conv and classifier, when loaded (for verification).
    head: Option<(ConvBn, Tensor, Tensor)>,
    act: Activation,
}

pub(crate) fn pad2(native: [usize; 2], k: usize, s: usize) -> Padding {
    let (top, bottom) = same_padding(native[0], k, s);
    let (left, right) = same_padding(native[1], k, s);
    Padding { top, bottom, left, right }
}

impl EfficientNet {
    /// Builds the network from PyTorch-named tensors (`_conv_stem.weight`, `_blocks.3._bn1.running_var`, ...).
    /// `last_block` limits loading to the blocks a feature tap needs; `None` loads all and the classifier.
    pub fn load(
        config: EfficientNetConfig,
        tensors: &BTreeMap<String, Tensor>,
        last_block: Option<usize>,
    ) -> Result<Self> {
        let w = Weights(tensors);
        let stem = w.stem(&config)?;
        let upto = last_block.unwrap_or(config.blocks.len() - 1);
        if upto >= config.blocks.len() {
            return Err(Error::Invalid(format!(
                "{} has blocks 0..={}, not {upto}",
                config.name,
                config.blocks.len() - 1
            )));
        }
        let mut blocks = Vec::new();
        for (i, b) in config.blocks.iter().enumerate().take(upto + 1) {
            // Packed block by block: the plain folded weights of one block at a time are alive.
            let f = w.block(&config, i)?;
            let pack = |c: &ConvBn| PointwiseWeights::new(&c.weight, &c.bias);
            blocks.push(MbConv {
                expand: f.expand.as_ref().map(pack).transpose()?,
                depthwise: DepthwiseWeights::new(&f.depthwise.weight, &f.depthwise.bias)?,
                stride: b.stride,
                pad: f.depthwise.pad,
                se: f.se,
                project: pack(&f.project)?,
                skip: f.skip,
            });
        }
        let head = if last_block.is_none() {
            let last = config.blocks.last().expect("blocks").output_filters;
            let h = config.head_channels;
            let conv = w.conv_bn("_conv_head", "_bn1", [h, last, 1, 1], 1, Padding::symmetric(0))?;
            Some((conv, w.get("_fc.weight", &[config.num_classes, h])?, w.get("_fc.bias", &[config.num_classes])?))
        } else {
            None
        };
        let act = if config.lite { Activation::Relu6 } else { Activation::Swish };
        Ok(Self { config, stem, blocks, head, act })
    }

    fn block(&self, b: &MbConv, x: Tensor) -> Result<Tensor> {
        let layers = InvertedResidual {
            expand: b.expand.as_ref(),
            depthwise: &b.depthwise,
            stride: b.stride,
            pad: b.pad,
            project: &b.project,
            act: self.act,
            skip: b.skip,
        };
        // The gates scale the projection's input and the skip connection is added in its epilogue.
        Ok(match &b.se {
            Some(se) => layers.forward_gated(&x, |means| se.gates(means))?,
            None => layers.forward(&x)?,
        })
    }

    /// The output of block `idx` for a normalized image batch [N, 3, H, W].
    pub fn features(&self, x: &Tensor, idx: usize) -> Result<Tensor> {
        Ok(self.features_of(std::slice::from_ref(x), idx)?.remove(0))
    }

    /// The output of block `idx` for each of several image batches (a pyramid's levels), block by block:
    /// each block's weights serve every input while they are in cache.
    pub fn features_of(&self, xs: &[Tensor], idx: usize) -> Result<Vec<Tensor>> {
        if idx >= self.blocks.len() {
            return Err(Error::Invalid(format!("block {idx} is not loaded ({} blocks)", self.blocks.len())));
        }
        let mut xs = xs.iter().map(|x| self.stem.stem(x, self.act)).collect::<Result<Vec<_>>>()?;
        for b in self.blocks.iter().take(idx + 1) {
            xs = xs.into_iter().map(|x| self.block(b, x)).collect::<Result<_>>()?;
        }
        Ok(xs)
    }

    /// ImageNet logits [N, classes] (needs the full network loaded).
    pub fn logits(&self, x: &Tensor) -> Result<Tensor> {
        let (conv, fc_w, fc_b) =
            self.head.as_ref().ok_or_else(|| Error::Invalid("the classifier head is not loaded".into()))?;
        let x = self.features(x, self.blocks.len() - 1)?;
        let x = conv.forward(&x, self.act)?.mean((2, 3))?;
        Ok(x.matmul(&fc_w.t()?)?.broadcast_add(fc_b)?)
    }
}
