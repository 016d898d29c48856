//! Activations applied in kernels' epilogues, with a vectorisable exponential for swish: libm's scalar `expf`
//! was 40 % of an EfficientNet-B5 extraction at 768 px.

#[cfg(target_arch = "x86_64")]
use crate::simd::Simd;

/// An activation applied in a kernel's epilogue.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Activation {
    Identity,
    /// x * sigmoid(x), EfficientNet's swish.
    Swish,
    /// min(max(x, 0), 6), EfficientNet-Lite's activation.
    Relu6,
    /// x for x > 0, else slope * x.
    LeakyRelu(f32),
}

impl Activation {
    /// One value, with libm's exponential (the reference the vector path is tested against).
    #[inline(always)]
    pub fn apply(self, x: f32) -> f32 {
        match self {
            Activation::Swish => x / (1.0 + (-x).exp()),
            other => other.apply_cheap(x),
        }
    }

    /// Every activation but swish: no transcendental, so any loop over it vectorises as it is.
    #[inline(always)]
    fn apply_cheap(self, x: f32) -> f32 {
        match self {
            Activation::Identity | Activation::Swish => x,
            Activation::Relu6 => x.clamp(0.0, 6.0),
            Activation::LeakyRelu(slope) => {
                if x > 0.0 {
                    x
                } else {
                    slope * x
                }
            }
        }
    }

