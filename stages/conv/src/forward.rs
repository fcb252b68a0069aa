//! The forward convolution: `act(conv(x, w) + b)` by the [`Algorithm`] that suits the shape.
//! The unfolded one here: tiles of output rows of every image in parallel, one `gemm` per tile
//! writing `weight · columns` into the NCHW output in place, on top of the bias.

use rayon::iter::{IntoParallelIterator, ParallelIterator};

use crate::shape::{ConvError, ConvShape, Geometry};
use crate::unfold::Sources;
use crate::winograd;
use crate::Element;

/// What follows the convolution on the same rows while they are still in cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Identity,
    Relu,
}

/// How a forward convolution computes its sums. Both give the convolution up to rounding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    /// im2col and one `gemm` per tile of output rows: any shape.
    Unfolded,
    /// Winograd's F(2×2, 3×3): 3×3 kernels at stride 1 only (`winograd.rs`).
    Winograd,
}

impl ConvShape {
    /// The algorithm [`ConvShape::forward`] uses on an `h × w` input: Winograd's where it was
    /// measured faster (see `winograd::pays_off`), else the unfolded one.
    pub fn algorithm(&self, h: usize, w: usize) -> Result<Algorithm, ConvError> {
        let g = self.geometry(h, w)?;
        Ok(if winograd::pays_off(self, g) { Algorithm::Winograd } else { Algorithm::Unfolded })
    }

    /// `input` `[batch, c_in, h, w]`, `weight` `[c_out, c_in, kh, kw]`, `bias` `[c_out]` →
    /// `[batch, c_out, H', W']`, by the algorithm [`ConvShape::algorithm`] picks.
    #[allow(clippy::too_many_arguments)]
    pub fn forward<T: Element>(
        &self,
        batch: usize,
        (h, w): (usize, usize),
        input: &[T],
        weight: &[T],
        bias: Option<&[T]>,
        activation: Activation,
    ) -> Result<Vec<T>, ConvError> {
        let algorithm = self.algorithm(h, w)?;
        self.forward_with(algorithm, batch, (h, w), input, weight, bias, activation)
    }

