use candle_core::Tensor;
use csflow_kernels::{
    bilinear_up2, conv_bf16, conv_narrow, leaky_relu, Activation, Bf16Weights, NarrowWeights, Precision,
    WinogradWeights,
};

use super::model::{winograd_tiles, ParamMap, MIN_WINOGRAD_TILES};
use crate::{Error, Result};

/// The ten convolutions of one subnet, by their names in the authors' state_dict.
pub(crate) const CONVS: [&str; 10] = [
    "conv_scale0_0",
    "conv_scale1_0",
    "conv_scale2_0",
    "conv_scale0_1",
    "conv_scale1_1",
    "conv_scale2_1",
    "up_conv10",
    "up_conv21",
    "down_conv01",
    "down_conv12",
];

pub(crate) const LEAKY_SLOPE: f32 = 0.1;

/// A 2-d convolution with bias and zero padding k/2 (PyTorch `nn.Conv2d(.., padding=k // 2)`).
#[derive(Clone, Debug)]
pub struct Conv2d {
    pub weight: ConvWeight,
    pub bias: Tensor,
    pub stride: usize,
}

/// A convolution's weight: as trained, or (3x3 and 5x5 stride-1 layers of a flow made for inference) its
/// Winograd transform instead, or packed for few output pixels where the layer's output map is small, or
/// both ([`CsFlow::for_inference`]).
///
/// [`CsFlow::for_inference`]: super::CsFlow::for_inference
#[derive(Clone, Debug)]
pub enum ConvWeight {
    Plain(Tensor),
    Winograd(WinogradWeights),
    /// Packed for [`conv_narrow`] (stride-2 layers onto small maps).
    Narrow(NarrowWeights),
    /// Two forms, taken by the 2x2 output tiles of a call's whole batch: `few` below `from`, `many` from
    /// there (one image and batches of them differ in which products run fastest).
    ByTiles {
        few: Box<ConvWeight>,
        many: Box<ConvWeight>,
        from: usize,
    },
    /// Rounded to bfloat16 for [`conv_bf16`] (stride-2 layers onto larger maps under [`Precision::Bf16`]).
    Bf16(Bf16Weights),
}

/// Output pixels per image up to which a stride-2 layer takes [`conv_narrow`]. One thread pair: paper size at
/// batch 1, 12x12 -> 6x6 3x3 1.55 -> 0.97 ms, 5x5 4.6 -> 2.1 ms; CPU size at batch 16 (input rows in blocks),
/// 8x8 -> 4x4 3x3 1.25 -> 0.85 ms, 5x5 1.93 -> 2.06 ms, 4x4 -> 2x2 0.54 -> 0.32 ms. Not onto 12x12 (144
/// pixels): the paper-size forward ran 3 % slower with it there (0.240 -> 0.247 s), though the layer alone
/// was as fast (3x3 2.67 vs 2.73 ms, 5x5 8.7 vs 7.7 ms).
const NARROW_MAX_PIXELS: usize = 36;

/// Winograd transforms up to this many bytes are kept even where the products could transform plain weights
/// as they go: at batch 1 on 8x8 maps (16 tiles) that per-call transform cost as much as the products
/// (3x3 96 -> 256: 0.130 ms against 0.063 with the transform kept), while the CPU-size flow's transforms
/// add some 30 MB. The paper size's (20-45 MB each) stay plain, for memory, and so do weights whose plain
/// products multiply in bfloat16 (CPU-size flow at batch 1 with `--precision bf16`: 7.4 ms plain, 7.8
/// transformed).
const KEEP_TRANSFORM_BYTES: usize = 8 << 20;

/// From this many bytes of transformed input per image the transform is kept too: the fused products read
/// that input once per 24 output channels and wait on it. The paper's 3x3 1024 -> 304 layers on 24x24 maps
/// (9.4 MB): 5.26 ms fused against 4.20 ms with the transform kept (Zen 5, 2 threads), for 9 MB more each.
const LARGE_INPUT_BYTES: usize = 4 << 20;

