//! 3x3, stride-1, padding-1 convolution by Winograd's minimal filtering F(2x2, 3x3) (Lavin & Gray, 2016).
//!
//! Each 2x2 output tile of one (output, input) channel pair costs 16 multiplications instead of im2col's 36, so
//! the GEMMs, which are most of CS-Flow's time, do 2.25x fewer operations. The input is cut into overlapping
//! 4x4 tiles (stride 2); tile d becomes V = Bᵀ d B, the kernel g becomes U = G g Gᵀ, and for each of the 16
//! positions ξ of the transformed tile one GEMM sums over input channels: M[ξ] = U[ξ] · V[ξ]. The output tile is
//! Aᵀ M A. All transform coefficients are 0, ±1 and 1/2, so rounding stays close to the direct sum's.
//!
//! Layouts keep each channel's 16 transformed rows together, so every transform runs in parallel over channels
//! on contiguous memory, while the GEMMs read position ξ as a matrix with row stride 16 x columns:
//! U [out][16][in], V [in][16][tiles], M [out][16][tiles], tiles = samples x tiles_y x tiles_x.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp2, Layout, Tensor};
use rayon::prelude::*;

use crate::gemm::{gemm_into, Mat};
use crate::Activation;

/// Geometry of a Winograd convolution: `n` samples of `cin` planes h x w to `cout` planes of the same size.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Shape3x3 {
    pub n: usize,
    pub cin: usize,
    pub cout: usize,
    pub h: usize,
    pub w: usize,
}

impl Shape3x3 {
    fn tiles_y(&self) -> usize {
        self.h.div_ceil(2)
    }

    fn tiles_x(&self) -> usize {
        self.w.div_ceil(2)
    }

    fn tiles(&self) -> usize {
        self.n * self.tiles_y() * self.tiles_x()
    }
}

/// Which kernel a convolution applies, given the layer's weight [O, I, 3, 3].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kernel {
    /// The layer's own kernel: O outputs from I inputs.
    Forward,
    /// The kernel of the layer's input gradient: I outputs from O inputs, each 3x3 kernel turned by 180°
    /// (a stride-1, padding-1 convolution's transpose is the same convolution with that kernel).
    InputGradient,
}

/// Below this many tiles (over the whole batch) the weight transform, made on every call when the weights
/// are being trained, costs more than the smaller products save (measured, 2 threads: 1024 -> 304 channels on
/// a 6x6 map, 9 tiles, 10.5 ms against im2col's 3.6-4.6 ms). Prepared weights ([`WinogradWeights`]) have
/// no such cost and always take this path.
const MIN_TILES: usize = 32;

/// Whether Winograd beats im2col for this shape.
pub(crate) fn pays(s: Shape3x3) -> bool {
    s.tiles() >= MIN_TILES
}

/// The 1-d transforms, each applied to the rows and then to the columns of a tile.
/// Kernel: G g for g = [a, b, c].
#[inline(always)]
fn g3(a: f32, b: f32, c: f32) -> [f32; 4] {
    [a, 0.5 * (a + b + c), 0.5 * (a - b + c), c]
}

/// Input: Bᵀ d for d = [d0, d1, d2, d3].
#[inline(always)]
fn bt4(d: [f32; 4]) -> [f32; 4] {
    [d[0] - d[2], d[1] + d[2], d[2] - d[1], d[1] - d[3]]
}

/// Output gradient: A g for g = [g0, g1] (the adjoint of `at4`).
#[inline(always)]
fn a4(g: [f32; 2]) -> [f32; 4] {
    [g[0], g[0] + g[1], g[0] - g[1], -g[1]]
}

/// Kernel gradient: Gᵀ u for u = [u0, u1, u2, u3] (the adjoint of `g3`).
#[inline(always)]
fn gt4(u: [f32; 4]) -> [f32; 3] {
    [u[0] + 0.5 * (u[1] + u[2]), 0.5 * (u[1] - u[2]), 0.5 * (u[1] + u[2]) + u[3]]
}

