//! Stride-1 convolutions with "same" padding by Winograd's minimal filtering F(2x2, 3x3), F(2x2, 5x5) and
//! F(4x4, 5x5) (Lavin & Gray, 2016).
//!
//! Each m x m output tile of one (output, input) channel pair costs α² multiplications (α = m + r - 1: 4 for
//! F(2x2, 3x3), 6 for F(2x2, 5x5), 8 for F(4x4, 5x5)) instead of im2col's m²·r², so the GEMMs, which are most
//! of CS-Flow's time, do 2.25x (3x3), 2.78x or 6.25x (5x5, the flow's last block) fewer operations. The input
//! is cut into overlapping α x α tiles (stride m); tile d becomes V = Bᵀ d B, the kernel g becomes U = G g Gᵀ,
//! and for each of the α² positions ξ
//! of the transformed tile one GEMM sums over input channels: M[ξ] = U[ξ] · V[ξ]. The output tile is Aᵀ M A.
//! F(2x2, 3x3) uses the points 0, ±1 and ∞ (coefficients 0, ±1, 1/2); F(2x2, 5x5) uses 0, ±1, ±2 and ∞
//! (the same Bᵀ as the common F(4x4, 3x3)), whose rounding error stays within a few times the direct sum's.
//!
//! Layouts keep each channel's α² transformed rows together, so every transform runs in parallel over channels
//! on contiguous memory, while the GEMMs read position ξ as a matrix with row stride α² x columns:
//! U [out][α²][in], V [in][α²][tiles], M [out][α²][tiles], tiles = samples x tiles_y x tiles_x.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;
use std::array::from_fn;
use std::ops::{Add, Mul, Sub};
use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp2, Layout, Tensor};
use rayon::prelude::*;

use crate::gemm::{gemm_into, Mat};
use crate::{Activation, Precision};

mod plain;
mod stored_f16;

/// Geometry of a Winograd convolution: `n` samples of `cin` planes h x w to `cout` planes of the same size,
/// kernel `k` x `k` (3 or 5), padding k / 2, output tiles of `m` x `m` (2, or 4 for F(4x4, 5x5)).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Shape {
    pub n: usize,
    pub cin: usize,
    pub cout: usize,
    pub h: usize,
    pub w: usize,
    pub k: usize,
    pub m: usize,
}

impl Shape {
    fn tiles_y(&self) -> usize {
        self.h.div_ceil(self.m)
    }

    fn tiles_x(&self) -> usize {
        self.w.div_ceil(self.m)
    }

    /// α, the transformed tile's side.
    fn alpha(&self) -> usize {
        self.m + self.k - 1
    }

    fn tiles(&self) -> usize {
        self.n * self.tiles_y() * self.tiles_x()
    }

    /// Values from one channel's α² rows of V or M to the next: α² x tiles rounded up to an odd number of
    /// 64-byte lines, so that a product's column of channels spreads over the L1's sets. At batch 16 on 8x8
    /// maps they were 16 KB apart, all in one set of the 8-way L1, and the fused products ([`plain`]) ran
    /// 1.5-1.9x slower than at batch 15 or 17.
    fn ld(&self, positions: usize) -> usize {
        ((positions * self.tiles()).div_ceil(16) | 1) * 16
    }
}

/// `$f::<α, r, m, Tile>(args)` for the variant F(m x m, r x r) of the sizes given: every call of a variant by
/// its sizes goes through here, so each variant is listed once.
macro_rules! by_variant {
    (($k:expr, $m:expr), $($f:ident)::+ ($($arg:expr),* $(,)?)) => {
        match ($k, $m) {
            (3, 2) => $($f)::+::<4, 3, 2, F2x3>($($arg),*),
            (5, 2) => $($f)::+::<6, 5, 2, F2x5>($($arg),*),
            (5, 4) => $($f)::+::<8, 5, 4, F4x5>($($arg),*),
            (k, m) => unreachable!("no Winograd variant F({m}x{m}, {k}x{k})"),
        }
    };
}

/// Whether kernels of size k x k have a Winograd variant here.
pub(crate) fn supports(k: usize) -> bool {
    matches!(k, 3 | 5)
}

/// Whether k x k kernels have a variant with output tiles of m x m: F(2x2, 3x3), F(2x2, 5x5), F(4x4, 5x5).
pub(crate) fn has_tile(k: usize, m: usize) -> bool {
    matches!((k, m), (3, 2) | (5, 2) | (5, 4))
}

/// Which kernel a convolution applies, given the layer's weight [O, I, k, k].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kernel {
    /// The layer's own kernel: O outputs from I inputs.
    Forward,
    /// The kernel of the layer's input gradient: I outputs from O inputs, each kernel turned by 180°
    /// (a stride-1 "same" convolution's transpose is the same convolution with that kernel).
    InputGradient,
}

/// Below this many tiles (over the whole batch) the weight transform, made on every call when the weights
/// are being trained, costs more than the smaller products save (measured, 2 threads: 1024 -> 304 channels on
/// a 6x6 map, 9 tiles, 10.5 ms against im2col's 3.6-4.6 ms; measured on 3x3 kernels and kept for 5x5, whose
/// products save more). Prepared weights ([`WinogradWeights`]) have no such cost.
const MIN_TILES: usize = 32;

/// Whether Winograd beats im2col for this shape.
pub(crate) fn pays(s: Shape) -> bool {
    supports(s.k) && s.tiles() >= MIN_TILES
}

/// Tiles per vector step of the transforms.
const TX: usize = 8;

/// What the input and output transforms compute with: one value, or one coefficient of TX tiles in an AVX2
/// register ([`V8`]), so one definition of each transform serves both.
trait Lane: Copy + Add<Output = Self> + Sub<Output = Self> + Mul<f32, Output = Self> {}

impl<L: Copy + Add<Output = L> + Sub<Output = L> + Mul<f32, Output = L>> Lane for L {}

/// One coefficient of TX consecutive tiles. Its operators are only ever inlined into functions compiled for
/// AVX2 + FMA, which the callers check at run time.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct V8(__m256);

#[cfg(target_arch = "x86_64")]
impl Add for V8 {
    type Output = V8;
    #[inline(always)]
    fn add(self, o: V8) -> V8 {
        // SAFETY: see `V8`.
        V8(unsafe { _mm256_add_ps(self.0, o.0) })
    }
}

#[cfg(target_arch = "x86_64")]
impl Sub for V8 {
    type Output = V8;
    #[inline(always)]
    fn sub(self, o: V8) -> V8 {
        // SAFETY: see `V8`.
        V8(unsafe { _mm256_sub_ps(self.0, o.0) })
    }
}

#[cfg(target_arch = "x86_64")]
impl Mul<f32> for V8 {
    type Output = V8;
    #[inline(always)]
    fn mul(self, c: f32) -> V8 {
        // SAFETY: see `V8`.
        V8(unsafe { _mm256_mul_ps(self.0, _mm256_set1_ps(c)) })
    }
}

/// The 1-d transforms of F(M, R) on tiles of A = M + R - 1 values, each applied to the rows and then to the
/// columns of a tile; the adjoints serve the gradients.
trait Tile<const A: usize, const R: usize, const M: usize> {
    /// Kernel: G g.
    fn g<L: Lane>(k: [L; R]) -> [L; A];
    /// Kernel gradient: Gᵀ u (the adjoint of `g`).
    fn gt(u: [f32; A]) -> [f32; R];
    /// Input: Bᵀ d.
    fn bt<L: Lane>(d: [L; A]) -> [L; A];
    /// Output: Aᵀ m.
    fn at<L: Lane>(m: [L; A]) -> [L; M];
    /// Output gradient: A g (the adjoint of `at`).
    fn a(g: [f32; M]) -> [f32; A];
}

/// F(2, 3) on the points 0, 1, -1 and ∞.
struct F2x3;

impl Tile<4, 3, 2> for F2x3 {
    #[inline(always)]
    fn g<L: Lane>([a, b, c]: [L; 3]) -> [L; 4] {
        [a, (a + b + c) * 0.5, (a - b + c) * 0.5, c]
    }

    #[inline(always)]
    fn gt(u: [f32; 4]) -> [f32; 3] {
        [u[0] + 0.5 * (u[1] + u[2]), 0.5 * (u[1] - u[2]), 0.5 * (u[1] + u[2]) + u[3]]
    }

    #[inline(always)]
    fn bt<L: Lane>(d: [L; 4]) -> [L; 4] {
        [d[0] - d[2], d[1] + d[2], d[2] - d[1], d[1] - d[3]]
    }

    #[inline(always)]
    fn at<L: Lane>(m: [L; 4]) -> [L; 2] {
        [m[0] + m[1] + m[2], m[1] - m[2] - m[3]]
    }

    #[inline(always)]
    fn a(g: [f32; 2]) -> [f32; 4] {
        [g[0], g[0] + g[1], g[0] - g[1], -g[1]]
    }
}

/// F(2, 5) on the points 0, 1, -1, 2, -2 and ∞.
struct F2x5;

impl Tile<6, 5, 2> for F2x5 {
    #[inline(always)]
    fn g<L: Lane>(k: [L; 5]) -> [L; 6] {
        // Multiplications by the reciprocals (not divisions, which the weights' per-call transform in
        // `plain` would wait on): within an ulp of the quotients.
        let (even, odd) = (k[0] + k[2] + k[4], k[1] + k[3]);
        let (even2, odd2) =
            (k[0] * (1.0 / 24.0) + k[2] * (1.0 / 6.0) + k[4] * (2.0 / 3.0), k[1] * (1.0 / 12.0) + k[3] * (1.0 / 3.0));
        [k[0] * 0.25, (even + odd) * (-1.0 / 6.0), (odd - even) * (1.0 / 6.0), even2 + odd2, even2 - odd2, k[4]]
    }

