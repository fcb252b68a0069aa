//! Attention on the CPU as blocked kernels, forward and backward: `softmax(q·kᵀ·scale)·v`
//! computed a block of query rows at a time, each block's scores and probabilities in
//! per-thread buffers that never leave L2.
//!
//! Why: composed of candle ops, attention over SD's 32×32 latents writes a 1024×1024 score
//! matrix per head, softmaxes it in another pass (libm's scalar `expf`, one thread) and reads it
//! back for the product — memory traffic that made it ~8× slower than torch's fused CPU kernel
//! in sampling, and a quarter of a training step.
//!
//! - [`attention`]: the blocks of all heads in parallel on the current rayon pool.
//! - [`attention_backward`]: flash attention's backward. Per block it recomputes the
//!   probabilities `P` exactly as the forward did, then `dV += Pᵀ·dO`, `dP = dO·vᵀ`,
//!   `dS = P ⊙ (dP − rowsum(dP ⊙ P))`, `dq = dS·k·scale`, `dk += dSᵀ·q·scale`. `dk` and `dv`
//!   sum over every query block, so the blocks of one head run in order on one thread and the
//!   heads in parallel: sums never depend on the thread count.
//!
//! Nothing score-sized outlives a block, in the forward or the backward, so the graph keeps
//! only `q`, `k` and `v` per attention layer.

use candle_core::{DType, Result, Tensor};
use rayon::iter::{IndexedParallelIterator, ParallelIterator};
use rayon::slice::ParallelSliceMut;

use crate::device_path::use_cpu_kernels;
use crate::fastmath::exp_nonpositive;
use crate::vectorised::multiversion;

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
    let device = q.device().clone();
    let (q, k, v) = (host(q)?, host(k)?, host(v)?);
    let mut out = vec![0f32; groups * n * e];
    if n * e == 0 {
        return Tensor::from_vec(out, (groups, n, e), &device);
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
    Tensor::from_vec(out, (groups, n, e), &device)
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
    assert!(v.len() == m * e && out.len() == r * e);
    probabilities(q, k, (r, m, d), scale, scores);
    product(out, (r, e, m), false, 0.0, 1.0, (&scores[..], Major::Row), (v, Major::Row));
}

/// `p` `(r, m)` = softmax(`q` `(r, d)` · `k`ᵀ · scale) by rows, `k` `(m, d)`: the forward's
/// probabilities, which the backward recomputes bit for bit.
fn probabilities(
    q: &[f32],
    k: &[f32],
    (r, m, d): (usize, usize, usize),
    scale: f32,
    p: &mut Vec<f32>,
) {
    p.resize(r * m, 0.0);
    assert!(q.len() == r * d && k.len() == m * d);
    product(p, (r, m, d), false, 0.0, scale, (q, Major::Row), (k, Major::Column));
    softmax_rows(p, m);
}

multiversion! {
    /// Softmax of each row of `m` values in place, as candle's fused kernel: subtract the row's
    /// max, exponentiate, scale by the reciprocal of the sum (a division per element was a
    /// tenth of the kernel; the reciprocal adds at most one rounding).
    ///
    /// The loops are written for the compiler to vectorise. Built for the baseline x86-64
    /// (SSE2), that is 4 lanes; where the CPU has AVX2 or AVX-512 the same code is compiled
    /// again for it, 8 or 16 lanes. Each element gets the same operations in the same order
    /// every way (no fused multiply-add: Rust never contracts; the reductions' lane counts are
    /// fixed in code), so the results are identical on every machine.
    fn softmax_rows[](scores: &mut [f32], m: usize)
        = softmax_rows_portable, built as softmax_rows_avx2, softmax_rows_avx512;
}

#[inline(always)]
fn softmax_rows_portable(scores: &mut [f32], m: usize) {
    for row in scores.chunks_exact_mut(m.max(1)) {
        let max = max_f32(row);
        let scale = 1.0 / map_sum(row, |x| exp_nonpositive(x - max));
        for x in row.iter_mut() {
            *x *= scale;
        }
    }
}

/// How a matrix operand of [`product`] lies in its slice: `Row` is the matrix stored row-major,
/// `Column` is the transpose of a row-major matrix (e.g. `kᵀ` read from `k`).
#[derive(Clone, Copy)]
enum Major {
    Row,
    Column,
}