/// From this many 2x2 tiles per image (maps from 24x24 on) the 5x5 stride-1 layers take F(4x4, 5x5),
/// transformed once: 2.25x fewer products than F(2x2, 5x5), whose rounding it about doubles (paper-size
/// flow, f32: latents 1.0e-6 -> 3.2e-6 of the reference's, scores unchanged at 7e-8), for 64/25 of the plain
/// weight's memory (paper size, Zen 5, 2 threads: 5x5 1024 -> 304 on 24x24 10.4 -> 5.8 ms; the forward
/// 0.225 -> 0.204 s in f32, peak 1.36 -> 1.54 GB, below PyTorch's 1.66). On 12x12 maps (nine 4x4 tiles) it
/// ran as fast as F(2x2, 5x5) for 1.8x its memory (bfloat16 forward 0.148 against 0.149 s, peak 1.48
/// against 1.30 GB); on 6x6 maps F(4x4)'s four tiles, three quarters padding, cost more than they save.
const LARGE_TILES_FROM: usize = 144;

/// From this many bytes of a 5x5 layer's f32 F(2x2, 5x5) transform, under [`Precision::Bf16`] one f16
/// transform ([`f16_forms`]) serves every batch: half the bytes streamed per call, with the output channels in
/// the vector lanes, which few tiles fill as well as many. Paper size at batch 1 (22-45 MB each): the bf16
/// forward 0.151 -> 0.142 s with F(4x4, 5x5) on 24x24 maps and F(2x2, 5x5) on 12x12 and 6x6, then 0.128 s
/// with F(4x4, 5x5) on 12x12 too (Zen 5, 2 threads). Smaller ones (the CPU size's 3.5 and 7 MB) keep a second
/// form for batches: at batch 16 (256 tiles on 8x8 maps) the f16 products' scatters made the forward 4 %
/// slower than F(2x2, 5x5) in f32.
const F16_TRANSFORM_BYTES: usize = 16 << 20;

/// From this many 2x2 tiles per image (maps from 12x12 on) the f16 transforms for single images are F(4x4,
/// 5x5): with the output channels in the lanes, its nine 4x4 tiles on a 12x12 map cost no more per tile than
/// many (paper size, 1024 -> 304 on 12x12: 1.6 ms against 2.1 ms for F(2x2, 5x5) in f16 and 3.2 ms in f32).
const F16_LARGE_TILES_FROM: usize = 36;

/// 2x2 tiles of the input over a batch from which stride-2 layers onto small maps take bfloat16 products
/// under [`Precision::Bf16`] instead of the narrow ones (CPU size, 8x8 -> 4x4, batch 16: 3x3 0.80 -> 0.55
/// ms, 5x5 2.0 -> 1.6 ms; at batch 1 the narrow ones run as fast or faster): batches of 8 on 8x8 maps.
const BATCH_BF16_TILES_FROM: usize = 128;

/// Up to this many bytes of a 5x5 layer's F(4x4, 5x5) transform, a layer on maps below
/// [`LARGE_TILES_FROM`] keeps that transform too (in f16 under [`Precision::Bf16`]: [`f16_forms`]), for
/// batches of [`BATCH_LARGE_TILES_FROM`] tiles or more:
/// the CPU size's 8x8 maps at batch 16 (256 tiles), 96 -> 256 1.36 -> 0.85 ms and 256 -> 192 2.98 -> 1.45
/// ms (Zen 5, 2 threads; the forward at batch 16 0.060 -> 0.054 s in bf16, 0.065 -> 0.058 s in f32, on
/// folders in eights `predict` 2 % faster), while single images (16 tiles) run F(2x2, 5x5) faster; for 38 MB
/// more weights (peak of `predict` 361 -> 420 MiB). The paper size's (40-80 MB) are left out for memory.
const BATCH_LARGE_TILES_BYTES: usize = 16 << 20;

/// 2x2 tiles over a batch from which the layers of [`BATCH_LARGE_TILES_BYTES`] take F(4x4, 5x5): the CPU
/// size's 8x8 maps from batch 4, where it ran as fast or faster (64 tiles: 96 -> 256 0.35 against 0.38 ms,
/// 256 -> 192 0.50 against 0.68 ms; 32 tiles: about even).
const BATCH_LARGE_TILES_FROM: usize = 64;