    #[inline(always)]
    fn gt(u: [f32; 6]) -> [f32; 5] {
        let (s12, d12, s34, d34) = (u[1] + u[2], u[2] - u[1], u[3] + u[4], u[3] - u[4]);
        [
            u[0] / 4.0 - s12 / 6.0 + s34 / 24.0,
            d12 / 6.0 + d34 / 12.0,
            (s34 - s12) / 6.0,
            d12 / 6.0 + d34 / 3.0,
            -s12 / 6.0 + s34 * (2.0 / 3.0) + u[5],
        ]
    }

    #[inline(always)]
    fn bt<L: Lane>(d: [L; 6]) -> [L; 6] {
        let (p, q) = (d[4] - d[2] * 4.0, d[3] - d[1] * 4.0);
        let (r, t) = (d[4] - d[2], (d[3] - d[1]) * 2.0);
        [d[0] * 4.0 - d[2] * 5.0 + d[4], p + q, p - q, r + t, r - t, d[1] * 4.0 - d[3] * 5.0 + d[5]]
    }

    #[inline(always)]
    fn at<L: Lane>(m: [L; 6]) -> [L; 2] {
        [m[0] + (m[1] + m[2]) + (m[3] + m[4]), (m[1] - m[2]) + (m[3] - m[4]) * 2.0 + m[5]]
    }

    #[inline(always)]
    fn a(g: [f32; 2]) -> [f32; 6] {
        [g[0], g[0] + g[1], g[0] - g[1], g[0] + 2.0 * g[1], g[0] - 2.0 * g[1], g[1]]
    }
}

/// F(4, 5) on the points 0, ±1, ±2, ±1/2 and ∞ (the Bᵀ of the common F(6x6, 3x3)): 64 multiplications per
/// 4x4 output tile against F(2x2, 5x5)'s 36 per 2x2, 2.25x fewer. Its rounding in f32 stays near F(2x2, 5x5)'s
/// (a float64 simulation with the transformed operands rounded to f32, 1024 channels: 9.5e-7 of the outputs'
/// size against 5.0e-7; bfloat16 operands in a direct sum: 2.8e-3).
struct F4x5;

impl Tile<8, 5, 4> for F4x5 {
    #[inline(always)]
    fn g<L: Lane>(k: [L; 5]) -> [L; 8] {
        let (even, odd) = (k[0] + k[2] + k[4], k[1] + k[3]);
        let (even2, odd2) = (k[0] + k[2] * 4.0 + k[4] * 16.0, k[1] * 2.0 + k[3] * 8.0);
        let (even3, odd3) = (k[0] * 16.0 + k[2] * 4.0 + k[4], k[1] * 8.0 + k[3] * 2.0);
        [
            k[0],
            (even + odd) * (-2.0 / 9.0),
            (even - odd) * (-2.0 / 9.0),
            (even2 + odd2) * (1.0 / 90.0),
            (even2 - odd2) * (1.0 / 90.0),
            (even3 + odd3) * (2.0 / 45.0),
            (even3 - odd3) * (2.0 / 45.0),
            k[4],
        ]
    }

    #[inline(always)]
    fn gt(u: [f32; 8]) -> [f32; 5] {
        let (s1, d1) = ((u[1] + u[2]) * (-2.0 / 9.0), (u[1] - u[2]) * (-2.0 / 9.0));
        let (s2, d2) = ((u[3] + u[4]) / 90.0, (u[3] - u[4]) / 90.0);
        let (s3, d3) = ((u[5] + u[6]) * (2.0 / 45.0), (u[5] - u[6]) * (2.0 / 45.0));
        [
            u[0] + s1 + s2 + 16.0 * s3,
            d1 + 2.0 * d2 + 8.0 * d3,
            s1 + 4.0 * s2 + 4.0 * s3,
            d1 + 8.0 * d2 + 2.0 * d3,
            s1 + 16.0 * s2 + s3 + u[7],
        ]
    }

    #[inline(always)]
    fn bt<L: Lane>(d: [L; 8]) -> [L; 8] {
        let (a1, b1) = (d[2] + d[6] - d[4] * 4.25, d[1] + d[5] - d[3] * 4.25);
        let (a2, b2) = (d[6] + d[2] * 0.25 - d[4] * 1.25, d[1] * 0.5 - d[3] * 2.5 + d[5] * 2.0);
        let (a3, b3) = (d[6] + d[2] * 4.0 - d[4] * 5.0, d[1] * 2.0 - d[3] * 2.5 + d[5] * 0.5);
        [
            d[0] - d[6] + (d[4] - d[2]) * 5.25,
            a1 + b1,
            a1 - b1,
            a2 + b2,
            a2 - b2,
            a3 + b3,
            a3 - b3,
            d[7] - d[1] + (d[3] - d[5]) * 5.25,
        ]
    }

    #[inline(always)]
    fn at<L: Lane>(m: [L; 8]) -> [L; 4] {
        let (s1, d1) = (m[1] + m[2], m[1] - m[2]);
        let (s2, d2) = (m[3] + m[4], m[3] - m[4]);
        let (s3, d3) = (m[5] + m[6], m[5] - m[6]);
        [m[0] + s1 + s2 + s3, d1 + d2 * 2.0 + d3 * 0.5, s1 + s2 * 4.0 + s3 * 0.25, d1 + d2 * 8.0 + d3 * 0.125 + m[7]]
    }

    #[inline(always)]
    fn a(g: [f32; 4]) -> [f32; 8] {
        let at = |p: f32| g[0] + p * (g[1] + p * (g[2] + p * g[3]));
        [g[0], at(1.0), at(-1.0), at(2.0), at(-2.0), at(0.5), at(-0.5), g[3]]
    }
}

/// U = G g Gᵀ for every (output, input) pair of the convolution `kernel` describes, as [out][α²][in], for
/// output tiles of m x m. `w` is the layer's weight [layer_out, layer_in, k, k].
pub(crate) fn transform_weights(
    w: &[f32],
    layer_out: usize,
    layer_in: usize,
    (k, m): (usize, usize),
    kernel: Kernel,
) -> Vec<f32> {
    by_variant!((k, m), weights_t(w, layer_out, layer_in, kernel))
}

fn weights_t<const A: usize, const R: usize, const M: usize, T: Tile<A, R, M>>(
    w: &[f32],
    layer_out: usize,
    layer_in: usize,
    kernel: Kernel,
) -> Vec<f32> {
    assert_eq!(w.len(), layer_out * layer_in * R * R);
    let (outs, ins) = match kernel {
        Kernel::Forward => (layer_out, layer_in),
        Kernel::InputGradient => (layer_in, layer_out),
    };
    // The taps of pair (o, i) start at o * so + i * si in w.
    let (so, si) = match kernel {
        Kernel::Forward => (layer_in * R * R, R * R),
        Kernel::InputGradient => (R * R, layer_in * R * R),
    };
    // Where tap (ky, kx) of the kernel applied lies among a pair's taps.
    let tap = |ky: usize, kx: usize| match kernel {
        Kernel::Forward => ky * R + kx,
        Kernel::InputGradient => (R - 1 - ky) * R + R - 1 - kx,
    };
    // Every element is written below.
    let mut u = crate::uninit(outs * A * A * ins);
    u.par_chunks_mut(A * A * ins).enumerate().for_each(|(o, uo)| {
        let mut block = [[[0f32; WB]; A]; A];
        for i0 in (0..ins).step_by(WB) {
            let nb = WB.min(ins - i0);
            let at = o * so + i0 * si;
            for b in 0..nb {
                let taps = &w[at + b * si..];
                let t = weight_tile::<A, R, M, T>(from_fn(|ky| from_fn(|kx| taps[tap(ky, kx)])));
                for (row, t) in block.iter_mut().zip(t) {
                    for (dst, v) in row.iter_mut().zip(t) {
                        dst[b] = v;
                    }
                }
            }
            for (r, row) in block.iter().enumerate() {
                for (q, src) in row.iter().enumerate() {
                    uo[(r * A + q) * ins + i0..][..nb].copy_from_slice(&src[..nb]);
                }
            }
        }
    });
    u
}

/// Input channels per block of the weight transform. A block's α² rows are built in a buffer and copied out as
/// runs of WB values: written one value at a time, the α² rows `ins` apart thrashed the L1 when `ins` is a
/// multiple of 1024 (4 KB apart, one set): 304 x 1024 3x3 took 4.7 ms against 0.6 ms for 1024 x 152.
const WB: usize = 64;

/// U = G g Gᵀ of one kernel g [ky][kx].
#[inline(always)]
fn weight_tile<const A: usize, const R: usize, const M: usize, T: Tile<A, R, M>>(g: [[f32; R]; R]) -> [[f32; A]; A] {
    // Columns of g through G (A x R), then each of those rows through G again (A x A).
    let cols: [[f32; A]; R] = from_fn(|kx| T::g(from_fn(|ky| g[ky][kx])));
    from_fn(|r| T::g(from_fn(|kx| cols[kx][r])))
}

/// Copies a plane of width w into `padded` (row length pw) starting `at` rows down and columns across; the
/// border around it is left as it is (zero, never written).
fn embed(plane: &[f32], w: usize, padded: &mut [f32], pw: usize, at: usize) {
    for (y, row) in plane.chunks_exact(w).enumerate() {
        padded[(y + at) * pw + at..][..w].copy_from_slice(row);
    }
}