/// `dst` `(rows, cols)` row-major ← `alpha·dst` (when `read_dst`) `+ beta · lhs · rhs`, where
/// `lhs` is `(rows, inner)` and `rhs` `(inner, cols)`, each laid out as its [`Major`] says; on
/// the calling thread.
///
/// Panics unless every operand holds its whole matrix (`dst` `rows·cols`, `lhs` `rows·inner`
/// and `rhs` `inner·cols` elements), which is what makes the `gemm` call sound.
#[allow(clippy::too_many_arguments)]
fn product(
    dst: &mut [f32],
    (rows, cols, inner): (usize, usize, usize),
    read_dst: bool,
    alpha: f32,
    beta: f32,
    (lhs, lhs_major): (&[f32], Major),
    (rhs, rhs_major): (&[f32], Major),
) {
    assert!(dst.len() >= rows * cols && lhs.len() >= rows * inner && rhs.len() >= inner * cols);
    // gemm takes each operand's (column stride, row stride).
    let strides = |major: Major, row_len: usize, col_len: usize| match major {
        Major::Row => (1, row_len as isize),
        Major::Column => (col_len as isize, 1),
    };
    let (lhs_cs, lhs_rs) = strides(lhs_major, inner, rows);
    let (rhs_cs, rhs_rs) = strides(rhs_major, cols, inner);
    // SAFETY: each operand holds its whole matrix (the assert above), read or written at
    // these strides, and `dst` does not alias the operands (it is borrowed mutably).
    unsafe {
        gemm::gemm(
            rows,
            cols,
            inner,
            dst.as_mut_ptr(),
            1,
            cols as isize,
            read_dst,
            lhs.as_ptr(),
            lhs_cs,
            lhs_rs,
            rhs.as_ptr(),
            rhs_cs,
            rhs_rs,
            alpha,
            beta,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// The gradients `(dq, dk, dv)` of [`attention`] for the output gradient `grad` `(groups, n,
/// e)`, shapes as there.
pub(crate) fn attention_backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    grad: &Tensor,
    scale: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (groups, n, d) = q.dims3()?;
    let (_, m, e) = v.dims3()?;
    if k.dims() != [groups, m, d] || v.dim(0)? != groups || grad.dims() != [groups, n, e] {
        candle_core::bail!(
            "attention backward: q {:?}, k {:?}, v {:?}, grad {:?} do not fit together",
            q.dims(),
            k.dims(),
            v.dims(),
            grad.dims()
        )
    }
    let host = |t: &Tensor| -> Result<Vec<f32>> { t.flatten_all()?.to_vec1::<f32>() };
    let device = q.device().clone();
    let (q, k, v, g) = (host(q)?, host(k)?, host(v)?, host(grad)?);
    let (mut dq, mut dk, mut dv) =
        (vec![0f32; groups * n * d], vec![0f32; groups * m * d], vec![0f32; groups * m * e]);
    if n * m * d * e > 0 {
        let rows = (BLOCK_SCORES / m).clamp(1, n);
        let scale = scale as f32;
        dq.par_chunks_mut(n * d)
            .zip(dk.par_chunks_mut(m * d))
            .zip(dv.par_chunks_mut(m * e))
            .enumerate()
            .for_each(|(h, ((dq, dk), dv))| {
                let (qh, kh) = (&q[h * n * d..][..n * d], &k[h * m * d..][..m * d]);
                let (vh, gh) = (&v[h * m * e..][..m * e], &g[h * n * e..][..n * e]);
                let (mut p, mut dp) = (Vec::new(), Vec::new());
                for first in (0..n).step_by(rows) {
                    let r = rows.min(n - first);
                    let (qb, gb) = (&qh[first * d..][..r * d], &gh[first * e..][..r * e]);
                    let dqb = &mut dq[first * d..][..r * d];
                    probabilities(qb, kh, (r, m, d), scale, &mut p);
                    dp.resize(r * m, 0.0);
                    // dV += Pᵀ·dO, then dP = dO·vᵀ.
                    product(
                        dv,
                        (m, e, r),
                        true,
                        1.0,
                        1.0,
                        (&p[..], Major::Column),
                        (gb, Major::Row),
                    );
                    product(
                        &mut dp,
                        (r, m, e),
                        false,
                        0.0,
                        1.0,
                        (gb, Major::Row),
                        (vh, Major::Column),
                    );
                    softmax_backward_rows(&mut dp, &p, m);
                    // dq = dS·k·scale, dk += dSᵀ·q·scale.
                    product(
                        dqb,
                        (r, d, m),
                        false,
                        0.0,
                        scale,
                        (&dp[..], Major::Row),
                        (kh, Major::Row),
                    );
                    product(
                        dk,
                        (m, d, r),
                        true,
                        1.0,
                        scale,
                        (&dp[..], Major::Column),
                        (qb, Major::Row),
                    );
                }
            });
    }
    Ok((
        Tensor::from_vec(dq, (groups, n, d), &device)?,
        Tensor::from_vec(dk, (groups, m, d), &device)?,
        Tensor::from_vec(dv, (groups, m, e), &device)?,
    ))
}

multiversion! {
    /// The softmax's backward by rows, in place: `dp` `(r, m)` (the probabilities' gradient)
    /// becomes `dS = P ⊙ (dP − rowsum(dP ⊙ P))`. Built three times, as [`softmax_rows`].
    fn softmax_backward_rows[](dp: &mut [f32], p: &[f32], m: usize)
        = softmax_backward_rows_portable,
        built as softmax_backward_rows_avx2, softmax_backward_rows_avx512;
}

#[inline(always)]
fn softmax_backward_rows_portable(dp: &mut [f32], p: &[f32], m: usize) {
    for (dp_row, p_row) in dp.chunks_exact_mut(m.max(1)).zip(p.chunks_exact(m.max(1))) {
        let dot = dot_f32(dp_row, p_row);
        for (ds, &p) in dp_row.iter_mut().zip(p_row) {
            *ds = p * (*ds - dot);
        }
    }
}

/// Independent running sums (or maxima) of the reductions below: a single running value is a
/// dependency chain the compiler may not reorder, one vector add (3–4 cycles) per element
/// group. The bulk runs in 32 lanes (two AVX-512 or four AVX2 registers in flight), what is
/// left in 8 (a cross-attention row of 77 keys leaves 13), the last few one by one. The lane
/// counts, not the instruction set, fix the order of the sums, so every machine gets the same
/// bits.
const LANES: usize = 32;
const TAIL_LANES: usize = 8;

/// `acc` folded over `values` with `step(lane, value)`, in [`LANES`] running values, then
/// [`TAIL_LANES`], then one; `finish` combines the lanes.
#[inline(always)]
fn reduce(
    values: &[f32],
    init: f32,
    step: impl Fn(f32, f32) -> f32,
    finish: impl Fn(f32, f32) -> f32,
) -> f32 {
    let mut lanes = [init; LANES];
    let chunks = values.chunks_exact(LANES);
    let rest = chunks.remainder();
    for chunk in chunks {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            *lane = step(*lane, v);
        }
    }
    let tail = rest.chunks_exact(TAIL_LANES);
    let last = tail.remainder();
    for chunk in tail {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            *lane = step(*lane, v);
        }
    }
    let mut total = lanes.iter().copied().fold(init, &finish);
    for &v in last {
        total = step(total, v);
    }
    total
}

