//! Element-wise f32 functions written so that the compiler vectorises them: straight-line
//! arithmetic, no libm call, no branch that a select cannot express.
//!
//! Why: libm's `expf` and `erff` are scalar calls, and at SD's activation sizes they were most
//! of the attention's softmax and of GELU. Each function here states its accuracy against libm
//! and is tested for it; NaN stays NaN (a diverged model must not look finite).

const LOG2E: f32 = std::f32::consts::LOG2_E;
// Adding 1.5·2^23 rounds to the nearest integer without a (non-vectorisable) floor call.
const ROUND: f32 = 12_582_912.0;

/// `e^x = 2^n · e^r` with `n = round(x/ln2)` and `|r| ≤ ln2/2` (ln2 split in two for an exact
/// reduction): returns `t`, which carries `n` in its low mantissa bits (see [`integer_of`]),
/// and `e^r` by Cephes' degree-6 polynomial. `x` must be finite and `|x| < 2^22`.
///
/// Written with fused multiply-adds (`mul_add`, one rounding each): the AVX2 and AVX-512 builds
/// of the loops that call it ([`crate::vectorised`]) make each one instruction, which takes a
/// third of the instructions per element away; a build without FMA hardware calls libm's
/// correctly rounded `fmaf` instead (slow, but the same bits).
#[inline(always)]
fn exp_reduced(x: f32) -> (f32, f32) {
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let t = x.mul_add(LOG2E, ROUND);
    let n = t - ROUND;
    let r = (-n).mul_add(LN2_LO, (-n).mul_add(LN2_HI, x));
    let mut p: f32 = 1.987_569_1e-4;
    p = p.mul_add(r, 1.398_199_9e-3);
    p = p.mul_add(r, 8.333_452e-3);
    p = p.mul_add(r, 4.166_579_6e-2);
    p = p.mul_add(r, 1.666_666_5e-1);
    p = p.mul_add(r, 0.5);
    (t, p.mul_add(r * r, r) + 1.0)
}

/// The `n` that [`exp_reduced`]'s `t` carries.
#[inline(always)]
fn integer_of(t: f32) -> i32 {
    t.to_bits() as i32 - ROUND.to_bits() as i32
}

/// `2^n` for `n` in [−126, 127], built in the exponent bits.
#[inline(always)]
fn power_of_two(n: i32) -> f32 {
    f32::from_bits(((n + 127) as u32) << 23)
}

/// `e^x` for `x ≤ 0` (a softmax's shifted scores), within 2 ulp of libm's `expf`, in
/// straight-line arithmetic the compiler vectorises (libm's scalar call was most of the
/// attention's time; see [`exp_reduced`]). Below −87.3 the true value is under f32's smallest
/// normal: 0. One multiply cheaper than [`exp`], which the softmax's inner loop feels.
#[inline(always)]
pub(crate) fn exp_nonpositive(x: f32) -> f32 {
    let (t, e_r) = exp_reduced(x.max(-87.3));
    // n is in [-126, 0]: its biased exponent fits the field.
    let two_n = power_of_two(integer_of(t));
    if x > -87.3 {
        e_r * two_n
    } else if x <= -87.3 {
        0.0
    } else {
        x // NaN stays NaN: a diverged model must not look finite
    }
}

/// `e^x` for every `x`, within 2 ulp of libm's `expf` wherever the result is a normal number
/// (SiLU's and GELU's exponential: libm's scalar call was a twelfth of a VAE training step).
/// `2^n` is applied as two powers of two, `2^⌊n/2⌋ · 2^(n−⌊n/2⌋)`, so that the whole range, from
/// the largest finite result down to the smallest subnormal, needs no special case; beyond it,
/// `+∞` and 0.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    // ln(f32::MAX), and ln of half the smallest subnormal (below it e^x rounds to 0).
    const MAX: f32 = 88.722_84;
    const MIN: f32 = -103.972_08;
    let (t, e_r) = exp_reduced(x.clamp(MIN, MAX));
    // n is in [-150, 128]: each half is in [-75, 64].
    let n = integer_of(t);
    let half = n >> 1;
    let value = e_r * power_of_two(half) * power_of_two(n - half);
    if (MIN..=MAX).contains(&x) {
        value
    } else if x > MAX {
        f32::INFINITY
    } else if x < MIN {
        0.0
    } else {
        x // NaN
    }
}

