//! A convolution's shape: what it reads, what it writes, and how the work is tiled.

/// Most elements of the unfolded matrix held at once per task: 1 MiB of f32, so a tile stays in
/// a core's L2 cache between being written and `gemm` packing it (measured on AlexNet at 512²:
/// the 11×11 layer took 30% less CPU time than with 16 MiB tiles, the others 4–10% less; 256 KiB
/// tiles were no faster). It also keeps VGG's 3×3 layers on 512² maps from unfolding a whole
/// image (≈ 600 MB) at once.
pub(crate) const COLUMNS_BUDGET: usize = 1 << 18;

/// Why a convolution cannot run on the data it was given.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConvError {
    #[error("conv stride must be at least 1")]
    ZeroStride,
    #[error("conv input {h}×{w} (padding {ph}, {pw}) is smaller than its {kh}×{kw} kernel")]
    InputTooSmall { h: usize, w: usize, ph: usize, pw: usize, kh: usize, kw: usize },
    #[error("conv {what} has {got} elements, expected {expected}")]
    Length { what: &'static str, expected: usize, got: usize },
    #[error(
        "the {algorithm:?} algorithm cannot compute a {}×{} conv at stride {}",
        shape.kernel.0,
        shape.kernel.1,
        shape.stride
    )]
    Unsupported { algorithm: crate::Algorithm, shape: ConvShape },
}

/// A 2-D convolution with zero padding (the same on both sides of an axis), no dilation and no
/// groups: every convolution in SD's UNet and VAE and in the metric trunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvShape {
    pub c_in: usize,
    pub c_out: usize,
    /// `(kh, kw)`.
    pub kernel: (usize, usize),
    pub stride: usize,
    /// Zero rows and columns added on both sides: `(rows, columns)`.
    pub padding: (usize, usize),
}

/// The sides of one image's input and output.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Geometry {
    pub h: usize,
    pub w: usize,
    pub out_h: usize,
    pub out_w: usize,
}

/// What a convolution's products read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    /// The image itself (a 1×1 convolution at stride 1 without padding).
    Image,
    /// The image unfolded (stride 1).
    Unfolded,
    /// The image split into phases, then unfolded (stride > 1): see `unfold::split_phases`.
    Phases,
}

impl ConvShape {
    /// The shape of a kernel `[c_out, c_in, kh, kw]` applied at `stride` with `padding`.
    pub fn new(
        kernel_dims: [usize; 4],
        stride: usize,
        padding: (usize, usize),
    ) -> Result<ConvShape, ConvError> {
        if stride == 0 {
            return Err(ConvError::ZeroStride);
        }
        let [c_out, c_in, kh, kw] = kernel_dims;
        Ok(ConvShape { c_in, c_out, kernel: (kh, kw), stride, padding })
    }

    /// The output's `(H', W')` for an `H × W` input.
    pub fn output_size(&self, h: usize, w: usize) -> Result<(usize, usize), ConvError> {
        let g = self.geometry(h, w)?;
        Ok((g.out_h, g.out_w))
    }

    /// Rows of the unfolded matrix: one per input channel and kernel tap.
    pub(crate) fn depth(&self) -> usize {
        self.c_in * self.kernel.0 * self.kernel.1
    }

    pub(crate) fn source(&self) -> Source {
        if self.kernel == (1, 1) && self.stride == 1 && self.padding == (0, 0) {
            Source::Image
        } else if self.stride > 1 {
            Source::Phases
        } else {
            Source::Unfolded
        }
    }

    pub(crate) fn geometry(&self, h: usize, w: usize) -> Result<Geometry, ConvError> {
        let (kh, kw) = self.kernel;
        let (ph, pw) = self.padding;
        if h + 2 * ph < kh || w + 2 * pw < kw {
            return Err(ConvError::InputTooSmall { h, w, ph, pw, kh, kw });
        }
        let out_h = (h + 2 * ph - kh) / self.stride + 1;
        let out_w = (w + 2 * pw - kw) / self.stride + 1;
        Ok(Geometry { h, w, out_h, out_w })
    }

    /// Output rows per tile: as many as keep the tile's unfolded matrix within the budget.
    pub(crate) fn rows_per_tile(&self, g: Geometry) -> usize {
        (COLUMNS_BUDGET / (self.depth() * g.out_w).max(1)).clamp(1, g.out_h.max(1))
    }

    /// Sides `(Hq, Wq)` of a phase plane: the padded image's sides over the stride, rounded up.
    pub(crate) fn phase_dims(&self, g: Geometry) -> (usize, usize) {
        let (ph, pw) = self.padding;
        ((g.h + 2 * ph).div_ceil(self.stride), (g.w + 2 * pw).div_ceil(self.stride))
    }

    /// Elements of one image's phases (see `unfold::split_phases`).
    pub(crate) fn phases_len(&self, g: Geometry) -> usize {
        let (hq, wq) = self.phase_dims(g);
        self.c_in * self.stride * self.stride * hq * wq
    }

    pub(crate) fn check_len(
        what: &'static str,
        data: usize,
        expected: usize,
    ) -> Result<(), ConvError> {
        if data == expected {
            Ok(())
        } else {
            Err(ConvError::Length { what, expected, got: data })
        }
    }
}