/// The sum of `values`, grouped by [`reduce`]: what [`map_sum`] must equal.
#[cfg(test)]
fn sum_f32(values: &[f32]) -> f32 {
    reduce(values, 0.0, |lane, v| lane + v, |a, b| a + b)
}

/// Replaces each of `values` by `map(value)` and returns their sum, grouped exactly as
/// [`reduce`] groups a sum (the same bits), in one pass instead of two: the softmax's
/// exponentials and their sum.
#[inline(always)]
fn map_sum(values: &mut [f32], map: impl Fn(f32) -> f32) -> f32 {
    let mut lanes = [0f32; LANES];
    let mut chunks = values.chunks_exact_mut(LANES);
    for chunk in &mut chunks {
        for (lane, v) in lanes.iter_mut().zip(chunk) {
            *v = map(*v);
            *lane += *v;
        }
    }
    let mut tail = chunks.into_remainder().chunks_exact_mut(TAIL_LANES);
    for chunk in &mut tail {
        for (lane, v) in lanes.iter_mut().zip(chunk) {
            *v = map(*v);
            *lane += *v;
        }
    }
    let mut total = lanes.iter().fold(0.0, |a, &b| a + b);
    for v in tail.into_remainder() {
        *v = map(*v);
        total += *v;
    }
    total
}

