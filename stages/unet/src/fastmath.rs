//! Element-wise f32 functions written so that the compiler vectorises them: straight-line
//! arithmetic, no libm call, no branch that a select cannot express.
//!
//! Why: libm's `expf` and `erff` are scalar calls, and at SD's activation sizes they were most
//! of the attention's softmax and of GELU. Each function here states its accuracy against libm
//! and is tested for it; NaN stays NaN (a diverged model must not look finite).

/// `e^x` for `x ≤ 0` (a softmax's shifted scores), within 2 ulp of libm's `expf`, in
/// straight-line arithmetic the compiler vectorises (libm's scalar call was most of the
/// attention's time): `x = n·ln2 + r` with `|r| ≤ ln2/2` (ln2 split in two for an exact
/// reduction), Cephes' degree-6 polynomial for `e^r`, and `2^n` built in the exponent bits.
/// Below −87.3 the true value is under f32's smallest normal: 0.
#[inline(always)]
pub(crate) fn exp_nonpositive(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding 1.5·2^23 rounds to the nearest integer without a (non-vectorisable) floor call.
    const ROUND: f32 = 12_582_912.0;
    let clamped = x.max(-87.3);
    let t = clamped * LOG2E + ROUND;
    let n = t - ROUND;
    let r = clamped - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let e_r = p * r * r + r + 1.0;
    // n is in [-126, 0]: its biased exponent fits the field.
    let two_n = f32::from_bits(((t.to_bits() as i32 - ROUND.to_bits() as i32 + 127) as u32) << 23);
    if x > -87.3 {
        e_r * two_n
    } else if x <= -87.3 {
        0.0
    } else {
        x // NaN stays NaN: a diverged model must not look finite
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
