//! 3×3 convolutions at stride 1 by Winograd's minimal filtering F(2×2, 3×3) (Lavin & Gray,
//! "Fast Algorithms for Convolutional Neural Networks", 2016): each 2×2 block of output pixels
//! from the 4×4 block of input around it, with 16 multiplications per pair of channels where
//! the direct product needs 36.
//!
//! `Y = Aᵀ [(G g Gᵀ) ⊙ (Bᵀ d B)] A` per tile (`g` the 3×3 kernel, `d` the 4×4 input block),
//! with
//!
//! ```text
//!      ⎡1  0  −1  0⎤        ⎡1   0   0⎤
//! Bᵀ = ⎢0  1   1  0⎥    G = ⎢½   ½   ½⎥    Aᵀ = ⎡1  1   1   0⎤
//!      ⎢0 −1   1  0⎥        ⎢½  −½   ½⎥         ⎣0  1  −1  −1⎦
//!      ⎣0  1   0 −1⎦        ⎣0   0   1⎦
//! ```
//!
//! Summed over input channels, the element-wise product becomes 16 matrix products, one per
//! position ξ of the 4×4 transformed tile: `M[ξ] (c_out × tiles) = U[ξ] (c_out × c_in) ·
//! V[ξ] (c_in × tiles)`, each a `gemm`. That is 2.25× fewer multiply-adds than im2col's product
//! (`c_out × 9·c_in × pixels`), for transforms that are a few additions per value.
//!
//! The rounding differs from the unfolded product's (the transforms are exact in G's halves,
//! but each output is a signed combination of 16 products of transformed values), by about as
//! much as the order of a sum changes it: the tests hold it to the direct loops within 1e-10
//! relative in f64, and its f32 results to its f64 ones within 2e-5 on sums of 288 products of
//! values in [−1, 1]. Results do not depend on the thread count: blocks are fixed by the shape,
//! and `gemm` splits its outputs, never a sum.
//!
//! Work is split like the unfolded forward's: blocks of tile rows of every image in parallel,
//! each block's transformed input and products in per-task buffers sized to stay in cache.

use rayon::iter::{IntoParallelIterator, ParallelIterator};

use crate::forward::{gemm_parallelism, Activation, SharedPtr};
use crate::shape::{ConvShape, Geometry};
use crate::Element;

/// Positions of a transformed 4×4 tile, one matrix product each.
const XI: usize = 16;

/// Most elements of a block's transformed input or products held at once per task (4 MiB of
/// f32): a mid-size UNet's 32×32 map of 128 channels is one block per image.
const BLOCK_BUDGET: usize = 1 << 20;

/// Whether F(2×2, 3×3) computes `shape`: a 3×3 kernel at stride 1 (any padding).
pub(crate) fn computes(shape: &ConvShape) -> bool {
    shape.kernel == (3, 3) && shape.stride == 1
}

/// Whether F(2×2, 3×3) is faster than the unfolded product on `shape` at `g`. The transforms
/// cost per pixel and channel, the products they save per pixel and pair of channels, and a
/// product of few tiles runs `gemm` on a short side. Measured by `examples/conv_algorithms.rs`
/// (best of ≥ 0.6 s of calls, 2 threads, batch 2, c → c channels, AMD EPYC with AVX-512,
/// 2026-12-08), Winograd's time over the unfolded product's:
///
/// | output side | c = 32 | 64 | 128 | 256 | 512 |
/// |---|---|---|---|---|---|
/// | 8 | 1.90 | 1.64 | 1.53 | 1.26 | 1.13 |
/// | 16 | 1.87 | 1.29 | 0.99 | 0.71 | 0.41 |
/// | 32 | 1.04 | 1.01 | 0.82 | 0.73 | 0.58 |
/// | 64 | 1.11 | 0.84 | 0.91 | 0.60 | 0.37 |
///
/// So: at least 128 channels each side on outputs of at least 16×16, or 64 on 64×64 (an earlier
/// run of the same grid agreed on every cell's side of 1 but c = 128 at 16, 0.98).
pub(crate) fn pays_off(shape: &ConvShape, g: Geometry) -> bool {
    let channels = shape.c_in.min(shape.c_out);
    let side = g.out_h.min(g.out_w);
    computes(shape) && ((channels >= 128 && side >= 16) || (channels >= 64 && side >= 64))
}

/// `(d0 − d2, d1 + d2, d2 − d1, d1 − d3)`: one axis of `Bᵀ d B`.
#[inline(always)]
fn input_transform<T: Element>([d0, d1, d2, d3]: [T; 4]) -> [T; 4] {
    [d0 - d2, d1 + d2, d2 - d1, d1 - d3]
}