/// Under [`Precision::Bf16`], the forms of a 5x5 stride-1 weight w for output maps of `t` 2x2 tiles per
/// image: transforms stored in f16 ([`WinogradWeights::stored_f16`]), F(4x4, 5x5) from
/// [`F16_LARGE_TILES_FROM`] tiles, else F(2x2, 5x5); large ones ([`F16_TRANSFORM_BYTES`]) for every batch,
/// smaller ones (the CPU size's) for single images, beside F(4x4, 5x5) for batches on maps from 4x4 (from
/// [`BATCH_LARGE_TILES_FROM`] tiles on maps from 8x8, [`MIN_WINOGRAD_TILES`] on 4x4 ones). `None` on CPUs
/// without AVX-512.
///
/// CPU size at batch 1 (Zen 5, 2 threads), f16 F(2x2, 5x5) against what f32 takes: 8x8 maps 96 -> 256
/// 0.13 against 0.17-0.32 ms (F(2x2, 5x5) in f32), 4x4 maps 256 -> 192 0.07 against 0.15 ms (the narrow
/// products), 2x2 maps 0.06-0.09 against 0.11-0.15 ms; at batch 16 on 4x4 maps F(4x4, 5x5) in f16 96 -> 256
/// 0.23 against 0.42 ms, 256 -> 192 0.41 against 0.72 ms.
fn f16_forms(w: &Tensor, t: usize) -> Result<Option<ConvWeight>> {
    let (cout, cin) = (w.dim(0)?, w.dim(1)?);
    let f16 = |m| Ok::<_, Error>(WinogradWeights::stored_f16(w, m)?.map(ConvWeight::Winograd));
    let Some(one) = f16(if t >= F16_LARGE_TILES_FROM { 4 } else { 2 })? else { return Ok(None) };
    let large = cout * cin * 36 * 4 >= F16_TRANSFORM_BYTES;
    let from = match t {
        _ if large || !(4..F16_LARGE_TILES_FROM).contains(&t) => return Ok(Some(one)),
        MIN_WINOGRAD_TILES.. => BATCH_LARGE_TILES_FROM,
        _ => MIN_WINOGRAD_TILES,
    };
    Ok(Some(match f16(4)? {
        Some(many) => ConvWeight::ByTiles { few: Box::new(one), many: Box::new(many), from },
        None => one,
    }))
}

impl Conv2d {
    fn load(params: &ParamMap, prefix: &str, stride: usize) -> Result<Self> {
        Ok(Self {
            weight: ConvWeight::Plain(get(params, &format!("{prefix}.weight"))?),
            bias: get(params, &format!("{prefix}.bias"))?,
            stride,
        })
    }

