//! Thin, strided access to the `gemm` crate's f32 product.

use gemm::Parallelism;
use rayon::prelude::*;

use crate::Activation;

/// A matrix operand as used in a product: pointer and (row, column) strides in elements.
#[derive(Clone, Copy)]
pub(crate) struct Mat {
    pub ptr: *const f32,
    pub rs: isize,
    pub cs: isize,
}

impl Mat {
    /// A row-major `[rows, cols]` matrix.
    pub fn plain(ptr: *const f32, cols: usize) -> Self {
        Self { ptr, rs: cols as isize, cs: 1 }
    }

    /// The transpose of a row-major `[rows, cols]` matrix stored at `ptr`.
    pub fn transposed(ptr: *const f32, cols: usize) -> Self {
        Self { ptr, rs: 1, cs: cols as isize }
    }
}

/// A raw output pointer shared by tasks that write disjoint parts of one buffer.
pub(crate) struct SendPtr(pub *mut f32);
// SAFETY: users only write disjoint elements through it while the buffer outlives the tasks.
unsafe impl Sync for SendPtr {}
unsafe impl Send for SendPtr {}

#[cfg(target_arch = "x86_64")]
thread_local! {
    /// Each worker's row-major copies of strided operands for `gemm512`, kept between calls.
    static ROW_MAJOR: std::cell::RefCell<(Vec<f32>, Vec<f32>)> =
        const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// x [rows, cols] as a pointer to row-major values and its row stride: itself where its rows are
/// contiguous, else a copy in `buf`.
///
/// # Safety
/// x covers rows x cols elements at its strides.
#[cfg(target_arch = "x86_64")]
unsafe fn row_major(x: Mat, rows: usize, cols: usize, buf: &mut Vec<f32>) -> (*const f32, usize) {
    if x.cs == 1 && x.rs > 0 {
        return (x.ptr, x.rs as usize);
    }
    buf.clear();
    buf.resize(rows * cols, 0.0);
    // In 32 x 32 blocks, so that both the strided reads and the writes stay within a few pages; a transposed
    // matrix (columns contiguous) 8 x 8 at a time in registers (the scalar loop was 8 % of a training step).
    const B: usize = 32;
    let by_registers = x.rs == 1 && x.cs > 0 && crate::has_avx2_fma();
    for r0 in (0..rows).step_by(B) {
        for c0 in (0..cols).step_by(B) {
            let (r1, c1) = ((r0 + B).min(rows), (c0 + B).min(cols));
            let (rv, cv) = if by_registers { (r0 + (r1 - r0) / 8 * 8, c0 + (c1 - c0) / 8 * 8) } else { (r0, c0) };
            for r in (r0..rv).step_by(8) {
                for c in (c0..cv).step_by(8) {
                    transpose8(
                        x.ptr.offset(r as isize + c as isize * x.cs),
                        x.cs as usize,
                        buf.as_mut_ptr().add(r * cols + c),
                        cols,
                    );
                }
            }
            for c in c0..c1 {
                for r in r0..r1 {
                    if r < rv && c < cv {
                        continue;
                    }
                    buf[r * cols + c] = *x.ptr.offset(r as isize * x.rs + c as isize * x.cs);
                }
            }
        }
    }
    (buf.as_ptr(), cols.max(1))
}

/// dst[r][c] = src[c][r] for an 8 x 8 block: rows of src `lds` apart, of dst `ldd`.
///
/// # Safety
/// AVX2; both blocks lie within their buffers.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn transpose8(src: *const f32, lds: usize, dst: *mut f32, ldd: usize) {
    use std::arch::x86_64::*;
    let r: [__m256; 8] = std::array::from_fn(|i| _mm256_loadu_ps(src.add(i * lds)));
    let t0 = _mm256_unpacklo_ps(r[0], r[1]);
    let t1 = _mm256_unpackhi_ps(r[0], r[1]);
    let t2 = _mm256_unpacklo_ps(r[2], r[3]);
    let t3 = _mm256_unpackhi_ps(r[2], r[3]);
    let t4 = _mm256_unpacklo_ps(r[4], r[5]);
    let t5 = _mm256_unpackhi_ps(r[4], r[5]);
    let t6 = _mm256_unpacklo_ps(r[6], r[7]);
    let t7 = _mm256_unpackhi_ps(r[6], r[7]);
    let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
    let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
    let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
    let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
    let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
    let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
    let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
    let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
    let out = [
        _mm256_permute2f128_ps::<0x20>(u0, u4),
        _mm256_permute2f128_ps::<0x20>(u1, u5),
        _mm256_permute2f128_ps::<0x20>(u2, u6),
        _mm256_permute2f128_ps::<0x20>(u3, u7),
        _mm256_permute2f128_ps::<0x31>(u0, u4),
        _mm256_permute2f128_ps::<0x31>(u1, u5),
        _mm256_permute2f128_ps::<0x31>(u2, u6),
        _mm256_permute2f128_ps::<0x31>(u3, u7),
    ];
    for (i, o) in out.iter().enumerate() {
        _mm256_storeu_ps(dst.add(i * ldd), *o);
    }
}