    /// [`ConvShape::forward`] by the given algorithm; an error if it cannot compute this shape.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_with<T: Element>(
        &self,
        algorithm: Algorithm,
        batch: usize,
        (h, w): (usize, usize),
        input: &[T],
        weight: &[T],
        bias: Option<&[T]>,
        activation: Activation,
    ) -> Result<Vec<T>, ConvError> {
        let g = self.geometry(h, w)?;
        Self::check_len("input", input.len(), batch * self.c_in * h * w)?;
        Self::check_len("weight", weight.len(), self.c_out * self.depth())?;
        if let Some(bias) = bias {
            Self::check_len("bias", bias.len(), self.c_out)?;
        }
        if algorithm == Algorithm::Winograd {
            if !winograd::computes(self) {
                return Err(ConvError::Unsupported { algorithm, shape: *self });
            }
            return Ok(self.forward_winograd(batch, g, input, weight, bias, activation));
        }
        let out_len = self.c_out * g.out_h * g.out_w;
        let rows_per_tile = self.rows_per_tile(g);
        let tiles = g.out_h.div_ceil(rows_per_tile);
        let mut out = vec![T::ZERO; batch * out_len];
        let dst = SharedPtr(out.as_mut_ptr());
        let sources = Sources::new(self, g, batch, input);
        let parallelism = gemm_parallelism(batch * tiles);
        (0..batch * tiles).into_par_iter().for_each_init(Vec::new, |columns, task| {
            let (image, tile) = (task / tiles, task % tiles);
            let first = tile * rows_per_tile;
            let rows = rows_per_tile.min(g.out_h - first);
            let (rhs, rhs_stride) = sources.tile(self, g, image, first, rows, columns);
            // SAFETY: `out` holds `batch` images of `out_len`, so the image's output lies
            // inside it, and each task is the only one writing its output rows of it.
            unsafe {
                self.forward_tile(
                    g,
                    (first, rows),
                    (rhs, rhs_stride),
                    weight,
                    bias,
                    activation,
                    parallelism,
                    dst.at(image * out_len),
                )
            }
        });
        Ok(out)
    }

    /// Output rows `first..first + rows` of one image from their right-hand side `rhs`
    /// (`[depth, rows·W']`, rows `rhs_stride` apart).
    ///
    /// # Safety
    /// `out` points to the image's whole output `[c_out, H', W']`, whose rows
    /// `first..first + rows` (of every channel) nothing else reads or writes meanwhile.
    #[allow(clippy::too_many_arguments)]
    unsafe fn forward_tile<T: Element>(
        &self,
        g: Geometry,
        (first, rows): (usize, usize),
        (rhs, rhs_stride): (&[T], usize),
        weight: &[T],
        bias: Option<&[T]>,
        activation: Activation,
        parallelism: gemm::Parallelism,
        out: *mut T,
    ) {
        let plane = g.out_h * g.out_w;
        let (offset, n) = (first * g.out_w, rows * g.out_w);
        // SAFETY: rows `first..first + rows` of channel `c` lie inside the image's output, and
        // are this call's alone; each slice is dropped before the next is made.
        let segment =
            |c: usize| unsafe { std::slice::from_raw_parts_mut(out.add(c * plane + offset), n) };
        for c in 0..self.c_out {
            segment(c).fill(bias.map_or(T::ZERO, |b| b[c]));
        }
        let depth = self.depth();
        assert!(
            depth == 0 || n == 0 || (depth - 1) * rhs_stride + n <= rhs.len(),
            "unfolded matrix too short"
        );
        // SAFETY: gemm reads `weight` (`c_out × depth`, row-major, its length checked by the
        // caller) and `rhs` (`depth × n`, rows `rhs_stride` apart, inside it by the assert),
        // and writes the `c_out` output row segments of `n` at `offset`, `plane` apart, which
        // are this call's (no slice of them is alive during the call).
        unsafe {
            gemm::gemm(
                self.c_out,
                n,
                depth,
                out.add(offset),
                1,
                plane as isize,
                true,
                weight.as_ptr(),
                1,
                depth as isize,
                rhs.as_ptr(),
                1,
                rhs_stride as isize,
                T::ONE,
                T::ONE,
                false,
                false,
                false,
                parallelism,
            )
        }
        if activation == Activation::Relu {
            for c in 0..self.c_out {
                for v in segment(c) {
                    if *v < T::ZERO {
                        *v = T::ZERO;
                    }
                }
            }
        }
    }
}

/// A buffer shared by tasks that each write only their own part of it.
#[derive(Clone, Copy)]
pub(crate) struct SharedPtr<T>(pub(crate) *mut T);

// SAFETY: the tasks write disjoint parts of the buffer (see each user), and the buffer
// outlives them (they finish before the function that made it returns).
unsafe impl<T> Send for SharedPtr<T> {}
unsafe impl<T> Sync for SharedPtr<T> {}

impl<T> SharedPtr<T> {
    /// The pointer `offset` elements in. A method, so closures capture the whole (Sync)
    /// wrapper rather than its raw-pointer field.
    pub(crate) fn at(self, offset: usize) -> *mut T {
        self.0.wrapping_add(offset)
    }
}

/// How each `gemm` of a pass with `tasks` independent tasks runs: alone when the tasks keep
/// every thread of the pool busy, else spread over the pool itself (a UNet's 8×8 latents are one
/// tile per image). `gemm` splits its output, never the sum, so the results are the same.
pub(crate) fn gemm_parallelism(tasks: usize) -> gemm::Parallelism {
    if tasks >= rayon::current_num_threads() {
        gemm::Parallelism::None
    } else {
        gemm::Parallelism::Rayon(0)
    }
}