    /// Prepares the weight for calls without gradients whose output map has `tiles` 2x2 tiles per image
    /// where known: a 3x3 or 5x5 stride-1 weight for Winograd convolutions (5x5 from [`LARGE_TILES_FROM`]
    /// as F(4x4, 5x5); below [`MIN_WINOGRAD_TILES`] beside weights packed for [`conv_narrow`], which single
    /// images take; kept plain where the products fuse the weight's transform at that size, 9/16 or 25/36 of
    /// the memory, unless the transform is small or the input large ([`KEEP_TRANSFORM_BYTES`],
    /// [`LARGE_INPUT_BYTES`]), and there under [`Precision::Bf16`] transformed and rounded to bfloat16 once
    /// instead, 8/9 of the plain bytes; else transformed once; under [`Precision::Bf16`] 5x5 transforms in
    /// f16, [`f16_forms`]), a stride-2
    /// weight onto at most [`NARROW_MAX_PIXELS`] pixels packed for [`conv_narrow`]. The packed weights are
    /// f16 under [`Precision::Bf16`] where the CPU takes it, and there the other stride-2 weights (all of them
    /// where the map sizes are unknown) bfloat16 ([`conv_bf16`]; paper size, 24x24 -> 12x12: 3x3 2.43 -> 1.41
    /// ms, 5x5 8.1 -> 4.2 ms, Zen 5, 2 threads).
    fn prepare_for_inference(&mut self, tiles: Option<usize>, precision: Precision) -> Result<()> {
        let ConvWeight::Plain(w) = &self.weight else { return Ok(()) };
        let bf16 = precision == Precision::Bf16 && precision.supported();
        let narrow = || NarrowWeights::new(w, &self.bias, bf16);
        if self.stride == 2 {
            if tiles.is_some_and(|t| 4 * t <= NARROW_MAX_PIXELS) {
                let few = ConvWeight::Narrow(narrow()?);
                self.weight = match bf16 {
                    true => ConvWeight::ByTiles {
                        few: Box::new(few),
                        many: Box::new(ConvWeight::Bf16(Bf16Weights::new(w, &self.bias)?)),
                        from: BATCH_BF16_TILES_FROM,
                    },
                    false => few,
                };
            } else if bf16 {
                self.weight = ConvWeight::Bf16(Bf16Weights::new(w, &self.bias)?);
            }
            return Ok(());
        }
        if self.stride == 1 {
            let (cout, cin, k) = (w.dim(0)?, w.dim(1)?, w.dim(2)?);
            let positions = (k + 1) * (k + 1);
            // Whether the transform made once beats the fused products' per-call one (see the constants).
            let keep = |t: usize| {
                !WinogradWeights::plain_in_bf16(k, precision)
                    && (cout * cin * positions * 4 <= KEEP_TRANSFORM_BYTES
                        || cin * positions * t * 4 > LARGE_INPUT_BYTES)
            };
            if let Some(form) = tiles.filter(|_| bf16 && k == 5).map(|t| f16_forms(w, t)).transpose()?.flatten() {
                self.weight = form;
                return Ok(());
            }
            let prepared = match tiles {
                Some(t) if k == 5 && t >= LARGE_TILES_FROM => {
                    WinogradWeights::new_tiles(w, 4)?.map(ConvWeight::Winograd)
                }
                Some(t) if t < MIN_WINOGRAD_TILES => match WinogradWeights::new(w)? {
                    Some(u) => Some(ConvWeight::ByTiles {
                        few: Box::new(ConvWeight::Narrow(narrow()?)),
                        many: Box::new(ConvWeight::Winograd(u)),
                        from: MIN_WINOGRAD_TILES,
                    }),
                    None => None,
                },
                Some(t) if !keep(t) && WinogradWeights::plain_fuses(cin, k, t, precision) => {
                    let stored = if bf16 { WinogradWeights::stored_bf16(w)? } else { None };
                    match stored {
                        Some(u) => Some(u),
                        None => WinogradWeights::plain(w, precision)?,
                    }
                    .map(ConvWeight::Winograd)
                }
                _ => WinogradWeights::new(w)?.map(ConvWeight::Winograd),
            };
            // Batches of small maps: F(4x4, 5x5) beside (see the constants).
            let batched = match tiles {
                Some(t) if k == 5 && (MIN_WINOGRAD_TILES..LARGE_TILES_FROM).contains(&t) => {
                    let small = cout * cin * 64 * 4 <= BATCH_LARGE_TILES_BYTES;
                    if small {
                        WinogradWeights::new_tiles(w, 4)?
                    } else {
                        None
                    }
                }
                _ => None,
            };
            self.weight = match (prepared, batched) {
                (Some(few), Some(u)) => ConvWeight::ByTiles {
                    few: Box::new(few),
                    many: Box::new(ConvWeight::Winograd(u)),
                    from: BATCH_LARGE_TILES_FROM,
                },
                (Some(p), None) => p,
                (None, _) => return Ok(()),
            };
        }
        Ok(())
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_act(x, Activation::Identity)
    }

    /// The convolution then a leaky ReLU (fused into the convolution for inference).
    fn forward_leaky(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_act(x, Activation::LeakyRelu(LEAKY_SLOPE))
    }

    /// The convolution then `act` (identity or the subnet's leaky ReLU); differentiable with plain weights.
    fn forward_act(&self, x: &Tensor, act: Activation) -> Result<Tensor> {
        self.forward_with(&self.weight, x, act)
    }

