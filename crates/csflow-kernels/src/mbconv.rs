//! The inverted-residual block of MobileNetV2 and EfficientNet without squeeze-excitation (1x1 expand,
//! depthwise, 1x1 project, skip) as one op, for inference: on large maps in bands of output rows, on maps of
//! 16x16 and smaller with vectors over channels ([`small`]), layer by layer in between.
//!
//! Layer by layer, a large expanded map (six times the block's channels: 6 MB in Lite0's second block at
//! 256 px) is written to freshly allocated memory that has long left the caches, read back by the depthwise
//! convolution, and its output makes the same trip to the projection. Here each thread takes a range of
//! output rows and walks it in bands: it expands only the input rows a band adds into a ring of rows (rows
//! the previous band's windows share stay where they are), copies each channel's rows into one padded plane
//! that stays in L1, convolves it into the band's depthwise output and projects that straight into the
//! block's output, skip included. The ring and the band's output are rewritten while still in cache.
//! Squeeze-excitation needs the whole depthwise output before the projection, so blocks with it stop the
//! bands there ([`InvertedResidual::depthwise_output`]: the expanded map is still never written whole) and
//! project once their gates are known; on small maps the gates come between the small path's two passes
//! ([`InvertedResidual::forward_gated`]). Bands do not pay on small maps: their layers stay in cache anyway
//! and their few rows per band would re-read the (then larger) weights too often.

#[cfg(target_arch = "x86_64")]
use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

use crate::{depthwise_conv2d, f32_slice, pointwise_conv, Activation, DepthwiseWeights, Padding, PointwiseWeights};

pub(crate) mod small;

/// One inverted-residual block's layers, for [`InvertedResidual::forward`].
#[derive(Clone, Copy, Debug)]
pub struct InvertedResidual<'a> {
    /// The 1x1 expansion; absent where the expand ratio is 1.
    pub expand: Option<&'a PointwiseWeights>,
    /// C the expanded channels.
    pub depthwise: &'a DepthwiseWeights,
    pub stride: usize,
    pub pad: Padding,
    pub project: &'a PointwiseWeights,
    /// After the expansion and after the depthwise convolution (the projection is linear).
    pub act: Activation,
    /// Adds the block's input to the projection (same shape).
    pub skip: bool,
}

/// Expanded bytes per sample from which the block runs in bands. Below, the layers' outputs are few enough to
/// stay in cache from one layer to the next (measured in the network: Lite0's blocks on 1-2 MB maps gain,
/// the 0.5-1 MB ones do not).
#[cfg(target_arch = "x86_64")]
const FUSE_BYTES: usize = 1 << 20;

/// Bytes of one thread's band buffers (the ring of expanded rows and the band's depthwise output). Larger
/// than L2: what matters is that they are rewritten while still in cache, where the layer-by-layer outputs
/// are written to memory and read back; larger bands repeat fewer halo rows. 256 KB and 1 MB measured
/// within the noise of each other, 2 MB slower.
#[cfg(target_arch = "x86_64")]
const BAND_BYTES: usize = 1 << 20;

/// Input maps of at least this many pixels take the bands in [`InvertedResidual::depthwise_output`]. B5 at
/// 768 px (its blocks have squeeze-excitation), 2 threads, interleaved medians: 0.254 -> 0.251 s from 96x96
/// on, 0.263 -> 0.260 s from 192x192 on (from 48x48 on 1.5 % slower: bands of 1056-1824 channels re-read
/// their weights), peak memory 325 -> 277 MiB (B5's 144-channel expansion at 384x384 is 85 MB).
#[cfg(target_arch = "x86_64")]
const SE_BAND_PIXELS: usize = 96 * 96;

/// Input maps of at most this many pixels run with vectors over channels ([`small`]): Lite0's blocks at 16x16
/// and smaller. At 16x16, per block in the network (one thread, minimum of 200): 480 channels 3x3 650 -> 560 us,
/// 672 channels 5x5 1207 -> 1152 us, 240 channels 5x5 237 -> 244 us; 32x32 maps gained nothing.
#[cfg(target_arch = "x86_64")]
const SMALL_PIXELS: usize = 256;