/// Whether the transforms take their AVX2 versions on this CPU.
fn vector_transforms() -> bool {
    #[cfg(target_arch = "x86_64")]
    return crate::has_avx2_fma();
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// V = Bᵀ d B for every A x A tile of x [n, cin, h, w] (zero outside the map), as [cin][α²][tiles].
fn transform_input<const A: usize, const R: usize, const M: usize, T: Tile<A, R, M>>(x: &[f32], s: Shape) -> Vec<f32> {
    transform_input_by::<A, R, M, T>(x, s, vector_transforms())
}

/// [`transform_input`] by the AVX2 version (`vector`, where the CPU supports it) or the scalar one.
fn transform_input_by<const A: usize, const R: usize, const M: usize, T: Tile<A, R, M>>(
    x: &[f32],
    s: Shape,
    vector: bool,
) -> Vec<f32> {
    let stack = Stack::new::<A>(s);
    // Every (channel, position, tile) is written below.
    // Every (channel, position, tile) is written below; the padding between channels never is, nor read.
    let mut v = crate::uninit(s.cin * s.ld(A * A));
    v.par_chunks_mut(s.ld(A * A)).enumerate().for_each_init(
        || vec![0f32; stack.len()],
        |padded, (ci, vc)| {
            stack.fill::<R>(x, s, ci, padded);
            input_channel::<A, R, M, T>(padded, stack.pw, &stack.starts, &mut vc[..A * A * s.tiles()], vector)
        },
    );
    v
}

/// Each channel's planes copied into a stack of planes with a zero border (R / 2 rows and columns before,
/// enough after to complete the last tile), so every tile reads without bounds tests; TX values past the
/// stack serve the vector loads' unused columns.
struct Stack {
    pw: usize,
    plane: usize,
    n: usize,
    /// Where each tile starts in the stack, in the order of V's columns.
    starts: Vec<usize>,
}

impl Stack {
    fn new<const A: usize>(s: Shape) -> Self {
        let (ty_n, tx_n) = (s.tiles_y(), s.tiles_x());
        let m = s.m;
        let (ph, pw) = (m * ty_n + A - m, m * tx_n + A - m);
        let plane = ph * pw;
        let mut starts = Vec::with_capacity(s.tiles());
        for j in 0..s.n {
            for ty in 0..ty_n {
                starts.extend((0..tx_n).map(|tx| j * plane + m * ty * pw + m * tx));
            }
        }
        Self { pw, plane, n: s.n, starts }
    }

    fn len(&self) -> usize {
        self.n * self.plane + TX
    }

    /// Copies channel ci's planes of x into `padded` (a zeroed buffer of [`Stack::len`] values, only ever
    /// refilled with the same geometry, so its border stays zero).
    fn fill<const R: usize>(&self, x: &[f32], s: Shape, ci: usize, padded: &mut [f32]) {
        for (j, stack) in padded.chunks_exact_mut(self.plane).take(s.n).enumerate() {
            embed(&x[(j * s.cin + ci) * s.h * s.w..][..s.h * s.w], s.w, stack, self.pw, R / 2);
        }
    }
}

/// The input transform of one channel: the tiles at `starts` in its padded planes (rows of `pw`) into its α²
/// rows of V, `vc`.
fn input_channel<const A: usize, const R: usize, const M: usize, T: Tile<A, R, M>>(
    padded: &[f32],
    pw: usize,
    starts: &[usize],
    vc: &mut [f32],
    vector: bool,
) {
    let tiles = starts.len();
    assert!(vc.len() == A * A * tiles && A <= TX);
    assert!(starts.iter().max().is_none_or(|&t| t + (A - 1) * pw + A.next_multiple_of(4) <= padded.len()));
    #[cfg(target_arch = "x86_64")]
    if vector && crate::has_avx2_fma() {
        // SAFETY: the CPU supports AVX2 and FMA (checked); the sizes were checked above (the vector
        // loads read A rounded up to 4 values per tile row).
        return unsafe { input_channel_avx2::<A, R, M, T>(padded, pw, starts, vc) };
    }
    input_channel_scalar::<A, R, M, T>(padded, pw, starts, vc)
}

/// [`input_channel`] one tile at a time, on CPUs without AVX2 + FMA.
fn input_channel_scalar<const A: usize, const R: usize, const M: usize, T: Tile<A, R, M>>(
    padded: &[f32],
    pw: usize,
    starts: &[usize],
    vc: &mut [f32],
) {
    let tiles = starts.len();
    for (t, &at) in starts.iter().enumerate() {
        // Bᵀ d down each column, then B across each row.
        let cols: [[f32; A]; A] = from_fn(|q| T::bt(from_fn(|r| padded[at + r * pw + q])));
        for r in 0..A {
            for (q, val) in T::bt(from_fn(|q| cols[q][r])).into_iter().enumerate() {
                vc[(r * A + q) * tiles + t] = val;
            }
        }
    }
}

/// [`input_channel`] on TX tiles per step, one per lane: the scalar version's stores, one per value at a
/// stride of `tiles`, made the transform 16 % of the CPU-size flow's forward at batch 16.
///
/// # Safety
/// The CPU supports AVX2 and FMA; `vc` holds A² x tiles values and every start plus (A - 1) rows and A
/// rounded up to 4 values lies within `padded`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
// r indexes the transposed coefficients inside a closure and the destination row: clearer as a range.
#[allow(clippy::needless_range_loop)]
unsafe fn input_channel_avx2<const A: usize, const R: usize, const M: usize, T: Tile<A, R, M>>(
    padded: &[f32],
    pw: usize,
    starts: &[usize],
    vc: &mut [f32],
) {
    let tiles = starts.len();
    let p = padded.as_ptr();
    for t0 in (0..tiles).step_by(TX) {
        let n = TX.min(tiles - t0);
        // The last step's missing tiles repeat its first one and are not stored.
        let at: [usize; TX] = from_fn(|l| starts[t0 + if l < n { l } else { 0 }]);
        let d: [[V8; A]; A] = from_fn(|r| unsafe { columns::<A>(p, &at, r * pw) });
        let cols: [[V8; A]; A] = from_fn(|q| T::bt(from_fn(|r| d[r][q])));
        let mask = unsafe { crate::first_lanes(n) };
        for r in 0..A {
            for (q, val) in T::bt(from_fn(|q| cols[q][r])).into_iter().enumerate() {
                // SAFETY: row r * A + q of vc has room for tiles t0..t0 + n (n < TX takes the masked store).
                unsafe {
                    let dst = vc.as_mut_ptr().add((r * A + q) * tiles + t0);
                    if n == TX {
                        _mm256_storeu_ps(dst, val.0)
                    } else {
                        _mm256_maskstore_ps(dst, mask, val.0)
                    }
                }
            }
        }
    }
}

/// Values 0..A of the row at `p + at[l] + row` for the TX tiles l, as A registers holding tile l in lane l:
/// 4x4 transposes of the rows' 4-value pieces (so A rounded up to 4 values are read per row).
///
/// # Safety
/// AVX2; those values are readable.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn columns<const A: usize>(p: *const f32, at: &[usize; TX], row: usize) -> [V8; A] {
    let mut out = [V8(_mm256_setzero_ps()); A];
    for c0 in (0..A).step_by(4) {
        // Register k holds tile k's piece in its low half and tile k + 4's in its high half.
        let v: [__m256; 4] = from_fn(|k| unsafe {
            let piece = |l: usize| _mm_loadu_ps(p.add(at[l] + row + c0));
            _mm256_insertf128_ps::<1>(_mm256_castps128_ps256(piece(k)), piece(k + 4))
        });
        let (t0, t1) = (_mm256_unpacklo_ps(v[0], v[1]), _mm256_unpackhi_ps(v[0], v[1]));
        let (t2, t3) = (_mm256_unpacklo_ps(v[2], v[3]), _mm256_unpackhi_ps(v[2], v[3]));
        let q = [
            _mm256_shuffle_ps::<0x44>(t0, t2),
            _mm256_shuffle_ps::<0xEE>(t0, t2),
            _mm256_shuffle_ps::<0x44>(t1, t3),
            _mm256_shuffle_ps::<0xEE>(t1, t3),
        ];
        for (o, qk) in out[c0..].iter_mut().zip(q) {
            *o = V8(qk);
        }
    }
    out
}

/// Where one output tile goes: its first value's offset from plane (0, o) of y, and how many of its M x M
/// values lie inside the map.
#[derive(Clone, Copy)]
struct TileOut {
    at: usize,
    rows: usize,
    cols: usize,
}

/// Y = Aᵀ M A (+ bias) for every tile, written to y [n, cout, h, w] (the parts of edge tiles outside the map
/// are dropped). `m` is [cout][α²][tiles] followed by TX readable values.
///
/// Each output channel's tiles (all samples) are contiguous in each of its α² coefficient rows, so the
/// transform runs over TX tiles per vector step: per tile with scalar loads it cost as much as the
/// channel's GEMM (cout 256 on 8x8 maps).
fn transform_output<const A: usize, const R: usize, const M: usize, T: Tile<A, R, M>>(
    m: &[f32],
    s: Shape,
    bias: Option<&[f32]>,
    act: Activation,
    y: &mut [f32],
) {
    transform_output_by::<A, R, M, T>(m, s, bias, act, y, vector_transforms())
}

/// [`transform_output`] by the AVX2 version (`vector`, where the CPU supports it) or the scalar one.
fn transform_output_by<const A: usize, const R: usize, const M: usize, T: Tile<A, R, M>>(
    m: &[f32],
    s: Shape,
    bias: Option<&[f32]>,
    act: Activation,
    y: &mut [f32],
    vector: bool,
) {
    let (ty_n, tx_n, tiles) = (s.tiles_y(), s.tiles_x(), s.tiles());
    let ld = s.ld(A * A);
    assert!(m.len() >= (s.cout - 1) * ld + A * A * tiles + TX && y.len() == s.n * s.cout * s.h * s.w);
    let mut outs = Vec::with_capacity(tiles);
    for j in 0..s.n {
        for ty in 0..ty_n {
            outs.extend((0..tx_n).map(|tx| TileOut {
                at: j * s.cout * s.h * s.w + M * ty * s.w + M * tx,
                rows: (s.h - M * ty).min(M),
                cols: (s.w - M * tx).min(M),
            }));
        }
    }
    let out = crate::gemm::SendPtr(y.as_mut_ptr());
    (0..s.cout).into_par_iter().with_min_len(crate::items_per_task(A * A * tiles)).for_each(|o| {
        let out = &out;
        let b = bias.map_or(0.0, |b| b[o]);
        // SAFETY: channel o writes only the planes (j, o) of y, disjoint from every other channel's; the
        // tiles' values inside the map lie within them.
        unsafe { output_channel::<A, R, M, T>(&m[o * ld..], s.w, &outs, b, act, out.0.add(o * s.h * s.w), vector) }
    });
}

