//! Attention for inference (no graph): `softmax(q·kᵀ·scale)·v` computed a block of query rows at
//! a time, each block's scores, softmax and product in one per-thread buffer, the blocks of all
//! heads in parallel on the current rayon pool.
//!
//! Why: composed of candle ops, attention over SD's 32×32 latents writes a 1024×1024 score
//! matrix per head, softmaxes it in another pass and reads it back for the product — memory
//! traffic that made it ~8× slower than torch's fused CPU kernel, and most of a sampling step.
//! Here a block's scores (64 rows × the keys) stay in L2 between the two products. The training
//! path ([`crate::ops::attention`]) keeps its own forward, whose backward recomputes the scores.

use candle_core::{DType, Device, Result, Tensor};
use rayon::iter::{IndexedParallelIterator, ParallelIterator};
use rayon::slice::ParallelSliceMut;

/// Scores held per block: 64 Ki f32 (256 KiB, within a core's L2), i.e. 64 query rows against
/// 1024 keys.
const BLOCK_SCORES: usize = 1 << 16;

/// `q` `(groups, n, d)`, `k` `(groups, m, d)`, `v` `(groups, m, e)`, all f32 → `(groups, n, e)`.
pub(crate) fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let (groups, n, d) = q.dims3()?;
    let (_, m, e) = v.dims3()?;
    if k.dims() != [groups, m, d] || v.dim(0)? != groups {
        candle_core::bail!(
            "attention: q {:?}, k {:?}, v {:?} do not fit together",
            q.dims(),
            k.dims(),
            v.dims()
        )
    }
    let host = |t: &Tensor| -> Result<Vec<f32>> { t.flatten_all()?.to_vec1::<f32>() };
    let (q, k, v) = (host(q)?, host(k)?, host(v)?);
    let mut out = vec![0f32; groups * n * e];
    if n * e == 0 {
        return Tensor::from_vec(out, (groups, n, e), &Device::Cpu);
    }
    let rows = (BLOCK_SCORES / m.max(1)).clamp(1, n);
    let scale = scale as f32;
    out.par_chunks_mut(n * e).enumerate().for_each(|(g, group_out)| {
        let (qg, kg, vg) =
            (&q[g * n * d..][..n * d], &k[g * m * d..][..m * d], &v[g * m * e..][..m * e]);
        group_out.par_chunks_mut(rows * e).enumerate().for_each_init(Vec::new, |scores, (b, o)| {
            let first = b * rows;
            let r = o.len() / e;
            block(&qg[first * d..][..r * d], kg, vg, (r, m, d, e), scale, scores, o);
        });
    });
    Tensor::from_vec(out, (groups, n, e), &Device::Cpu)
}

