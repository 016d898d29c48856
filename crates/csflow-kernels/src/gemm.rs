//! Thin, strided access to the `gemm` crate's f32 product.

use gemm::Parallelism;

/// A matrix operand as used in a product: pointer and (row, column) strides in elements.
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
pub(crate) fn matmul(dst: &mut [f32], m: usize, n: usize, k: usize, lhs: Mat, rhs: Mat, accumulate: bool) {
    assert_eq!(dst.len(), m * n);
    // SAFETY: dst is an exclusive m x n row-major buffer; the callers' shapes size lhs and rhs.
    unsafe {
        gemm_into(
            dst.as_mut_ptr(),
            n as isize,
            m,
            n,
            k,
            lhs,
            rhs,
            accumulate,
            Parallelism::Rayon(rayon::current_num_threads()),
        )
    }
}