/// `(g0, (g0 + g1 + g2)/2, (g0 − g1 + g2)/2, g2)`: one axis of `G g Gᵀ`.
#[inline(always)]
fn kernel_transform<T: Element>([g0, g1, g2]: [T; 3]) -> [T; 4] {
    let half = T::HALF;
    [g0, (g0 + g1 + g2) * half, (g0 - g1 + g2) * half, g2]
}

/// `(m0 + m1 + m2, m1 − m2 − m3)`: one axis of `Aᵀ M A`.
#[inline(always)]
fn output_transform<T: Element>([m0, m1, m2, m3]: [T; 4]) -> [T; 2] {
    [m0 + m1 + m2, m1 - m2 - m3]
}

/// `dst[t]` = padded column `2t + parity` of `row` (zero outside it), the row padded by `pad` on
/// the left: row column `2t + parity − pad`, which lies inside it for `t` in `lo..hi`.
fn split_parity<T: Element>(row: &[T], pad: usize, dst: &mut [T], parity: usize) {
    let lo = pad.saturating_sub(parity).div_ceil(2).min(dst.len());
    let hi = (row.len() + pad).saturating_sub(parity).div_ceil(2).clamp(lo, dst.len());
    dst[..lo].fill(T::ZERO);
    dst[hi..].fill(T::ZERO);
    if lo < hi {
        let start = 2 * lo + parity - pad;
        for (d, &x) in dst[lo..hi].iter_mut().zip(row[start..].iter().step_by(2)) {
            *d = x;
        }
    }
}

/// Run `i` of `c_in` values in `runs`.
fn run<T>(runs: &[T], i: usize, c_in: usize) -> &[T] {
    &runs[i * c_in..][..c_in]
}

/// `dst[t] = f(d0[t], d1[t], d2[t], d3[t])`: one loop per combination, which vectorises.
#[inline(always)]
fn combine_runs<T: Element>(
    dst: &mut [T],
    (d0, d1, d2, d3): (&[T], &[T], &[T], &[T]),
    f: impl Fn(T, T, T, T) -> T,
) {
    for (t, d) in dst.iter_mut().enumerate() {
        *d = f(d0[t], d1[t], d2[t], d3[t]);
    }
}

impl ConvShape {
    /// The forward of a shape [`computes`] accepts, as [`ConvShape::forward_with`]'s contract
    /// says (lengths checked by it).
    pub(crate) fn forward_winograd<T: Element>(
        &self,
        batch: usize,
        g: Geometry,
        input: &[T],
        weight: &[T],
        bias: Option<&[T]>,
        activation: Activation,
    ) -> Vec<T> {
        let (tiles_h, tiles_w) = (g.out_h.div_ceil(2), g.out_w.div_ceil(2));
        let per_tile_row = XI * self.c_in.max(self.c_out) * tiles_w;
        let rows_per_block = (BLOCK_BUDGET / per_tile_row.max(1)).clamp(1, tiles_h.max(1));
        let blocks = tiles_h.div_ceil(rows_per_block);
        let u = self.transformed_kernel(weight);
        let out_len = self.c_out * g.out_h * g.out_w;
        let mut out = vec![T::ZERO; batch * out_len];
        let dst = SharedPtr(out.as_mut_ptr());
        let parallelism = gemm_parallelism(batch * blocks);
        let in_len = self.c_in * g.h * g.w;
        (0..batch * blocks).into_par_iter().for_each_init(
            || (Vec::new(), Vec::new()),
            |(v, m), task| {
                let (image, block) = (task / blocks, task % blocks);
                let first = block * rows_per_block;
                let rows = rows_per_block.min(tiles_h - first);
                let tiles = rows * tiles_w;
                v.resize(XI * self.c_in * tiles, T::ZERO);
                m.resize(XI * self.c_out * tiles, T::ZERO);
                let image_in = &input[image * in_len..][..in_len];
                self.transform_input(g, image_in, (first, rows), v);
                for xi in 0..XI {
                    // SAFETY: `u[xi]` is `c_out × c_in`, `v[xi]` `c_in × tiles` and `m[xi]`
                    // `c_out × tiles`, all row-major and inside their buffers (sized above);
                    // `m` is this task's own.
                    unsafe {
                        gemm::gemm(
                            self.c_out,
                            tiles,
                            self.c_in,
                            m.as_mut_ptr().add(xi * self.c_out * tiles),
                            1,
                            tiles as isize,
                            false,
                            u.as_ptr().add(xi * self.c_out * self.c_in),
                            1,
                            self.c_in as isize,
                            v.as_ptr().add(xi * self.c_in * tiles),
                            1,
                            tiles as isize,
                            T::ZERO,
                            T::ONE,
                            false,
                            false,
                            false,
                            parallelism,
                        )
                    }
                }
                // SAFETY: the image's output lies inside `out`, and this task is the only one
                // writing its output rows `2·first ..` (two per tile row) of every channel.
                unsafe {
                    self.transform_output(
                        g,
                        m,
                        (first, rows),
                        bias,
                        activation,
                        dst.at(image * out_len),
                    )
                };
            },
        );
        out
    }

