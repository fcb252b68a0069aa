//! The gradients of a convolution: of its input (a convolution of the output gradient with the
//! kernel flipped and transposed at stride 1; col2im of `wᵀ · grad` otherwise) and of its kernel
//! (`grad · columnsᵀ` summed over tiles), and of its bias (`grad` summed per channel).

use rayon::iter::{IndexedParallelIterator, IntoParallelIterator, ParallelIterator};
use rayon::slice::ParallelSliceMut;

use crate::forward::{gemm_parallelism, Activation, SharedPtr};
use crate::shape::{ConvError, ConvShape, Geometry};
use crate::unfold::{fold_channel, Sources};
use crate::Element;

/// Most elements of the kernel gradient's partial sums held at once (256 MiB of f32): the tiles
/// are summed in at most this many / (c_out · depth) groups, and at most [`MAX_GROUPS`].
const PARTIALS_BUDGET: usize = 1 << 26;

/// Groups of tiles whose kernel-gradient sums run in parallel. A constant, not the pool's size,
/// so the order of the sums (and so the rounding) does not depend on the thread count.
const MAX_GROUPS: usize = 8;

impl ConvShape {
    /// The gradient of the input `[batch, c_in, h, w]` from the output gradient
    /// `[batch, c_out, H', W']` and the kernel.
    pub fn backward_input<T: Element>(
        &self,
        batch: usize,
        (h, w): (usize, usize),
        grad_out: &[T],
        weight: &[T],
    ) -> Result<Vec<T>, ConvError> {
        let g = self.geometry(h, w)?;
        Self::check_len("output gradient", grad_out.len(), batch * self.c_out * g.out_h * g.out_w)?;
        Self::check_len("weight", weight.len(), self.c_out * self.depth())?;
        let (kh, kw) = self.kernel;
        let (ph, pw) = self.padding;
        if self.stride == 1 && ph < kh && pw < kw {
            // Input pixel (y, x) received w[.., ky, kx] · out(y + ph − ky, x + pw − kx): a
            // stride-1 convolution of the output gradient with the flipped, transposed kernel
            // and padding k − 1 − p, which runs on the parallel forward pass.
            let transposed = ConvShape {
                c_in: self.c_out,
                c_out: self.c_in,
                kernel: self.kernel,
                stride: 1,
                padding: (kh - 1 - ph, kw - 1 - pw),
            };
            let flipped = self.flipped_transposed(weight);
            return transposed.forward(
                batch,
                (g.out_h, g.out_w),
                grad_out,
                &flipped,
                None,
                Activation::Identity,
            );
        }
        Ok(self.fold_input_gradient(g, batch, grad_out, weight))
    }

    /// `w'[ci, co, ky, kx] = w[co, ci, kh − 1 − ky, kw − 1 − kx]`.
    fn flipped_transposed<T: Element>(&self, weight: &[T]) -> Vec<T> {
        let (kh, kw) = self.kernel;
        let mut flipped = vec![T::ZERO; weight.len()];
        for co in 0..self.c_out {
            for ci in 0..self.c_in {
                for ky in 0..kh {
                    for kx in 0..kw {
                        flipped[((ci * self.c_out + co) * kh + ky) * kw + kx] =
                            weight[((co * self.c_in + ci) * kh + (kh - 1 - ky)) * kw + kw - 1 - kx];
                    }
                }
            }
        }
        flipped
    }

    /// The input gradient of any convolution: per tile of output rows, the unfolded gradient
    /// `wᵀ · grad` (`[depth, n]`) added back onto the pixels each tap read. Tiles of one image
    /// overlap in the input, so they run in order; images (and, for a small batch, input
    /// channels) run in parallel.
    fn fold_input_gradient<T: Element>(
        &self,
        g: Geometry,
        batch: usize,
        grad_out: &[T],
        weight: &[T],
    ) -> Vec<T> {
        let (in_len, out_plane) = (self.c_in * g.h * g.w, g.out_h * g.out_w);
        let depth = self.depth();
        let rows_per_tile = self.rows_per_tile(g);
        let parallelism = gemm_parallelism(batch);
        let mut grad_in = vec![T::ZERO; batch * in_len];
        grad_in.par_chunks_mut(in_len.max(1)).enumerate().for_each(|(image, grad_in)| {
            let grad_out = &grad_out[image * self.c_out * out_plane..][..self.c_out * out_plane];
            let mut columns = Vec::new();
            for first in (0..g.out_h).step_by(rows_per_tile) {
                let rows = rows_per_tile.min(g.out_h - first);
                let n = rows * g.out_w;
                columns.clear();
                columns.resize(depth * n, T::ZERO);
                // SAFETY: gemm writes `columns` (`depth × n`, row-major, just sized) from
                // `weight` read transposed (`depth × c_out`: element (d, co) at co·depth + d,
                // its length checked by the caller) and the tile of the output gradient
                // (`c_out × n`, rows `out_plane` apart, starting at the tile's first row).
                unsafe {
                    gemm::gemm(
                        depth,
                        n,
                        self.c_out,
                        columns.as_mut_ptr(),
                        1,
                        n as isize,
                        false,
                        weight.as_ptr(),
                        depth as isize,
                        1,
                        grad_out.as_ptr().add(first * g.out_w),
                        1,
                        out_plane as isize,
                        T::ZERO,
                        T::ONE,
                        false,
                        false,
                        false,
                        parallelism,
                    )
                }
                let fold = |(ci, plane): (usize, &mut [T])| {
                    fold_channel(self, g, ci, &columns, first, rows, plane)
                };
                let planes = grad_in.par_chunks_mut((g.h * g.w).max(1)).enumerate();
                if matches!(parallelism, gemm::Parallelism::None) {
                    planes.with_min_len(usize::MAX).for_each(fold);
                } else {
                    planes.for_each(fold);
                }
            }
        });
        grad_in
    }

