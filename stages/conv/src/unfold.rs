//! im2col: the unfolded matrix of a tile of output rows, whose row `(ci, ky, kx)` holds, for
//! each output pixel of the tile, the input pixel under that kernel tap (0 in the padding). The
//! rows are ordered as PyTorch's kernel `[c_out, c_in, kh, kw]` flattens, so a kernel is used
//! as stored.

use std::borrow::Cow;

use rayon::iter::{IndexedParallelIterator, ParallelIterator};
use rayon::slice::{ParallelSlice, ParallelSliceMut};

use crate::shape::{ConvShape, Geometry, Source};
use crate::Element;

/// What the tiles of a batch are unfolded from: the images, or for a strided convolution their
/// phases (see [`split_phases`]), one image's worth `len` apart.
pub(crate) struct Sources<'a, T: Element> {
    data: Cow<'a, [T]>,
    len: usize,
}

impl<'a, T: Element> Sources<'a, T> {
    pub(crate) fn new(shape: &ConvShape, g: Geometry, batch: usize, input: &'a [T]) -> Self {
        let in_len = shape.c_in * g.h * g.w;
        if shape.source() != Source::Phases {
            return Sources { data: Cow::Borrowed(input), len: in_len };
        }
        let len = shape.phases_len(g);
        let mut phases = vec![T::ZERO; batch * len];
        phases
            .par_chunks_mut(len.max(1))
            .zip(input.par_chunks(in_len.max(1)))
            .for_each(|(phases, input)| split_phases(shape, g, input, phases));
        Sources { data: Cow::Owned(phases), len }
    }

    fn image(&self, image: usize) -> &[T] {
        &self.data[image * self.len..][..self.len]
    }

    /// The right-hand side of output rows `first..first + rows` of `image`'s product: the
    /// matrix `[depth, rows·W']` and the distance between its rows. A pointwise convolution
    /// reads the image in place; otherwise the tile is unfolded into `columns`.
    pub(crate) fn tile<'b>(
        &'b self,
        shape: &ConvShape,
        g: Geometry,
        image: usize,
        first: usize,
        rows: usize,
        columns: &'b mut Vec<T>,
    ) -> (&'b [T], usize) {
        let source = self.image(image);
        let n = rows * g.out_w;
        match shape.source() {
            Source::Image => {
                let offset = (first * g.out_w).min(source.len());
                (&source[offset..], g.out_h * g.out_w)
            }
            Source::Unfolded => {
                columns.resize(shape.depth() * n, T::ZERO);
                unfold(shape, g, source, first, rows, columns);
                (&columns[..], n)
            }
            Source::Phases => {
                columns.resize(shape.depth() * n, T::ZERO);
                unfold_phases(shape, g, source, first, rows, columns);
                (&columns[..], n)
            }
        }
    }
}

/// im2col at stride 1: a shifted copy of an input row per output row and kernel tap.
fn unfold<T: Element>(
    shape: &ConvShape,
    g: Geometry,
    input: &[T],
    first: usize,
    rows: usize,
    columns: &mut [T],
) {
    let (kh, kw) = shape.kernel;
    let (ph, pw) = shape.padding;
    let mut chunks = columns.chunks_exact_mut(rows * g.out_w);
    for plane in input.chunks_exact(g.h * g.w) {
        for ky in 0..kh {
            for kx in 0..kw {
                let column = chunks.next().expect("one unfolded row per kernel tap");
                // Output columns whose input column `ox + kx − pw` lies inside the image.
                let x_lo = pw.saturating_sub(kx).min(g.out_w);
                let x_hi = (g.w + pw).saturating_sub(kx).clamp(x_lo, g.out_w);
                for (r, dst) in column.chunks_exact_mut(g.out_w).enumerate() {
                    let iy = first + r + ky;
                    if iy < ph || iy >= g.h + ph {
                        dst.fill(T::ZERO);
                        continue;
                    }
                    let src = &plane[(iy - ph) * g.w..][..g.w];
                    dst[..x_lo].fill(T::ZERO);
                    dst[x_hi..].fill(T::ZERO);
                    let x0 = x_lo + kx - pw;
                    dst[x_lo..x_hi].copy_from_slice(&src[x0..x0 + (x_hi - x_lo)]);
                }
            }
        }
    }
}