    /// `U[ξ][co][ci]`: every 3×3 kernel transformed to its 4×4 `G g Gᵀ`. Parallel over output
    /// channels, vectorised across input channels: each task gathers its kernels' nine taps
    /// into runs over `ci`, and writes row `co` of each of the 16 matrices.
    fn transformed_kernel<T: Element>(&self, weight: &[T]) -> Vec<T> {
        let (c_out, c_in) = (self.c_out, self.c_in);
        let pairs = c_out * c_in;
        let mut u = vec![T::ZERO; XI * pairs];
        let dst = SharedPtr(u.as_mut_ptr());
        (0..c_out).into_par_iter().for_each_init(
            || vec![T::ZERO; 21 * c_in],
            |scratch, co| {
                // taps[j][ci] = weight[co][ci][j]; rows[4r + b][ci] = (g Gᵀ)[r][b].
                let (taps, rows) = scratch.split_at_mut(9 * c_in);
                for (ci, kernel) in weight[co * c_in * 9..][..c_in * 9].chunks_exact(9).enumerate()
                {
                    for (j, &value) in kernel.iter().enumerate() {
                        taps[j * c_in + ci] = value;
                    }
                }
                for r in 0..3 {
                    let (g0, g1, g2) = (
                        run(taps, 3 * r, c_in),
                        run(taps, 3 * r + 1, c_in),
                        run(taps, 3 * r + 2, c_in),
                    );
                    let out = &mut rows[4 * r * c_in..][..4 * c_in];
                    let (o0, rest) = out.split_at_mut(c_in);
                    let (o1, rest) = rest.split_at_mut(c_in);
                    let (o2, o3) = rest.split_at_mut(c_in);
                    for ci in 0..c_in {
                        [o0[ci], o1[ci], o2[ci], o3[ci]] =
                            kernel_transform([g0[ci], g1[ci], g2[ci]]);
                    }
                }
                for b in 0..4 {
                    let (r0, r1, r2) =
                        (run(rows, b, c_in), run(rows, 4 + b, c_in), run(rows, 8 + b, c_in));
                    // SAFETY: row `co` of each ξ's `c_out × c_in` matrix lies inside `u` and is
                    // this task's alone; the four rows are distinct (distinct ξ).
                    let row = |a: usize| unsafe {
                        std::slice::from_raw_parts_mut(
                            dst.at((4 * a + b) * pairs + co * c_in),
                            c_in,
                        )
                    };
                    let (u0, u1, u2, u3) = (row(0), row(1), row(2), row(3));
                    for ci in 0..c_in {
                        [u0[ci], u1[ci], u2[ci], u3[ci]] =
                            kernel_transform([r0[ci], r1[ci], r2[ci]]);
                    }
                }
            },
        );
        u
    }

    /// `V[ξ][ci][t]` for the tiles of tile rows `first..first + rows` of one image: each 4×4
    /// input block (zero outside the image) transformed to `Bᵀ d B`.
    ///
    /// Vectorised across the tiles of a tile row: its four input rows are split into their even
    /// and odd padded columns (tile `t` reads columns `2t .. 2t + 4`: even `t`, odd `t`, even
    /// `t + 1`, odd `t + 1`), combined row-wise (`Bᵀ d`), then column-wise into 16 runs that lie
    /// contiguously in `V`.
    fn transform_input<T: Element>(
        &self,
        g: Geometry,
        image: &[T],
        (first, rows): (usize, usize),
        v: &mut [T],
    ) {
        let tiles_w = g.out_w.div_ceil(2);
        let tiles = rows * tiles_w;
        let (ph, pw) = (self.padding.0 as isize, self.padding.1);
        let half = tiles_w + 1;
        // [row r][parity]: the padded input row's even or odd columns.
        let mut split = vec![T::ZERO; 8 * half];
        // [combination a][parity]: `Bᵀ d`'s rows.
        let mut combos = vec![T::ZERO; 8 * half];
        for ci in 0..self.c_in {
            let plane = &image[ci * g.h * g.w..][..g.h * g.w];
            for ty in 0..rows {
                let top = 2 * (first + ty) as isize - ph;
                for (r, parts) in split.chunks_exact_mut(2 * half).enumerate() {
                    let y = top + r as isize;
                    let (even, odd) = parts.split_at_mut(half);
                    if !(0..g.h as isize).contains(&y) {
                        even.fill(T::ZERO);
                        odd.fill(T::ZERO);
                        continue;
                    }
                    let row = &plane[y as usize * g.w..][..g.w];
                    split_parity(row, pw, even, 0);
                    split_parity(row, pw, odd, 1);
                }
                // Bᵀ d: combinations of the four rows, column by column.
                let row = |r: usize| &split[r * 2 * half..][..2 * half];
                let (r0, r1, r2, r3) = (row(0), row(1), row(2), row(3));
                let (c01, c23) = combos.split_at_mut(4 * half);
                let (c0, c1) = c01.split_at_mut(2 * half);
                let (c2, c3) = c23.split_at_mut(2 * half);
                for i in 0..2 * half {
                    [c0[i], c1[i], c2[i], c3[i]] = input_transform([r0[i], r1[i], r2[i], r3[i]]);
                }
                // (Bᵀ d) B: the four columns of each tile.
                let offset = ty * tiles_w;
                for a in 0..4 {
                    let (even, odd) = combos[a * 2 * half..][..2 * half].split_at(half);
                    let (e0, e1) = (&even[..tiles_w], &even[1..][..tiles_w]);
                    let (o0, o1) = (&odd[..tiles_w], &odd[1..][..tiles_w]);
                    // One run of `V` per column combination b, as `input_transform` combines.
                    let at = |b: usize| ((4 * a + b) * self.c_in + ci) * tiles + offset;
                    let d = (e0, o0, e1, o1);
                    combine_runs(&mut v[at(0)..][..tiles_w], d, |d0, _, d2, _| d0 - d2);
                    combine_runs(&mut v[at(1)..][..tiles_w], d, |_, d1, d2, _| d1 + d2);
                    combine_runs(&mut v[at(2)..][..tiles_w], d, |_, d1, d2, _| d2 - d1);
                    combine_runs(&mut v[at(3)..][..tiles_w], d, |_, d1, _, d3| d1 - d3);
                }
            }
        }
    }