/// U = G g Gᵀ for every (output, input) pair of the convolution `kernel` describes, as [out][16][in].
/// `w` is the layer's weight [layer_out, layer_in, 3, 3].
pub(crate) fn transform_weights(w: &[f32], layer_out: usize, layer_in: usize, kernel: Kernel) -> Vec<f32> {
    assert_eq!(w.len(), layer_out * layer_in * 9);
    let (outs, ins) = match kernel {
        Kernel::Forward => (layer_out, layer_in),
        Kernel::InputGradient => (layer_in, layer_out),
    };
    // Every element is written below.
    let mut u = crate::uninit(outs * 16 * ins);
    u.par_chunks_mut(16 * ins).enumerate().for_each(|(o, uo)| {
        for i in 0..ins {
            let mut g = [0f32; 9];
            match kernel {
                Kernel::Forward => g.copy_from_slice(&w[(o * layer_in + i) * 9..][..9]),
                Kernel::InputGradient => {
                    for (t, &v) in w[(i * layer_in + o) * 9..][..9].iter().rev().enumerate() {
                        g[t] = v;
                    }
                }
            }
            // Columns of g through G (4 x 3), then each of those rows through G again (4 x 4).
            let cols = [g3(g[0], g[3], g[6]), g3(g[1], g[4], g[7]), g3(g[2], g[5], g[8])];
            for r in 0..4 {
                for (q, v) in g3(cols[0][r], cols[1][r], cols[2][r]).into_iter().enumerate() {
                    uo[(r * 4 + q) * ins + i] = v;
                }
            }
        }
    });
    u
}

/// Copies a plane of width w into `padded` (row length pw) starting `at` rows down and columns across; the
/// border around it is left as it is (zero, never written).
fn embed(plane: &[f32], w: usize, padded: &mut [f32], pw: usize, at: usize) {
    for (y, row) in plane.chunks_exact(w).enumerate() {
        padded[(y + at) * pw + at..][..w].copy_from_slice(row);
    }
}

/// V = Bᵀ d B for every 4x4 tile of x [n, cin, h, w] (zero outside the map), as [cin][16][tiles].
fn transform_input(x: &[f32], s: Shape3x3) -> Vec<f32> {
    let (ty_n, tx_n, tiles) = (s.tiles_y(), s.tiles_x(), s.tiles());
    // Each plane is copied into a zero border first (one row and column before, enough after to complete
    // the last tile), so every tile reads without bounds tests.
    let (ph, pw) = (2 * ty_n + 2, 2 * tx_n + 2);
    // Every (channel, position, tile) is written below.
    let mut v = crate::uninit(s.cin * 16 * tiles);
    v.par_chunks_mut(16 * tiles).enumerate().for_each_init(
        || vec![0f32; ph * pw],
        |padded, (ci, vc)| {
            for j in 0..s.n {
                embed(&x[(j * s.cin + ci) * s.h * s.w..][..s.h * s.w], s.w, padded, pw, 1);
                for ty in 0..ty_n {
                    let rows: [&[f32]; 4] = std::array::from_fn(|r| &padded[(2 * ty + r) * pw..][..pw]);
                    let base = (j * ty_n + ty) * tx_n;
                    for tx in 0..tx_n {
                        let d: [[f32; 4]; 4] = std::array::from_fn(|r| {
                            let p = &rows[r][2 * tx..2 * tx + 4];
                            [p[0], p[1], p[2], p[3]]
                        });
                        // Bᵀ d down each column, then B across each row.
                        let cols: [[f32; 4]; 4] = std::array::from_fn(|q| bt4([d[0][q], d[1][q], d[2][q], d[3][q]]));
                        for r in 0..4 {
                            let row = bt4([cols[0][r], cols[1][r], cols[2][r], cols[3][r]]);
                            for (q, val) in row.into_iter().enumerate() {
                                vc[(r * 4 + q) * tiles + base + tx] = val;
                            }
                        }
                    }
                }
            }
        },
    );
    v
}

