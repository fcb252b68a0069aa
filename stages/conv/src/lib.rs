//! One fast 2-D convolution on the CPU, forward and both gradients, shared by every network in
//! sdpipe: the metric trunks (Inception, AlexNet, VGG), the UNet and the VAE.
//!
//! Why not candle's `conv2d`: on the CPU it transposes the whole batch to NHWC on one thread,
//! gathers tiles of output pixels element by element and scatters each tile's product, and its
//! gradients go through `conv_transpose2d` (a direct loop, parallel over output channels only)
//! and a convolution with the output gradient as a kernel. At the shapes sdpipe trains and
//! samples that made convolutions 3–6× slower than PyTorch's oneDNN.
//!
//! What this crate owns:
//! - [`ConvShape`]: channels, kernel, stride and padding, and the output size they give;
//! - [`ConvShape::forward`]: `act(conv(x, w) + b)` — each image unfolded (im2col) straight from
//!   NCHW a tile of output rows at a time, one `gemm` per tile writing into the output in place
//!   (`unfold.rs`, `forward.rs`), or for wide 3×3 kernels at stride 1 on large maps by
//!   Winograd's F(2×2, 3×3), 16 products of transformed tiles (`winograd.rs`): the
//!   [`Algorithm`] that [`ConvShape::algorithm`] picks, or the caller names
//!   ([`ConvShape::forward_with`]);
//! - [`ConvShape::backward_input`], [`ConvShape::backward_weight`] and
//!   [`ConvShape::backward_bias`]: the gradients of the input, the kernel and the bias
//!   (`backward.rs`).
//!
//! Data are plain row-major slices (`[B, C, H, W]` images, `[c_out, c_in, kh, kw]` kernels, as
//! PyTorch stores them), in f32 or f64, so the crate knows nothing of any tensor library.
//!
//! Parallelism: work is split on the current rayon pool into tiles of output rows of every image,
//! and each tile's sums are the same whichever thread runs it, so results do not depend on the
//! thread count (the kernel gradient's partial sums are grouped by a count fixed by the shape,
//! never by the pool).

mod backward;
mod element;
mod forward;
mod shape;
mod unfold;
mod winograd;

pub use element::Element;
pub use forward::{Activation, Algorithm};
pub use shape::{ConvError, ConvShape};