    /// [`Conv2d::forward_act`] through one form of the weight.
    fn forward_with(&self, weight: &ConvWeight, x: &Tensor, act: Activation) -> Result<Tensor> {
        Ok(match weight {
            ConvWeight::Plain(w) => {
                let y = csflow_kernels::conv2d(x, w, &self.bias, self.stride, w.dim(2)? / 2)?;
                match act {
                    Activation::Identity => y,
                    Activation::LeakyRelu(slope) => leaky_relu(&y, slope)?,
                    other => unreachable!("the subnet applies only identity and leaky ReLU, not {other:?}"),
                }
            }
            ConvWeight::Winograd(u) => csflow_kernels::conv_winograd(x, u, &self.bias, act)?,
            ConvWeight::Narrow(w) => conv_narrow(x, w, self.stride, act)?,
            ConvWeight::Bf16(w) => conv_bf16(x, w, self.stride, act)?,
            ConvWeight::ByTiles { few, many, from } => {
                let (n, _, h, wd) = x.dims4()?;
                let form = if winograd_tiles(n, h, wd) >= *from { many } else { few };
                self.forward_with(form, x, act)?
            }
        })
    }
}

pub(crate) fn get(params: &ParamMap, name: &str) -> Result<Tensor> {
    params.get(name).cloned().ok_or_else(|| Error::Invalid(format!("missing parameter `{name}`")))
}

/// The CS-Flow subnet: per-scale convolutions plus up/down convolutions that exchange information between
/// neighbouring scales, scaled by learned gammas that start at 0 so the flow starts as the identity.
#[derive(Clone, Debug)]
pub struct CrossConvolutions {
    pub gamma: [Tensor; 3],
    pub conv_in: [Conv2d; 3],
    pub conv_out: [Conv2d; 3],
    pub up_conv10: Conv2d,
    pub up_conv21: Conv2d,
    pub down_conv01: Conv2d,
    pub down_conv12: Conv2d,
}

impl CrossConvolutions {
    /// Loads the subnet whose parameters start with `prefix` (e.g. `module_list.4.s1`).
    pub fn load(params: &ParamMap, prefix: &str) -> Result<Self> {
        let conv = |n: &str, stride| Conv2d::load(params, &format!("{prefix}.{n}"), stride);
        let gamma = |i: usize| get(params, &format!("{prefix}.gamma{i}"));
        Ok(Self {
            gamma: [gamma(0)?, gamma(1)?, gamma(2)?],
            conv_in: [conv("conv_scale0_0", 1)?, conv("conv_scale1_0", 1)?, conv("conv_scale2_0", 1)?],
            conv_out: [conv("conv_scale0_1", 1)?, conv("conv_scale1_1", 1)?, conv("conv_scale2_1", 1)?],
            up_conv10: conv("up_conv10", 1)?,
            up_conv21: conv("up_conv21", 1)?,
            down_conv01: conv("down_conv01", 2)?,
            down_conv12: conv("down_conv12", 2)?,
        })
    }

    /// Prepares the stride-1 convolutions for `tiles` per image on each scale, where known (see
    /// [`CsFlow::for_inference`]). Freed memory is returned to the kernel after each layer, so the process
    /// never holds more than one layer's plain weight beside the transforms (a transform is larger than the
    /// weight it replaces, so it cannot reuse the freed weight's place in the heap).
    ///
    /// [`CsFlow::for_inference`]: super::CsFlow::for_inference
    pub(crate) fn prepare_for_inference(&mut self, tiles: Option<[usize; 3]>, precision: Precision) -> Result<()> {
        let Self { conv_in, conv_out, up_conv10, up_conv21, down_conv01, down_conv12, .. } = self;
        // Each convolution with the scale of its output map (the up convolutions the finer one's, the down
        // convolutions the coarser one's).
        let [in0, in1, in2] = conv_in;
        let [out0, out1, out2] = conv_out;
        for (c, scale) in [
            (in0, 0),
            (in1, 1),
            (in2, 2),
            (out0, 0),
            (out1, 1),
            (out2, 2),
            (up_conv10, 0),
            (up_conv21, 1),
            (down_conv01, 1),
            (down_conv12, 2),
        ] {
            c.prepare_for_inference(tiles.map(|t| t[scale]), precision)?;
            crate::memory::release_freed_memory();
        }
        Ok(())
    }

