//! Convolution + bias + ReLU for the metric networks on the CPU, in f32: the layer that makes up
//! nearly all of the AlexNet, VGG and Inception trunks' time.
//!
//! candle's CPU conv2d transposes the whole batch to NHWC on one thread, gathers tiles of 512
//! output pixels element by element, and allocates and scatters each tile's product; on the
//! large feature maps of LPIPS at 512² that overhead costs more than the arithmetic. Here each
//! image is unfolded (im2col) straight from NCHW — whole rows copied at stride 1 — a tile of
//! output rows at a time into a per-thread buffer, and one `gemm` call per tile writes
//! `weight · columns` into the NCHW output in place, on top of the bias; ReLU follows on the
//! same rows while they are still in cache. The rows of the unfolded matrix are ordered (c_in, ky, kx), which is
//! PyTorch's weight layout flattened, so the weights are used as stored.
//!
//! The tasks run in parallel on the current rayon pool are tiles of output rows, of every image
//! of the batch: small enough that a thread the OS pauses (the machine is shared) does not hold
//! up the others, and each tile's sums are the same whichever thread runs it, so the results do
//! not depend on the thread count or on which images share a batch.

use candle_core::{DType, Device, Storage, Tensor};
use rayon::iter::{IndexedParallelIterator, IntoParallelIterator, ParallelIterator};
use rayon::slice::{ParallelSlice, ParallelSliceMut};

/// Most elements of the unfolded matrix held at once per image: 1 MiB of f32, so a tile stays
/// in a core's L2 cache between being written and `gemm` packing it (measured on AlexNet at
/// 512²: the 11×11 layer takes 30% less CPU time than with 16 MiB tiles, the others 4–10% less;
/// 256 KiB tiles are no faster). It also keeps VGG's 3×3 layers on 512² maps from unfolding a
/// whole image (≈ 600 MB) at once.
const COLUMNS_BUDGET: usize = 1 << 18;

/// A 2-D convolution with bias, followed by ReLU: `relu(conv(x, weight) + bias)`.
#[derive(Debug, Clone)]
pub struct ConvRelu {
    /// `[c_out, c_in·kh·kw]`, PyTorch's `[c_out, c_in, kh, kw]` flattened.
    weight: Vec<f32>,
    bias: Vec<f32>,
    c_in: usize,
    c_out: usize,
    kernel: (usize, usize),
    stride: usize,
    /// Zero padding (rows, columns) on both sides.
    padding: (usize, usize),
}

/// The geometry of one image's convolution.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    h: usize,
    w: usize,
    out_h: usize,
    out_w: usize,
}

impl ConvRelu {
    /// `weight` `[c_out, c_in, kh, kw]` and `bias` `[c_out]`, both f32.
    pub fn new(
        weight: &Tensor,
        bias: &Tensor,
        stride: usize,
        padding: (usize, usize),
    ) -> candle_core::Result<ConvRelu> {
        let (c_out, c_in, kh, kw) = weight.dims4()?;
        if bias.dims() != [c_out] {
            candle_core::bail!("conv bias has shape {:?}, expected [{c_out}]", bias.dims())
        }
        if stride == 0 {
            candle_core::bail!("conv stride must be at least 1")
        }
        Ok(ConvRelu {
            weight: weight.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?,
            bias: bias.to_dtype(DType::F32)?.to_vec1()?,
            c_in,
            c_out,
            kernel: (kh, kw),
            stride,
            padding,
        })
    }