impl InvertedResidual<'_> {
    /// The block's output for x [N, C, H, W].
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        #[cfg(target_arch = "x86_64")]
        if crate::has_avx2_fma() {
            let (_, c, h, w) = x.dims4()?;
            if h * w <= SMALL_PIXELS {
                return self.fused(x, Path::Small { avx512: crate::has_avx512() });
            }
            if self.expand.map_or(c, |e| e.cout) * h * w * 4 >= FUSE_BYTES {
                return self.fused(x, Path::Banded(BAND_BYTES));
            }
        }
        self.layered(x)
    }

    /// The depthwise convolution's output (activated), the projection's input: for blocks with
    /// squeeze-excitation, whose gates need all of it before the projection. On maps from 96x96 on, in bands
    /// as [`InvertedResidual::forward`] runs (the expanded map is never written whole); else layer by layer.
    pub fn depthwise_output(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.depthwise_with_means(x)?.0)
    }

    /// [`InvertedResidual::depthwise_output`] and, from the bands, each (sample, channel)'s mean of it
    /// `[N, C]`, summed while each band's rows were in L1 (else `None`): at 768 px a pass over B5's
    /// depthwise outputs of 15-35 MB for the means was 2.3 % of the backbone.
    fn depthwise_with_means(&self, x: &Tensor) -> Result<(Tensor, Option<Tensor>)> {
        #[cfg(target_arch = "x86_64")]
        if crate::has_avx2_fma() && self.expand.is_some() {
            let (_, _, h, w) = x.dims4()?;
            if h * w >= SE_BAND_PIXELS {
                let (y, sums) = self.fused_with_sums(x, Path::Banded(BAND_BYTES), Until::Depthwise)?;
                let (n, c, ho, wo) = y.dims4()?;
                let means = sums.iter().map(|&s| (s / (ho * wo) as f64) as f32).collect();
                return Ok((y, Some(Tensor::from_vec(means, (n, c), x.device())?)));
            }
        }
        Ok((self.expanded_depthwise(x)?, None))
    }

    /// The block's sizes for an input of `xdims` and a depthwise weight of `wdims` with `bias` biases, or an
    /// error naming `name` and what does not chain.
    #[cfg(target_arch = "x86_64")]
    fn dims(&self, name: &str, xdims: &[usize], wdims: &[usize], bias: usize) -> Result<Dims> {
        let (&[n, cin, h, wd], &[c, one, k, kw]) = (xdims, wdims) else {
            candle_core::bail!(
                "{name}: expected x [N, C, H, W] and a depthwise weight [C, 1, k, k], got {xdims:?} and {wdims:?}"
            );
        };
        let expanded = self.expand.map_or(cin, |e| e.cout);
        if self.expand.is_some_and(|e| e.cin != cin) || c != expanded || self.project.cin != c {
            candle_core::bail!(
                "{name}: input channels {cin}, expansion {:?}, depthwise weight {:?} and projection from {} \
                 do not chain",
                self.expand.map(|e| (e.cin, e.cout)),
                wdims,
                self.project.cin
            );
        }
        if one != 1 || k != kw || k == 0 || bias != c {
            candle_core::bail!("{name}: depthwise weight {wdims:?} and bias {bias} for {c} channels");
        }
        if h == 0 || wd == 0 {
            candle_core::bail!("{name}: empty input {h}x{wd}");
        }
        let (ho, wo) = self.pad.output_size(name, h, wd, k, k, self.stride)?;
        let cout = self.project.cout;
        if cout == 0 {
            candle_core::bail!("{name}: the projection has no output channels");
        }
        if self.skip && (cout != cin || (ho, wo) != (h, wd)) {
            candle_core::bail!("{name}: a skip needs the output's shape, {cout}x{ho}x{wo}, to be the input's");
        }
        if !crate::has_avx2_fma() {
            candle_core::bail!("{name}: needs AVX2 and FMA");
        }
        Ok(Dims { n, cin, h, wd, c, k, cout, ho, wo })
    }

    /// The block with squeeze-excitation: `gates` maps the depthwise output's per-channel means `[N, C]` to
    /// the gates `[N, C]` that scale the projection's input. On maps of at most `SMALL_PIXELS` through the
    /// small-map path (the gates applied between its two passes: B5's 12x12 and 6x6 blocks, which layer by
    /// layer ran 1.5-2.5x slower), else [`InvertedResidual::depthwise_output`] and the gated projection.
    pub fn forward_gated(&self, x: &Tensor, gates: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
        #[cfg(target_arch = "x86_64")]
        if crate::has_avx2_fma() {
            let (_, _, h, w) = x.dims4()?;
            if h * w <= SMALL_PIXELS {
                let x = x.contiguous()?;
                let path = Path::Small { avx512: crate::has_avx512() };
                let panels = self.fused_to(&x, path, Until::Panels)?;
                let g = gates(&crate::reduce::pixel_means(&panels, self.depthwise.weight().dim(0)?)?)?.contiguous()?;
                return panels.apply_op3_no_bwd(&g, &x, &GatedProjection { block: *self, path });
            }
        }
        let (y, means) = self.depthwise_with_means(x)?;
        let g = gates(&match means {
            Some(m) => m,
            None => y.mean((2, 3))?,
        })?;
        pointwise_conv(&y, self.project, Activation::Identity, self.skip.then_some(x), Some(&g))
    }

    /// Expansion and depthwise convolution, one op after the other.
    fn expanded_depthwise(&self, x: &Tensor) -> Result<Tensor> {
        let expanded = match self.expand {
            Some(e) => pointwise_conv(x, e, self.act, None, None)?,
            None => x.clone(),
        };
        let (w, b) = (self.depthwise.weight(), self.depthwise.bias());
        depthwise_conv2d(&expanded, w, b, self.stride, self.pad, self.act)
    }

    /// One op after the other (mid-sized maps; CPUs without AVX2).
    fn layered(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.expanded_depthwise(x)?;
        pointwise_conv(&y, self.project, Activation::Identity, self.skip.then_some(x), None)
    }

    /// As one op, on `path`.
    #[cfg(target_arch = "x86_64")]
    fn fused(&self, x: &Tensor, path: Path) -> Result<Tensor> {
        self.fused_to(x, path, Until::Projection)
    }

    /// The block's layers up to `until` as one op, on `path`.
    #[cfg(target_arch = "x86_64")]
    fn fused_to(&self, x: &Tensor, path: Path, until: Until) -> Result<Tensor> {
        Ok(self.fused_with_sums(x, path, until)?.0)
    }

    /// [`InvertedResidual::fused_to`] and, until the depthwise output on the banded path, the sum of each
    /// (sample, channel) of it (else empty).
    #[cfg(target_arch = "x86_64")]
    fn fused_with_sums(&self, x: &Tensor, path: Path, until: Until) -> Result<(Tensor, Vec<f64>)> {
        let (w, b) = (self.depthwise.weight(), self.depthwise.bias());
        let op = Fused { block: *self, path, until, sums: Mutex::new(Vec::new()) };
        let y = x.contiguous()?.apply_op3_no_bwd(w, b, &op)?;
        Ok((y, op.sums.into_inner().unwrap_or_else(|poisoned| poisoned.into_inner())))
    }
}