/// The zero-padded image `[c_in, H, W]` split into its `s × s` phases at stride `s`:
/// `[c_in, s, s, Hq, Wq]`, phase `(py, px)` holding the padded pixels `(Y·s + py, X·s + px)`.
/// Kernel tap `(ky, kx)` of output pixel `(oy, ox)` is then pixel `(oy + ky / s, ox + kx / s)`
/// of phase `(ky % s, kx % s)`: a contiguous run per output row, where gathering every s-th
/// input pixel for each of the k² taps was several times slower (AlexNet's 11×11/4 conv reads
/// each pixel ≈ 8 times).
fn split_phases<T: Element>(shape: &ConvShape, g: Geometry, input: &[T], phases: &mut [T]) {
    let s = shape.stride;
    let (ph, pw) = shape.padding;
    let (hq, wq) = shape.phase_dims(g);
    let planes = input.chunks_exact(g.h * g.w);
    for (plane, channel) in planes.zip(phases.chunks_exact_mut(s * s * hq * wq)) {
        for (phase, dst) in channel.chunks_exact_mut(hq * wq).enumerate() {
            let (py, px) = (phase / s, phase % s);
            for (yq, row) in dst.chunks_exact_mut(wq).enumerate() {
                let y = yq * s + py;
                if y < ph || y >= g.h + ph {
                    row.fill(T::ZERO);
                    continue;
                }
                let src = &plane[(y - ph) * g.w..][..g.w];
                for (xq, d) in row.iter_mut().enumerate() {
                    let x = xq * s + px;
                    *d = if x < pw || x >= g.w + pw { T::ZERO } else { src[x - pw] };
                }
            }
        }
    }
}

/// im2col of a strided convolution's output rows from the image's phases.
fn unfold_phases<T: Element>(
    shape: &ConvShape,
    g: Geometry,
    phases: &[T],
    first: usize,
    rows: usize,
    columns: &mut [T],
) {
    let s = shape.stride;
    let (kh, kw) = shape.kernel;
    let (hq, wq) = shape.phase_dims(g);
    let mut chunks = columns.chunks_exact_mut(rows * g.out_w);
    for channel in phases.chunks_exact(s * s * hq * wq) {
        for ky in 0..kh {
            for kx in 0..kw {
                let column = chunks.next().expect("one unfolded row per kernel tap");
                let plane = &channel[((ky % s) * s + kx % s) * hq * wq..][..hq * wq];
                let (qy, qx) = (ky / s, kx / s);
                for (r, dst) in column.chunks_exact_mut(g.out_w).enumerate() {
                    dst.copy_from_slice(&plane[(first + r + qy) * wq + qx..][..g.out_w]);
                }
            }
        }
    }
}

/// col2im of one tile: adds the unfolded gradient `columns` `[depth, rows·W']` of output rows
/// `first..first + rows` back onto the input gradient of one input channel `ci`
/// (`plane`, `[H, W]`), each tap's entry onto the pixel it was read from.
pub(crate) fn fold_channel<T: Element>(
    shape: &ConvShape,
    g: Geometry,
    ci: usize,
    columns: &[T],
    first: usize,
    rows: usize,
    plane: &mut [T],
) {
    let (kh, kw) = shape.kernel;
    let (ph, pw) = shape.padding;
    let s = shape.stride;
    let n = rows * g.out_w;
    for ky in 0..kh {
        for kx in 0..kw {
            let column = &columns[((ci * kh + ky) * kw + kx) * n..][..n];
            for (r, src) in column.chunks_exact(g.out_w).enumerate() {
                let iy = (first + r) * s + ky;
                if iy < ph || iy >= g.h + ph {
                    continue;
                }
                let dst = &mut plane[(iy - ph) * g.w..][..g.w];
                for (ox, &v) in src.iter().enumerate() {
                    let ix = ox * s + kx;
                    if ix >= pw && ix < g.w + pw {
                        dst[ix - pw] += v;
                    }
                }
            }
        }
    }
}
