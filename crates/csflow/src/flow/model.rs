use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};
use csflow_kernels::Precision;

use super::config::{FlowConfig, N_SCALES};
use super::coupling::Coupling;
use super::permutation::{block_permutations, inverse, Mt19937};
use crate::{Error, Result};

/// Named parameters, keyed by the authors' state_dict names.
pub type ParamMap = BTreeMap<String, Tensor>;

/// Fewest 2x2 output tiles (over the batch) for which an inference flow's convolutions take the Winograd
/// path where they also hold plain weights ([`CsFlow::for_inference`]): 9 tiles (the paper's 6x6 map) ran
/// 2-2.5x faster than im2col (1024 -> 304 channels, 3x3 and 5x5), 4 and 1 tiles (the CPU size's 4x4 and 2x2
/// maps at batch 1) slower.
pub const MIN_WINOGRAD_TILES: usize = 8;

/// 2x2 output tiles of n maps h x w: what a Winograd F(2x2, ·) convolution multiplies per position.
pub(crate) fn winograd_tiles(n: usize, h: usize, w: usize) -> usize {
    n * h.div_ceil(2) * w.div_ceil(2)
}

/// What the flow returns for a batch.
#[derive(Debug)]
pub struct FlowOutput {
    /// The latent maps per scale, [B, C, h_i, w_i].
    pub z: [Tensor; 3],
    /// log |det J| per sample and scale, [B, 3].
    pub logdet: Tensor,
}

/// The whole flow: per block a fixed channel permutation per scale, then a coupling layer.
#[derive(Clone, Debug)]
pub struct CsFlow {
    pub config: FlowConfig,
    blocks: Vec<Coupling>,
    perms: Vec<[Tensor; 3]>,
    inv_perms: Vec<[Tensor; 3]>,
}

fn index_tensors(p: &[Vec<usize>], device: &Device) -> Result<[Tensor; 3]> {
    let t = |v: &Vec<usize>| {
        let v: Vec<u32> = v.iter().map(|&i| i as u32).collect();
        Tensor::from_vec(v.clone(), v.len(), device)
    };
    Ok([t(&p[0])?, t(&p[1])?, t(&p[2])?])
}

impl CsFlow {
    /// Builds the flow from named parameters, checking every name and shape against the config.
    pub fn new(config: FlowConfig, params: &ParamMap) -> Result<Self> {
        config.validate()?;
        for (name, shape) in config.param_shapes() {
            let t = params.get(&name).ok_or_else(|| Error::Invalid(format!("missing parameter `{name}`")))?;
            if t.dims() != shape.as_slice() {
                return Err(Error::Invalid(format!("parameter `{name}` has shape {:?}, expected {shape:?}", t.dims())));
            }
            if t.dtype() != DType::F32 {
                return Err(Error::Invalid(format!("parameter `{name}` must be f32, is {:?}", t.dtype())));
            }
        }
        let device = params.values().next().map(|t| t.device().clone()).unwrap_or(Device::Cpu);
        let mut blocks = Vec::new();
        let (mut perms, mut inv_perms) = (Vec::new(), Vec::new());
        for b in 0..config.n_blocks() {
            let prefix = format!("module_list.{}", FlowConfig::module_index(b));
            blocks.push(Coupling::load(params, &prefix, config.clamp)?);
            let p = block_permutations(config.channels, b, N_SCALES);
            let inv: Vec<Vec<usize>> = p.iter().map(|p| inverse(p)).collect();
            perms.push(index_tensors(&p, &device)?);
            inv_perms.push(index_tensors(&inv, &device)?);
        }
        Ok(Self { config, blocks, perms, inv_perms })
    }