    /// Each tile's 2×2 output pixels `Aᵀ M A` plus the bias, through the activation, written
    /// where they lie inside the image. Vectorised across the tiles of a tile row, whose 16
    /// products are contiguous runs of `M`.
    ///
    /// # Safety
    /// `out` points to the image's whole output `[c_out, H', W']`, whose rows
    /// `2·first .. 2·(first + rows)` (of every channel) nothing else reads or writes meanwhile.
    unsafe fn transform_output<T: Element>(
        &self,
        g: Geometry,
        m: &[T],
        (first, rows): (usize, usize),
        bias: Option<&[T]>,
        activation: Activation,
        out: *mut T,
    ) {
        let tiles_w = g.out_w.div_ceil(2);
        let tiles = rows * tiles_w;
        let plane = g.out_h * g.out_w;
        // Aᵀ M: [output row dy][column of the tile][tile].
        let mut partial = vec![T::ZERO; 8 * tiles_w];
        let mut pair = vec![T::ZERO; 2 * tiles_w];
        for co in 0..self.c_out {
            let b = bias.map_or(T::ZERO, |b| b[co]);
            for ty in 0..rows {
                // Product ξ's run of this channel and tile row.
                let product =
                    |xi: usize| &m[(xi * self.c_out + co) * tiles + ty * tiles_w..][..tiles_w];
                for col in 0..4 {
                    let (m0, m1, m2, m3) =
                        (product(col), product(4 + col), product(8 + col), product(12 + col));
                    let (top, bottom) = partial.split_at_mut(4 * tiles_w);
                    let top = &mut top[col * tiles_w..][..tiles_w];
                    let bottom = &mut bottom[col * tiles_w..][..tiles_w];
                    for t in 0..tiles_w {
                        [top[t], bottom[t]] = output_transform([m0[t], m1[t], m2[t], m3[t]]);
                    }
                }
                for dy in 0..2 {
                    let oy = 2 * (first + ty) + dy;
                    if oy >= g.out_h {
                        continue;
                    }
                    let s = &partial[dy * 4 * tiles_w..][..4 * tiles_w];
                    let (s0, s1, s2, s3) = (
                        &s[..tiles_w],
                        &s[tiles_w..][..tiles_w],
                        &s[2 * tiles_w..][..tiles_w],
                        &s[3 * tiles_w..],
                    );
                    let (left, right) = pair.split_at_mut(tiles_w);
                    for t in 0..tiles_w {
                        [left[t], right[t]] = output_transform([s0[t], s1[t], s2[t], s3[t]]);
                    }
                    // SAFETY: row `oy` of channel `co` lies inside the image's output and is
                    // this call's (see the contract); no other reference to it is alive.
                    let dst = unsafe {
                        std::slice::from_raw_parts_mut(out.add(co * plane + oy * g.out_w), g.out_w)
                    };
                    for (x, d) in dst.iter_mut().enumerate() {
                        let value = if x % 2 == 0 { left[x / 2] } else { right[x / 2] } + b;
                        *d = if activation == Activation::Relu && value < T::ZERO {
                            T::ZERO
                        } else {
                            value
                        };
                    }
                }
            }
        }
    }
}