/// Y = Aᵀ M A (+ bias) for every tile, written to y [n, cout, h, w] (the parts of edge tiles outside the map
/// are dropped). `m` is [cout][16][tiles] followed by TX readable values.
///
/// Each output channel's tiles (all samples) are contiguous in each of its 16 coefficient rows, so the
/// transform runs over TX tiles per vector step and only the 2x2 results are stored one by one: per tile
/// with 16 scalar loads it cost as much as the channel's GEMM (cout 256 on 8x8 maps).
fn transform_output(m: &[f32], s: Shape3x3, bias: Option<&[f32]>, act: Activation, y: &mut [f32]) {
    let tiles = s.tiles();
    assert!(m.len() >= s.cout * 16 * tiles + TX && y.len() == s.n * s.cout * s.h * s.w);
    let out = crate::gemm::SendPtr(y.as_mut_ptr());
    (0..s.cout).into_par_iter().with_min_len(crate::items_per_task(16 * tiles)).for_each(|o| {
        let out = &out;
        let b = bias.map_or(0.0, |b| b[o]);
        // SAFETY: channel o writes only the planes (j, o) of y, disjoint from every other channel's.
        unsafe { output_channel(&m[o * 16 * tiles..], s, b, act, out.0.add(o * s.h * s.w)) }
    });
}

/// Tiles per vector step of the output transform.
const TX: usize = 8;

/// One coefficient of TX consecutive tiles.
type Lanes = [f32; TX];

/// Output: Aᵀ m for m = [m0, m1, m2, m3], on TX tiles at once.
#[inline(always)]
fn at4(m: [Lanes; 4]) -> [Lanes; 2] {
    [std::array::from_fn(|l| m[0][l] + m[1][l] + m[2][l]), std::array::from_fn(|l| m[1][l] - m[2][l] - m[3][l])]
}