    /// The same flow with its weights prepared for inference: the 3x3 and 5x5 stride-1 ones for Winograd
    /// convolutions, the stride-2 ones onto small maps for [`csflow_kernels::conv_narrow`]. For scoring
    /// (values agree to rounding); such a flow has no gradients.
    ///
    /// `maps` are the latent map sizes [h, w] per scale when known (model files record them). Per stride-1
    /// layer, at the tiles of one image:
    /// - below `MIN_WINOGRAD_TILES` (8) 2x2 tiles, the transform beside weights packed for
    ///   [`csflow_kernels::conv_narrow`], which single images use: there the products read each transformed
    ///   weight for only 1-4 tiles, so they wait on memory, and the transform holds 16/9 (3x3) or 36/25 (5x5)
    ///   as many values; the packed weights are read once per image with a prefetch (`predict` at the CPU
    ///   size, maps 8, 4, 2: the flow 10.8 -> 7.2 ms against im2col on plain weights); batches take the
    ///   transform;
    /// - where the products can transform the weights slice by slice as they go
    ///   ([`csflow_kernels::WinogradWeights::plain_fuses`]), the plain weight only (9/16 or 25/36 of the
    ///   memory), unless those products would multiply in f32 and the transform is small (up to 8 MB: the
    ///   CPU-size flow) or their transformed input large (over 4 MB per image: the paper's 3x3 1024 -> 304
    ///   layers on 24x24), where the per-call transform costs more than it saves: the paper-size forward's
    ///   peak at batch 1 is 1.33 GB (1.18 GB all plain, 1.65 GB all transformed);
    /// - 5x5 layers on maps from 24x24 on: F(4x4, 5x5), transformed once (paper size: peak 1.54 GB);
    /// - under [`Precision::Bf16`], 3x3 weights that would stay plain: transformed and rounded to bfloat16
    ///   once, 8/9 of the plain weight's bytes;
    /// - elsewhere (the paper's 5x5 layers from 1024 channels on the 12x12 map) the transform, made once.
    ///
    /// Stride-2 layers onto maps of at most 36 pixels take the packed weights (see `subnet.rs`). Unknown
    /// sizes keep only the transforms (and the stride-2 layers plain). Freed memory is returned to the
    /// kernel layer by layer, so the process does not hold all plain weights and their transforms at once.
    pub fn for_inference(self, maps: Option<[[usize; 2]; 3]>) -> Result<Self> {
        self.for_inference_in(maps, Precision::F32)
    }

    /// [`CsFlow::for_inference`] in `precision`: with [`Precision::Bf16`] on CPUs with AVX512_BF16 the
    /// fused products of the 3x3 layers and the stride-2 layers onto maps past the narrow size round their
    /// operands to bfloat16 and the packed weights of the narrow products are held in f16 (11 significant
    /// bits, 3x3 and 5x5), scores within 4.3e-4 relative of
    /// f32's in the tests; the 5x5 Winograd products stay f32 (in bfloat16 they moved scores by 1.4e-3, see
    /// `tests/flow_parity.rs`).
    pub fn for_inference_in(mut self, maps: Option<[[usize; 2]; 3]>, precision: Precision) -> Result<Self> {
        let tiles = maps.map(|m| m.map(|[h, w]| winograd_tiles(1, h, w)));
        crate::memory::release_freed_memory();
        for b in &mut self.blocks {
            b.s1.prepare_for_inference(tiles, precision)?;
            b.s2.prepare_for_inference(tiles, precision)?;
        }
        Ok(self)
    }

    /// Fresh parameters with PyTorch's default `Conv2d` ranges (uniform in +-1/sqrt(fan_in) for weights and
    /// biases) and all gammas 0, so the untrained flow is the identity. Seeded and reproducible.
    pub fn init_params(config: &FlowConfig, seed: u64, device: &Device) -> Result<ParamMap> {
        let mut rng = Mt19937::new((seed ^ (seed >> 32)) as u32);
        let mut params = ParamMap::new();
        let shapes = config.param_shapes();
        for (name, shape) in &shapes {
            let n: usize = shape.iter().product();
            let data: Vec<f32> = if name.contains(".gamma") {
                vec![0.0; n]
            } else {
                let wshape = if name.ends_with(".bias") {
                    &shapes.iter().find(|(w, _)| *w == name.replace(".bias", ".weight")).expect("weight of bias").1
                } else {
                    shape
                };
                let bound = 1.0 / ((wshape[1] * wshape[2] * wshape[3]) as f64).sqrt();
                (0..n).map(|_| ((rng.next_u32() as f64 / 4_294_967_296.0 * 2.0 - 1.0) * bound) as f32).collect()
            };
            params.insert(name.clone(), Tensor::from_vec(data, shape.as_slice(), device)?);
        }
        Ok(params)
    }