/// Where the fused op stops: after the whole block, or at the depthwise output ([`Path::Banded`] only).
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Until {
    Projection,
    Depthwise,
    /// The small-map path's first pass: the depthwise output pixel-major in panels, `[N, Ho·Wo, C']` (C
    /// rounded up to whole panels, zero past C).
    Panels,
}

/// How the fused op walks a block.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy, Debug)]
enum Path {
    /// In bands of output rows whose buffers take at most this many bytes (tests make them as small as
    /// allowed).
    Banded(usize),
    /// With vectors over channels, 512 bits wide with `avx512` (the CPU must have it), else 256.
    Small { avx512: bool },
}

#[cfg(target_arch = "x86_64")]
struct Fused<'a> {
    block: InvertedResidual<'a>,
    path: Path,
    until: Until,
    /// Filled until the depthwise output on the banded path: the sum of each (sample, channel) of it.
    sums: Mutex<Vec<f64>>,
}

#[cfg(target_arch = "x86_64")]
/// A block's sizes: input [n, cin, h, wd], expanded channels c, kernel k, output [n, cout, ho, wo].
#[derive(Clone, Copy, Debug)]
struct Dims {
    n: usize,
    cin: usize,
    h: usize,
    wd: usize,
    c: usize,
    k: usize,
    cout: usize,
    ho: usize,
    wo: usize,
}

#[cfg(target_arch = "x86_64")]
impl CustomOp3 for Fused<'_> {
    fn name(&self) -> &'static str {
        "csflow-inverted-residual"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        let (x, w, b) = (f32_slice(xs, xl, name)?, f32_slice(ws, wl, name)?, f32_slice(bs, bl, name)?);
        let blk = &self.block;
        let dims = blk.dims(name, xl.dims(), wl.dims(), b.len())?;
        let Dims { n, c, cout, ho, wo, .. } = dims;
        if let (Path::Small { avx512 }, Until::Panels) = (self.path, self.until) {
            // SAFETY: the CPU supports AVX2 and FMA (and AVX-512 where the path says); the sizes are checked
            // above.
            let panels = unsafe { small::x86::panels(blk, dims, x, avx512) };
            let shape = Shape::from((n, ho * wo, c.div_ceil(small::CH) * small::CH));
            return Ok((CpuStorage::F32(panels), shape));
        }
        let channels = match self.until {
            Until::Projection | Until::Panels => cout,
            Until::Depthwise => c,
        };
        let mut out = crate::uninit(n * channels * ho * wo);
        if n > 0 {
            // SAFETY: the CPU supports AVX2 and FMA (and AVX-512 where the path says); the sizes are checked
            // above.
            match (self.path, self.until) {
                (Path::Banded(_), Until::Panels) => {
                    candle_core::bail!("{name}: only the small-map path stops at its panels")
                }
                (Path::Banded(band_bytes), until) => {
                    let mut sums = self.sums.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                    *sums = unsafe { x86::run(blk, band_bytes, dims, x, (w, b), &mut out, until) };
                }
                (Path::Small { avx512 }, Until::Projection) => unsafe {
                    small::x86::run(blk, dims, x, &mut out, avx512)
                },
                (Path::Small { .. }, Until::Depthwise) => {
                    candle_core::bail!("{name}: the small-map path stops at its panels, not the NCHW depthwise output")
                }
                (Path::Small { .. }, Until::Panels) => unreachable!("returned above"),
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((n, channels, ho, wo))))
    }
}

/// The small-map path's second pass with squeeze-excitation gates: panels `[N, Ho·Wo, C']` from its first,
/// gates `[N, C]`, the block's input x `[N, Cin, H, W]` (for its sizes and the skip).
#[cfg(target_arch = "x86_64")]
struct GatedProjection<'a> {
    block: InvertedResidual<'a>,
    path: Path,
}

