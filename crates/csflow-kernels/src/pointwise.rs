//! 1x1 convolutions (the backbone's expand and project layers) with weights packed once at load, bias,
//! an optional residual and the activation applied in registers before the single store.
//!
//! In NCHW a 1x1 convolution is W [O, C] · X [C, H·W] per sample. The `gemm` crate packs both operands on
//! every call and is weakest at the small inner sizes of the expand layers (C = 16-40: 49 GFLOPS against
//! oneDNN's 70 on this machine's 144x24x4096); here the weights are packed once at load into panels of six
//! rows, X is packed in L2-sized blocks of 16-column strips (long contiguous reads of each row) that every
//! panel then passes over, and the epilogue needs no second pass over the output.

use std::sync::OnceLock;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::mbconv::small::ChannelPanels;
use crate::{f32_slice, Activation};

/// Output channels per packed panel (rows of the micro-kernel).
const MR: usize = 6;
/// Columns per strip (two AVX2 vectors).
const NR: usize = 16;

/// A 1x1 convolution's weights, packed in panels of 6 output channels (`packed[p][k][i]` =
/// `weight[p * MR + i][k]`, zero past the last channel), and its bias.
#[derive(Clone, Debug)]
pub struct PointwiseWeights {
    packed: Vec<f32>,
    bias: Vec<f32>,
    pub(crate) cout: usize,
    pub(crate) cin: usize,
    /// Packed with vectors over output channels, on the first small map (blocks with squeeze-excitation and
    /// large maps never need it).
    by_channel: OnceLock<ChannelPanels>,
}

impl PointwiseWeights {
    /// From a weight `[O, C]` or `[O, C, 1, 1]` and a bias `[O]`.
    pub fn new(weight: &Tensor, bias: &Tensor) -> Result<Self> {
        let (cout, cin) = match weight.dims() {
            &[o, c] | &[o, c, 1, 1] => (o, c),
            d => candle_core::bail!("pointwise conv: weight must be [O, C] or [O, C, 1, 1], got {d:?}"),
        };
        if cin == 0 {
            candle_core::bail!("pointwise conv: weight {:?} has no input channels", weight.dims());
        }
        if bias.dims() != [cout] {
            candle_core::bail!("pointwise conv: bias {:?} for {cout} output channels", bias.dims());
        }
        let weight: Vec<f32> = weight.flatten_all()?.to_vec1()?;
        let bias: Vec<f32> = bias.to_vec1()?;
        let panels = cout.div_ceil(MR);
        let mut packed = vec![0f32; panels * cin * MR];
        for (o, row) in weight.chunks_exact(cin).enumerate() {
            let (p, i) = (o / MR, o % MR);
            for (k, &v) in row.iter().enumerate() {
                packed[(p * cin + k) * MR + i] = v;
            }
        }
        Ok(Self { packed, bias, cout, cin, by_channel: OnceLock::new() })
    }

    pub(crate) fn channel_panels(&self) -> &ChannelPanels {
        self.by_channel.get_or_init(|| ChannelPanels::new(&self.unpacked(), self.cin, &self.bias))
    }

    /// Packed panels of output channels.
    pub(crate) fn panels(&self) -> usize {
        self.cout.div_ceil(MR)
    }

    /// The weight [cout, cin], unpacked (for the portable path, so that only the packed copy is kept).
    fn unpacked(&self) -> Vec<f32> {
        (0..self.cout * self.cin)
            .map(|idx| {
                let (o, k) = (idx / self.cin, idx % self.cin);
                self.packed[((o / MR) * self.cin + k) * MR + o % MR]
            })
            .collect()
    }
}

/// act(W · (x · scale) + b [+ residual]) for x [N, C, H, W]: `scale` [N, C] multiplies each input
/// channel (squeeze-excitation gates, applied as the input is packed instead of in a pass of their own);
/// the residual [N, O, H, W] is added before the activation. Inference only.
pub fn pointwise_conv(
    x: &Tensor,
    w: &PointwiseWeights,
    act: Activation,
    residual: Option<&Tensor>,
    scale: Option<&Tensor>,
) -> Result<Tensor> {
    let scale = match scale {
        Some(s) if s.dims() != [x.dim(0)?, w.cin] => {
            candle_core::bail!("pointwise conv: scale {:?} for input {:?}", s.dims(), x.dims())
        }
        Some(s) => Some(s.flatten_all()?.to_vec1::<f32>()?),
        None => None,
    };
    let op = Pointwise { w, act, scale };
    let x = x.contiguous()?;
    match residual {
        Some(r) => x.apply_op2_no_bwd(&r.contiguous()?, &op),
        None => x.apply_op1_no_bwd(&op),
    }
}