/// `erf(x)` as PyTorch's vectorised CPU kernels compute it (`Vectorized<float>::erf`, which
/// its exact GELU uses): Abramowitz & Stegun 7.1.26, `1 − (a₁t + … + a₅t⁵)·e^{−x²}` with
/// `t = 1/(1 + p|x|)`, sign restored. Absolute error below 6e-7 against libm's `erff` (the
/// formula's 1.5e-7 plus the rounding of `1 − …` near 0): accurate in absolute terms, which is
/// what GELU's `1 + erf` needs, not relative to tiny values of erf near 0.
#[inline(always)]
pub(crate) fn erf(x: f32) -> f32 {
    const P: f32 = 0.327_591_1;
    const A1: f32 = 0.254_829_6;
    const A2: f32 = -0.284_496_74;
    const A3: f32 = 1.421_413_8;
    const A4: f32 = -1.453_152_1;
    const A5: f32 = 1.061_405_4;
    let magnitude = x.abs();
    let t = 1.0 / (1.0 + P * magnitude);
    let poly = ((((A5 * t + A4) * t + A3) * t + A2) * t + A1) * t;
    (1.0 - poly * exp_nonpositive(-magnitude * magnitude)).copysign(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fast_exponential_is_within_two_ulp_of_libm_zero_far_below_and_nan_for_nan() {
        let mut worst = 0f32;
        for i in 0..=200_000u32 {
            let x = -(i as f32) * 87.0 / 200_000.0;
            let (ours, libm) = (exp_nonpositive(x), x.exp());
            worst = worst.max((ours - libm).abs() / libm);
        }
        // 2 ulp of f32 is 2.4e-7 relative.
        assert!(worst <= 2.4e-7, "worst relative error {worst:e}");
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert_eq!(exp_nonpositive(-100.0), 0.0);
        assert_eq!(exp_nonpositive(f32::NEG_INFINITY), 0.0);
        assert!(exp_nonpositive(f32::NAN).is_nan());
    }

    #[test]
    fn the_general_exponential_is_within_two_ulp_of_libm_overflows_underflows_and_keeps_nan() {
        let mut worst = 0f32;
        for i in 0..=400_000u32 {
            // Every result from the smallest normal (e^-87.33) to the largest finite value.
            let x = -87.3 + (i as f32) * (88.72 + 87.3) / 400_000.0;
            let (ours, libm) = (exp(x), x.exp());
            worst = worst.max((ours - libm).abs() / libm);
        }
        assert!(worst <= 2.4e-7, "worst relative error {worst:e}");
        // Subnormal results: within one subnormal step (1.4e-45) of libm's.
        for x in [-88.0f32, -95.5, -101.0, -103.9] {
            assert!((exp(x) - x.exp()).abs() <= 1.5e-45, "{x}: {} vs {}", exp(x), x.exp());
        }
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(88.72).is_finite());
        assert_eq!(exp(88.73), f32::INFINITY);
        assert_eq!(exp(f32::INFINITY), f32::INFINITY);
        assert_eq!(exp(-104.0), 0.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert!(exp(f32::NAN).is_nan());
    }

    #[test]
    fn erf_is_within_6e7_of_libm_odd_saturating_and_nan_for_nan() {
        let mut worst = 0f32;
        for i in 0..=200_000u32 {
            let x = i as f32 * 6.0 / 200_000.0;
            let (ours, libm) = (erf(x), libm::erff(x));
            worst = worst.max((ours - libm).abs());
            assert_eq!(erf(-x), -ours);
        }
        assert!(worst < 6e-7, "worst absolute error {worst:e}");
        assert!(erf(0.0).abs() < 1e-7);
        assert_eq!(erf(f32::INFINITY), 1.0);
        assert_eq!(erf(f32::NEG_INFINITY), -1.0);
        assert!(erf(f32::NAN).is_nan());
    }
}