/// The output transform of one channel: `mo` from its 16 coefficient rows on, results into its planes of y.
///
/// # Safety
/// `y0` points at plane (0, o) of y [n, cout, h, w] and the caller owns planes (j, o) for every j.
unsafe fn output_channel(mo: &[f32], s: Shape3x3, b: f32, act: Activation, y0: *mut f32) {
    #[cfg(target_arch = "x86_64")]
    if crate::has_avx2_fma() {
        // SAFETY: the CPU supports AVX2 and FMA (checked at run time); the rest is the caller's.
        return unsafe { output_channel_avx2(mo, s, b, act, y0) };
    }
    unsafe { output_channel_lanes::<false>(mo, s, b, act, y0) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn output_channel_avx2(mo: &[f32], s: Shape3x3, b: f32, act: Activation, y0: *mut f32) {
    unsafe { output_channel_lanes::<true>(mo, s, b, act, y0) }
}

#[inline(always)]
unsafe fn output_channel_lanes<const FMA: bool>(mo: &[f32], s: Shape3x3, b: f32, act: Activation, y0: *mut f32) {
    let (ty_n, tx_n, tiles) = (s.tiles_y(), s.tiles_x(), s.tiles());
    let (mut j, mut ty, mut tx) = (0, 0, 0);
    let mut t0 = 0;
    while t0 < tiles {
        // Whole vectors even for the last, partial step: lanes past it are computed and not stored.
        let m: [Lanes; 16] = std::array::from_fn(|xi| mo[xi * tiles + t0..][..TX].try_into().expect("TX lanes"));
        // Aᵀ M down each column, then A across each of the two rows.
        let cols: [[Lanes; 2]; 4] = std::array::from_fn(|q| at4([m[q], m[4 + q], m[8 + q], m[12 + q]]));
        let mut outs: [[Lanes; 2]; 2] =
            std::array::from_fn(|dy| at4([cols[0][dy], cols[1][dy], cols[2][dy], cols[3][dy]]));
        for v in outs.iter_mut().flatten() {
            v.iter_mut().for_each(|x| *x += b);
            act.apply_lanes::<FMA>(v);
        }
        for l in 0..TX.min(tiles - t0) {
            let (yy, xx) = (2 * ty, 2 * tx);
            // SAFETY: (j, yy + dy, xx + dx) lies in plane (j, o) of the caller's y, within h x w.
            unsafe {
                let plane = y0.add(j * s.cout * s.h * s.w);
                for (dy, row) in outs.iter().enumerate().take(s.h - yy) {
                    for (dx, v) in row.iter().enumerate().take(s.w - xx) {
                        *plane.add((yy + dy) * s.w + xx + dx) = v[l];
                    }
                }
            }
            tx += 1;
            if tx == tx_n {
                (tx, ty) = (0, ty + 1);
                if ty == ty_n {
                    (ty, j) = (0, j + 1);
                }
            }
        }
        t0 += TX;
    }
}

/// y [n, cout, h, w] = conv3x3(x [n, cin, h, w], U) + bias, U from [`transform_weights`].
pub(crate) fn conv3x3(x: &[f32], u: &[f32], bias: Option<&[f32]>, act: Activation, s: Shape3x3) -> Vec<f32> {
    assert_eq!(x.len(), s.n * s.cin * s.h * s.w);
    assert_eq!(u.len(), s.cout * 16 * s.cin);
    let tiles = s.tiles();
    let v = transform_input(x, s);
    // Overwritten by the products (which do not read it).
    let mut m = crate::uninit(s.cout * 16 * tiles + TX);
    // The output transform's last vector step reads up to TX - 1 values past the products.
    m[s.cout * 16 * tiles..].fill(0.0);
    let dst = crate::gemm::SendPtr(m.as_mut_ptr());
    // The 16 products are independent: one per task, each single-threaded, which keeps every thread busy
    // even when a product alone is too small to split.
    (0..16).into_par_iter().for_each(|xi| {
        let dst = &dst;
        // SAFETY: product ξ writes only row positions ξ*tiles..(ξ+1)*tiles of each output channel's 16 rows
        // in m, disjoint from every other ξ; u and v cover the strided extents read (checked by their sizes).
        unsafe {
            gemm_into(
                dst.0.add(xi * tiles),
                (16 * tiles) as isize,
                s.cout,
                tiles,
                s.cin,
                Mat { ptr: u.as_ptr().add(xi * s.cin), rs: (16 * s.cin) as isize, cs: 1 },
                Mat { ptr: v.as_ptr().add(xi * tiles), rs: (16 * tiles) as isize, cs: 1 },
                false,
                gemm::Parallelism::None,
            )
        }
    });
    // Every output plane is written whole by the output transform.
    let mut y = crate::uninit(s.n * s.cout * s.h * s.w);
    transform_output(&m, s, bias, act, &mut y);
    y
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_data as data;

    /// The direct sum y[j, o, y, x] = b[o] + Σ k[o, i, ky, kx] x[j, i, y + ky - 1, x + kx - 1] with k taken as
    /// `kernel` describes from the layer weight w.
    fn direct(x: &[f32], w: &[f32], b: &[f32], s: Shape3x3, kernel: Kernel) -> Vec<f32> {
        let mut y = vec![0f32; s.n * s.cout * s.h * s.w];
        for j in 0..s.n {
            for o in 0..s.cout {
                for yy in 0..s.h {
                    for xx in 0..s.w {
                        let mut acc = b[o] as f64;
                        for i in 0..s.cin {
                            for ky in 0..3 {
                                for kx in 0..3 {
                                    let (iy, ix) = ((yy + ky) as isize - 1, (xx + kx) as isize - 1);
                                    if iy < 0 || ix < 0 || iy >= s.h as isize || ix >= s.w as isize {
                                        continue;
                                    }
                                    let tap = match kernel {
                                        Kernel::Forward => w[((o * s.cin + i) * 3 + ky) * 3 + kx],
                                        // Layer weight [cin(layer out), cout(layer in)], turned by 180°.
                                        Kernel::InputGradient => w[((i * s.cout + o) * 3 + 2 - ky) * 3 + 2 - kx],
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

    #[test]
    fn matches_the_direct_sum_on_even_odd_and_tiny_maps() {
        for &(n, cin, cout, h, w) in
            &[(1, 1, 1, 1, 1), (2, 3, 4, 2, 3), (1, 5, 2, 5, 4), (3, 4, 6, 7, 7), (2, 8, 3, 8, 6)]
        {
            let s = Shape3x3 { n, cin, cout, h, w };
            let (x, wt, b) = (data(n * cin * h * w, 1), data(cout * cin * 9, 2), data(cout, 3));
            for kernel in [Kernel::Forward, Kernel::InputGradient] {
                // For the input gradient the layer's weight is [cin, cout] of this convolution's view.
                let u = match kernel {
                    Kernel::Forward => transform_weights(&wt, cout, cin, kernel),
                    Kernel::InputGradient => transform_weights(&wt, cin, cout, kernel),
                };
                let bias = if kernel == Kernel::Forward { b.clone() } else { vec![0.0; cout] };
                let ours = conv3x3(&x, &u, (kernel == Kernel::Forward).then_some(&b[..]), Activation::Identity, s);
                let want = direct(&x, &wt, &bias, s, kernel);
                let err = ours.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                assert!(err < 2e-6 * (cin as f32 * 9.0).sqrt(), "{n}x{cin}->{cout} {h}x{w} {kernel:?}: error {err}");
            }
        }
    }

    /// The weight gradient against the direct sum dW[o, i, ky, kx] = Σ grad[j, o, y, x] x[j, i, y+ky-1, x+kx-1].
    #[test]
    fn weight_gradient_matches_the_direct_sum() {
        for &(n, cin, cout, h, w) in
            &[(1, 1, 1, 1, 1), (2, 3, 4, 2, 3), (1, 5, 2, 5, 4), (3, 4, 6, 7, 7), (2, 8, 3, 8, 6)]
        {
            let s = Shape3x3 { n, cin, cout, h, w };
            let (x, g) = (data(n * cin * h * w, 7), data(n * cout * h * w, 8));
            let ours = weight_grad3x3(&x, &g, s);
            let mut want = vec![0f64; cout * cin * 9];
            for j in 0..n {
                for o in 0..cout {
                    for i in 0..cin {
                        for ky in 0..3 {
                            for kx in 0..3 {
                                for yy in 0..h {
                                    for xx in 0..w {
                                        let (iy, ix) = ((yy + ky) as isize - 1, (xx + kx) as isize - 1);
                                        if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                                            continue;
                                        }
                                        want[((o * cin + i) * 3 + ky) * 3 + kx] += (g
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
            let err = ours.iter().zip(&want).map(|(&a, &b)| (a as f64 - b).abs()).fold(0f64, f64::max);
            assert!(err < 2e-6 * ((n * h * w) as f64).sqrt(), "{n}x{cin}->{cout} {h}x{w}: error {err}");
        }
    }

    /// The prepared op gives the same values as the convolution op that transforms on every call.
    #[test]
    fn prepared_weights_match_the_plain_op() {
        let dev = candle_core::Device::Cpu;
        let (n, cin, cout, h, w) = (2, 5, 7, 6, 9);
        let x = Tensor::from_vec(data(n * cin * h * w, 4), (n, cin, h, w), &dev).unwrap();
        let wt = Tensor::from_vec(data(cout * cin * 9, 5), (cout, cin, 3, 3), &dev).unwrap();
        let b = Tensor::from_vec(data(cout, 6), cout, &dev).unwrap();
        let u = WinogradWeights::new(&wt).unwrap().expect("3x3");
        assert_eq!(u.dims(), [cout, cin]);
        let ours = conv3x3_winograd(&x, &u, &b, Activation::Identity)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let s = Shape3x3 { n, cin, cout, h, w };
        let want = direct(
            &x.flatten_all().unwrap().to_vec1().unwrap(),
            &wt.flatten_all().unwrap().to_vec1().unwrap(),
            &b.to_vec1().unwrap(),
            s,
            Kernel::Forward,
        );
        let err = ours.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(err < 1e-5, "error {err}");
        assert!(WinogradWeights::new(&Tensor::zeros((2, 2, 5, 5), candle_core::DType::F32, &dev).unwrap())
            .unwrap()
            .is_none());
        let wrong = Tensor::zeros((1, cin + 1, h, w), candle_core::DType::F32, &dev).unwrap();
        assert!(conv3x3_winograd(&wrong, &u, &b, Activation::Identity).is_err());
        // The fused leaky ReLU is the activation applied to the plain values.
        let leaky = conv3x3_winograd(&x, &u, &b, Activation::LeakyRelu(0.1)).unwrap().flatten_all().unwrap();
        let leaky: Vec<f32> = leaky.to_vec1().unwrap();
        assert!(ours.iter().any(|&v| v < 0.0) && ours.iter().any(|&v| v > 0.0));
        for (l, o) in leaky.iter().zip(&ours) {
            assert_eq!(*l, if *o > 0.0 { *o } else { 0.1 * o });
        }
    }

    #[test]
    fn small_products_are_left_to_im2col() {
        assert!(!pays(Shape3x3 { n: 1, cin: 8, cout: 8, h: 6, w: 6 }));
        assert!(pays(Shape3x3 { n: 1, cin: 8, cout: 8, h: 12, w: 12 }));
        assert!(pays(Shape3x3 { n: 16, cin: 8, cout: 8, h: 4, w: 4 }));
    }
}

/// The weight gradient of y = conv3x3(x, w) + b for the output gradient `grad` [n, cout, h, w], as [cout, cin,
/// 3, 3]: per position ξ one product sums over all tiles, dU[ξ] = (A dY Aᵀ)[ξ] · V[ξ]ᵀ, then dW = Gᵀ dU G
/// (the forward's transforms read backwards). 2.25x fewer multiplications than im2col's product.
pub(crate) fn weight_grad3x3(x: &[f32], grad: &[f32], s: Shape3x3) -> Vec<f32> {
    assert_eq!(x.len(), s.n * s.cin * s.h * s.w);
    assert_eq!(grad.len(), s.n * s.cout * s.h * s.w);
    let tiles = s.tiles();
    let v = transform_input(x, s);
    let dm = transform_output_grad(grad, s);
    // [cout][16][cin]; overwritten by the products (which do not read it).
    let mut du = crate::uninit(s.cout * 16 * s.cin);
    let dst = crate::gemm::SendPtr(du.as_mut_ptr());
    (0..16).into_par_iter().for_each(|xi| {
        let dst = &dst;
        // SAFETY: product ξ writes only row positions ξ*cin..(ξ+1)*cin of each output channel's 16 rows of du,
        // disjoint from every other ξ; dm and v cover the strided extents read.
        unsafe {
            gemm_into(
                dst.0.add(xi * s.cin),
                (16 * s.cin) as isize,
                s.cout,
                s.cin,
                tiles,
                Mat { ptr: dm.as_ptr().add(xi * tiles), rs: (16 * tiles) as isize, cs: 1 },
                Mat { ptr: v.as_ptr().add(xi * tiles), rs: 1, cs: (16 * tiles) as isize },
                false,
                gemm::Parallelism::None,
            )
        }
    });
    let mut dw = crate::uninit(s.cout * s.cin * 9);
    dw.par_chunks_mut(s.cin * 9).enumerate().for_each(|(o, dwo)| {
        let duo = &du[o * 16 * s.cin..(o + 1) * 16 * s.cin];
        for i in 0..s.cin {
            let at = |r: usize, q: usize| duo[(r * 4 + q) * s.cin + i];
            // Gᵀ down each column, then G across each of the three rows.
            let cols: [[f32; 3]; 4] = std::array::from_fn(|q| gt4([at(0, q), at(1, q), at(2, q), at(3, q)]));
            for ky in 0..3 {
                let row = gt4([cols[0][ky], cols[1][ky], cols[2][ky], cols[3][ky]]);
                dwo[i * 9 + ky * 3..i * 9 + ky * 3 + 3].copy_from_slice(&row);
            }
        }
    });
    dw
}

/// The adjoint of the output transform: A dY Aᵀ for every 2x2 tile of grad [n, cout, h, w] (zero outside the
/// map), as [cout][16][tiles].
fn transform_output_grad(grad: &[f32], s: Shape3x3) -> Vec<f32> {
    let (ty_n, tx_n, tiles) = (s.tiles_y(), s.tiles_x(), s.tiles());
    let (ph, pw) = (2 * ty_n, 2 * tx_n);
    // Every (channel, position, tile) is written below.
    let mut dm = crate::uninit(s.cout * 16 * tiles);
    dm.par_chunks_mut(16 * tiles).enumerate().for_each_init(
        || vec![0f32; ph * pw],
        |padded, (o, dmo)| {
            for j in 0..s.n {
                embed(&grad[(j * s.cout + o) * s.h * s.w..][..s.h * s.w], s.w, padded, pw, 0);
                for ty in 0..ty_n {
                    let base = (j * ty_n + ty) * tx_n;
                    for tx in 0..tx_n {
                        let g = |dy: usize, dx: usize| padded[(2 * ty + dy) * pw + 2 * tx + dx];
                        let cols = [a4([g(0, 0), g(1, 0)]), a4([g(0, 1), g(1, 1)])];
                        for r in 0..4 {
                            for (q, val) in a4([cols[0][r], cols[1][r]]).into_iter().enumerate() {
                                dmo[(r * 4 + q) * tiles + base + tx] = val;
                            }
                        }
                    }
                }
            }
        },
    );
    dm
}

/// A 3x3 layer's weight in Winograd's transformed form, made once for weights that no longer change
/// (inference): at batch 1 the transform costs about as much as the convolution's products. It holds 16/9 of
/// the weight's values and replaces the weight.
#[derive(Clone, Debug)]
pub struct WinogradWeights {
    u: Arc<Vec<f32>>,
    cout: usize,
    cin: usize,
}

impl WinogradWeights {
    /// The transform of w [O, I, 3, 3]; `None` for other kernel sizes.
    pub fn new(w: &Tensor) -> candle_core::Result<Option<Self>> {
        let &[cout, cin, 3, 3] = w.dims() else { return Ok(None) };
        let data = w.flatten_all()?.to_vec1::<f32>()?;
        let u = transform_weights(&data, cout, cin, Kernel::Forward);
        Ok(Some(Self { u: Arc::new(u), cout, cin }))
    }

    /// [O, I] of the weight it was made from.
    pub fn dims(&self) -> [usize; 2] {
        [self.cout, self.cin]
    }
}

/// `F.conv2d(x, w, b, padding=1)` for the w that `u` was made from; x [N, I, H, W], b [O]. Without gradients
/// (an inference path). At any map size: with the transform made, it is as fast as im2col or faster even on
/// 2x2 maps at batch 1 (measured: 1024 -> 304 on 6x6, 1.7-2.0 ms vs 3.6-4.6 ms; 256 -> 192 on 2x2, 0.32-0.35
/// vs 0.32-0.37 ms).
/// `act` is applied in the output transform's epilogue.
pub fn conv3x3_winograd(x: &Tensor, u: &WinogradWeights, b: &Tensor, act: Activation) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op2_no_bwd(&b.contiguous()?, &Prepared(u.clone(), act))
}

struct Prepared(WinogradWeights, Activation);

impl CustomOp2 for Prepared {
    fn name(&self) -> &'static str {
        "csflow-conv3x3-winograd"
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
            candle_core::bail!("conv3x3: expected x [N, C, H, W], got {:?}", xl.dims());
        };
        if cin != u.cin || b.len() != u.cout {
            candle_core::bail!(
                "conv3x3: input has {cin} channels and bias {} values for a kernel of {} -> {}",
                b.len(),
                u.cin,
                u.cout
            );
        }
        let s = Shape3x3 { n, cin, cout: u.cout, h, w };
        Ok((CpuStorage::F32(conv3x3(x, &u.u, Some(b), self.1, s)), (n, u.cout, h, w).into()))
    }
}