struct Pointwise<'a> {
    w: &'a PointwiseWeights,
    act: Activation,
    /// Per sample and input channel, [N * C].
    scale: Option<Vec<f32>>,
}

impl Pointwise<'_> {
    fn run(&self, x: &[f32], dims: &[usize], residual: Option<&[f32]>) -> Result<(CpuStorage, Shape)> {
        let &[n, c, h, wd] = dims else {
            candle_core::bail!("pointwise conv: expected x [N, C, H, W], got {dims:?}");
        };
        let w = self.w;
        if c != w.cin {
            candle_core::bail!("pointwise conv: input has {c} channels, weights expect {}", w.cin);
        }
        let (o, hw) = (w.cout, h * wd);
        let mut out = crate::uninit(n * o * hw);
        if n > 0 && hw > 0 && o > 0 {
            #[cfg(target_arch = "x86_64")]
            if crate::has_avx2_fma() {
                // SAFETY: the CPU supports AVX2 and FMA (checked at run time); sizes checked above.
                unsafe { x86::run(w, self.act, x, self.scale.as_deref(), residual, &mut out, n, hw) };
                return Ok((CpuStorage::F32(out), Shape::from((n, o, h, wd))));
            }
            self.portable(x, residual, &mut out, hw);
        }
        Ok((CpuStorage::F32(out), Shape::from((n, o, h, wd))))
    }

    /// Through the `gemm` crate's product, with the scale, residual and activation in passes of their own.
    fn portable(&self, x: &[f32], residual: Option<&[f32]>, out: &mut [f32], hw: usize) {
        let (w, (o, c)) = (self.w, (self.w.cout, self.w.cin));
        let weight = w.unpacked();
        let mut scaled = Vec::new();
        for (s, dst) in out.chunks_exact_mut(o * hw).enumerate() {
            let mut rhs = &x[s * c * hw..(s + 1) * c * hw];
            if let Some(g) = &self.scale {
                scaled.clear();
                scaled.extend(
                    rhs.chunks_exact(hw)
                        .zip(&g[s * c..(s + 1) * c])
                        .flat_map(|(row, &g)| row.iter().map(move |v| v * g)),
                );
                rhs = &scaled;
            }
            match residual {
                None => crate::gemm::matmul_bias_act(dst, o, hw, c, &weight, rhs, &w.bias, self.act),
                Some(r) => {
                    crate::gemm::matmul_bias_act(dst, o, hw, c, &weight, rhs, &w.bias, Activation::Identity);
                    dst.iter_mut().zip(&r[s * o * hw..(s + 1) * o * hw]).for_each(|(d, r)| *d += r);
                    self.act.apply_slice(dst);
                }
            }
        }
    }
}

/// The op's name in both of its forms (with and without a residual).
const NAME: &str = "csflow-pointwise-conv";

impl CustomOp1 for Pointwise<'_> {
    fn name(&self) -> &'static str {
        NAME
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout) -> Result<(CpuStorage, Shape)> {
        self.run(f32_slice(xs, xl, NAME)?, xl.dims(), None)
    }
}