    /// Reads the config that a parameter set implies (the authors' state_dict carries no config): channels,
    /// hidden width and per-block kernel sizes from the tensors; the clamp is the authors' 3.
    pub fn config_from_params(params: &ParamMap) -> Result<FlowConfig> {
        let mut kernel_sizes = Vec::new();
        let (mut channels, mut hidden) = (0, 0);
        for b in 0.. {
            let name = format!("module_list.{}.s1.conv_scale0_0.weight", FlowConfig::module_index(b));
            let Some(w) = params.get(&name) else { break };
            let d = w.dims();
            if d.len() != 4 {
                return Err(Error::Invalid(format!("parameter `{name}` has shape {d:?}, expected 4 dimensions")));
            }
            if b == 0 {
                (hidden, channels) = (d[0], d[1] * 2);
            }
            kernel_sizes.push(d[2]);
        }
        if kernel_sizes.is_empty() {
            return Err(Error::Invalid(
                "no CS-Flow coupling block found (expected `module_list.4.s1.conv_scale0_0.weight`)".into(),
            ));
        }
        Ok(FlowConfig { channels, hidden, kernel_sizes, clamp: 3.0 })
    }

    /// Checks that `x` is three [B, C, h, w] maps with scale i twice the size of scale i + 1.
    pub fn check_input(&self, x: &[Tensor; 3]) -> Result<()> {
        let dims: Vec<&[usize]> = x.iter().map(|t| t.dims()).collect();
        let bad = || {
            Error::Invalid(format!(
            "flow input must be 3 maps [B, {}, h, w] with each scale half the size of the previous one, got {dims:?}",
            self.config.channels
        ))
        };
        for (i, d) in dims.iter().enumerate() {
            if d.len() != 4 || d[1] != self.config.channels || d[0] != dims[0][0] || d[2] == 0 || d[3] == 0 {
                return Err(bad());
            }
            if i > 0 && (dims[i - 1][2] != 2 * d[2] || dims[i - 1][3] != 2 * d[3]) {
                return Err(bad());
            }
        }
        Ok(())
    }

    pub fn forward(&self, x: &[Tensor; 3]) -> Result<FlowOutput> {
        csflow_kernels::on_worker(|| self.forward_here(x))
    }

    /// [`CsFlow::forward`] on the calling thread.
    fn forward_here(&self, x: &[Tensor; 3]) -> Result<FlowOutput> {
        self.check_input(x)?;
        let mut x = x.clone();
        let mut logdet: Option<Tensor> = None;
        for (block, perm) in self.blocks.iter().zip(&self.perms) {
            let permuted =
                [x[0].index_select(&perm[0], 1)?, x[1].index_select(&perm[1], 1)?, x[2].index_select(&perm[2], 1)?];
            let (y, jac) = block.forward(&permuted)?;
            logdet = Some(match logdet {
                None => jac,
                Some(l) => (l + jac)?,
            });
            x = y;
        }
        Ok(FlowOutput { z: x, logdet: logdet.expect("at least one block") })
    }

    /// Maps latents back to features: inverse(forward(x)) = x.
    pub fn inverse(&self, z: &[Tensor; 3]) -> Result<[Tensor; 3]> {
        self.check_input(z)?;
        let mut y = z.clone();
        for (block, inv) in self.blocks.iter().zip(&self.inv_perms).rev() {
            let x = block.inverse(&y)?;
            y = [x[0].index_select(&inv[0], 1)?, x[1].index_select(&inv[1], 1)?, x[2].index_select(&inv[2], 1)?];
        }
        Ok(y)
    }
}

/// z of all scales flattened per sample: [B, D].
pub fn flatten_z(z: &[Tensor; 3]) -> Result<Tensor> {
    let flat: Vec<Tensor> = z.iter().map(|t| t.flatten_from(1)).collect::<candle_core::Result<_>>()?;
    Ok(Tensor::cat(&flat, 1)?)
}

impl FlowOutput {
    /// Sample `i` of the batch, as a batch of one.
    pub fn sample(&self, i: usize) -> Result<FlowOutput> {
        let [a, b, c] = self.z.each_ref().map(|z| z.narrow(0, i, 1));
        Ok(FlowOutput { z: [a?, b?, c?], logdet: self.logdet.narrow(0, i, 1)? })
    }

    /// The training loss: mean over the batch of 0.5 * sum(z^2) - sum of log-dets, divided by D.
    pub fn loss(&self) -> Result<Tensor> {
        let flat = flatten_z(&self.z)?;
        let d = flat.dim(1)? as f64;
        let nll = ((flat.sqr()?.sum(1)? * 0.5)? - self.logdet.sum(1)?)?;
        Ok((nll.mean_all()? / d)?)
    }
}