/// The largest of `values` (NaNs ignored, as `f32::max` does; −∞ for none). The maximum is
/// exact, so the grouping changes nothing. Each step is a compare and select, which is one
/// `maxps` (NaN never enters a lane: `v > lane` is false for it), rather than `f32::max`, whose
/// NaN handling costs a compare and a blend per step.
#[inline(always)]
fn max_f32(values: &[f32]) -> f32 {
    let step = |lane: f32, v: f32| if v > lane { v } else { lane };
    reduce(values, f32::NEG_INFINITY, step, step)
}

/// `Σ a_i·b_i`, grouped as [`reduce`] groups a sum.
#[inline(always)]
fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for ((lane, x), y) in lanes.iter_mut().zip(x).zip(y) {
            *lane += x * y;
        }
    }
    let (ta, tb) = (ra.chunks_exact(TAIL_LANES), rb.chunks_exact(TAIL_LANES));
    let (la, lb) = (ta.remainder(), tb.remainder());
    for (x, y) in ta.zip(tb) {
        for ((lane, x), y) in lanes.iter_mut().zip(x).zip(y) {
            *lane += x * y;
        }
    }
    let mut total: f32 = lanes.iter().sum();
    for (x, y) in la.iter().zip(lb) {
        total += x * y;
    }
    total
}