impl CustomOp2 for Pointwise<'_> {
    fn name(&self) -> &'static str {
        NAME
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, rs: &CpuStorage, rl: &Layout) -> Result<(CpuStorage, Shape)> {
        if let &[n, _, h, wd] = xl.dims() {
            if rl.dims() != [n, self.w.cout, h, wd] {
                candle_core::bail!(
                    "pointwise conv: residual {:?} for output [{n}, {}, {h}, {wd}]",
                    rl.dims(),
                    self.w.cout
                );
            }
        }
        self.run(f32_slice(xs, xl, NAME)?, xl.dims(), Some(f32_slice(rs, rl, NAME)?))
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use std::arch::x86_64::*;

    use super::*;
    use crate::gemm::SendPtr;
    use crate::simd::Simd;

    /// A task: one sample's columns `col..col + width` (whole strips but maybe the last) for panels
    /// `panels`.
    pub(crate) struct Task {
        pub(crate) sample: usize,
        pub(crate) col: usize,
        pub(crate) width: usize,
        pub(crate) panels: std::ops::Range<usize>,
    }

    /// What one product reads and writes: the weights and the activation; the input, with the distance
    /// between its channel rows; the per-channel scale; the residual and the output, with the distance
    /// between their rows (a banded block reads a band of one map's rows and writes into another's).
    #[derive(Clone, Copy)]
    pub(crate) struct Operands<'a> {
        pub(crate) w: &'a PointwiseWeights,
        pub(crate) act: Activation,
        pub(crate) x: (&'a [f32], usize),
        pub(crate) scale: Option<&'a [f32]>,
        pub(crate) res: Option<&'a [f32]>,
        pub(crate) dst: (*mut f32, usize),
    }

    /// Splits the work into about four tasks per thread: column ranges of whole units of `unit` strips first
    /// (the AVX-512 product takes strips in pairs), then panel ranges where the maps are too small for that.
    /// Ranges of single or odd strips left the AVX-512 product with half-width tiles (six accumulators, not
    /// enough to hide the FMA latency): on B5's 24x24 maps (36 strips in blocks of 5) every fifth tile, on
    /// 6x6 maps all of them.
    pub(super) fn tasks(n: usize, hw: usize, panels: usize, threads: usize, unit: usize) -> Vec<Task> {
        let want = 4 * threads;
        let strips = hw.div_ceil(NR);
        let units = strips.div_ceil(unit);
        let col_blocks = want.div_ceil(n).clamp(1, units);
        let strips_per_block = units.div_ceil(col_blocks) * unit;
        let col_blocks = strips.div_ceil(strips_per_block);
        let panel_blocks = want.div_ceil(n * col_blocks).clamp(1, panels);
        let panels_per_block = panels.div_ceil(panel_blocks);
        let mut out = Vec::new();
        for sample in 0..n {
            for cb in 0..col_blocks {
                let col = cb * strips_per_block * NR;
                let width = (strips_per_block * NR).min(hw - col);
                for p0 in (0..panels).step_by(panels_per_block) {
                    out.push(Task { sample, col, width, panels: p0..(p0 + panels_per_block).min(panels) });
                }
            }
        }
        out
    }

    /// # Safety
    /// The CPU supports AVX2 and FMA; x is [n, cin, hw], residual (if any) and out are [n, cout, hw].
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn run(
        w: &PointwiseWeights,
        act: Activation,
        x: &[f32],
        scale: Option<&[f32]>,
        residual: Option<&[f32]>,
        out: &mut [f32],
        n: usize,
        hw: usize,
    ) {
        let (o, c) = (w.cout, w.cin);
        let panels = o.div_ceil(MR);
        let dst = SendPtr(out.as_mut_ptr());
        let unit = if crate::has_avx512() { 2 } else { 1 };
        tasks(n, hw, panels, rayon::current_num_threads(), unit).into_par_iter().for_each(|t| {
            let dst = &dst;
            let xs = &x[t.sample * c * hw..(t.sample + 1) * c * hw];
            let res = residual.map(|r| &r[t.sample * o * hw..(t.sample + 1) * o * hw]);
            let scale = scale.map(|g| &g[t.sample * c..(t.sample + 1) * c]);
            // SAFETY: the CPU supports AVX2 and FMA; this task alone writes rows of its panels in columns
            // t.col..t.col + t.width of its sample's [cout, hw] output (tasks split samples, columns and
            // panels disjointly).
            let dst = (dst.0.add(t.sample * o * hw), hw);
            unsafe { task(&Operands { w, act, x: (xs, hw), scale, res, dst }, &t) }
        });
    }

    /// Bytes of input one task packs at a time (whole strips, at least one), and of weights that pass over
    /// a packed block together (whole panels, at least one): both stay in a 512 KB L2. Without the panel
    /// groups, B5's 176x1056 projections streamed 743 KB of weights through L2 for every strip.
    const PACK_BYTES: usize = 128 * 1024;
    /// Strips per packed block at most. The packing writes each input row's pieces one strip (kc·64 bytes)
    /// apart, and with few input channels 128 KB held up to 128 strips: those scattered stores missed L1 and
    /// the packing waited on them (Lite0's first block, 32 -> 16 channels on 128x128, one thread: the product
    /// alone 0.29 -> 0.17 ms, the block in the network 390 -> 315 us; wider layers' blocks hold fewer strips).
    const MAX_STRIPS: usize = 16;
    /// Input channels per slice up to which the AVX-512 product takes two panels a tile (24 accumulators,
    /// each loaded input vector feeding 12 multiply-adds instead of 6): the expansions (16-40 channels in)
    /// gain, the projections (hundreds in) lost 8-15 %.
    const PAIR_KC: usize = 64;
    const PANEL_BYTES: usize = 192 * 1024;
    const GROUP_PANELS: usize = 8;
    /// Input channels per pass: wider layers (B5's 768-1824) are summed in slices, partial sums kept in
    /// the output, so that a packed strip stays in L1.
    const KC: usize = 256;
    /// Input rows ahead whose pieces the packing prefetches: in the network a projection's input (the
    /// depthwise output, 4-7 MB in B5) comes from memory, in pieces of 512 bytes a map's row apart, and the
    /// packing waited on each. B5 at 768 px 0.241 -> 0.237 s, medians of 10 interleaved rounds.
    const PREFETCH_ROWS: usize = 16;

    thread_local! {
        /// Each worker's packing buffer, kept between calls.
        static PACKED: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    }

    /// One task: blocks of strips are packed (`[strip][k][NR]`, zero past the map's last column) with long
    /// contiguous reads of each input row, then each group of panels passes over the block, strip by strip
    /// (a strip stays in L1 or L2 while the group's panels use it). Read in place, a strip's rows were
    /// 64-byte pieces a map's width apart (pages apart at 64x64 and larger) and the first panel waited on
    /// each of them.
    ///
    /// On CPUs with AVX-512 the product takes two strips at a time in 512-bit registers (12 accumulators,
    /// each weight broadcast once for 32 columns: twice the AVX2 kernel's work per instruction).
    ///
    /// # Safety
    /// The CPU supports AVX2 and FMA; `op.x` holds `cin` rows of at least `t.col + t.width` values, `op.dst`
    /// (and the residual) `cout` rows the same, and no other thread writes the rows of `t.panels` there.
    pub(crate) unsafe fn task(op: &Operands, t: &Task) {
        if crate::has_avx512() {
            task512(op, t)
        } else {
            task256(op, t)
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn task256(op: &Operands, t: &Task) {
        task_with::<false>(op, t)
    }

    #[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl")]
    pub(super) unsafe fn task512(op: &Operands, t: &Task) {
        task_with::<true>(op, t)
    }

    /// [`task`]'s body, `WIDE` for the AVX-512 product (inlined into callers with those features).
    #[inline(always)]
    unsafe fn task_with<const WIDE: bool>(op: &Operands, t: &Task) {
        let Operands { w, act, x: (xs, ldx), scale, res, dst: (dst, hw) } = *op;
        let c = w.cin;
        let strips = t.width.div_ceil(NR);
        let mut packed = PACKED.take();
        for k0 in (0..c).step_by(KC) {
            let kc = KC.min(c - k0);
            let mut per_block = (PACK_BYTES / (kc * NR * 4)).clamp(1, strips.min(MAX_STRIPS));
            if WIDE && per_block > 1 {
                per_block &= !1;
            }
            // A task of a few panels (up to 24 output channels) takes them one at a time over all strips: its
            // strips are reused little, and rows a power of two apart (Lite0's 128x128 and 64x64 maps) all
            // fall in one L1 set, which six rows fit and 16-24 do not. Lite0's first block at 256 px (16
            // channels out), per block in the network, one thread, min of 300: 814-856 -> 784 us.
            let per_group = match t.panels.len() {
                ..=4 => 1,
                _ => (PANEL_BYTES / (kc * MR * 4)).clamp(1, GROUP_PANELS),
            };
            packed.resize(per_block * kc * NR, 0.0);
            for b0 in (0..strips).step_by(per_block) {
                let nb = per_block.min(strips - b0);
                let (col0, bw) = (t.col + b0 * NR, (nb * NR).min(t.width - b0 * NR));
                for k in 0..kc {
                    let row = &xs[(k0 + k) * ldx + col0..(k0 + k) * ldx + col0 + bw];
                    let g = _mm256_set1_ps(scale.map_or(1.0, |g| g[k0 + k]));
                    // wrapping: an address to prefetch from, never read through.
                    let ahead = (k + PREFETCH_ROWS < kc)
                        .then(|| xs.as_ptr().wrapping_add((k0 + k + PREFETCH_ROWS) * ldx + col0));
                    for (j, piece) in row.chunks(NR).enumerate() {
                        if let Some(a) = ahead {
                            _mm_prefetch::<_MM_HINT_T0>(a.wrapping_add(j * NR).cast());
                        }
                        let to = packed[(j * kc + k) * NR..(j * kc + k + 1) * NR].as_mut_ptr();
                        // Vector moves, not a `memcpy` call per 64 bytes; a last piece is zero-filled.
                        if piece.len() == NR {
                            _mm256_storeu_ps(to, _mm256_mul_ps(g, _mm256_loadu_ps(piece.as_ptr())));
                            _mm256_storeu_ps(to.add(8), _mm256_mul_ps(g, _mm256_loadu_ps(piece.as_ptr().add(8))));
                        } else {
                            for v in 0..NR / 8 {
                                let m = crate::first_lanes(piece.len().saturating_sub(8 * v));
                                // wrapping: past a short piece's end the address is formed but, masked off, not read.
                                let vals = _mm256_maskload_ps(piece.as_ptr().wrapping_add(8 * v), m);
                                _mm256_storeu_ps(to.add(8 * v), _mm256_mul_ps(g, vals));
                            }
                        }
                    }
                }
                let step = if WIDE { 2 } else { 1 };
                for g0 in t.panels.clone().step_by(per_group) {
                    for j in (0..nb).step_by(step) {
                        let (col, width) = (col0 + j * NR, (step * NR).min(bw - j * NR));
                        let strip = &packed[j * kc * NR..(j + step).min(nb) * kc * NR];
                        let end = (g0 + per_group).min(t.panels.end);
                        let mut p = g0;
                        while p < end {
                            // Two panels at once in AVX-512 registers where two are left and the input channels
                            // are few (PAIR_KC).
                            let pair = WIDE && p + 1 < end && kc <= PAIR_KC;
                            let tile = Tile { w, act, strip, k0, kc, res, hw, col, width, panel: p };
                            match (WIDE, pair, width == step * NR, width > step * NR / 2) {
                                (true, true, true, _) => tile.compute::<__m512, 2, false, 2>(dst),
                                (true, true, false, true) => tile.compute::<__m512, 2, true, 2>(dst),
                                (true, true, false, false) => tile.compute::<__m512, 1, true, 2>(dst),
                                (true, false, true, _) => tile.compute::<__m512, 2, false, 1>(dst),
                                (true, false, false, true) => tile.compute::<__m512, 2, true, 1>(dst),
                                (true, false, false, false) => tile.compute::<__m512, 1, true, 1>(dst),
                                (false, _, true, _) => tile.compute::<__m256, 2, false, 1>(dst),
                                (false, _, false, true) => tile.compute::<__m256, 2, true, 1>(dst),
                                (false, _, false, false) => tile.compute::<__m256, 1, true, 1>(dst),
                            }
                            p += if pair { 2 } else { 1 };
                        }
                    }
                }
            }
        }
        PACKED.set(packed);
    }

    /// One micro-kernel call: panels from `panel` by columns `col..col + width`, over input channels `k0..`
    /// whose values are packed in `strip` ([k][NR]).
    struct Tile<'a> {
        w: &'a PointwiseWeights,
        act: Activation,
        /// One strip, or two (`[strip][k][NR]`) for the AVX-512 product.
        strip: &'a [f32],
        k0: usize,
        /// Input channels in this slice.
        kc: usize,
        res: Option<&'a [f32]>,
        hw: usize,
        col: usize,
        width: usize,
        panel: usize,
    }

    impl Tile<'_> {
        /// `P` (1 or 2) panels of `V` vectors of `S::LANES` columns (AVX2: one strip in two; AVX-512: two
        /// strips in two); `MASKED` reads and stores only the first `width` (a map's last strip). The first
        /// slice of input channels starts from zero, later ones from the partial sums stored; the last adds
        /// bias and residual and activates.
        ///
        /// # Safety
        /// The CPU supports `S`'s features; `strip` holds the packed strips of the tile's columns; panels
        /// `panel..panel + P` exist.
        #[inline(always)]
        unsafe fn compute<S: Simd, const V: usize, const MASKED: bool, const P: usize>(&self, dst: *mut f32) {
            let (c, kc) = (self.w.cin, self.kc);
            let (first, last) = (self.k0 == 0, self.k0 + kc == c);
            let mut masks = [S::first(0); V];
            for (v, m) in masks.iter_mut().enumerate() {
                *m = S::first(self.width.saturating_sub(S::LANES * v));
            }
            let wp = |j: usize| self.w.packed[((self.panel + j) * c + self.k0) * MR..].as_ptr();
            let x = self.strip.as_ptr();
            // Vector v's columns in the packed strips ([strip][k][NR]).
            let packed = |v: usize, k: usize| (v * S::LANES / NR * kc + k) * NR + v * S::LANES % NR;
            // Panel j of the tile has live(j) real rows.
            let live = |j: usize| if j < P { MR.min(self.w.cout.saturating_sub((self.panel + j) * MR)) } else { 0 };
            // Two arrays of 12 handled apart, not one of 24 or references to both: LLVM then kept the
            // accumulators in memory too, storing each after every multiply-add (2.5x slower).
            let (mut acc0, mut acc1) = ([[S::splat(0.0); V]; MR], [[S::splat(0.0); V]; MR]);
            if !first {
                for (i, row) in acc0.iter_mut().enumerate().take(live(0)) {
                    self.resume::<S, V, MASKED>(row, dst, i, &masks);
                }
                for (i, row) in acc1.iter_mut().enumerate().take(live(1)) {
                    self.resume::<S, V, MASKED>(row, dst, MR + i, &masks);
                }
            }
            let (wp0, wp1) = (wp(0), if P == 2 { wp(1) } else { wp(0) });
            let mut xv = [S::splat(0.0); V];
            for k in 0..kc {
                for (v, xv) in xv.iter_mut().enumerate() {
                    *xv = S::load::<false>(x.add(packed(v, k)), masks[v]);
                }
                for (i, row) in acc0.iter_mut().enumerate() {
                    let wv = S::splat(*wp0.add(k * MR + i));
                    for (a, xv) in row.iter_mut().zip(&xv) {
                        *a = a.fmadd(wv, *xv);
                    }
                }
                if P == 2 {
                    for (i, row) in acc1.iter_mut().enumerate() {
                        let wv = S::splat(*wp1.add(k * MR + i));
                        for (a, xv) in row.iter_mut().zip(&xv) {
                            *a = a.fmadd(wv, *xv);
                        }
                    }
                }
            }
            for (i, row) in acc0.iter_mut().enumerate().take(live(0)) {
                self.finish::<S, V, MASKED>(row, dst, i, last, &masks);
            }
            for (i, row) in acc1.iter_mut().enumerate().take(live(1)) {
                self.finish::<S, V, MASKED>(row, dst, MR + i, last, &masks);
            }
        }

        /// Where output channel `i` of the tile (panel i / MR) starts in dst and the residual.
        #[inline(always)]
        fn at(&self, i: usize) -> usize {
            (self.panel * MR + i) * self.hw + self.col
        }

        /// Output channel `i`'s partial sums from an earlier slice of input channels.
        #[inline(always)]
        unsafe fn resume<S: Simd, const V: usize, const MASKED: bool>(
            &self,
            row: &mut [S; V],
            dst: *mut f32,
            i: usize,
            masks: &[S::Mask; V],
        ) {
            let at = self.at(i);
            for (v, a) in row.iter_mut().enumerate() {
                *a = S::load::<MASKED>(dst.add(at + S::LANES * v), masks[v]);
            }
        }

        /// Output channel `i` of the tile: with the last slice its bias, residual and activation, then stored.
        #[inline(always)]
        unsafe fn finish<S: Simd, const V: usize, const MASKED: bool>(
            &self,
            row: &mut [S; V],
            dst: *mut f32,
            i: usize,
            last: bool,
            masks: &[S::Mask; V],
        ) {
            let at = self.at(i);
            if last {
                let b = S::splat(self.w.bias[self.panel * MR + i]);
                for (v, a) in row.iter_mut().enumerate() {
                    *a = a.add(b);
                    if let Some(r) = self.res {
                        *a = a.add(S::load::<MASKED>(r.as_ptr().add(at + S::LANES * v), masks[v]));
                    }
                }
                self.act.apply_registers(row);
            }
            for (v, a) in row.iter().enumerate() {
                a.store::<MASKED>(dst.add(at + S::LANES * v), masks[v]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_data as data;
    use candle_core::Device;

    /// Against direct f64 sums, through the op and each product the CPU has: channel counts with a partial
    /// last panel, maps with whole strips, a partial strip wider and narrower than 8, one pixel, 65 columns
    /// (two pairs of strips and one column), 620 columns (packed blocks of `MAX_STRIPS` and a partial one);
    /// 34 and 40 output channels (panels in pairs, a partial panel in a pair and alone);
    /// batch 2 (per-sample offsets); 520 input channels (three slices of the channel sum); with and without a
    /// residual and input-channel scale; every activation.
    #[test]
    fn matches_direct_sums() {
        let dev = Device::Cpu;
        for &(n, c, o, h, wd) in &[
            (2usize, 5usize, 13usize, 4usize, 8usize),
            (1, 24, 6, 7, 7),
            (2, 3, 7, 1, 1),
            (1, 40, 20, 3, 5),
            (1, 520, 13, 3, 6),
            (1, 7, 9, 5, 13),
            (1, 6, 9, 20, 31),
            (1, 7, 40, 5, 13),
            (2, 9, 34, 4, 9),
        ] {
            let hw = h * wd;
            let (xv, wv, bv, rv) = (data(n * c * hw, 1), data(o * c, 2), data(o, 3), data(n * o * hw, 4));
            let x = Tensor::from_vec(xv.clone(), (n, c, h, wd), &dev).unwrap();
            let pw = PointwiseWeights::new(
                &Tensor::from_vec(wv.clone(), (o, c, 1, 1), &dev).unwrap(),
                &Tensor::from_vec(bv.clone(), o, &dev).unwrap(),
            )
            .unwrap();
            let r = Tensor::from_vec(rv.clone(), (n, o, h, wd), &dev).unwrap();
            let gv = data(n * c, 5);
            let g = Tensor::from_vec(gv.clone(), (n, c), &dev).unwrap();
            for (act, residual, scale) in [
                (Activation::Relu6, None, None),
                (Activation::Swish, Some(&r), Some(&g)),
                (Activation::Identity, Some(&r), None),
                (Activation::LeakyRelu(0.1), None, Some(&g)),
            ] {
                let got: Vec<f32> =
                    pointwise_conv(&x, &pw, act, residual, scale).unwrap().flatten_all().unwrap().to_vec1().unwrap();
                let mut outputs = vec![("op", got)];
                // Each product this CPU has, called directly (the op takes the widest).
                #[cfg(target_arch = "x86_64")]
                for wide in [false, true].into_iter().filter(|&w| crate::has_avx2_fma() && (!w || crate::has_avx512()))
                {
                    let mut out = vec![f32::NAN; n * o * hw];
                    for s in 0..n {
                        let t = x86::Task { sample: s, col: 0, width: hw, panels: 0..pw.panels() };
                        let xs = (&xv[s * c * hw..(s + 1) * c * hw], hw);
                        let gate = scale.map(|_| &gv[s * c..(s + 1) * c]);
                        let res = residual.map(|_| &rv[s * o * hw..(s + 1) * o * hw]);
                        let dst = (out[s * o * hw..].as_mut_ptr(), hw);
                        let op = x86::Operands { w: &pw, act, x: xs, scale: gate, res, dst };
                        // SAFETY: AVX2 + FMA (and AVX-512 for `wide`) checked above; the sizes are the task's.
                        unsafe {
                            match wide {
                                true => x86::task512(&op, &t),
                                false => x86::task256(&op, &t),
                            }
                        }
                    }
                    outputs.push((if wide { "avx512" } else { "avx2" }, out));
                }
                for (what, got) in outputs {
                    for (idx, &got) in got.iter().enumerate() {
                        let (s, ch, p) = (idx / (o * hw), idx / hw % o, idx % hw);
                        let mut sum = bv[ch] as f64;
                        for k in 0..c {
                            let gate = if scale.is_some() { gv[s * c + k] as f64 } else { 1.0 };
                            sum += wv[ch * c + k] as f64 * xv[(s * c + k) * hw + p] as f64 * gate;
                        }
                        if residual.is_some() {
                            sum += rv[idx] as f64;
                        }
                        let want = match act {
                            Activation::Relu6 => sum.clamp(0.0, 6.0),
                            Activation::Swish => sum / (1.0 + (-sum).exp()),
                            Activation::LeakyRelu(slope) if sum <= 0.0 => slope as f64 * sum,
                            _ => sum,
                        };
                        assert!(
                            (got as f64 - want).abs() < 1e-5,
                            "{what} {n}x{c}->{o} {h}x{wd} {act:?} [{idx}]: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    /// The tasks cover every (sample, column, panel) once, each column range starting at a whole unit of
    /// strips (pairs for the AVX-512 product), for maps of one pixel to odd numbers of strips.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn tasks_cover_the_work_once_in_whole_units() {
        for (n, hw, panels, threads, unit) in task_grid() {
            let mut seen = vec![0u8; n * hw * panels];
            for t in x86::tasks(n, hw, panels, threads, unit) {
                assert_eq!(t.col % (unit * NR), 0, "{n} {hw} {panels} {threads} {unit}: column {}", t.col);
                for col in t.col..t.col + t.width {
                    for p in t.panels.clone() {
                        seen[(t.sample * hw + col) * panels + p] += 1;
                    }
                }
            }
            assert!(seen.iter().all(|&v| v == 1), "{n} {hw} {panels} {threads} {unit}");
        }
    }

    fn task_grid() -> impl Iterator<Item = (usize, usize, usize, usize, usize)> {
        let mut out = Vec::new();
        for n in [1, 2, 3] {
            for hw in [1, 15, 16, 17, 36, 144, 576, 1000] {
                for panels in [1, 5, 30] {
                    for threads in [1, 2, 3] {
                        for unit in [1, 2] {
                            out.push((n, hw, panels, threads, unit));
                        }
                    }
                }
            }
        }
        out.into_iter()
    }

    /// The portable path (CPUs without AVX2) gives the kernel's values: unpacked weights through the `gemm`
    /// crate, scale, residual and activation in passes of their own.
    #[test]
    fn portable_path_matches_the_kernel() {
        let dev = Device::Cpu;
        let (n, c, o, hw) = (2usize, 11usize, 8usize, 21usize);
        let x = Tensor::from_vec(data(n * c * hw, 1), (n, c, hw, 1), &dev).unwrap();
        let wt = Tensor::from_vec(data(o * c, 2), (o, c), &dev).unwrap();
        let pw = PointwiseWeights::new(&wt, &Tensor::from_vec(data(o, 3), o, &dev).unwrap()).unwrap();
        assert_eq!(pw.unpacked(), wt.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        let r = Tensor::from_vec(data(n * o * hw, 4), (n, o, hw, 1), &dev).unwrap();
        let g = Tensor::from_vec(data(n * c, 5), (n, c), &dev).unwrap();
        let kernel: Vec<f32> = pointwise_conv(&x, &pw, Activation::Swish, Some(&r), Some(&g))
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let op = Pointwise { w: &pw, act: Activation::Swish, scale: Some(g.flatten_all().unwrap().to_vec1().unwrap()) };
        let mut portable = vec![f32::NAN; n * o * hw];
        let (xv, rv): (Vec<f32>, Vec<f32>) =
            (x.flatten_all().unwrap().to_vec1().unwrap(), r.flatten_all().unwrap().to_vec1().unwrap());
        op.portable(&xv, Some(&rv), &mut portable, hw);
        for (i, (a, b)) in kernel.iter().zip(&portable).enumerate() {
            assert!((a - b).abs() < 1e-5, "[{i}]: kernel {a}, portable {b}");
        }
    }

    /// Mismatched shapes are errors, not panics; an empty batch gives an empty output.
    #[test]
    fn mismatched_shapes_are_errors() {
        let dev = Device::Cpu;
        let pw = PointwiseWeights::new(
            &Tensor::zeros((4, 3), candle_core::DType::F32, &dev).unwrap(),
            &Tensor::zeros(4, candle_core::DType::F32, &dev).unwrap(),
        )
        .unwrap();
        let x = Tensor::zeros((1, 5, 2, 2), candle_core::DType::F32, &dev).unwrap();
        assert!(pointwise_conv(&x, &pw, Activation::Identity, None, None)
            .unwrap_err()
            .to_string()
            .contains("5 channels"));
        let x = Tensor::zeros((1, 3, 2, 2), candle_core::DType::F32, &dev).unwrap();
        let r = Tensor::zeros((1, 4, 2, 1), candle_core::DType::F32, &dev).unwrap();
        assert!(pointwise_conv(&x, &pw, Activation::Identity, Some(&r), None)
            .unwrap_err()
            .to_string()
            .contains("residual"));
        let g = Tensor::zeros((1, 4), candle_core::DType::F32, &dev).unwrap();
        assert!(pointwise_conv(&x, &pw, Activation::Identity, None, Some(&g))
            .unwrap_err()
            .to_string()
            .contains("scale"));
        let empty = Tensor::zeros((0, 3, 2, 2), candle_core::DType::F32, &dev).unwrap();
        assert_eq!(pointwise_conv(&empty, &pw, Activation::Identity, None, None).unwrap().dims(), [0, 4, 2, 2]);
        let no_inputs = Tensor::zeros((4, 0), candle_core::DType::F32, &dev).unwrap();
        assert!(PointwiseWeights::new(&no_inputs, &Tensor::zeros(4, candle_core::DType::F32, &dev).unwrap()).is_err());
        let bad = Tensor::zeros((4, 3, 3, 3), candle_core::DType::F32, &dev).unwrap();
        assert!(PointwiseWeights::new(&bad, &Tensor::zeros(4, candle_core::DType::F32, &dev).unwrap()).is_err());
    }
}