/// The output transform of one channel: `mo` from its α² coefficient rows on, results into its planes of y
/// (rows of `w`).
///
/// # Safety
/// `y0` points at plane (0, o) of y [n, cout, h, w], the caller owns planes (j, o) for every j, and `outs`
/// describes tiles of those planes.
unsafe fn output_channel<const A: usize, const R: usize, const M: usize, T: Tile<A, R, M>>(
    mo: &[f32],
    w: usize,
    outs: &[TileOut],
    b: f32,
    act: Activation,
    y0: *mut f32,
    vector: bool,
) {
    let tiles = outs.len();
    assert!(mo.len() >= A * A * tiles + TX);
    #[cfg(target_arch = "x86_64")]
    if vector && crate::has_avx2_fma() {
        // SAFETY: the CPU supports AVX2 and FMA (checked); the rest is the caller's.
        return unsafe { output_channel_avx2::<A, R, M, T>(mo, w, outs, b, act, y0) };
    }
    unsafe { output_channel_scalar::<A, R, M, T>(mo, w, outs, b, act, y0) }
}

/// [`output_channel`] one tile at a time, on CPUs without AVX2 + FMA.
///
/// # Safety
/// As for [`output_channel`].
unsafe fn output_channel_scalar<const A: usize, const R: usize, const M: usize, T: Tile<A, R, M>>(
    mo: &[f32],
    w: usize,
    outs: &[TileOut],
    b: f32,
    act: Activation,
    y0: *mut f32,
) {
    let tiles = outs.len();
    for (t, tile) in outs.iter().enumerate() {
        // Aᵀ M down each column, then A across each of the two rows.
        let cols: [[f32; M]; A] = from_fn(|q| T::at(from_fn(|r| mo[(r * A + q) * tiles + t])));
        let mut vals: [[f32; M]; M] = from_fn(|dy| T::at(from_fn(|q| cols[q][dy])).map(|v| v + b));
        // The vector path's exponential (swish), not libm's.
        act.apply_lanes::<false>(vals.as_flattened_mut());
        for (dy, row) in vals.iter().enumerate().take(tile.rows) {
            for (dx, v) in row.iter().enumerate().take(tile.cols) {
                // SAFETY: a value inside the map, in the caller's planes.
                unsafe { *y0.add(tile.at + dy * w + dx) = *v };
            }
        }
    }
}

/// [`output_channel`] on TX tiles per step: for 2x2 tiles each row's two values go out as one 8-byte store
/// where the whole step lies inside the map; F(4x4)'s tiles are stored value by value (all output
/// transforms together took about 2 % of the paper-size forward in `perf`).
///
/// # Safety
/// As for [`output_channel`], and the CPU supports AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn output_channel_avx2<const A: usize, const R: usize, const M: usize, T: Tile<A, R, M>>(
    mo: &[f32],
    w: usize,
    outs: &[TileOut],
    b: f32,
    act: Activation,
    y0: *mut f32,
) {
    let tiles = outs.len();
    let bias = _mm256_set1_ps(b);
    for t0 in (0..tiles).step_by(TX) {
        let n = TX.min(tiles - t0);
        // Whole vectors even for the last, partial step (mo holds TX more values): lanes past it are computed
        // and not stored.
        let load = |xi: usize| V8(unsafe { _mm256_loadu_ps(mo.as_ptr().add(xi * tiles + t0)) });
        let cols: [[V8; M]; A] = from_fn(|q| T::at(from_fn(|r| load(r * A + q))));
        let mut regs: [[__m256; M]; M] =
            from_fn(|dy| T::at(from_fn(|q| cols[q][dy])).map(|v| _mm256_add_ps(v.0, bias)));
        for row in regs.iter_mut() {
            unsafe { act.apply_registers(row) };
        }
        let step = &outs[t0..t0 + n];
        if M == 2 && n == TX && step.iter().all(|t| t.rows == 2 && t.cols == 2) {
            let regs = regs.as_flattened();
            for dy in 0..2 {
                // Tiles 0, 1 | 4, 5 and 2, 3 | 6, 7, each as (dx 0, dx 1) pairs.
                let lo = _mm256_castps_pd(_mm256_unpacklo_ps(regs[2 * dy], regs[2 * dy + 1]));
                let hi = _mm256_castps_pd(_mm256_unpackhi_ps(regs[2 * dy], regs[2 * dy + 1]));
                let halves = [
                    _mm256_castpd256_pd128(lo),
                    _mm256_castpd256_pd128(hi),
                    _mm256_extractf128_pd::<1>(lo),
                    _mm256_extractf128_pd::<1>(hi),
                ];
                for (k, half) in halves.into_iter().enumerate() {
                    // SAFETY: both values of row dy of tiles 2k and 2k + 1 lie inside the map.
                    unsafe {
                        // 8-byte stores without an alignment requirement (the rows are only 4-byte aligned).
                        let (first, second) = (_mm_castpd_si128(half), _mm_castpd_si128(_mm_unpackhi_pd(half, half)));
                        _mm_storel_epi64(y0.add(step[2 * k].at + dy * w).cast(), first);
                        _mm_storel_epi64(y0.add(step[2 * k + 1].at + dy * w).cast(), second);
                    }
                }
            }
        } else {
            let mut lanes = [[[0f32; TX]; M]; M];
            for (l, r) in lanes.as_flattened_mut().iter_mut().zip(regs.as_flattened()) {
                unsafe { _mm256_storeu_ps(l.as_mut_ptr(), *r) };
            }
            for (l, tile) in step.iter().enumerate() {
                for (dy, row) in lanes.iter().enumerate().take(tile.rows) {
                    for (dx, col) in row.iter().enumerate().take(tile.cols) {
                        // SAFETY: a value inside the map, in the caller's planes.
                        unsafe { *y0.add(tile.at + dy * w + dx) = col[l] };
                    }
                }
            }
        }
    }
}

/// y [n, cout, h, w] = conv(x [n, cin, h, w], U) + bias, U from [`transform_weights`] for s.k and s.m.
pub(crate) fn conv(x: &[f32], u: &[f32], bias: Option<&[f32]>, act: Activation, s: Shape) -> Vec<f32> {
    by_variant!((s.k, s.m), conv_t(x, u, bias, act, s))
}

fn conv_t<const A: usize, const R: usize, const M: usize, T: Tile<A, R, M>>(
    x: &[f32],
    u: &[f32],
    bias: Option<&[f32]>,
    act: Activation,
    s: Shape,
) -> Vec<f32> {
    assert_eq!(u.len(), s.cout * A * A * s.cin);
    let (tiles, positions) = (s.tiles(), A * A);
    let ld = s.ld(positions);
    around_products::<A, R, M, T>(x, bias, act, s, |v, m| {
        let dst = crate::gemm::SendPtr(m.as_mut_ptr());
        // The α² products are independent: one per task, each single-threaded, which keeps every thread busy
        // even when a product alone is too small to split.
        (0..positions).into_par_iter().for_each(|xi| {
            let dst = &dst;
            // SAFETY: product ξ writes only row positions ξ*tiles..(ξ+1)*tiles of each output channel's α²
            // rows in m, disjoint from every other ξ; u and v cover the strided extents read (checked by their
            // sizes).
            unsafe {
                gemm_into(
                    dst.0.add(xi * tiles),
                    ld as isize,
                    s.cout,
                    tiles,
                    s.cin,
                    Mat { ptr: u.as_ptr().add(xi * s.cin), rs: (positions * s.cin) as isize, cs: 1 },
                    Mat { ptr: v.as_ptr().add(xi * tiles), rs: ld as isize, cs: 1 },
                    false,
                    gemm::Parallelism::None,
                )
            }
        })
    })
}

