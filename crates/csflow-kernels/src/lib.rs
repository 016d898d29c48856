//! CPU kernels that candle 0.11 lacks, as candle custom ops with their backward.
//!
//! - [`soft_affine`]: a coupling block's soft-clamped affine transform, one pass each way.
//! - [`atan`]: elementwise arctangent (candle has no `atan`); CS-Flow's soft clamp needs it.
//! - [`bilinear_resize`]: bilinear resampling with `align_corners = false`, exactly as PyTorch's
//!   `F.interpolate(mode="bilinear")`; candle's own upsampling has no backward.
//! - [`leaky_relu`]: one pass each way, PyTorch's gradient at 0.
//! - [`conv2d`]: im2col + `gemm`, or Winograd F(2x2, 3x3) / F(2x2, 5x5) for stride-1 3x3 and 5x5 kernels,
//!   with both gradients;
//!   [`conv2d_act`] and [`conv_winograd`] (prepared [`WinogradWeights`]) fuse an activation, for inference.
//! - [`conv_narrow`]: convolutions onto few output pixels on weights packed once ([`NarrowWeights`], f32 or
//!   f16), for inference.
//! - [`depthwise_conv2d`]: with fused bias and activation, for inference.
//! - [`pointwise_conv`]: 1x1 convolutions on packed weights ([`PointwiseWeights`]) with fused bias, residual,
//!   input-channel scale and activation, for inference.
//! - [`InvertedResidual`]: an MBConv block without squeeze-excitation as one op (large maps in bands of output
//!   rows, small ones with vectors over channels; [`DepthwiseWeights`]), for inference.
//! - [`stem_conv`]: dense convolution of few input channels (the backbone's stem), padding, bias and
//!   activation fused, for inference.
//!
//! The ops know nothing of CS-Flow. They take f32 tensors of any layout (made contiguous first).

mod activation;
mod affine;
mod atan;
mod bf16conv;
mod bilinear;
mod conv;
mod depthwise;
mod gemm;
mod leaky_relu;
mod mbconv;
#[cfg(target_arch = "x86_64")]
mod microkernel;
mod narrow;
mod pointwise;
mod reduce;
#[cfg(target_arch = "x86_64")]
mod simd;
mod stem;
mod winograd;

pub use activation::Activation;
pub use affine::{soft_affine, SOFT_CLAMP_SLOPE};
pub use atan::atan;
pub use bf16conv::{conv_bf16, Bf16Weights};
pub use bilinear::{bilinear_resize, bilinear_up2};
pub use conv::{conv2d, conv2d_act};
pub use depthwise::{depthwise_conv2d, DepthwiseWeights, Padding};
pub use leaky_relu::leaky_relu;
pub use mbconv::InvertedResidual;
pub use narrow::{conv_narrow, NarrowWeights};
pub use pointwise::{pointwise_conv, PointwiseWeights};
pub use reduce::sum_of_squares;
pub use stem::stem_conv;
pub use winograd::{conv_winograd, WinogradWeights};

use candle_core::{CpuStorage, Layout, Result};

/// The contiguous f32 data behind a custom op's argument.
fn f32_slice<'a>(storage: &'a CpuStorage, layout: &Layout, op: &str) -> Result<&'a [f32]> {
    let data = storage
        .as_slice::<f32>()
        .map_err(|_| candle_core::Error::Msg(format!("{op}: only f32 tensors are supported")))?;
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("{op}: argument must be contiguous"),
    }
}

/// A buffer of n f32 whose contents are unspecified, for outputs that a kernel writes whole before reading:
/// zeroing tens of MB that are overwritten anyway cost as much as the transforms that fill them.
#[allow(clippy::uninit_vec)]
fn uninit(n: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(n);
    // SAFETY: f32 has no invalid bit patterns and the capacity is n; every caller writes all n elements
    // before reading any (candle's own `alloc_uninit` does the same).
    unsafe { v.set_len(n) };
    v
}

/// Whether this CPU runs the AVX2 + FMA versions of the kernels (detected once).
#[cfg(target_arch = "x86_64")]
fn has_avx2_fma() -> bool {
    static DETECTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *DETECTED.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
}