    /// `[B, c_in, H, W]` f32 → `[B, c_out, H', W']`.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, c_in, h, w) = x.dims4()?;
        if c_in != self.c_in {
            candle_core::bail!("conv expects {} input channels, got {c_in}", self.c_in)
        }
        let g = self.geometry(h, w)?;
        let in_len = c_in * h * w;
        let out_len = self.c_out * g.out_h * g.out_w;
        let rows_per_tile = (COLUMNS_BUDGET / (self.depth() * g.out_w).max(1)).clamp(1, g.out_h);
        let tiles = g.out_h.div_ceil(rows_per_tile);
        let mut out = vec![0f32; b * out_len];
        let dst = OutputPtr(out.as_mut_ptr());
        with_f32_slice(x, |input| {
            // A strided convolution reads the images split into phases (see `split_phases`).
            let (phases, phases_len) = if self.source() == Source::Phases {
                let (hq, wq) = self.phase_dims(g);
                let len = c_in * self.stride * self.stride * hq * wq;
                let mut phases = vec![0f32; b * len];
                phases
                    .par_chunks_mut(len.max(1))
                    .zip(input.par_chunks(in_len.max(1)))
                    .for_each(|(phases, input)| self.split_phases(input, g, phases));
                (phases, len)
            } else {
                (Vec::new(), in_len)
            };
            let (source, source_len) =
                if phases.is_empty() { (input, in_len) } else { (&phases[..], phases_len) };
            (0..b * tiles).into_par_iter().for_each_init(Vec::new, |columns, task| {
                let (image, tile) = (task / tiles, task % tiles);
                let first = tile * rows_per_tile;
                let rows = rows_per_tile.min(g.out_h - first);
                let input = &source[image * source_len..][..source_len];
                // SAFETY: `out` holds `b` images of `out_len`, so the image's output lies
                // inside it, and each task is the only one writing its output rows of it.
                unsafe {
                    self.forward_tile(input, g, first, rows, dst.at(image * out_len), columns)
                }
            })
        })?;
        Tensor::from_vec(out, (b, self.c_out, g.out_h, g.out_w), &Device::Cpu)
    }

    /// What the products read: see [`Source`].
    fn source(&self) -> Source {
        if self.kernel == (1, 1) && self.stride == 1 && self.padding == (0, 0) {
            Source::Image
        } else if self.stride > 1 {
            Source::Phases
        } else {
            Source::Unfolded
        }
    }

    /// Rows of the unfolded matrix: one per input channel and kernel tap.
    fn depth(&self) -> usize {
        self.c_in * self.kernel.0 * self.kernel.1
    }

    fn geometry(&self, h: usize, w: usize) -> candle_core::Result<Geometry> {
        let (kh, kw) = self.kernel;
        let (ph, pw) = self.padding;
        if h + 2 * ph < kh || w + 2 * pw < kw {
            candle_core::bail!("conv input {h}×{w} (padding {ph}, {pw}) is smaller than {kh}×{kw}")
        }
        let out_h = (h + 2 * ph - kh) / self.stride + 1;
        let out_w = (w + 2 * pw - kw) / self.stride + 1;
        Ok(Geometry { h, w, out_h, out_w })
    }

    /// Output rows `first..first + rows` of one image: `input` `[c_in, H, W]`, or its phases
    /// for a strided convolution.
    ///
    /// # Safety
    /// `out` points to the image's whole output `[c_out, H', W']`, whose rows
    /// `first..first + rows` (of every channel) nothing else reads or writes meanwhile.
    unsafe fn forward_tile(
        &self,
        input: &[f32],
        g: Geometry,
        first: usize,
        rows: usize,
        out: *mut f32,
        columns: &mut Vec<f32>,
    ) {
        let plane = g.out_h * g.out_w;
        let (offset, n) = (first * g.out_w, rows * g.out_w);
        // SAFETY: rows `first..first + rows` of channel `c` lie inside the image's output, and
        // are this call's alone; each slice is dropped before the next is made.
        let segment =
            |c: usize| unsafe { std::slice::from_raw_parts_mut(out.add(c * plane + offset), n) };
        for (c, bias) in self.bias.iter().enumerate() {
            segment(c).fill(*bias);
        }
        let depth = self.depth();
        let (rhs, rhs_stride) = match self.source() {
            // The rows of the product are the input channels, `plane` apart.
            Source::Image => (&input[offset.min(input.len())..], plane),
            Source::Unfolded => {
                columns.resize(depth * n, 0.0);
                self.unfold(input, g, first, rows, columns);
                (&columns[..], n)
            }
            Source::Phases => {
                columns.resize(depth * n, 0.0);
                self.unfold_phases(input, g, first, rows, columns);
                (&columns[..], n)
            }
        };
        assert!(self.weight.len() == self.c_out * depth, "weight matrix of the wrong size");
        assert!(
            depth == 0 || n == 0 || (depth - 1) * rhs_stride + n <= rhs.len(),
            "unfolded matrix too short"
        );
        // SAFETY: gemm reads `weight` (`c_out × depth`, row-major) and `rhs` (`depth × n`, rows
        // `rhs_stride` apart), both inside their slices by the asserts above, and writes the
        // `c_out` output row segments of `n` at `offset`, `plane` apart, which are this call's
        // (no slice of them is alive during the call).
        unsafe {
            gemm::gemm(
                self.c_out,
                n,
                depth,
                out.add(offset),
                1,
                plane as isize,
                true,
                self.weight.as_ptr(),
                1,
                depth as isize,
                rhs.as_ptr(),
                1,
                rhs_stride as isize,
                1.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            )
        }
        for c in 0..self.c_out {
            for v in segment(c) {
                *v = v.max(0.0);
            }
        }
    }

    /// im2col of output rows `first..first + rows` at stride 1: row `(ci, ky, kx)` of
    /// `columns` holds, for each of those output pixels, the input pixel under that kernel tap
    /// (0 in the padding) — a shifted copy of an input row per output row.
    fn unfold(&self, input: &[f32], g: Geometry, first: usize, rows: usize, columns: &mut [f32]) {
        let (kh, kw) = self.kernel;
        let (ph, pw) = self.padding;
        let n = rows * g.out_w;
        let mut chunks = columns.chunks_exact_mut(n);
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
                            dst.fill(0.0);
                            continue;
                        }
                        let src = &plane[(iy - ph) * g.w..][..g.w];
                        dst[..x_lo].fill(0.0);
                        dst[x_hi..].fill(0.0);
                        let x0 = x_lo + kx - pw;
                        dst[x_lo..x_hi].copy_from_slice(&src[x0..x0 + (x_hi - x_lo)]);
                    }
                }
            }
        }
    }

    /// Sides `(Hq, Wq)` of a phase plane: the padded image's sides over the stride, rounded up.
    fn phase_dims(&self, g: Geometry) -> (usize, usize) {
        let (ph, pw) = self.padding;
        ((g.h + 2 * ph).div_ceil(self.stride), (g.w + 2 * pw).div_ceil(self.stride))
    }

    /// The zero-padded image `[c_in, H, W]` split into its `s × s` phases at stride `s`:
    /// `[c_in, s, s, Hq, Wq]`, phase `(py, px)` holding the padded pixels `(Y·s + py, X·s + px)`.
    /// Kernel tap `(ky, kx)` of output pixel `(oy, ox)` is then pixel
    /// `(oy + ky / s, ox + kx / s)` of phase `(ky % s, kx % s)`: a contiguous run per output
    /// row, where gathering every s-th input pixel for each of the k² taps was several times
    /// slower (AlexNet's 11×11/4 conv reads each pixel ≈ 8 times).
    fn split_phases(&self, input: &[f32], g: Geometry, phases: &mut [f32]) {
        let s = self.stride;
        let (ph, pw) = self.padding;
        let (hq, wq) = self.phase_dims(g);
        let planes = input.chunks_exact(g.h * g.w);
        for (plane, channel) in planes.zip(phases.chunks_exact_mut(s * s * hq * wq)) {
            for (phase, dst) in channel.chunks_exact_mut(hq * wq).enumerate() {
                let (py, px) = (phase / s, phase % s);
                for (yq, row) in dst.chunks_exact_mut(wq).enumerate() {
                    let y = yq * s + py;
                    if y < ph || y >= g.h + ph {
                        row.fill(0.0);
                        continue;
                    }
                    let src = &plane[(y - ph) * g.w..][..g.w];
                    for (xq, d) in row.iter_mut().enumerate() {
                        let x = xq * s + px;
                        *d = if x < pw || x >= g.w + pw { 0.0 } else { src[x - pw] };
                    }
                }
            }
        }
    }

    /// im2col of output rows `first..first + rows` of a strided convolution, from the image's
    /// phases (see [`ConvRelu::split_phases`]).
    fn unfold_phases(
        &self,
        phases: &[f32],
        g: Geometry,
        first: usize,
        rows: usize,
        columns: &mut [f32],
    ) {
        let s = self.stride;
        let (kh, kw) = self.kernel;
        let (hq, wq) = self.phase_dims(g);
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
}