/// dst [m, n] (row stride `dst_rs`, unit column stride) = (accumulate ? dst : 0) + lhs [m, k] · rhs [k, n].
///
/// # Safety
/// lhs must cover m x k and rhs k x n elements at their strides, and dst m x n at `dst_rs`, exclusively.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_into(
    dst: *mut f32,
    dst_rs: isize,
    m: usize,
    n: usize,
    k: usize,
    lhs: Mat,
    rhs: Mat,
    accumulate: bool,
    parallelism: Parallelism,
) {
    // One thread, on CPUs with AVX-512: our own kernel (the `gemm` crate's AVX-512 kernels need a nightly
    // compiler; its AVX2 ones ran the Winograd products of 1024 -> 304 3x3 on 24x24 in 12.1 ms against 7.5 in
    // AVX-512 registers, on Zen 5). An operand with strided rows (the weight gradients' transposed ones) is
    // first copied row-major, which costs under 1/16 of the product where the other side has 16 or more rows.
    #[cfg(target_arch = "x86_64")]
    if crate::has_avx512() && dst_rs > 0 && matches!(parallelism, Parallelism::None) {
        let contiguous = |x: &Mat| x.cs == 1 && x.rs > 0;
        if (contiguous(&lhs) || n >= 16) && (contiguous(&rhs) || m >= 16) {
            return ROW_MAJOR.with_borrow_mut(|(a, b)| {
                let (lhs, lda) = row_major(lhs, m, k, a);
                let (rhs, ldb) = row_major(rhs, k, n, b);
                // SAFETY: the CPU has AVX-512 (checked); the operands cover what the caller promised.
                crate::microkernel::gemm512(dst, dst_rs as usize, (m, n, k), lhs, lda, rhs, ldb, accumulate)
            });
        }
    }
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs,
        accumulate,
        lhs.ptr,
        lhs.cs,
        lhs.rs,
        rhs.ptr,
        rhs.cs,
        rhs.rs,
        1.0,
        1.0,
        false,
        false,
        false,
        parallelism,
    )
}

/// dst [m, n] (row-major, exclusive) = (accumulate ? dst : 0) + lhs [m, k] · rhs [k, n], on all rayon threads.
///
/// Split into blocks of rows or columns (whichever dimension is longer), each multiplied single-threaded: on
/// the training step's shapes that ran 5-25 % faster than the `gemm` crate's own rayon split (measured on
/// 24x144x4096, 672x112x256, 192x2304x1024).
pub(crate) fn matmul(dst: &mut [f32], m: usize, n: usize, k: usize, lhs: Mat, rhs: Mat, accumulate: bool) {
    assert_eq!(dst.len(), m * n);
    let by_rows = m > n;
    let len = if by_rows { m } else { n };
    let step = len.div_ceil(4 * rayon::current_num_threads()).max(16).next_multiple_of(16);
    let out = SendPtr(dst.as_mut_ptr());
    let operands = (SendMat(lhs), SendMat(rhs));
    (0..len.div_ceil(step)).into_par_iter().for_each(|blk| {
        let (out, (lhs, rhs)) = (&out, &operands);
        let (at, width) = (blk * step, step.min(len - blk * step));
        // SAFETY: block blk owns rows (or columns) at..at + width of dst, an exclusive m x n row-major buffer;
        // the callers' shapes size lhs and rhs, read from that row of lhs (or column of rhs).
        unsafe {
            if by_rows {
                let lhs = Mat { ptr: lhs.0.ptr.offset(at as isize * lhs.0.rs), ..lhs.0 };
                gemm_into(out.0.add(at * n), n as isize, width, n, k, lhs, rhs.0, accumulate, Parallelism::None)
            } else {
                let rhs = Mat { ptr: rhs.0.ptr.offset(at as isize * rhs.0.cs), ..rhs.0 };
                gemm_into(out.0.add(at), n as isize, m, width, k, lhs.0, rhs, accumulate, Parallelism::None)
            }
        }
    });
}

/// A read-only operand shared by the tasks of one product.
struct SendMat(Mat);
// SAFETY: the matrix is only read, while the buffer it points into outlives the tasks.
unsafe impl Sync for SendMat {}

/// dst [m, n] (row-major) = act(bias[row] + lhs [m, k] · rhs [k, n]), with rhs row-major and `n` columns.
///
/// One parallel pass over column blocks, each multiplied single-threaded, then given its bias and activation
/// while still in cache: three passes (bias fill, product, activation) with a thread wake-up each cost more
/// than the product on the small maps of an extraction at 64-256 px.
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul_bias_act(
    dst: &mut [f32],
    m: usize,
    n: usize,
    k: usize,
    lhs: &[f32],
    rhs: &[f32],
    bias: &[f32],
    act: Activation,
) {
    assert!(dst.len() == m * n && lhs.len() == m * k && rhs.len() == k * n && bias.len() == m);
    let cols = block_cols(m, n, rayon::current_num_threads());
    let out = SendPtr(dst.as_mut_ptr());
    (0..n.div_ceil(cols)).into_par_iter().for_each(|blk| {
        let out = &out;
        let (j0, nb) = (blk * cols, cols.min(n - blk * cols));
        let row = |r: usize| {
            // SAFETY: block blk owns columns j0..j0 + nb of every row; rows are n apart in an m x n buffer.
            unsafe { std::slice::from_raw_parts_mut(out.0.add(r * n + j0), nb) }
        };
        // SAFETY: as above; lhs is m x k and rhs k x n row-major, read from column j0. The product only
        // stores (it does not read dst), then each row gets its bias and activation while in cache.
        unsafe {
            gemm_into(
                out.0.add(j0),
                n as isize,
                m,
                nb,
                k,
                Mat::plain(lhs.as_ptr(), k),
                Mat::plain(rhs.as_ptr().add(j0), n),
                false,
                Parallelism::None,
            )
        };
        (0..m).for_each(|r| act.apply_slice_with_bias(row(r), bias[r]));
    });
}