    /// The gradient of the kernel `[c_out, c_in, kh, kw]` from the input and the output
    /// gradient: `Σ_tiles grad_tile · columns_tileᵀ`.
    pub fn backward_weight<T: Element>(
        &self,
        batch: usize,
        (h, w): (usize, usize),
        input: &[T],
        grad_out: &[T],
    ) -> Result<Vec<T>, ConvError> {
        let g = self.geometry(h, w)?;
        Self::check_len("input", input.len(), batch * self.c_in * h * w)?;
        let out_plane = g.out_h * g.out_w;
        Self::check_len("output gradient", grad_out.len(), batch * self.c_out * out_plane)?;
        let depth = self.depth();
        let size = self.c_out * depth;
        let rows_per_tile = self.rows_per_tile(g);
        let tiles = g.out_h.div_ceil(rows_per_tile);
        let tasks = batch * tiles;
        let groups = tasks.min(MAX_GROUPS).min((PARTIALS_BUDGET / size.max(1)).max(1)).max(1);
        let per_group = tasks.div_ceil(groups);
        let parallelism = gemm_parallelism(groups);
        let sources = Sources::new(self, g, batch, input);
        let mut partials = vec![T::ZERO; groups * size];
        let partial_sums = SharedPtr(partials.as_mut_ptr());
        (0..groups).into_par_iter().for_each_init(Vec::new, |columns, group| {
            let dst = partial_sums.at(group * size);
            for task in group * per_group..((group + 1) * per_group).min(tasks) {
                let (image, tile) = (task / tiles, task % tiles);
                let first = tile * rows_per_tile;
                let rows = rows_per_tile.min(g.out_h - first);
                let (rhs, rhs_stride) = sources.tile(self, g, image, first, rows, columns);
                let n = rows * g.out_w;
                assert!(
                    depth == 0 || n == 0 || (depth - 1) * rhs_stride + n <= rhs.len(),
                    "unfolded matrix too short"
                );
                let lhs = &grad_out[image * self.c_out * out_plane + first * g.out_w..];
                assert!(self.c_out == 0 || (self.c_out - 1) * out_plane + n <= lhs.len());
                // SAFETY: gemm adds into the group's own partial sum (`c_out × depth`,
                // row-major, inside `partials`) the product of the tile's output gradient
                // (`c_out × n`, rows `out_plane` apart) and its unfolded matrix read transposed
                // (`n × depth`: element (p, d) at d·rhs_stride + p), both inside their slices
                // by the asserts above.
                unsafe {
                    gemm::gemm(
                        self.c_out,
                        depth,
                        n,
                        dst,
                        1,
                        depth as isize,
                        true,
                        lhs.as_ptr(),
                        1,
                        out_plane as isize,
                        rhs.as_ptr(),
                        rhs_stride as isize,
                        1,
                        T::ONE,
                        T::ONE,
                        false,
                        false,
                        false,
                        parallelism,
                    )
                }
            }
        });
        let mut grad = partials[..size].to_vec();
        for partial in partials.chunks_exact(size.max(1)).skip(1) {
            for (g, &p) in grad.iter_mut().zip(partial) {
                *g += p;
            }
        }
        Ok(grad)
    }

    /// The gradient of the bias `[c_out]` from the output gradient `[batch, c_out, H', W']`
    /// of an input of `h × w`: each channel's sum over images and pixels, channels in
    /// parallel, each summed in one fixed order (image by image, pixel by pixel).
    pub fn backward_bias<T: Element>(
        &self,
        batch: usize,
        (h, w): (usize, usize),
        grad_out: &[T],
    ) -> Result<Vec<T>, ConvError> {
        let g = self.geometry(h, w)?;
        let out_plane = g.out_h * g.out_w;
        Self::check_len("output gradient", grad_out.len(), batch * self.c_out * out_plane)?;
        Ok((0..self.c_out)
            .into_par_iter()
            .map(|c| {
                let mut total = T::ZERO;
                for image in 0..batch {
                    for &v in &grad_out[(image * self.c_out + c) * out_plane..][..out_plane] {
                        total += v;
                    }
                }
                total
            })
            .collect())
    }
}