/// What a convolution's products read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    /// The image itself (a 1×1 convolution at stride 1 without padding).
    Image,
    /// The image unfolded (stride 1).
    Unfolded,
    /// The image split into phases, then unfolded (stride > 1).
    Phases,
}

/// The output buffer shared by the tile tasks of [`ConvRelu::forward`], each writing only its
/// own rows.
#[derive(Clone, Copy)]
struct OutputPtr(*mut f32);

// SAFETY: the tasks write disjoint parts of the buffer (see `ConvRelu::forward_tile`), and the
// buffer outlives them (they finish before `forward` returns).
unsafe impl Send for OutputPtr {}
unsafe impl Sync for OutputPtr {}

impl OutputPtr {
    /// The pointer `offset` elements in. A method, so closures capture the whole (Sync)
    /// wrapper rather than its raw-pointer field.
    fn at(self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}

/// Runs `f` on the elements of an f32 CPU tensor, in row-major order (copied only if the
/// tensor is not contiguous).
pub(crate) fn with_f32_slice<R>(x: &Tensor, f: impl FnOnce(&[f32]) -> R) -> candle_core::Result<R> {
    if x.dtype() != DType::F32 {
        candle_core::bail!("expected an f32 tensor, got {:?}", x.dtype())
    }
    let x = x.contiguous()?;
    let (storage, layout) = x.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else { candle_core::bail!("expected a CPU tensor") };
    let data = cpu.as_slice::<f32>()?;
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("tensor not contiguous".into()))?;
    Ok(f(&data[start..end]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensor(dims: &[usize], seed: f32) -> Tensor {
        let n: usize = dims.iter().product();
        let v: Vec<f32> = (0..n).map(|i| ((i as f32 + seed) * 0.71).sin()).collect();
        Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
    }

    /// The reference: candle's conv2d (symmetric padding) + bias + ReLU.
    fn reference(x: &Tensor, w: &Tensor, b: &Tensor, stride: usize, pad: (usize, usize)) -> Tensor {
        let x = x.pad_with_zeros(2, pad.0, pad.0).unwrap().pad_with_zeros(3, pad.1, pad.1).unwrap();
        let c = b.dim(0).unwrap();
        x.conv2d(w, 0, stride, 1, 1)
            .unwrap()
            .broadcast_add(&b.reshape((1, c, 1, 1)).unwrap())
            .unwrap()
            .relu()
            .unwrap()
    }

    fn assert_matches_candle(x: &[usize], w: &[usize], stride: usize, pad: (usize, usize)) {
        let (x, w, b) = (tensor(x, 0.0), tensor(w, 1.0), tensor(&w[..1], 2.0));
        let expected = reference(&x, &w, &b, stride, pad);
        for threads in [1, 3] {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            let conv = ConvRelu::new(&w, &b, stride, pad).unwrap();
            let got = pool.install(|| conv.forward(&x)).unwrap();
            assert_eq!(got.dims(), expected.dims());
            // The same f32 sums of `depth` terms (each |x·w| ≤ 1) in another order: rounding
            // differences grow with the number of terms, a wrong tap is off by O(1).
            let depth = (w.dims()[1] * w.dims()[2] * w.dims()[3]) as f32;
            let diff = (got - &expected).unwrap().abs().unwrap().max_all().unwrap();
            let diff = diff.to_scalar::<f32>().unwrap();
            assert!(diff <= 1e-6 * depth, "{threads} threads: {diff} over {depth} terms");
        }
    }

    #[test]
    fn a_strided_padded_convolution_matches_candle() {
        assert_matches_candle(&[2, 3, 23, 19], &[5, 3, 11, 11], 4, (2, 2));
    }

    #[test]
    fn a_stride_one_convolution_matches_candle() {
        assert_matches_candle(&[4, 4, 9, 10], &[6, 4, 5, 5], 1, (2, 2));
    }

    #[test]
    fn asymmetric_padding_matches_candle() {
        assert_matches_candle(&[1, 3, 8, 7], &[2, 3, 1, 7], 1, (0, 3));
        assert_matches_candle(&[1, 3, 8, 7], &[2, 3, 7, 1], 1, (3, 0));
    }

    #[test]
    fn a_pointwise_convolution_matches_candle() {
        assert_matches_candle(&[3, 8, 5, 6], &[4, 8, 1, 1], 1, (0, 0));
        assert_matches_candle(&[3, 8, 5, 6], &[4, 8, 1, 1], 2, (0, 0));
    }

    #[test]
    fn large_outputs_are_unfolded_in_tiles_of_rows() {
        // Depth 3·3·3 = 27 and 400 output columns: 10 800 elements a row, so the budget splits
        // this image into several tiles.
        let rows = COLUMNS_BUDGET / (27 * 400) + 3;
        assert_matches_candle(&[1, 3, rows, 400], &[2, 3, 3, 3], 1, (1, 1));
        // Depth 3·11·11 = 363 and 24 output columns at stride 4: 34 output rows, two tiles.
        const { assert!(COLUMNS_BUDGET / (363 * 24) < 34) };
        assert_matches_candle(&[2, 3, 140, 100], &[4, 3, 11, 11], 4, (2, 2));
    }

    #[test]
    fn a_wrong_channel_count_is_an_error() {
        let conv = ConvRelu::new(&tensor(&[2, 3, 3, 3], 0.0), &tensor(&[2], 0.0), 1, (1, 1));
        let err = conv.unwrap().forward(&tensor(&[1, 4, 5, 5], 0.0)).unwrap_err();
        assert!(err.to_string().contains("3 input channels"), "{err}");
    }
}