/// Whether these kernels serve these tensors: f32 on the CPU (see [`crate::device_path`]).
pub(crate) fn applies(q: &Tensor, k: &Tensor, v: &Tensor) -> bool {
    [q, k, v].iter().all(|t| t.dtype() == DType::F32 && use_cpu_kernels(t))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

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
    fn the_fused_map_and_sum_gives_the_bits_of_mapping_then_summing() {
        // 77 (a cross-attention row: 32-lane chunks, an 8-lane tail, 5 left) and 1024 keys.
        for len in [77usize, 1024, 5] {
            let values: Vec<f32> = (0..len).map(|i| (i as f32 * 0.37).sin() - 1.5).collect();
            let map = |x: f32| exp_nonpositive(x - 0.25);
            let mut fused = values.clone();
            let sum = map_sum(&mut fused, map);
            let mapped: Vec<f32> = values.iter().map(|&x| map(x)).collect();
            assert_eq!(sum.to_bits(), sum_f32(&mapped).to_bits(), "{len}");
            assert!(fused.iter().zip(&mapped).all(|(a, b)| a.to_bits() == b.to_bits()));
        }
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

    /// `(dq, dk, dv)` by candle's autograd through the plain formula (its composed softmax),
    /// for the output gradient `g`.
    fn plain_gradients(q: &Tensor, k: &Tensor, v: &Tensor, g: &Tensor, scale: f64) -> [Tensor; 3] {
        let vars = [q, k, v].map(|t| candle_core::Var::from_tensor(t).unwrap());
        let scores = (vars[0].as_tensor() * scale).unwrap().matmul(&vars[1].t().unwrap()).unwrap();
        let probs = candle_nn::ops::softmax(&scores, candle_core::D::Minus1).unwrap();
        let out = probs.matmul(vars[2].as_tensor()).unwrap();
        let grads = (out * g).unwrap().sum_all().unwrap().backward().unwrap();
        vars.map(|var| grads.get(&var).unwrap().clone())
    }

    /// Each of `ours` within float rounding of `theirs`, relative to the largest gradient.
    fn assert_gradients_close(ours: (Tensor, Tensor, Tensor), theirs: [Tensor; 3]) {
        for (name, (a, b)) in
            ["dq", "dk", "dv"].iter().zip([ours.0, ours.1, ours.2].iter().zip(&theirs))
        {
            let largest: f32 =
                b.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap();
            let diff = max_abs_diff(a, b);
            assert!(diff <= 1e-5 * largest.max(1.0), "{name}: max |Δ| {diff}, largest {largest}");
        }
    }

    #[test]
    fn backward_equals_autograd_of_the_plain_formula_within_float_rounding() {
        let (q, k, v) = (sample(&[3, 10, 4], 11), sample(&[3, 7, 4], 12), sample(&[3, 7, 5], 13));
        let g = sample(&[3, 10, 5], 14);
        let ours = attention_backward(&q, &k, &v, &g, 0.5).unwrap();
        assert_gradients_close(ours, plain_gradients(&q, &k, &v, &g, 0.5));
    }

    #[test]
    fn backward_over_several_blocks_sums_every_blocks_share_of_dk_and_dv() {
        // 2048 keys: 32 rows per block, so 100 queries make three full blocks and a partial one.
        let (q, k, v) =
            (sample(&[2, 100, 3], 15), sample(&[2, 2048, 3], 16), sample(&[2, 2048, 6], 17));
        let g = sample(&[2, 100, 6], 18);
        let ours = attention_backward(&q, &k, &v, &g, 0.3).unwrap();
        assert_gradients_close(ours, plain_gradients(&q, &k, &v, &g, 0.3));
    }

    #[test]
    fn backward_does_not_depend_on_the_thread_count() {
        let (q, k, v) =
            (sample(&[4, 70, 3], 19), sample(&[4, 1500, 3], 20), sample(&[4, 1500, 2], 21));
        let g = sample(&[4, 70, 2], 22);
        let run = |threads| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            pool.install(|| attention_backward(&q, &k, &v, &g, 0.7).unwrap())
        };
        let (one, three) = (run(1), run(3));
        for (a, b) in [(&one.0, &three.0), (&one.1, &three.1), (&one.2, &three.2)] {
            assert_eq!(max_abs_diff(a, b), 0.0);
        }
    }

    #[test]
    fn the_avx2_and_avx512_softmax_kernels_equal_the_portable_ones_bit_for_bit() {
        #[cfg(target_arch = "x86_64")]
        {
            type Forward = unsafe fn(&mut [f32], usize);
            type Backward = unsafe fn(&mut [f32], &[f32], usize);
            let mut versions: Vec<(Forward, Backward)> = Vec::new();
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                versions.push((softmax_rows_avx2, softmax_backward_rows_avx2));
            }
            if std::arch::is_x86_feature_detected!("avx512f") {
                versions.push((softmax_rows_avx512, softmax_backward_rows_avx512));
            }
            // 1003 per row: full vectors and a remainder.
            let m = 1003;
            let x = sample(&[3, m], 23).flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let g = sample(&[3, m], 24).flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let mut portable = x.clone();
            softmax_rows_portable(&mut portable, m);
            let mut portable_ds = g.clone();
            softmax_backward_rows_portable(&mut portable_ds, &portable, m);
            let same =
                |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(a, b)| a.to_bits() == b.to_bits());
            for (forward, backward) in versions {
                let (mut p, mut ds) = (x.clone(), g.clone());
                // SAFETY: only the versions whose features the CPU has (checked above).
                unsafe {
                    forward(&mut p, m);
                    backward(&mut ds, &portable, m);
                }
                assert!(same(&p, &portable) && same(&ds, &portable_ds));
            }
        }
    }

    #[test]
    fn the_row_maximum_ignores_nans_as_f32_max_does() {
        let fold = |row: &[f32]| row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut row: Vec<f32> = (0..21).map(|i| (i as f32 * 1.7).sin()).collect();
        row[4] = f32::NAN;
        row[19] = f32::NAN;
        assert_eq!(max_f32(&row), fold(&row));
        assert_eq!(max_f32(&[]), f32::NEG_INFINITY);
        assert_eq!(max_f32(&[f32::NAN; 9]), fold(&[f32::NAN; 9]));
    }

    #[test]
    fn shapes_that_do_not_fit_are_an_error() {
        let (q, k, v) = (sample(&[1, 4, 3], 1), sample(&[1, 5, 2], 2), sample(&[1, 5, 2], 3));
        assert!(attention(&q, &k, &v, 1.0).is_err());
    }

    #[test]
    fn serves_f32_tensors_tracked_or_not_and_nothing_else() {
        let x = sample(&[1, 2, 2], 1);
        let var = candle_core::Var::from_tensor(&x).unwrap();
        assert!(applies(&x, &x, &x));
        assert!(applies(var.as_tensor(), &x, &x));
        assert!(!applies(&x.to_dtype(DType::F16).unwrap(), &x, &x));
    }
}