/// Columns per block of [`matmul_bias_act`]: about four blocks per thread, each at most as wide as keeps its
/// m rows within 256 KB (so the activation finds them in L2), in multiples of 16 (the micro-kernel's width).
fn block_cols(m: usize, n: usize, threads: usize) -> usize {
    let cache = (65_536 / m.max(1)).max(64);
    let spread = n.div_ceil(4 * threads.max(1));
    cache.min(spread).max(16).next_multiple_of(16)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_data as data;

    /// Against a direct f64 sum, with rows enough that blocks are capped by the cache (64 columns) and a
    /// partial last block, and with few rows and columns (one block).
    #[test]
    fn blocked_product_with_bias_and_activation_matches_direct_sums() {
        for (m, n, k) in [(1100, 1000, 7), (3, 5, 4)] {
            let (lhs, rhs, bias) = (data(m * k, 1), data(k * n, 2), data(m, 3));
            let mut dst = vec![f32::NAN; m * n];
            matmul_bias_act(&mut dst, m, n, k, &lhs, &rhs, &bias, Activation::Relu6);
            for (i, &got) in dst.iter().enumerate() {
                let (r, c) = (i / n, i % n);
                let sum = bias[r] as f64 + (0..k).map(|t| lhs[r * k + t] as f64 * rhs[t * n + c] as f64).sum::<f64>();
                let want = sum.clamp(0.0, 6.0);
                assert!((got as f64 - want).abs() < 1e-5, "({r}, {c}) of {m}x{n}: {got} vs {want}");
            }
        }
        assert_eq!(block_cols(1100, 1000, 2), 64);
    }

    /// Products through `gemm_into` (our AVX-512 kernel where the CPU has it) against f64 sums: several
    /// slices of k (256) and blocks of columns (512) with partial last ones, partial strips of 32 columns and
    /// panels of 8 rows, strided rows, accumulation and k = 0; each operand also stored transposed (copied
    /// row-major first).
    #[test]
    fn strided_products_match_direct_sums() {
        let cases = [(19, 600, 530, false), (9, 33, 257, true), (8, 7, 1, false), (3, 40, 0, true), (20, 18, 40, true)];
        for ((m, n, k, accumulate), transposed) in cases.into_iter().flat_map(|c| [(c, 0), (c, 1), (c, 2)]) {
            let (lda, ldb, ldc) = (k + 3, n + 5, n + 2);
            let (lhs, rhs, start) = (data(m * lda, 4), data(k.max(1) * ldb, 5), data(m * ldc, 6));
            // The same values in column-major copies: lhs[r, t] at t * m + r, rhs[t, c] at c * k + t.
            let lhs_t: Vec<f32> = (0..k * m).map(|i| lhs[(i % m) * lda + i / m]).collect();
            let rhs_t: Vec<f32> = (0..n * k).map(|i| rhs[(i % k) * ldb + i / k]).collect();
            let a = match transposed {
                1 => Mat { ptr: lhs_t.as_ptr(), rs: 1, cs: m as isize },
                _ => Mat { ptr: lhs.as_ptr(), rs: lda as isize, cs: 1 },
            };
            let b = match transposed {
                2 => Mat { ptr: rhs_t.as_ptr(), rs: 1, cs: k as isize },
                _ => Mat { ptr: rhs.as_ptr(), rs: ldb as isize, cs: 1 },
            };
            let mut dst = start.clone();
            // SAFETY: the buffers cover the strided extents.
            unsafe { gemm_into(dst.as_mut_ptr(), ldc as isize, m, n, k, a, b, accumulate, Parallelism::None) };
            for r in 0..m {
                for c in 0..ldc {
                    let got = dst[r * ldc + c];
                    if c >= n {
                        assert_eq!(got, start[r * ldc + c], "padding ({r}, {c}) written");
                        continue;
                    }
                    let sum: f64 = (0..k).map(|t| lhs[r * lda + t] as f64 * rhs[t * ldb + c] as f64).sum();
                    let want = sum + if accumulate { start[r * ldc + c] as f64 } else { 0.0 };
                    assert!((got as f64 - want).abs() < 1e-4, "({r}, {c}) of {m}x{n}x{k}: {got} vs {want}");
                }
            }
        }
    }
}