/// A convolution around its products: the input transform V [cin][α²][tiles], then `products`, which writes
/// every value of M [cout][α²][tiles] from it, then the output transform with bias and activation.
fn around_products<const A: usize, const R: usize, const M: usize, T: Tile<A, R, M>>(
    x: &[f32],
    bias: Option<&[f32]>,
    act: Activation,
    s: Shape,
    products: impl FnOnce(&[f32], &mut [f32]),
) -> Vec<f32> {
    assert_eq!(x.len(), s.n * s.cin * s.h * s.w);
    let len = s.cout * s.ld(A * A);
    let v = transform_input::<A, R, M, T>(x, s);
    // Overwritten by the products (which do not read it).
    let mut m = crate::uninit(len + TX);
    // The output transform's last vector step reads up to TX - 1 values past the products.
    m[len..].fill(0.0);
    products(&v, &mut m[..len]);
    drop(v);
    // Every output plane is written whole by the output transform.
    let mut y = crate::uninit(s.n * s.cout * s.h * s.w);
    transform_output::<A, R, M, T>(&m, s, bias, act, &mut y);
    y
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_data as data;
    use plain::Products;

    /// The direct sum y[j, o, y, x] = b[o] + Σ k[o, i, ky, kx] x[j, i, y + ky - p, x + kx - p] (p = k / 2) with
    /// the kernel taken as `kernel` describes from the layer weight w.
    fn direct(x: &[f32], w: &[f32], b: &[f32], s: Shape, kernel: Kernel) -> Vec<f32> {
        let (k, p) = (s.k, (s.k / 2) as isize);
        let mut y = vec![0f32; s.n * s.cout * s.h * s.w];
        for j in 0..s.n {
            for o in 0..s.cout {
                for yy in 0..s.h {
                    for xx in 0..s.w {
                        let mut acc = b[o] as f64;
                        for i in 0..s.cin {
                            for ky in 0..k {
                                for kx in 0..k {
                                    let (iy, ix) = ((yy + ky) as isize - p, (xx + kx) as isize - p);
                                    if iy < 0 || ix < 0 || iy >= s.h as isize || ix >= s.w as isize {
                                        continue;
                                    }
                                    let tap = match kernel {
                                        Kernel::Forward => w[((o * s.cin + i) * k + ky) * k + kx],
                                        // Layer weight [cin(layer out), cout(layer in)], turned by 180°.
                                        Kernel::InputGradient => {
                                            w[((i * s.cout + o) * k + k - 1 - ky) * k + k - 1 - kx]
                                        }
                                    };
                                    acc += (tap * x[((j * s.cin + i) * s.h + iy as usize) * s.w + ix as usize]) as f64;
                                }
                            }
                        }
                        y[((j * s.cout + o) * s.h + yy) * s.w + xx] = acc as f32;
                    }
                }
            }
        }
        y
    }

    /// Largest error allowed, as a fraction of the largest |value|. F(2x2, 5x5)'s transforms have
    /// coefficients up to 5 and 1/24 (the points ±2), so it rounds about ten times more than F(2x2, 3x3):
    /// measured here up to 3.3e-7 (3x3) and 2.7e-6 (5x5); a float32 simulation of single 5x5 tiles against
    /// float64 gives 8e-7 on average. F(4x4, 5x5) (coefficients up to 21/4 and 1/90, 64 terms a tile)
    /// about twice F(2x2, 5x5): up to 3.8e-6, and 6.5e-6 for a 1x1 map of one channel, whose one product
    /// comes out of the transforms' cancellation.
    fn tolerance(k: usize, m: usize) -> f64 {
        match (k, m) {
            (3, _) => 1e-6,
            (_, 2) => 5e-6,
            _ => 1e-5,
        }
    }

    /// The largest |a - b| over the largest |b| (every value of ours finite: a NaN would not raise a maximum).
    fn relative_error(ours: &[f32], want: &[f32]) -> f64 {
        assert!(ours.iter().all(|v| v.is_finite()), "non-finite output");
        let err = ours.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        (err / want.iter().fold(0f32, |m, v| m.max(v.abs()))) as f64
    }

    /// Odd and even maps; tile counts below, at and past a vector step of TX tiles, with and without a
    /// partial last step (18 tiles: two whole steps then two tiles on an even map); a step of whole tiles on
    /// an odd-width map (rows 17 values apart, so the second row's pairs are not 8-byte aligned).
    const SHAPES: [(usize, usize, usize, usize, usize); 8] = [
        (1, 1, 1, 1, 1),
        (2, 3, 4, 2, 3),
        (1, 5, 2, 5, 4),
        (3, 4, 6, 7, 7),
        (2, 8, 3, 8, 6),
        (1, 6, 5, 9, 10),
        (3, 2, 3, 4, 6),
        (1, 2, 3, 3, 17),
    ];

    /// Every (kernel, output tile) variant.
    const VARIANTS: [(usize, usize); 3] = [(3, 2), (5, 2), (5, 4)];

    #[test]
    fn matches_the_direct_sum_on_even_odd_and_tiny_maps() {
        for (k, m) in VARIANTS {
            for &(n, cin, cout, h, w) in &SHAPES {
                let s = Shape { n, cin, cout, h, w, k, m };
                let (x, wt, b) = (data(n * cin * h * w, 1), data(cout * cin * k * k, 2), data(cout, 3));
                for kernel in [Kernel::Forward, Kernel::InputGradient] {
                    // For the input gradient the layer's weight is [cin, cout] of this convolution's view.
                    let u = match kernel {
                        Kernel::Forward => transform_weights(&wt, cout, cin, (k, m), kernel),
                        Kernel::InputGradient => transform_weights(&wt, cin, cout, (k, m), kernel),
                    };
                    let bias = if kernel == Kernel::Forward { b.clone() } else { vec![0.0; cout] };
                    let ours = conv(&x, &u, (kernel == Kernel::Forward).then_some(&b[..]), Activation::Identity, s);
                    let want = direct(&x, &wt, &bias, s, kernel);
                    let err = relative_error(&ours, &want);
                    assert!(err < tolerance(k, m), "F({m}, {k}) {n}x{cin}->{cout} {h}x{w} {kernel:?}: error {err}");
                }
            }
        }
    }

    /// Each pair's U = G g Gᵀ lands at [o][ξ][i] across the weight transform's blocks of WB input channels
    /// (130 = 64 + 64 + 2 for the layer's kernel, 70 = 64 + 6 for its input gradient's, g turned by 180°):
    /// the same values, bit for bit, as the transform of that one kernel. The transform's values themselves
    /// are checked against the direct sum above.
    #[test]
    fn weight_transform_places_every_pair() {
        fn check<const A: usize, const R: usize, const M: usize, T: Tile<A, R, M>>() {
            let (layer_out, layer_in) = (70, 130);
            let wt = data(layer_out * layer_in * R * R, 5);
            for kernel in [Kernel::Forward, Kernel::InputGradient] {
                let u = transform_weights(&wt, layer_out, layer_in, (R, M), kernel);
                let (outs, ins) = if kernel == Kernel::Forward { (layer_out, layer_in) } else { (layer_in, layer_out) };
                assert_eq!(u.len(), outs * A * A * ins);
                for o in 0..outs {
                    for i in 0..ins {
                        let g: [[f32; R]; R] = from_fn(|ky| {
                            from_fn(|kx| match kernel {
                                Kernel::Forward => wt[((o * layer_in + i) * R + ky) * R + kx],
                                Kernel::InputGradient => wt[((i * layer_in + o) * R + R - 1 - ky) * R + R - 1 - kx],
                            })
                        });
                        let want = weight_tile::<A, R, M, T>(g);
                        for (xi, &v) in want.iter().flatten().enumerate() {
                            assert_eq!(
                                u[(o * A * A + xi) * ins + i],
                                v,
                                "F({M}, {R}) {kernel:?} pair ({o}, {i}) ξ {xi}"
                            );
                        }
                    }
                }
            }
        }
        for (k, m) in VARIANTS {
            by_variant!((k, m), check());
        }
    }

    /// The weight gradient against the direct sum dW[o, i, ky, kx] = Σ grad[j, o, y, x] x[j, i, y+ky-p, x+kx-p].
    #[test]
    fn weight_gradient_matches_the_direct_sum() {
        for (k, m) in VARIANTS {
            let p = (k / 2) as isize;
            for &(n, cin, cout, h, w) in &SHAPES {
                let s = Shape { n, cin, cout, h, w, k, m };
                let (x, g) = (data(n * cin * h * w, 7), data(n * cout * h * w, 8));
                let ours = weight_grad(&x, &g, s);
                let mut want = vec![0f64; cout * cin * k * k];
                for j in 0..n {
                    for o in 0..cout {
                        for i in 0..cin {
                            for ky in 0..k {
                                for kx in 0..k {
                                    for yy in 0..h {
                                        for xx in 0..w {
                                            let (iy, ix) = ((yy + ky) as isize - p, (xx + kx) as isize - p);
                                            if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                                                continue;
                                            }
                                            want[((o * cin + i) * k + ky) * k + kx] += (g
                                                [((j * cout + o) * h + yy) * w + xx]
                                                * x[((j * cin + i) * h + iy as usize) * w + ix as usize])
                                                as f64;
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
                let want: Vec<f32> = want.into_iter().map(|v| v as f32).collect();
                let err = relative_error(&ours, &want);
                assert!(err < tolerance(k, m), "F({m}, {k}) {n}x{cin}->{cout} {h}x{w}: error {err}");
            }
        }
    }

    /// The prepared op gives the direct sum's values, with the fused activation and the shape checks.
    #[test]
    fn prepared_weights_match_the_direct_sum() {
        let dev = candle_core::Device::Cpu;
        let (n, cin, cout, h, w) = (2, 5, 7, 6, 9);
        for (k, m) in VARIANTS {
            let x = Tensor::from_vec(data(n * cin * h * w, 4), (n, cin, h, w), &dev).unwrap();
            let wt = Tensor::from_vec(data(cout * cin * k * k, 5), (cout, cin, k, k), &dev).unwrap();
            let b = Tensor::from_vec(data(cout, 6), cout, &dev).unwrap();
            let u = WinogradWeights::new_tiles(&wt, m).unwrap().expect("a variant");
            assert_eq!(u.dims(), [cout, cin, k]);
            let ours = conv_winograd(&x, &u, &b, Activation::Identity)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let s = Shape { n, cin, cout, h, w, k, m };
            let want = direct(
                &x.flatten_all().unwrap().to_vec1().unwrap(),
                &wt.flatten_all().unwrap().to_vec1().unwrap(),
                &b.to_vec1().unwrap(),
                s,
                Kernel::Forward,
            );
            let err = relative_error(&ours, &want);
            assert!(err < tolerance(k, m), "{k}x{k}: error {err}");
            let wrong = Tensor::zeros((1, cin + 1, h, w), candle_core::DType::F32, &dev).unwrap();
            assert!(conv_winograd(&wrong, &u, &b, Activation::Identity).is_err());
            // The fused leaky ReLU is the activation applied to the plain values.
            let leaky = conv_winograd(&x, &u, &b, Activation::LeakyRelu(0.1)).unwrap().flatten_all().unwrap();
            let leaky: Vec<f32> = leaky.to_vec1().unwrap();
            assert!(ours.iter().any(|&v| v < 0.0) && ours.iter().any(|&v| v > 0.0));
            for (l, o) in leaky.iter().zip(&ours) {
                assert_eq!(*l, if *o > 0.0 { *o } else { 0.1 * o });
            }
        }
        for shape in [(2, 2, 7, 7), (2, 2, 1, 1), (2, 2, 3, 5)] {
            let w = Tensor::zeros(shape, candle_core::DType::F32, &dev).unwrap();
            assert!(WinogradWeights::new(&w).unwrap().is_none(), "{shape:?}");
        }
        let w3 = Tensor::zeros((2, 2, 3, 3), candle_core::DType::F32, &dev).unwrap();
        assert!(WinogradWeights::new_tiles(&w3, 4).unwrap().is_none());
    }

    /// Weights kept plain and transformed slice by slice (or whole, per call) give the direct sum's values on
    /// the shapes above, and the transformed weights' values on shapes with several slices of input channels
    /// (at most 80 per slice for 3x3, 32 for 5x5; 100 channels as 56 + 44 and 32 + 32 + 32 + 4), several
    /// tasks of 24 output channels (the last one partial) and a partial last strip of 16 tiles. There both
    /// sum in the same order (mostly to the bit, measured up to 7.6e-7 apart), while Winograd's rounding
    /// against the direct sum grows with the input channels (measured with 170: 2.2e-6 for 3x3, 1.0e-5 for
    /// 5x5, the same for both forms).
    #[test]
    fn plain_weights_match_the_direct_sum() {
        let dev = candle_core::Device::Cpu;
        for (k, m) in VARIANTS {
            let large = [(1, 100, 30, 9, 7), (2, 170, 50, 4, 6), (1, 9, 25, 1, 1)];
            for (&(n, cin, cout, h, w), is_large) in SHAPES.iter().zip([false; 8]).chain(large.iter().zip([true; 3])) {
                let s = Shape { n, cin, cout, h, w, k, m };
                let (x, wt, b) = (data(n * cin * h * w, 12), data(cout * cin * k * k, 13), data(cout, 14));
                // Fused by each f32 micro-kernel this CPU runs, and with the whole weight transformed first
                // (calls whose input transform is large).
                let kernels = [(true, Products::Avx2), (true, Products::Avx512), (false, Products::Avx2)];
                for (fused, kernel) in kernels.into_iter().filter(|&(f, k)| !f || k.supported()) {
                    let blocked = plain::by_blocks(&wt, cout, cin, k);
                    let ours = plain::conv_by(&x, &blocked, Some(&b), Activation::Identity, s, fused, kernel);
                    let err = if is_large {
                        let u = transform_weights(&wt, cout, cin, (k, m), Kernel::Forward);
                        relative_error(&ours, &conv(&x, &u, Some(&b), Activation::Identity, s))
                    } else {
                        relative_error(&ours, &direct(&x, &wt, &b, s, Kernel::Forward))
                    };
                    assert!(
                        err < tolerance(k, m),
                        "F({m}, {k}) {n}x{cin}->{cout} {h}x{w} {fused} {kernel:?}: error {err}"
                    );
                }
            }
            let (n, cin, cout, h, w) = (2, 5, 7, 6, 9);
            let x = Tensor::from_vec(data(n * cin * h * w, 15), (n, cin, h, w), &dev).unwrap();
            let wt = Tensor::from_vec(data(cout * cin * k * k, 16), (cout, cin, k, k), &dev).unwrap();
            let b = Tensor::from_vec(data(cout, 17), cout, &dev).unwrap();
            let [p, t] = [WinogradWeights::plain_tiles(&wt, Precision::F32, m), WinogradWeights::new_tiles(&wt, m)]
                .map(|u| u.unwrap().unwrap());
            assert_eq!(p.dims(), [cout, cin, k]);
            let act = Activation::LeakyRelu(0.1);
            let [yp, yt] = [p, t].map(|u| conv_winograd(&x, &u, &b, act).unwrap().flatten_all().unwrap());
            let (yp, yt) = (yp.to_vec1::<f32>().unwrap(), yt.to_vec1::<f32>().unwrap());
            let err = relative_error(&yp, &yt);
            assert!(err < tolerance(k, m), "F({m}, {k}) prepared forms: error {err}");
        }
        let w7 = Tensor::zeros((2, 2, 7, 7), candle_core::DType::F32, &dev).unwrap();
        assert!(WinogradWeights::plain(&w7, Precision::F32).unwrap().is_none());
    }

    /// The bfloat16 products (on CPUs with AVX512_BF16) are the f32 pipeline's with the transformed weights
    /// and input rounded to bfloat16 (to nearest, ties to even), their products summed exactly: computed here
    /// from `transform_weights` and `transform_input` (the same f32 operations), rounded, multiplied in f64
    /// and put through the output transform. What remains is the kernel's f32 summation: measured up to
    /// 3.4e-7 of the outputs' size with 2-8 channels, 1.1e-6 (3x3) and 3.9e-6 (5x5) with 170, within twice
    /// the f32 tests' tolerances (the f32 forms measured 2.2e-6 and 1.0e-5 against the direct sum there); a
    /// wrong pairing or slice would show at the bfloat16 rounding's 1e-2. Against the f32 products the rounding itself shows: up to 1e-2 of the
    /// outputs' size for 3x3 kernels and 6e-2 for 5x5 (whose transforms' coefficients reach 5 and 1/24) on
    /// these few-channel shapes; the flow's scores stay within 1e-3 (tests/flow_parity.rs).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn bf16_products_are_the_rounded_operands_products() {
        fn bf16(v: f32) -> f32 {
            half::bf16::from_f32(v).to_f32()
        }
        fn check<const A: usize, const R: usize, const M: usize, T: Tile<A, R, M>>(s: Shape) {
            let (x, wt, b) =
                (data(s.n * s.cin * s.h * s.w, 19), data(s.cout * s.cin * s.k * s.k, 20), data(s.cout, 21));
            let u: Vec<f32> =
                transform_weights(&wt, s.cout, s.cin, (s.k, s.m), Kernel::Forward).into_iter().map(bf16).collect();
            let v: Vec<f32> = transform_input::<A, R, M, T>(&x, s).into_iter().map(bf16).collect();
            let want = exact_products::<A, R, M, T>(&u, &v, &b, s);
            let blocked = plain::by_blocks(&wt, s.cout, s.cin, s.k);
            let ours = plain::conv_by(&x, &blocked, Some(&b), Activation::Identity, s, true, Products::Bf16);
            let err = relative_error(&ours, &want);
            assert!(err < 2.0 * tolerance(s.k, s.m), "{s:?}: error {err}");
            let f32s = plain::conv_by(&x, &blocked, Some(&b), Activation::Identity, s, true, Products::Avx2);
            // Not the f32 values: the bfloat16 kernel ran.
            assert!(relative_error(&ours, &f32s) > 0.0, "{s:?}");
        }
        if !Precision::Bf16.supported() {
            eprintln!("no AVX512_BF16 here: bfloat16 products not tested");
            return;
        }
        let large = [(1, 100, 30, 9, 7), (2, 170, 50, 4, 6), (1, 9, 25, 1, 1), (1, 33, 40, 13, 12)];
        for &(n, cin, cout, h, w) in SHAPES.iter().chain(&large) {
            for (k, m) in VARIANTS {
                by_variant!((k, m), check(Shape { n, cin, cout, h, w, k, m }));
            }
        }
    }

    /// The convolution from transformed weights u [out][α²][in] and input v [in][α²][tiles] (as given,
    /// rounded or not): each product summed in float64, then the output transform with bias b.
    fn exact_products<const A: usize, const R: usize, const M: usize, T: Tile<A, R, M>>(
        u: &[f32],
        v: &[f32],
        b: &[f32],
        s: Shape,
    ) -> Vec<f32> {
        let (tiles, ld) = (s.tiles(), s.ld(A * A));
        let mut m = vec![0f32; s.cout * ld + TX];
        for o in 0..s.cout {
            for xi in 0..A * A {
                for t in 0..tiles {
                    let sum: f64 = (0..s.cin)
                        .map(|c| u[(o * A * A + xi) * s.cin + c] as f64 * v[c * ld + xi * tiles + t] as f64)
                        .sum();
                    m[o * ld + xi * tiles + t] = sum as f32;
                }
            }
        }
        let mut want = vec![0f32; s.n * s.cout * s.h * s.w];
        transform_output::<A, R, M, T>(&m, s, Some(b), Activation::Identity, &mut want);
        want
    }

    /// Weights stored in f16 give the products of U rounded to f16 and V in f32, summed in float64, within
    /// the f32 summation's rounding; on shapes with partial strips of 16 output channels (7, 25, 40), more
    /// than one strip of 64 (70, 150), partial groups of 6 tiles and whole ones (36 tiles: F(4x4, 5x5) on a
    /// 24x24 map). Against the f32 weights they differ by the f16 rounding: on these uniform values up to
    /// 1.8e-2 of the largest output for F(4x4, 5x5) and 1.1e-2 for F(2x2, 5x5) (bfloat16 F(2x2, 3x3): 3.5e-3).
    #[test]
    fn f16_products_are_the_rounded_weights_products() {
        fn check<const A: usize, const R: usize, const M: usize, T: Tile<A, R, M>>(s: Shape) {
            let f16 = |v: f32| half::f16::from_f32(v).to_f32();
            let (x, wt, b) =
                (data(s.n * s.cin * s.h * s.w, 25), data(s.cout * s.cin * s.k * s.k, 26), data(s.cout, 27));
            let exact = transform_weights(&wt, s.cout, s.cin, (s.k, s.m), Kernel::Forward);
            let u: Vec<f32> = exact.iter().copied().map(f16).collect();
            let v = transform_input::<A, R, M, T>(&x, s);
            let want = exact_products::<A, R, M, T>(&u, &v, &b, s);
            let packed = stored_f16::pack(&exact, s.cout, s.cin, A * A);
            let ours = stored_f16::conv::<A, R, M, T>(&x, &packed, Some(&b), Activation::Identity, s);
            let err = relative_error(&ours, &want);
            assert!(err < 2.0 * tolerance(s.k, s.m), "{s:?}: error {err}");
            let f32s = conv(&x, &exact, Some(&b), Activation::Identity, s);
            let rounding = relative_error(&ours, &f32s);
            assert!(rounding > 0.0 && rounding < 3e-2, "{s:?}: f16 against f32 {rounding}");
        }
        if !stored_f16::supported() {
            eprintln!("no AVX-512 here: f16 weights not tested");
            return;
        }
        let large = [(1, 100, 70, 9, 7), (2, 17, 150, 4, 6), (1, 9, 25, 1, 1), (1, 33, 40, 24, 24)];
        for &(n, cin, cout, h, w) in SHAPES.iter().chain(&large) {
            for (k, m) in VARIANTS {
                by_variant!((k, m), check(Shape { n, cin, cout, h, w, k, m }));
            }
        }
    }

    /// The stored bfloat16 weights give the per-call transform's bfloat16 values to the bit: the same f32
    /// transform, the same rounding, the products summed in the same slices and order. Shapes with an odd
    /// number of input channels, several slices (80 channels each for 3x3), a partial last task of output
    /// channels and a partial last strip of tiles.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn stored_bf16_weights_match_the_per_call_transform() {
        if !Precision::Bf16.supported() {
            eprintln!("no AVX512_BF16 here: stored bfloat16 weights not tested");
            return;
        }
        let dev = candle_core::Device::Cpu;
        for (n, cin, cout, h, w) in [(1, 1, 1, 1, 1), (2, 7, 5, 6, 9), (1, 170, 50, 9, 7), (3, 33, 40, 13, 12)] {
            let x = Tensor::from_vec(data(n * cin * h * w, 22), (n, cin, h, w), &dev).unwrap();
            let wt = Tensor::from_vec(data(cout * cin * 9, 23), (cout, cin, 3, 3), &dev).unwrap();
            let b = Tensor::from_vec(data(cout, 24), cout, &dev).unwrap();
            let stored = WinogradWeights::stored_bf16(&wt).unwrap().expect("3x3 on AVX512_BF16");
            assert_eq!(stored.dims(), [cout, cin, 3]);
            let per_call = WinogradWeights::plain(&wt, Precision::Bf16).unwrap().unwrap();
            let act = Activation::LeakyRelu(0.1);
            let [ys, yp] = [stored, per_call].map(|u| conv_winograd(&x, &u, &b, act).unwrap().flatten_all().unwrap());
            let (ys, yp) = (ys.to_vec1::<f32>().unwrap(), yp.to_vec1::<f32>().unwrap());
            assert!(ys == yp, "{n}x{cin}->{cout} {h}x{w}: error {}", relative_error(&ys, &yp));
        }
        let w5 = Tensor::zeros((2, 2, 5, 5), candle_core::DType::F32, &dev).unwrap();
        assert!(WinogradWeights::stored_bf16(&w5).unwrap().is_none());
    }

    /// The portable path's reordering undoes the blocked one, which pads the input channels to 8.
    #[test]
    fn blocked_weights_round_trip() {
        let w = data(4 * 3 * 25, 18);
        let blocked = plain::by_blocks(&w, 4, 3, 5);
        assert_eq!(blocked.len(), 4 * 8 * 25);
        assert_eq!(plain::from_blocks(&blocked, 3, 5), w);
        // Tap 7 of the pair (o 2, i 1) is at o * 200 + 7 * 8 + 1; lanes 3..8 of each tap are zero.
        assert_eq!(blocked[2 * 200 + 7 * 8 + 1], w[((2 * 3 + 1) * 5 + 1) * 5 + 2]);
        assert!(blocked.chunks_exact(8).all(|lanes| lanes[3..] == [0.0; 5]));
    }

    /// The AVX2 transforms give the scalar ones' values (which CPUs without AVX2 run) to the bit with the
    /// activations the flow fuses (identity, leaky ReLU): the same operations in the same order on each lane.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn vector_transforms_match_the_scalar_ones() {
        fn both<const A: usize, const R: usize, const M: usize, T: Tile<A, R, M>>(s: Shape) {
            let x = data(s.n * s.cin * s.h * s.w, 9);
            let (v0, v1) =
                (transform_input_by::<A, R, M, T>(&x, s, false), transform_input_by::<A, R, M, T>(&x, s, true));
            // Each channel's rows, without the padding up to the next channel's.
            let rows = |v: &[f32]| -> Vec<f32> {
                v.chunks_exact(s.ld(A * A)).flat_map(|c| c[..A * A * s.tiles()].to_vec()).collect()
            };
            assert!(rows(&v0) == rows(&v1), "input transform {s:?}");
            let (m, b) = (data(s.cout * s.ld(A * A) + TX, 10), data(s.cout, 11));
            for act in [Activation::Identity, Activation::LeakyRelu(0.1)] {
                let mut ys = [0f32, 1f32].map(|fill| vec![fill; s.n * s.cout * s.h * s.w]);
                for (y, vector) in ys.iter_mut().zip([false, true]) {
                    transform_output_by::<A, R, M, T>(&m, s, Some(&b), act, y, vector);
                }
                assert!(ys[0] == ys[1], "output transform {s:?} {act:?}");
            }
        }
        if !crate::has_avx2_fma() {
            return;
        }
        for &(n, cin, cout, h, w) in &SHAPES {
            both::<4, 3, 2, F2x3>(Shape { n, cin, cout, h, w, k: 3, m: 2 });
            both::<6, 5, 2, F2x5>(Shape { n, cin, cout, h, w, k: 5, m: 2 });
            both::<8, 5, 4, F4x5>(Shape { n, cin, cout, h, w, k: 5, m: 4 });
        }
    }

    #[test]
    fn small_products_are_left_to_im2col() {
        let s = |n, h, k| Shape { n, cin: 8, cout: 8, h, w: h, k, m: 2 };
        assert!(!pays(s(1, 6, 3)));
        assert!(pays(s(1, 12, 3)));
        assert!(pays(s(16, 4, 3)));
        assert!(pays(s(16, 4, 5)));
        assert!(!pays(s(16, 4, 7)));
    }
}

/// The weight gradient of y = conv(x, w) + b for the output gradient `grad` [n, cout, h, w], as [cout, cin,
/// k, k]: per position ξ one product sums over all tiles, dU[ξ] = (A dY Aᵀ)[ξ] · V[ξ]ᵀ, then dW = Gᵀ dU G
/// (the forward's transforms read backwards). 2.25x (3x3) or 2.78x (5x5) fewer multiplications than im2col's.
pub(crate) fn weight_grad(x: &[f32], grad: &[f32], s: Shape) -> Vec<f32> {
    by_variant!((s.k, s.m), weight_grad_t(x, grad, s))
}

fn weight_grad_t<const A: usize, const R: usize, const M: usize, T: Tile<A, R, M>>(
    x: &[f32],
    grad: &[f32],
    s: Shape,
) -> Vec<f32> {
    assert_eq!(x.len(), s.n * s.cin * s.h * s.w);
    assert_eq!(grad.len(), s.n * s.cout * s.h * s.w);
    let (tiles, positions) = (s.tiles(), A * A);
    let v = transform_input::<A, R, M, T>(x, s);
    let dm = transform_output_grad::<A, R, M, T>(grad, s);
    // [cout][α²][cin]; overwritten by the products (which do not read it).
    let mut du = crate::uninit(s.cout * positions * s.cin);
    let dst = crate::gemm::SendPtr(du.as_mut_ptr());
    (0..positions).into_par_iter().for_each(|xi| {
        let dst = &dst;
        // SAFETY: product ξ writes only row positions ξ*cin..(ξ+1)*cin of each output channel's α² rows of du,
        // disjoint from every other ξ; dm and v cover the strided extents read.
        unsafe {
            gemm_into(
                dst.0.add(xi * s.cin),
                (positions * s.cin) as isize,
                s.cout,
                s.cin,
                tiles,
                Mat { ptr: dm.as_ptr().add(xi * tiles), rs: s.ld(positions) as isize, cs: 1 },
                Mat { ptr: v.as_ptr().add(xi * tiles), rs: 1, cs: s.ld(positions) as isize },
                false,
                gemm::Parallelism::None,
            )
        }
    });
    let mut dw = crate::uninit(s.cout * s.cin * R * R);
    dw.par_chunks_mut(s.cin * R * R).enumerate().for_each(|(o, dwo)| {
        let duo = &du[o * positions * s.cin..(o + 1) * positions * s.cin];
        for i in 0..s.cin {
            let at = |r: usize, q: usize| duo[(r * A + q) * s.cin + i];
            // Gᵀ down each column, then G across each of the R rows.
            let cols: [[f32; R]; A] = from_fn(|q| T::gt(from_fn(|r| at(r, q))));
            for ky in 0..R {
                let row = T::gt(from_fn(|q| cols[q][ky]));
                dwo[(i * R + ky) * R..][..R].copy_from_slice(&row);
            }
        }
    });
    dw
}

/// The adjoint of the output transform: A dY Aᵀ for every M x M tile of grad [n, cout, h, w] (zero outside the
/// map), as [cout][α²][tiles].
fn transform_output_grad<const A: usize, const R: usize, const M: usize, T: Tile<A, R, M>>(
    grad: &[f32],
    s: Shape,
) -> Vec<f32> {
    let (ty_n, tx_n, tiles) = (s.tiles_y(), s.tiles_x(), s.tiles());
    let (ph, pw) = (M * ty_n, M * tx_n);
    // Every (channel, position, tile) is written below.
    // Every value but the padding between channels is written below; the padding is never read.
    let mut dm = crate::uninit(s.cout * s.ld(A * A));
    dm.par_chunks_mut(s.ld(A * A)).enumerate().for_each_init(
        || vec![0f32; ph * pw],
        |padded, (o, dmo)| {
            for j in 0..s.n {
                embed(&grad[(j * s.cout + o) * s.h * s.w..][..s.h * s.w], s.w, padded, pw, 0);
                for ty in 0..ty_n {
                    let base = (j * ty_n + ty) * tx_n;
                    for tx in 0..tx_n {
                        let g = |dy: usize, dx: usize| padded[(M * ty + dy) * pw + M * tx + dx];
                        let cols: [[f32; A]; M] = from_fn(|dx| T::a(from_fn(|dy| g(dy, dx))));
                        for r in 0..A {
                            for (q, val) in T::a(from_fn(|dx| cols[dx][r])).into_iter().enumerate() {
                                dmo[(r * A + q) * tiles + base + tx] = val;
                            }
                        }
                    }
                }
            }
        },
    );
    dm
}

/// A 3x3 or 5x5 layer's weight prepared for Winograd convolutions that no longer change it (inference),
/// in one of two forms ([`WinogradWeights::new`], [`WinogradWeights::plain`]).
#[derive(Clone, Debug)]
pub struct WinogradWeights {
    form: Form,
    cout: usize,
    cin: usize,
    k: usize,
    /// Output tiles' side.
    m: usize,
}

#[derive(Clone, Debug)]
enum Form {
    /// U [out][α²][in], made once.
    Transformed(Arc<Vec<f32>>),
    /// The weight reordered ([`plain::by_blocks`]), transformed slice by slice in every call ([`plain`]), and
    /// the precision of its products.
    Plain(Arc<Vec<f32>>, Precision),
    /// F(2x2, 3x3)'s U rounded to bfloat16 once, in the order the products read it
    /// ([`plain::stored_bf16`]).
    StoredBf16(Arc<Vec<u32>>),
    /// U rounded to f16 once, in strips of output channels ([`stored_f16::pack`]).
    StoredF16(Arc<Vec<u16>>),
}

impl WinogradWeights {
    /// The transform of w [O, I, k, k], made once (at batch 1 a transform costs about as much as the
    /// convolution's products); 16/9 (3x3) or 36/25 (5x5) of the weight's values. `None` for kernel sizes
    /// without a Winograd variant (all but 3 and 5).
    pub fn new(w: &Tensor) -> candle_core::Result<Option<Self>> {
        Self::new_tiles(w, 2)
    }

    /// [`WinogradWeights::new`] for output tiles of m x m: `None` without that variant (4 with 5x5 kernels
    /// only: F(4x4, 5x5), 64/25 of the weight's values).
    pub fn new_tiles(w: &Tensor, m: usize) -> candle_core::Result<Option<Self>> {
        Self::make(w, m, |data, [cout, cin, k]| {
            Form::Transformed(Arc::new(transform_weights(&data, cout, cin, (k, m), Kernel::Forward)))
        })
    }

    /// w [O, I, k, k] kept at its size, reordered so that each call transforms it a cache-sized slice at a
    /// time with vector arithmetic just before multiplying (`winograd::plain`): for flows whose transforms would
    /// not fit the memory the users have (the paper's, 1.5 GB against 1.0 GB) or that run on maps large
    /// enough for the transform's cost to vanish. AVX2 CPUs only; elsewhere it transforms the whole weight
    /// per call.
    /// `precision` [`Precision::Bf16`] rounds the transformed weights and input to bfloat16 where the CPU
    /// multiplies them (AVX512_BF16).
    pub fn plain(w: &Tensor, precision: Precision) -> candle_core::Result<Option<Self>> {
        Self::plain_tiles(w, precision, 2)
    }

    /// The transform of a 3x3 weight w [O, I, 3, 3] rounded to bfloat16 once (8/9 of the plain weight's
    /// bytes), for products in `vdpbf16ps`: the values of [`WinogradWeights::plain`] in
    /// [`Precision::Bf16`], without its per-call transform of the weights. `None` for other kernel sizes
    /// and on CPUs without AVX512_BF16.
    pub fn stored_bf16(w: &Tensor) -> candle_core::Result<Option<Self>> {
        if !matches!(w.dims(), [_, _, 3, 3]) || !Precision::Bf16.supported() || !cfg!(target_arch = "x86_64") {
            return Ok(None);
        }
        Self::make(w, 2, |data, [cout, cin, _]| Form::StoredBf16(Arc::new(plain::stored_bf16(&data, cout, cin))))
    }

    /// The transform of w [O, I, k, k] for output tiles of m x m, made once and rounded to f16 (half the bytes
    /// of [`WinogradWeights::new_tiles`]), for products in f32 with the output channels in the vector lanes
    /// (`winograd::stored_f16`): for the 5x5 layers under [`Precision::Bf16`], whose bfloat16 transforms
    /// would round 8-10x more. `None` without that variant and on CPUs without AVX-512.
    pub fn stored_f16(w: &Tensor, m: usize) -> candle_core::Result<Option<Self>> {
        if !stored_f16::supported() {
            return Ok(None);
        }
        Self::make(w, m, |data, [cout, cin, k]| {
            let u = transform_weights(&data, cout, cin, (k, m), Kernel::Forward);
            Form::StoredF16(Arc::new(stored_f16::pack(&u, cout, cin, (k + m - 1).pow(2))))
        })
    }

    /// [`WinogradWeights::plain`] for output tiles of m x m (see [`WinogradWeights::new_tiles`]).
    pub fn plain_tiles(w: &Tensor, precision: Precision, m: usize) -> candle_core::Result<Option<Self>> {
        Self::make(w, m, |data, [cout, cin, k]| Form::Plain(Arc::new(plain::by_blocks(&data, cout, cin, k)), precision))
    }

    fn make(
        w: &Tensor,
        m: usize,
        form: impl FnOnce(Vec<f32>, [usize; 3]) -> Form,
    ) -> candle_core::Result<Option<Self>> {
        let &[cout, cin, k, kw] = w.dims() else { return Ok(None) };
        if k != kw || !has_tile(k, m) {
            return Ok(None);
        }
        let data = w.flatten_all()?.to_vec1::<f32>()?;
        Ok(Some(Self { form: form(data, [cout, cin, k]), cout, cin, k, m }))
    }

    /// Whether [`WinogradWeights::plain`] weights with `cin` input channels and k x k kernels run at
    /// about the transformed ones' speed on `tiles` 2x2 output tiles (batch x ⌈h/2⌉ x ⌈w/2⌉): their fused
    /// products read the transformed input once per 24 output channels, which waits on memory when it is
    /// large; such calls transform the whole weight first.
    pub fn plain_fuses(cin: usize, k: usize, tiles: usize, precision: Precision) -> bool {
        plain::fuses(cin, k + 1, tiles, Self::plain_in_bf16(k, precision))
    }

    /// Whether [`WinogradWeights::plain`] weights of k x k kernels multiply in bfloat16 in `precision` on this
    /// CPU (transformed ones always multiply in f32).
    pub fn plain_in_bf16(k: usize, precision: Precision) -> bool {
        plain::Products::best(precision, k) == plain::Products::Bf16
    }

    /// [O, I, k] of the weight it was made from.
    pub fn dims(&self) -> [usize; 3] {
        [self.cout, self.cin, self.k]
    }
}

/// `F.conv2d(x, w, b, padding=k // 2)` for the w that `u` was made from; x `[N, I, H, W]`, b `[O]`. Without
/// gradients (an inference path). With the transform made it beats im2col from about 8 tiles (measured,
/// 3x3: 1024 -> 304 on 6x6, 1.7-2.0 ms vs 3.6-4.6 ms); below, inside a whole flow at batch 1, im2col on the
/// smaller plain weights does better (see `csflow::flow::MIN_WINOGRAD_TILES`).
/// `act` is applied in the output transform's epilogue.
pub fn conv_winograd(x: &Tensor, u: &WinogradWeights, b: &Tensor, act: Activation) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op2_no_bwd(&b.contiguous()?, &Prepared(u.clone(), act))
}

struct Prepared(WinogradWeights, Activation);

impl CustomOp2 for Prepared {
    fn name(&self) -> &'static str {
        "csflow-conv-winograd"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CpuStorage, candle_core::Shape)> {
        let (x, b) = (crate::f32_slice(xs, xl, self.name())?, crate::f32_slice(bs, bl, self.name())?);
        let u = &self.0;
        let &[n, cin, h, w] = xl.dims() else {
            candle_core::bail!("conv_winograd: expected x [N, C, H, W], got {:?}", xl.dims());
        };
        if cin != u.cin || b.len() != u.cout {
            candle_core::bail!(
                "conv_winograd: input has {cin} channels and bias {} values for a kernel of {} -> {}",
                b.len(),
                u.cin,
                u.cout
            );
        }
        let s = Shape { n, cin, cout: u.cout, h, w, k: u.k, m: u.m };
        let y = match &u.form {
            Form::Transformed(t) => conv(x, t, Some(b), self.1, s),
            Form::Plain(p, precision) => plain::conv(x, p, Some(b), self.1, s, *precision),
            #[cfg(target_arch = "x86_64")]
            Form::StoredBf16(u) => plain::conv_stored_bf16(x, u, Some(b), self.1, s),
            #[cfg(not(target_arch = "x86_64"))]
            Form::StoredBf16(_) => unreachable!("made on x86-64 only"),
            Form::StoredF16(u) => by_variant!((s.k, s.m), stored_f16::conv(x, u, Some(b), self.1, s)),
        };
        Ok((CpuStorage::F32(y), (n, u.cout, h, w).into()))
    }
}