    /// The largest scale runs beside the two smaller ones (as in extraction): each thread runs its own
    /// sequence of kernels and steals from the other's when done, instead of both meeting at every kernel's
    /// end on maps of 2x2 to 8x8.
    pub fn forward(&self, x: &[Tensor; 3]) -> Result<[Tensor; 3]> {
        let (h0, (h1, h2)) = rayon::join(
            || self.conv_in[0].forward_leaky(&x[0]),
            || (self.conv_in[1].forward_leaky(&x[1]), self.conv_in[2].forward_leaky(&x[2])),
        );
        let h = [h0?, h1?, h2?];
        let (o0, (o1, o2)) = rayon::join(|| self.output(0, &h), || (self.output(1, &h), self.output(2, &h)));
        Ok([o0?, o1?, o2?])
    }

    /// Scale `i` of the second layer: its own convolution plus those from the neighbouring scales, times gamma.
    fn output(&self, i: usize, h: &[Tensor; 3]) -> Result<Tensor> {
        let o = match i {
            0 => (self.conv_out[0].forward(&h[0])? + self.up_conv10.forward(&bilinear_up2(&h[1])?)?)?,
            1 => {
                ((self.conv_out[1].forward(&h[1])? + self.down_conv01.forward(&h[0])?)?
                    + self.up_conv21.forward(&bilinear_up2(&h[2])?)?)?
            }
            _ => (self.conv_out[2].forward(&h[2])? + self.down_conv12.forward(&h[1])?)?,
        };
        Ok(o.broadcast_mul(&self.gamma[i])?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
        let d = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        d / b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
    }

    /// Under bf16, 5x5 layers take f16 transforms (the outputs rounded: not the f32 forms' values, within 1e-2
    /// of the direct sum's largest; measured 2.9e-3 to 7.2e-3, the most for F(4x4, 5x5) on 4x4 maps): large
    /// ones on the paper's maps, smaller ones on the CPU size's for single images and, beside, for batches
    /// (from 64 tiles on 8x8 maps, 8 on 4x4 ones).
    #[test]
    fn bf16_takes_f16_transforms_for_5x5_layers() {
        if !Precision::Bf16.supported() {
            eprintln!("no AVX512_BF16 here: the f16 transforms are not made");
            return;
        }
        let dev = Device::Cpu;
        let large = [(128, 1024, 24, 1), (128, 1024, 12, 1), (128, 1024, 6, 1), (128, 1024, 12, 4)];
        let small = [(64, 96, 8, 1), (64, 96, 8, 4), (64, 96, 4, 1), (64, 96, 4, 2), (64, 96, 2, 3)];
        for (cout, cin, map, batch) in large.into_iter().chain(small) {
            let what = format!("{cout}x{cin} on {map}x{map} at batch {batch}");
            let x = Tensor::randn(0f32, 1.0, (batch, cin, map, map), &dev).unwrap().relu().unwrap();
            let conv = Conv2d {
                weight: ConvWeight::Plain(Tensor::randn(0f32, 0.02, (cout, cin, 5, 5), &dev).unwrap()),
                bias: Tensor::randn(0f32, 0.1, cout, &dev).unwrap(),
                stride: 1,
            };
            // candle's own convolution: the direct sum, independent of csflow's kernels.
            let ConvWeight::Plain(w) = &conv.weight else { unreachable!() };
            let direct = x.conv2d(w, 2, 1, 1, 1).unwrap().broadcast_add(&conv.bias.reshape((cout, 1, 1)).unwrap());
            let direct = direct.unwrap();
            let [f32s, bf16] = [Precision::F32, Precision::Bf16].map(|p| {
                let mut c = conv.clone();
                c.prepare_for_inference(Some(map * map / 4), p).unwrap();
                assert!(!matches!(c.weight, ConvWeight::Plain(_)));
                c.forward(&x).unwrap()
            });
            let (rounded, err) = (rel_err(&bf16, &f32s), rel_err(&bf16, &direct));
            assert!(rounded > 0.0 && err < 1e-2, "{what}: {rounded} from the f32 forms', error {err}");
            eprintln!("{what}: {rounded:e} from the f32 forms', {err:e} from the direct sum");
        }
    }
}