/// One block of `r` query rows: `out` `(r, e)` = softmax(`q` `(r, d)` · `k`ᵀ · scale) · `v`.
fn block(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    (r, m, d, e): (usize, usize, usize, usize),
    scale: f32,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    scores.resize(r * m, 0.0);
    assert!(q.len() == r * d && k.len() == m * d && v.len() == m * e && out.len() == r * e);
    // SAFETY: every operand lies inside its slice (the assert above): `scores` `(r, m)` row-major
    // is written; `q` `(r, d)` row-major and `k` read as `kᵀ` `(d, m)` (element (i, j) at
    // `k[j·d + i]`: columns `d` apart, rows 1 apart).
    unsafe {
        gemm::gemm(
            r,
            m,
            d,
            scores.as_mut_ptr(),
            1,
            m as isize,
            false,
            q.as_ptr(),
            1,
            d as isize,
            k.as_ptr(),
            d as isize,
            1,
            0.0,
            scale,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
    // Softmax per row, as candle's fused kernel: subtract the max, exponentiate, divide by the sum.
    for row in scores.chunks_exact_mut(m.max(1)) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        for x in row.iter_mut() {
            *x = exp_nonpositive(*x - max);
        }
        let sum = sum_f32(row);
        for x in row.iter_mut() {
            *x /= sum;
        }
    }
    // SAFETY: `scores` `(r, m)` and `v` `(m, e)` row-major are read, `out` `(r, e)` row-major is
    // written, all inside their slices (the assert above).
    unsafe {
        gemm::gemm(
            r,
            e,
            m,
            out.as_mut_ptr(),
            1,
            e as isize,
            false,
            scores.as_ptr(),
            1,
            m as isize,
            v.as_ptr(),
            1,
            e as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// `e^x` for `x ≤ 0` (a softmax's shifted scores), within 2 ulp of libm's `expf`, in
/// straight-line arithmetic the compiler vectorises (libm's scalar call was most of the
/// attention's time): `x = n·ln2 + r` with `|r| ≤ ln2/2` (ln2 split in two for an exact
/// reduction), Cephes' degree-6 polynomial for `e^r`, and `2^n` built in the exponent bits.
/// Below −87.3 the true value is under f32's smallest normal: 0.
#[inline(always)]
fn exp_nonpositive(x: f32) -> f32 {
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

/// The sum of `values`, in eight running sums so that it vectorises (a single running sum is a
/// dependency chain the compiler may not reorder).
fn sum_f32(values: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let chunks = values.chunks_exact(8);
    let rest: f32 = chunks.remainder().iter().sum();
    for chunk in chunks {
        for (lane, v) in lanes.iter_mut().zip(chunk) {
            *lane += v;
        }
    }
    lanes.iter().sum::<f32>() + rest
}

/// Whether [`attention`] can serve these tensors (f32 on the CPU; no gradient wanted).
pub(crate) fn applies(q: &Tensor, k: &Tensor, v: &Tensor) -> bool {
    [q, k, v].iter().all(|t| t.dtype() == DType::F32 && t.device().is_cpu() && !t.track_op())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(dims: &[usize], seed: u64) -> Tensor {
        // Deterministic values in [-2, 2) without a random generator.
        let count: usize = dims.iter().product();
        let values: Vec<f32> = (0..count as u64)
            .map(|i| {
                let x = (i.wrapping_mul(2654435761).wrapping_add(seed * 97)) % 4000;
                x as f32 / 1000.0 - 2.0
            })
            .collect();
        Tensor::from_vec(values, dims, &Device::Cpu).unwrap()
    }

    fn plain(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Tensor {
        let scores = (q * scale).unwrap().matmul(&k.t().unwrap()).unwrap();
        candle_nn::ops::softmax_last_dim(&scores).unwrap().matmul(v).unwrap()
    }

    /// Both sides sum the same products in a different order (gemm's blocking, per-row sums):
    /// f32 rounding over up to 2048 terms of magnitude ≤ 2 stays far below this, while a row
    /// of the wrong block or a mis-strided operand would be off by ~0.1.
    const TOLERANCE: f32 = 1e-5;

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
    }

    #[test]
    fn equals_the_plain_formula_within_float_rounding() {
        // Cross-attention shapes: every query row in one block.
        let (q, k, v) = (sample(&[3, 10, 4], 1), sample(&[3, 7, 4], 2), sample(&[3, 7, 5], 3));
        let diff = max_abs_diff(&attention(&q, &k, &v, 0.5).unwrap(), &plain(&q, &k, &v, 0.5));
        assert!(diff < TOLERANCE, "max |Δ| {diff}");
    }

    #[test]
    fn blocks_of_query_rows_including_a_partial_last_one_give_the_same_result() {
        // 2048 keys: 32 rows per block, so 100 queries make three full blocks and a partial one.
        let (q, k, v) =
            (sample(&[2, 100, 3], 4), sample(&[2, 2048, 3], 5), sample(&[2, 2048, 6], 6));
        let diff = max_abs_diff(&attention(&q, &k, &v, 0.3).unwrap(), &plain(&q, &k, &v, 0.3));
        assert!(diff < TOLERANCE, "max |Δ| {diff}");
    }

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
    fn shapes_that_do_not_fit_are_an_error() {
        let (q, k, v) = (sample(&[1, 4, 3], 1), sample(&[1, 5, 2], 2), sample(&[1, 5, 2], 3));
        assert!(attention(&q, &k, &v, 1.0).is_err());
    }

    #[test]
    fn serves_only_untracked_f32_tensors() {
        let x = sample(&[1, 2, 2], 1);
        let var = candle_core::Var::from_tensor(&x).unwrap();
        assert!(applies(&x, &x, &x));
        assert!(!applies(var.as_tensor(), &x, &x));
        assert!(!applies(&x.to_dtype(DType::F16).unwrap(), &x, &x));
    }
}