#[cfg(target_arch = "x86_64")]
impl CustomOp3 for GatedProjection<'_> {
    fn name(&self) -> &'static str {
        "csflow-gated-projection"
    }

    fn cpu_fwd(
        &self,
        ps: &CpuStorage,
        pl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
        xs: &CpuStorage,
        xl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        let (panels, g, x) = (f32_slice(ps, pl, name)?, f32_slice(gs, gl, name)?, f32_slice(xs, xl, name)?);
        let blk = &self.block;
        let bias = blk.depthwise.bias().dim(0)?;
        let d = blk.dims(name, xl.dims(), blk.depthwise.weight().dims(), bias)?;
        let (hwo, cpad) = (d.ho * d.wo, d.c.div_ceil(small::CH) * small::CH);
        if pl.dims() != [d.n, hwo, cpad] || gl.dims() != [d.n, d.c] {
            candle_core::bail!("{name}: panels {:?} and gates {:?} for {d:?}", pl.dims(), gl.dims());
        }
        let Path::Small { avx512 } = self.path else {
            candle_core::bail!("{name}: only the small-map path projects panels");
        };
        // The gates scale a copy of the panels (a pass over C'·Ho·Wo values), not each broadcast input in the
        // product's inner loop.
        let mut scaled = panels.to_vec();
        for (s, sample) in scaled.chunks_exact_mut(hwo * cpad).enumerate() {
            let gates = &g[s * d.c..(s + 1) * d.c];
            for pixel in sample.chunks_exact_mut(cpad) {
                pixel.iter_mut().zip(gates).for_each(|(v, g)| *v *= g);
            }
        }
        let mut out = crate::uninit(d.n * d.cout * hwo);
        if d.n > 0 {
            // SAFETY: the CPU supports AVX2 and FMA (and AVX-512 where the path says, both checked by
            // `forward_gated`); the sizes are checked above.
            unsafe { small::x86::project(blk, d, &scaled, x, &mut out, avx512) };
        }
        Ok((CpuStorage::F32(out), Shape::from((d.n, d.cout, d.ho, d.wo))))
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use rayon::prelude::*;

    use super::{Dims, InvertedResidual, Until};
    use crate::depthwise::{grid_of, Phased, Plane, SLACK};
    use crate::gemm::SendPtr;
    use crate::pointwise::x86::{task as pointwise, Operands, Task};
    use crate::Activation;

    thread_local! {
        /// Each worker's band buffers (one channel's padded band, the ring of expanded rows, the band's depthwise
        /// output), kept between calls.
        static BANDS: std::cell::RefCell<[Vec<f32>; 3]> = const { std::cell::RefCell::new([Vec::new(), Vec::new(), Vec::new()]) };
    }

    /// Until the depthwise output, returns each (sample, channel)'s sum of it ([n][c]; else nothing).
    ///
    /// # Safety
    /// The CPU supports AVX2 and FMA; `dims` are x's, the depthwise weight's and out's sizes, checked; `out`
    /// holds the output of the layers `until` names.
    pub(super) unsafe fn run(
        blk: &InvertedResidual,
        band_bytes: usize,
        d: Dims,
        x: &[f32],
        dw: (&[f32], &[f32]),
        out: &mut [f32],
        until: Until,
    ) -> Vec<f64> {
        // Each sample's rows split into as many ranges as there are threads per sample: every range after
        // the first recomputes the expansion of k - stride rows its first band shares with the range before.
        let per_sample = rayon::current_num_threads().div_ceil(d.n).clamp(1, d.ho);
        let rows = d.ho.div_ceil(per_sample);
        let ranges: Vec<(usize, usize)> = (0..d.n).flat_map(|s| (0..d.ho).step_by(rows).map(move |y| (s, y))).collect();
        let dst = SendPtr(out.as_mut_ptr());
        let channels = if until == Until::Depthwise { d.c } else { d.cout };
        let to_out = until == Until::Depthwise;
        let per_range: Vec<(usize, Vec<f64>)> = ranges
            .into_par_iter()
            .map(|(sample, y0)| {
                let dst = &dst;
                let xs = &x[sample * d.cin * d.h * d.wd..(sample + 1) * d.cin * d.h * d.wd];
                let out = dst.0.add(sample * channels * d.ho * d.wo);
                let mut sums = vec![0.0; if to_out { d.c } else { 0 }];
                // SAFETY: the CPU supports AVX2 and FMA; this range alone writes output rows y0.. of its sample.
                unsafe { range(blk, band_bytes, d, xs, dw, out, y0..(y0 + rows).min(d.ho), until, &mut sums) };
                (sample, sums)
            })
            .collect();
        // The ranges' sums added in order, the same for any number of threads that gives the same ranges.
        let mut sums = vec![0.0; if to_out { d.n * d.c } else { 0 }];
        for (sample, range_sums) in per_range.into_iter().filter(|_| to_out) {
            for (s, r) in sums[sample * d.c..].iter_mut().zip(range_sums) {
                *s += r;
            }
        }
        sums
    }

    /// Output rows `ys` of one sample (`xs` its input, `out` its output), band by band: each band expands
    /// the input rows it adds into a ring of rows (row y in slot y % ring), then per channel copies the rows
    /// its windows read into one padded plane that stays in L1, convolves it into the band's depthwise
    /// output, and projects that (or, `until` the depthwise output, convolves into `out`).
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn range(
        blk: &InvertedResidual,
        band_bytes: usize,
        d: Dims,
        xs: &[f32],
        (dw_w, dw_b): (&[f32], &[f32]),
        out: *mut f32,
        ys: std::ops::Range<usize>,
        until: Until,
        sums: &mut [f64],
    ) {
        let (s, k, pad, c, wd) = (blk.stride, d.k, blk.pad, d.c, d.wd);
        // The most output rows per band whose ring and depthwise output fit, but at least the depthwise
        // kernel's block of rows (one-row bands left its FMA chains waiting): r rows read (r - 1) s + k rows.
        let to_out = until == Until::Depthwise;
        let bytes = |r: usize| 4 * c * (((r - 1) * s + k) * wd + if to_out { 0 } else { r * d.wo });
        let mut band = MIN_ROWS.min(ys.len());
        while band < ys.len() && bytes(band + 1) <= band_bytes {
            band += 1;
        }
        // Whole blocks of the depthwise kernel's rows: a leftover row runs on two accumulator chains, waiting on
        // FMA latency (Lite0's first block at 256 px: depthwise 397 -> 350 us).
        if band < ys.len() && band > MIN_ROWS {
            band -= band % MIN_ROWS;
        }
        let ring = (band - 1) * s + k;
        let phased = Phased::new(s, pad, wd, ring);
        let taps = phased.taps(k, k);
        let grid = grid_of(&taps, phased.row_step());
        let [mut plane, mut rows, mut convolved] = BANDS.take();
        // Zeroed: the border stays zero, the interior is overwritten channel by channel.
        plane.clear();
        plane.resize(phased.len() + SLACK, 0.0);
        rows.resize(c * ring * wd, 0.0);
        convolved.resize(if to_out { 0 } else { c * band * d.wo }, 0.0);
        // Map rows below `expanded` are (or were) in the ring.
        let mut expanded = 0;
        for oy in ys.clone().step_by(band) {
            let r = band.min(ys.end - oy);
            let need = oy * s..(oy + r - 1) * s + k;
            let image =
                need.start.clamp(pad.top, pad.top + d.h) - pad.top..need.end.clamp(pad.top, pad.top + d.h) - pad.top;
            if let Some(e) = blk.expand {
                let mut iy = image.start.max(expanded);
                while iy < image.end {
                    // A run of rows up to the ring's end, whose slots the band no longer reads.
                    let (slot, t) = (iy % ring, (image.end - iy).min(ring - iy % ring));
                    let task = Task { sample: 0, col: 0, width: t * wd, panels: 0..e.panels() };
                    let dst = rows.as_mut_ptr().add(slot * wd);
                    let x = (&xs[iy * wd..], d.h * wd);
                    let op = Operands { w: e, act: blk.act, x, scale: None, res: None, dst: (dst, ring * wd) };
                    pointwise(&op, &task);
                    iy += t;
                }
                expanded = expanded.max(image.end);
            }
            for ch in 0..c {
                for py in need.clone() {
                    let row0 = py - need.start;
                    if (pad.top..pad.top + d.h).contains(&py) {
                        let iy = py - pad.top;
                        let src = match blk.expand {
                            Some(_) => &rows[(ch * ring + iy % ring) * wd..][..wd],
                            None => &xs[(ch * d.h + iy) * wd..][..wd],
                        };
                        phased.fill(&mut plane, src, wd, row0);
                    } else {
                        for q in 0..s {
                            plane[(q * ring + row0) * phased.pws..][..phased.pws].fill(0.0);
                        }
                    }
                }
                let filt = &dw_w[ch * k * k..][..k * k];
                let p = Plane { buf: &plane, taps: &taps, filt, row_step: phased.row_step(), grid };
                let dst = if to_out {
                    // SAFETY: rows oy..oy + r of channel ch, this range's alone.
                    unsafe { std::slice::from_raw_parts_mut(out.add((ch * d.ho + oy) * d.wo), r * d.wo) }
                } else {
                    &mut convolved[ch * r * d.wo..][..r * d.wo]
                };
                p.convolve(dw_b[ch], blk.act, d.wo, dst);
                if to_out {
                    sums[ch] += crate::reduce::sum(dst);
                }
            }
            if to_out {
                continue;
            }
            let width = r * d.wo;
            let t = Task { sample: 0, col: 0, width, panels: 0..blk.project.panels() };
            let res = blk.skip.then(|| &xs[oy * d.wo..]);
            let dst = (out.add(oy * d.wo), d.ho * d.wo);
            let op =
                Operands { w: blk.project, act: Activation::Identity, x: (&convolved, width), scale: None, res, dst };
            pointwise(&op, &t);
        }
        BANDS.set([plane, rows, convolved]);
    }

    /// Output rows the depthwise kernel convolves at once.
    const MIN_ROWS: usize = 4;
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;
    use crate::test_data as data;
    use candle_core::Device;

    /// candle's convolution of x padded explicitly, plus the bias, then `act` (the shared test reference).
    fn layer(
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        stride: usize,
        pad: Padding,
        groups: usize,
        act: Activation,
    ) -> Tensor {
        let mut outs = crate::candle_reference(x, w, b, stride, pad, groups).into_iter();
        outs.find(|(a, _)| *a == act).expect("every activation").1
    }

    /// Every path against the three layers in candle (1x1 convolutions, grouped convolution, the
    /// activations, the skip): strides 1 and 2, kernels 3 and 5, symmetric and asymmetric padding, with and
    /// without expansion and skip, odd and even maps wider and narrower than a vector; bands of the fewest
    /// rows (so that the ring wraps), of a few more and of a whole range; one thread, three (so that
    /// ranges start mid-map and expand their first rows anew) and more threads than output rows; batch 1-3.
    /// The small-map path on maps of 1x1 to 7x7 too: channels over several panels with a partial last one,
    /// pixels not a multiple of its tile, windows larger than the map. The bands stopped at the depthwise
    /// output, and `depthwise_output`, against the first two layers.
    #[test]
    fn bands_match_candle_layers() {
        let dev = Device::Cpu;
        let cases = [
            // n, cin, h, w, expanded (None: no expansion), cout, k, stride, pad, skip
            (2usize, 4usize, 13usize, 11usize, Some(12usize), 4usize, 3usize, 1usize, Padding::symmetric(1), true),
            (1, 5, 17, 40, Some(10), 7, 3, 2, Padding { top: 0, bottom: 1, left: 0, right: 1 }, false),
            (1, 6, 20, 19, Some(18), 8, 5, 2, Padding { top: 1, bottom: 2, left: 1, right: 2 }, false),
            (1, 8, 9, 9, None, 8, 5, 1, Padding::symmetric(2), true),
            (2, 3, 6, 33, Some(7), 5, 3, 2, Padding { top: 1, bottom: 1, left: 1, right: 1 }, false),
            // Small maps.
            (2, 30, 2, 2, Some(50), 30, 5, 1, Padding::symmetric(2), true),
            (1, 24, 3, 3, Some(72), 25, 3, 1, Padding::symmetric(1), false),
            (2, 16, 7, 7, Some(49), 40, 5, 2, Padding { top: 1, bottom: 2, left: 1, right: 2 }, false),
            (1, 26, 1, 1, None, 26, 3, 1, Padding::symmetric(1), true),
            // Stride 3; kernels 7 and 1 (stride 2); padding larger than the kernel; more than 256 channels
            // (the pointwise kernel's slices of the channel sum); a map one pixel wide; batch 3.
            (1, 4, 13, 10, Some(9), 5, 3, 3, Padding { top: 1, bottom: 1, left: 2, right: 0 }, false),
            (2, 4, 12, 5, Some(8), 4, 7, 1, Padding::symmetric(3), true),
            (1, 4, 9, 9, Some(6), 3, 1, 2, Padding::symmetric(0), false),
            (1, 3, 3, 6, Some(5), 4, 3, 1, Padding { top: 4, bottom: 4, left: 1, right: 1 }, false),
            (1, 260, 6, 5, Some(270), 7, 3, 1, Padding::symmetric(1), false),
            (1, 3, 40, 1, Some(6), 4, 5, 2, Padding::symmetric(2), false),
            (3, 5, 8, 7, Some(10), 5, 3, 1, Padding::symmetric(1), true),
        ];
        for (case, &(n, cin, h, w, expanded, cout, k, s, pad, skip)) in cases.iter().enumerate() {
            let c = expanded.unwrap_or(cin);
            let x = Tensor::from_vec(data(n * cin * h * w, 1), (n, cin, h, w), &dev).unwrap();
            let ew = Tensor::from_vec(data(c * cin, 2), (c, cin, 1, 1), &dev).unwrap();
            let eb = Tensor::from_vec(data(c, 3), c, &dev).unwrap();
            let dw = Tensor::from_vec(data(c * k * k, 4), (c, 1, k, k), &dev).unwrap();
            let db = Tensor::from_vec(data(c, 5), c, &dev).unwrap();
            let pw = Tensor::from_vec(data(cout * c, 6), (cout, c, 1, 1), &dev).unwrap();
            let pb = Tensor::from_vec(data(cout, 7), cout, &dev).unwrap();
            let (expand, project) =
                (PointwiseWeights::new(&ew, &eb).unwrap(), PointwiseWeights::new(&pw, &pb).unwrap());
            let depthwise = DepthwiseWeights::new(&dw, &db).unwrap();
            for act in [Activation::Relu6, Activation::Swish] {
                let zero = Padding::symmetric(0);
                let mut want = x.clone();
                if expanded.is_some() {
                    want = layer(&want, &ew, &eb, 1, zero, 1, act);
                }
                let expanded_want = want.clone();
                want = layer(&want, &dw, &db, s, pad, c, act);
                want = layer(&want, &pw, &pb, 1, zero, 1, Activation::Identity);
                if skip {
                    want = (want + &x).unwrap();
                }
                let block = InvertedResidual {
                    expand: expanded.map(|_| &expand),
                    depthwise: &depthwise,
                    stride: s,
                    pad,
                    project: &project,
                    act,
                    skip,
                };
                let layered = block.layered(&x).unwrap();
                let diff: f32 = (&layered - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap();
                // Relative to the largest output: the 270-channel sums reach 51 (rounding 1.1e-5 there); every
                // case's error lies within 2.3e-7 of its largest output.
                let scale: f32 = want.abs().unwrap().max_all().unwrap().to_scalar().unwrap();
                assert!(diff <= 1e-6 * scale, "case {case} {act:?} layered: {diff} of {scale}");
                let want_dw = layer(&expanded_want, &dw, &db, s, pad, c, act);
                let dw_scale: f32 = want_dw.abs().unwrap().max_all().unwrap().to_scalar().unwrap();
                for threads in [1, 3, 16] {
                    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                    for path in
                        small_paths().chain([Path::Banded(1), Path::Banded(40 * 1024), Path::Banded(usize::MAX)])
                    {
                        let got = pool.install(|| block.fused(&x, path)).unwrap();
                        assert_eq!(got.dims(), want.dims());
                        let diff: f32 = (&got - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap();
                        assert!(diff <= 1e-6 * scale, "case {case} {act:?} {threads} threads, {path:?}: {diff}");
                        if let Path::Banded(_) = path {
                            // The bands stopped at the depthwise output (blocks with squeeze-excitation).
                            let got = pool.install(|| block.fused_to(&x, path, Until::Depthwise)).unwrap();
                            assert_eq!(got.dims(), want_dw.dims());
                            let diff: f32 =
                                (&got - &want_dw).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap();
                            assert!(diff <= 1e-6 * dw_scale, "case {case} {act:?} {threads} threads, {path:?}: {diff}");
                        }
                    }
                }
                let got = block.depthwise_output(&x).unwrap();
                let diff: f32 = (&got - &want_dw).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap();
                assert!(diff <= 1e-6 * dw_scale, "case {case} {act:?} depthwise_output: {diff}");
            }
        }
    }

    /// Blocks with squeeze-excitation gates (a function of the depthwise output's channel means) against
    /// candle's layers with the gates applied to the projection's input: the small-map path (gates between
    /// its passes; panels with a partial last one, odd and even panel counts, stride 2, skip, batches; each
    /// width this CPU has), a map above it (depthwise output, then the gated projection) and 96x96 maps (the
    /// banded depthwise output with its means summed band by band: 128 channels in several bands, ranges
    /// of three threads over one sample or two); one thread and three; an empty batch.
    #[test]
    fn gated_blocks_match_candle_layers() {
        let dev = Device::Cpu;
        let t = |len: usize, seed: usize, shape: &[usize]| Tensor::from_vec(data(len, seed), shape, &dev).unwrap();
        // (n, cin, map, expanded, cout, k, stride, skip)
        let cases = [
            (2usize, 6usize, 6usize, 40usize, 6usize, 3usize, 1usize, true),
            (1, 8, 12, 52, 11, 5, 1, false),
            (1, 7, 9, 33, 5, 5, 2, false),
            (3, 4, 2, 70, 4, 3, 1, true),
            (1, 5, 20, 24, 5, 3, 1, true),
            (1, 4, 96, 128, 4, 3, 2, false),
            (2, 4, 96, 24, 4, 3, 1, true),
        ];
        for (case, &(n, cin, map, c, cout, k, s, skip)) in cases.iter().enumerate() {
            let x = t(n * cin * map * map, 1, &[n, cin, map, map]);
            let (ew, eb) = (t(c * cin, 2, &[c, cin, 1, 1]), t(c, 3, &[c]));
            let (dw, db) = (t(c * k * k, 4, &[c, 1, k, k]), t(c, 5, &[c]));
            let (pw, pb) = (t(cout * c, 6, &[cout, c, 1, 1]), t(cout, 7, &[cout]));
            let expand = PointwiseWeights::new(&ew, &eb).unwrap();
            let depthwise = DepthwiseWeights::new(&dw, &db).unwrap();
            let project = PointwiseWeights::new(&pw, &pb).unwrap();
            let pad = Padding::symmetric(k / 2);
            let act = Activation::Swish;
            let block = InvertedResidual {
                expand: Some(&expand),
                depthwise: &depthwise,
                stride: s,
                pad,
                project: &project,
                act,
                skip,
            };
            // Gates from the means: any function does; this one mixes channels as squeeze-excitation's does.
            let mix = t(c * c, 8, &[c, c]);
            let gates = |m: &Tensor| (m.matmul(&mix)?.neg()?.exp()? + 1.0)?.recip();
            let zero = Padding::symmetric(0);
            let y = layer(&layer(&x, &ew, &eb, 1, zero, 1, act), &dw, &db, s, pad, c, act);
            let g = gates(&y.mean((2, 3)).unwrap()).unwrap();
            let gated = y.broadcast_mul(&g.reshape((n, c, 1, 1)).unwrap()).unwrap();
            let mut want = layer(&gated, &pw, &pb, 1, zero, 1, Activation::Identity);
            if skip {
                want = (want + &x).unwrap();
            }
            let scale: f32 = want.abs().unwrap().max_all().unwrap().to_scalar().unwrap();
            let check = |got: Tensor, what: &str| {
                assert_eq!(got.dims(), want.dims());
                let diff: f32 = (&got - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap();
                assert!(diff <= 1e-6 * scale, "case {case}, {what}: {diff} of {scale}");
            };
            for threads in [1, 3] {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                check(pool.install(|| block.forward_gated(&x, gates)).unwrap(), &format!("{threads} threads"));
            }
            // Each small-map width this CPU has, its two passes called directly.
            if map * map <= SMALL_PIXELS {
                for path in small_paths() {
                    let panels = block.fused_to(&x, path, Until::Panels).unwrap();
                    let g = gates(&panels.narrow(2, 0, c).unwrap().mean(1).unwrap()).unwrap();
                    check(
                        panels.apply_op3_no_bwd(&g, &x, &GatedProjection { block, path }).unwrap(),
                        &format!("{path:?}"),
                    );
                }
            }
            // An empty batch gives an empty output.
            let empty = x.narrow(0, 0, 0).unwrap();
            assert_eq!(block.forward_gated(&empty, gates).unwrap().dims()[0], 0, "case {case}: empty batch");
        }
    }

    /// The small-map path in each width this CPU has.
    fn small_paths() -> impl Iterator<Item = Path> {
        [false, true].into_iter().filter(|&w| !w || crate::has_avx512()).map(|avx512| Path::Small { avx512 })
    }

    /// A transposed or narrowed input (not contiguous) gives the contiguous copy's output on every path.
    #[test]
    fn strided_inputs_match_their_contiguous_copies() {
        let dev = Device::Cpu;
        let (cin, c, cout) = (6, 12, 6);
        let t = |len: usize, seed: usize, shape: &[usize]| Tensor::from_vec(data(len, seed), shape, &dev).unwrap();
        let expand = PointwiseWeights::new(&t(c * cin, 2, &[c, cin]), &t(c, 3, &[c])).unwrap();
        let depthwise = DepthwiseWeights::new(&t(c * 9, 4, &[c, 1, 3, 3]), &t(c, 5, &[c])).unwrap();
        let project = PointwiseWeights::new(&t(cout * c, 6, &[cout, c]), &t(cout, 7, &[cout])).unwrap();
        let block = InvertedResidual {
            expand: Some(&expand),
            depthwise: &depthwise,
            stride: 1,
            pad: Padding::symmetric(1),
            project: &project,
            act: Activation::Relu6,
            skip: true,
        };
        let transposed = t(2 * cin * 9 * 14, 1, &[2, cin, 9, 14]).transpose(2, 3).unwrap();
        let narrowed = t(2 * cin * 14 * 12, 8, &[2, cin, 14, 12]).narrow(3, 2, 9).unwrap();
        for x in [transposed, narrowed] {
            assert!(!x.is_contiguous());
            let want = block.layered(&x.contiguous().unwrap()).unwrap();
            let mut outs = vec![block.forward(&x).unwrap(), block.layered(&x).unwrap()];
            for path in small_paths().chain([Path::Banded(1), Path::Banded(usize::MAX)]) {
                outs.push(block.fused(&x, path).unwrap());
            }
            for got in outs {
                let diff: f32 = (&got - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap();
                assert!(diff < 1e-5, "{:?}: {diff}", x.dims());
            }
        }
    }

    /// Layers that do not chain, or a skip across a change of shape, are errors that say so; an empty batch
    /// gives an empty output.
    #[test]
    fn mismatched_layers_are_errors() {
        let dev = Device::Cpu;
        let z = |shape: &[usize]| Tensor::zeros(shape, candle_core::DType::F32, &dev).unwrap();
        let expand = PointwiseWeights::new(&z(&[12, 4]), &z(&[12])).unwrap();
        let project = PointwiseWeights::new(&z(&[4, 12]), &z(&[4])).unwrap();
        let depthwise = DepthwiseWeights::new(&z(&[12, 1, 3, 3]), &z(&[12])).unwrap();
        let block = InvertedResidual {
            expand: Some(&expand),
            depthwise: &depthwise,
            stride: 2,
            pad: Padding::symmetric(1),
            project: &project,
            act: Activation::Relu6,
            skip: true,
        };
        for path in small_paths().chain([Path::Banded(BAND_BYTES)]) {
            let err = block.fused(&z(&[1, 4, 8, 8]), path).unwrap_err().to_string();
            assert!(err.contains("skip"), "{err}");
            let err = block.fused(&z(&[1, 5, 8, 8]), path).unwrap_err().to_string();
            assert!(err.contains("do not chain"), "{err}");
            let empty = InvertedResidual { skip: false, ..block }.fused(&z(&[0, 4, 8, 8]), path).unwrap();
            assert_eq!(empty.dims(), [0, 4, 4, 4]);
        }
        let none = PointwiseWeights::new(&z(&[0, 12]), &z(&[0])).unwrap();
        for path in small_paths().chain([Path::Banded(BAND_BYTES)]) {
            let block = InvertedResidual { project: &none, skip: false, ..block };
            let err = block.fused(&z(&[1, 4, 8, 8]), path).unwrap_err().to_string();
            assert!(err.contains("no output channels"), "{err}");
        }
        let err = DepthwiseWeights::new(&z(&[12, 1, 3, 2]), &z(&[12])).unwrap_err();
        assert!(err.to_string().contains("square kernel"), "{err}");
    }
}