    /// Applies the activation to every element in place, with AVX2 + FMA where the CPU has them.
    pub fn apply_slice(self, v: &mut [f32]) {
        if self == Activation::Identity {
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if crate::has_avx2_fma() {
            // SAFETY: the CPU supports AVX2 and FMA (checked at run time).
            return unsafe { apply_slice_avx2(self, v) };
        }
        self.apply_lanes::<false>(v)
    }

    /// `v + bias`, activated, in place: a product's epilogue.
    pub(crate) fn apply_slice_with_bias(self, v: &mut [f32], bias: f32) {
        #[cfg(target_arch = "x86_64")]
        if crate::has_avx2_fma() {
            // SAFETY: the CPU supports AVX2 and FMA (checked at run time).
            return unsafe { apply_slice_with_bias_avx2(self, v, bias) };
        }
        v.iter_mut().for_each(|x| *x += bias);
        self.apply_lanes::<false>(v)
    }

    /// The loop behind [`Activation::apply_slice`], to be inlined into kernels compiled for AVX2 + FMA (where
    /// `FMA` is true): written so that LLVM turns it into 8-wide vector code.
    #[inline(always)]
    pub(crate) fn apply_lanes<const FMA: bool>(self, v: &mut [f32]) {
        match self {
            Activation::Identity => {}
            Activation::Swish => v.iter_mut().for_each(|x| *x /= 1.0 + exp::<FMA>(-*x)),
            other => v.iter_mut().for_each(|x| *x = other.apply_cheap(*x)),
        }
    }

    /// The activation on accumulators in registers (AVX2 or AVX-512), as vector ops: swish with
    /// [`exp_vector`], the same operations as [`Activation::apply_lanes`]'s (a copy through the stack for
    /// that loop cost B5's depthwise convolutions more than their multiply-adds).
    ///
    /// # Safety
    /// The CPU must support `S`'s features (see [`Simd`]).
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    pub(crate) unsafe fn apply_registers<S: Simd, const V: usize>(self, acc: &mut [S; V]) {
        // Loops, not closures: a closure does not inherit its caller's target features, and where LLVM did not
        // inline it (swish's) the intrinsics in it stayed calls (B5 7x slower).
        for a in acc.iter_mut() {
            *a = match self {
                Activation::Identity => *a,
                Activation::Relu6 => a.relu6(),
                Activation::LeakyRelu(slope) => a.leaky(slope),
                Activation::Swish => a.div(S::splat(1.0).add(exp_vector(S::splat(0.0).sub(*a)))),
            };
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn apply_slice_avx2(act: Activation, v: &mut [f32]) {
    act.apply_lanes::<true>(v)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn apply_slice_with_bias_avx2(act: Activation, v: &mut [f32], bias: f32) {
    v.iter_mut().for_each(|x| *x += bias);
    act.apply_lanes::<true>(v)
}

const LOG2E: f32 = std::f32::consts::LOG2_E;
// ln 2 split so that n * LN2_HI is exact for the n that occur.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
// Adding 1.5 * 2^23 rounds to the nearest integer and leaves it in the low mantissa bits.
const ROUND: f32 = 12_582_912.0;
// (Cephes' last coefficient, 0.500000001, is 0.5 in f32.)
const P: [f32; 6] = [1.987_569_1e-4, 1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 5e-1];
/// The inputs whose 2^n is a normal float.
const EXP_RANGE: (f32, f32) = (-87.336_54, 88.376_26);

/// e^x to about 1 ulp, branch-free so it vectorises: x = n ln 2 + r with |r| <= ln 2 / 2, e^r by Cephes'
/// degree-6 minimax polynomial, 2^n built in the exponent bits. Inputs are clamped to the range where 2^n is
/// a normal float (results 1.2e-38 ... 2.4e38); NaN stays NaN.
#[inline(always)]
pub(crate) fn exp<const FMA: bool>(x: f32) -> f32 {
    let x = x.clamp(EXP_RANGE.0, EXP_RANGE.1);
    let t = crate::madd::<FMA>(x, LOG2E, ROUND);
    let n = t - ROUND;
    let r = crate::madd::<FMA>(-n, LN2_LO, crate::madd::<FMA>(-n, LN2_HI, x));
    let mut p = P[0];
    for &c in &P[1..] {
        p = crate::madd::<FMA>(p, r, c);
    }
    let er = crate::madd::<FMA>(p, r * r, r + 1.0);
    let n_int = t.to_bits() as i32 - ROUND.to_bits() as i32;
    er * f32::from_bits(((n_int + 127) << 23) as u32)
}

/// [`exp`] (with FMA) in vector registers, operation for operation.
///
/// # Safety
/// The CPU must support `S`'s features (see [`Simd`]).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn exp_vector<S: Simd>(x: S) -> S {
    let x = x.clamp(EXP_RANGE.0, EXP_RANGE.1);
    let t = S::splat(ROUND).fmadd(x, S::splat(LOG2E));
    let n = t.sub(S::splat(ROUND));
    let r = x.fnmadd(n, S::splat(LN2_HI)).fnmadd(n, S::splat(LN2_LO));
    let mut p = S::splat(P[0]);
    for &c in &P[1..] {
        p = S::splat(c).fmadd(p, r);
    }
    let er = r.add(S::splat(1.0)).fmadd(p, r.mul(r));
    er.mul(t.pow2(ROUND.to_bits() as i32))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values across the whole range, the clamps and beyond, and the points around 0.
    fn probe() -> Vec<f32> {
        let mut v: Vec<f32> = (-20_000..=20_000).map(|i| i as f32 * 0.005).collect();
        v.extend([-200.0, -89.0, -87.5, -87.0, -1e-30, 0.0, 1e-30, 87.0, 88.3, 89.0, 200.0, f32::MIN_POSITIVE]);
        v
    }

    /// The polynomial exponential against f64's, relative to the value (it covers the normal range).
    #[test]
    fn exp_is_within_two_ulp_of_f64() {
        for x in probe().into_iter().filter(|x| x.abs() <= 87.0) {
            let want = (x as f64).exp();
            for got in [exp::<false>(x), exp::<true>(x)] {
                let rel = ((got as f64 - want) / want).abs();
                assert!(rel < 2.0 * f32::EPSILON as f64, "exp({x}) = {got}, want {want} (rel {rel:e})");
            }
        }
    }

    /// Swish on whole slices (vector path, scalar tail) against x / (1 + e^-x) in f64.
    #[test]
    fn swish_slice_matches_f64() {
        let mut v = probe();
        v.push(f32::NAN);
        let input = v.clone();
        Activation::Swish.apply_slice(&mut v);
        for (&x, &got) in input.iter().zip(&v) {
            if x.is_nan() {
                assert!(got.is_nan(), "swish(NaN) = {got}");
                continue;
            }
            let want = x as f64 / (1.0 + (-(x as f64)).exp());
            let err = (got as f64 - want).abs();
            // Below -87 the clamped exponential gives -x/2.4e38 instead of ~0: both vanish next to any sum.
            assert!(err <= 3.0 * f32::EPSILON as f64 * want.abs() + 1e-35, "swish({x}) = {got}, want {want}");
        }
    }

    /// Every activation on registers (AVX2 and AVX-512, what the CPU has) gives the slice path's values bit
    /// for bit: the same operations in the same order, NaN and the clamps included.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn registers_match_the_slice_path() {
        use std::arch::x86_64::{__m256, __m512};

        #[target_feature(enable = "avx2,fma")]
        unsafe fn on256(act: Activation, v: &mut [f32]) {
            on::<__m256>(act, v)
        }
        #[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl")]
        unsafe fn on512(act: Activation, v: &mut [f32]) {
            on::<__m512>(act, v)
        }
        #[inline(always)]
        unsafe fn on<S: Simd>(act: Activation, v: &mut [f32]) {
            for chunk in v.chunks_exact_mut(2 * S::LANES) {
                let p = chunk.as_mut_ptr();
                let all = S::first(S::LANES);
                let mut regs = [S::load::<false>(p, all), S::load::<false>(p.add(S::LANES), all)];
                act.apply_registers(&mut regs);
                regs[0].store::<false>(p, all);
                regs[1].store::<false>(p.add(S::LANES), all);
            }
        }

        let mut input = probe();
        input.extend([f32::NAN, -0.0, f32::INFINITY, f32::NEG_INFINITY]);
        input.truncate(input.len() / 32 * 32);
        for act in [Activation::Swish, Activation::Relu6, Activation::LeakyRelu(0.1), Activation::Identity] {
            let mut want = input.clone();
            act.apply_slice(&mut want);
            type Kernel = unsafe fn(Activation, &mut [f32]);
            let widths: [(&str, Kernel, bool); 2] =
                [("avx2", on256, crate::has_avx2_fma()), ("avx512", on512, crate::has_avx512())];
            for (name, run, supported) in widths {
                if !supported {
                    continue;
                }
                let mut got = input.clone();
                // SAFETY: the CPU's features checked just above.
                unsafe { run(act, &mut got) };
                for ((x, g), w) in input.iter().zip(&got).zip(&want) {
                    assert!(
                        g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()),
                        "{name} {act:?}({x}): {g} vs {w}"
                    );
                }
            }
        }
    }

    /// ReLU6 and leaky ReLU through the slice path, against hand-worked values.
    #[test]
    fn cheap_activations_on_slices() {
        let mut v = vec![-3.0, -0.5, 0.0, 2.5, 6.0, 7.25];
        Activation::Relu6.apply_slice(&mut v);
        assert_eq!(v, [0.0, 0.0, 0.0, 2.5, 6.0, 6.0]);
        let mut v = vec![-3.0, -0.5, 0.0, 2.5];
        Activation::LeakyRelu(0.1).apply_slice(&mut v);
        assert_eq!(v, [-0.3, -0.05, 0.0, 2.5]);
    }
}