/// Whether this CPU runs the AVX-512 kernels (AVX512F, BW and VL beside AVX2 and FMA; detected once).
fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static DETECTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *DETECTED.get_or_init(|| {
            has_avx2_fma()
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Whether this CPU runs the bfloat16 products (AVX512_BF16 with AVX512F, BW and VL; detected once).
fn has_avx512_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static DETECTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *DETECTED.get_or_init(|| has_avx512() && is_x86_feature_detected!("avx512bf16"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// The arithmetic of inference products that may trade precision for speed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Precision {
    /// f32 throughout.
    #[default]
    F32,
    /// Operands rounded to bfloat16 (8 significant bits), their products summed in f32, on CPUs with
    /// AVX512_BF16 (as OpenVINO does by default there); f32 elsewhere. Users choose per layer what takes it
    /// (the flow: 3x3 and larger maps' stride-2 layers in bfloat16; the 5x5 layers' transformed weights and
    /// the small maps' packed ones in f16, with the inputs in f32).
    Bf16,
}

impl Precision {
    /// Whether this CPU computes in this precision (f32 always; bfloat16 with AVX512_BF16).
    pub fn supported(self) -> bool {
        self == Precision::F32 || has_avx512_bf16()
    }
}

/// An AVX2 mask selecting the first `n` (at most 8) of 8 lanes, for masked loads and stores of a row's tail.
///
/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn first_lanes(n: usize) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    _mm256_cmpgt_epi32(_mm256_set1_epi32(n.min(8) as i32), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7))
}

/// 8 values at `p`, or with `MASKED` only the lanes `mask` selects (zeros elsewhere, nothing read there).
///
/// # Safety
/// The CPU must support AVX2; the values read must be readable.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn load_lanes<const MASKED: bool>(p: *const f32, mask: std::arch::x86_64::__m256i) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    if MASKED {
        _mm256_maskload_ps(p, mask)
    } else {
        _mm256_loadu_ps(p)
    }
}

/// Runs `f` on one of rayon's worker threads (inline when already on one).
///
/// Every kernel here splits its work over rayon. Called from an outside thread (a binary's main thread),
/// each split hands the work to the pool and puts the caller to sleep until it is done: two context
/// switches per kernel call, 17 % of a Lite0 extraction at 256 px. On a worker, the caller takes part.
pub fn on_worker<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    rayon::scope(|_| f())
}

/// Fused multiply-add where the target has it (`f32::mul_add` without FMA calls libm's slow `fmaf`).
#[inline(always)]
fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// Elements per rayon task: small enough to spread work, large enough to amortise scheduling.
const CHUNK: usize = 1 << 14;

/// How many items of `len` elements one rayon task should take, so tasks hold about [`CHUNK`] elements: one
/// task per 64-element plane or 4-element im2col row cost more in scheduling than in copying (8-10 % of a
/// flow forward at 8x8 maps).
fn items_per_task(len: usize) -> usize {
    (CHUNK / len.max(1)).max(1)
}

/// Deterministic test values in [-1, 1), varied enough to catch index mix-ups.
#[cfg(test)]
pub(crate) fn test_data(n: usize, seed: usize) -> Vec<f32> {
    (0..n).map(|i| ((i * 7919 + seed * 104_729) % 1009) as f32 / 504.5 - 1.0).collect()
}

/// The reference for the inference-only convolutions: candle's own convolution of x padded explicitly, plus
/// the bias, followed by each activation the kernels fuse (candle's silu and clamp).
#[cfg(test)]
pub(crate) fn candle_reference(
    x: &candle_core::Tensor,
    w: &candle_core::Tensor,
    b: &candle_core::Tensor,
    stride: usize,
    pad: Padding,
    groups: usize,
) -> Vec<(Activation, candle_core::Tensor)> {
    let xp = x.pad_with_zeros(2, pad.top, pad.bottom).unwrap().pad_with_zeros(3, pad.left, pad.right).unwrap();
    let o = w.dim(0).unwrap();
    let plain = xp.conv2d(w, 0, stride, 1, groups).unwrap().broadcast_add(&b.reshape((1, o, 1, 1)).unwrap()).unwrap();
    vec![
        (Activation::Identity, plain.clone()),
        (Activation::Swish, plain.silu().unwrap()),
        (Activation::Relu6, plain.clamp(0f32, 6f32).unwrap()),
    ]
}
