//! Pillow's resampling of 8-bit RGB images (`PIL.Image.resize` with `BILINEAR` or `BICUBIC`),
//! reproduced operation for operation, so that what the reference tools computed from a
//! resized image is computed here from the same bytes: BLIP's and CLIP's PIL image processors
//! resize with bicubic, diffusers' training transform (torchvision's `Resize` on a PIL image)
//! with bilinear.
//!
//! Pillow's algorithm (`libImaging/Resample.c`) is a separable convolution whose kernel widens
//! with the downscale factor (antialiasing), with coefficients rounded to 22-bit fixed point,
//! the horizontal pass first (over only the rows the vertical pass reads) and each pass rounded
//! and clamped to 8 bits. Doing the same integer arithmetic gives Pillow's output byte for
//! byte; a float filter would differ by a level here and there, which the parity fixtures of
//! the caption, metrics and train crates would show.

use image::RgbImage;

/// Pillow's `PRECISION_BITS` for 8-bit images: 32 bits minus 8 for the value and 2 for the sign
/// and overshoot of the kernel's negative lobes.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// The resampling filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    /// The triangle filter, support 1.
    Bilinear,
    /// The cubic with `a = -0.5` (Keys), support 2.
    Bicubic,
}

impl Filter {
    fn support(self) -> f64 {
        match self {
            Filter::Bilinear => 1.0,
            Filter::Bicubic => 2.0,
        }
    }

    fn weight(self, x: f64) -> f64 {
        let x = x.abs();
        match self {
            Filter::Bilinear if x < 1.0 => 1.0 - x,
            Filter::Bilinear => 0.0,
            Filter::Bicubic => {
                const A: f64 = -0.5;
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
        }
    }
}

/// For each output position: the first input index and how many inputs it reads, and their
/// fixed-point weights (`precompute_coeffs` + `normalize_coeffs_8bpc` in Pillow).
struct Coefficients {
    bounds: Vec<(usize, usize)>,
    weights: Vec<i32>,
    ksize: usize,
}

fn coefficients(in_size: usize, out_size: usize, filter: Filter) -> Coefficients {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filter.support() * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(out_size);
    let mut weights = vec![0i32; out_size * ksize];
    let mut k = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        // `(int)` in C truncates toward zero; the arguments here are > -1, so `as` matches.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize - xmin;
        let mut ww = 0.0;
        for (x, kx) in k.iter_mut().enumerate().take(xmax) {
            let w = filter.weight((x as f64 + xmin as f64 - center + 0.5) * ss);
            *kx = w;
            ww += w;
        }
        for (x, kx) in k.iter().enumerate().take(xmax) {
            let w = if ww != 0.0 { kx / ww } else { *kx };
            let fixed = w * (1 << PRECISION_BITS) as f64;
            weights[xx * ksize + x] =
                if fixed < 0.0 { (fixed - 0.5) as i32 } else { (fixed + 0.5) as i32 };
        }
        bounds.push((xmin, xmax));
    }
    Coefficients { bounds, weights, ksize }
}

/// Rounds a fixed-point accumulator (which starts at one half) to an 8-bit value.
fn clip8(v: i32) -> u8 {
    (v >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Resize an RGB image (`width * height * 3` bytes, row-major) to `out_w` x `out_h` exactly as
/// `PIL.Image.resize((out_w, out_h), filter)` does.
pub fn resize_rgb(
    src: &[u8],
    width: usize,
    height: usize,
    out_w: usize,
    out_h: usize,
    filter: Filter,
) -> Vec<u8> {
    assert_eq!(src.len(), width * height * 3, "an RGB buffer of the given size");
    let horiz = coefficients(width, out_w, filter);
    let vert = coefficients(height, out_h, filter);
    let need_horizontal = out_w != width;
    let need_vertical = out_h != height;

    // Only the rows the vertical pass reads go through the horizontal pass.
    let (first_row, last_row) = if need_vertical {
        let (start, len) = vert.bounds[out_h - 1];
        (vert.bounds[0].0, start + len)
    } else {
        (0, height)
    };
    let temp = if need_horizontal {
        let rows = last_row - first_row;
        let mut out = vec![0u8; out_w * rows * 3];
        for y in 0..rows {
            let row = &src[(y + first_row) * width * 3..][..width * 3];
            for (xx, &(xmin, xmax)) in horiz.bounds.iter().enumerate() {
                let k = &horiz.weights[xx * horiz.ksize..][..xmax];
                for c in 0..3 {
                    let mut ss: i32 = 1 << (PRECISION_BITS - 1);
                    for (x, &w) in k.iter().enumerate() {
                        ss += row[(x + xmin) * 3 + c] as i32 * w;
                    }
                    out[(y * out_w + xx) * 3 + c] = clip8(ss);
                }
            }
        }
        out
    } else {
        src[first_row * width * 3..last_row * width * 3].to_vec()
    };
    if !need_vertical {
        return temp;
    }
    let mut out = vec![0u8; out_w * out_h * 3];
    for (yy, &(ymin, ymax)) in vert.bounds.iter().enumerate() {
        let k = &vert.weights[yy * vert.ksize..][..ymax];
        let ymin = ymin - first_row;
        for x in 0..out_w * 3 {
            let mut ss: i32 = 1 << (PRECISION_BITS - 1);
            for (y, &w) in k.iter().enumerate() {
                ss += temp[(y + ymin) * out_w * 3 + x] as i32 * w;
            }
            out[yy * out_w * 3 + x] = clip8(ss);
        }
    }
    out
}

/// [`resize_rgb`] of an [`RgbImage`].
pub fn resize(src: &RgbImage, width: u32, height: u32, filter: Filter) -> RgbImage {
    let (in_w, in_h) = (src.width() as usize, src.height() as usize);
    let out = resize_rgb(src.as_raw(), in_w, in_h, width as usize, height as usize, filter);
    RgbImage::from_raw(width, height, out).expect("buffer sized for the image")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bicubic_kernel_is_interpolating_with_negative_lobes() {
        let f = Filter::Bicubic;
        assert_eq!((f.weight(0.0), f.weight(1.0), f.weight(2.0)), (1.0, 0.0, 0.0));
        assert!(f.weight(1.5) < 0.0);
    }

    #[test]
    fn weights_of_each_output_sum_to_one_in_fixed_point() {
        for filter in [Filter::Bilinear, Filter::Bicubic] {
            for (inp, out) in [(61, 384), (512, 384), (1000, 384), (384, 384)] {
                let c = coefficients(inp, out, filter);
                for xx in 0..out {
                    let sum: i32 = c.weights[xx * c.ksize..][..c.ksize].iter().sum();
                    let off = (sum - (1 << PRECISION_BITS)).abs();
                    assert!(off <= c.ksize as i32, "{filter:?} {inp}->{out}");
                }
            }
        }
    }

    #[test]
    fn a_flat_image_stays_flat_at_any_size() {
        let src = RgbImage::from_pixel(37, 23, image::Rgb([200, 10, 99]));
        for filter in [Filter::Bilinear, Filter::Bicubic] {
            for (w, h) in [(16, 16), (80, 50), (37, 11), (5, 23), (384, 384)] {
                let out = resize(&src, w, h, filter);
                assert_eq!(out.dimensions(), (w, h));
                assert!(out.pixels().all(|p| p.0 == [200, 10, 99]), "{filter:?} {w}x{h}");
            }
        }
    }

    #[test]
    fn bilinear_halving_averages_neighbours_with_the_widened_filter() {
        // Downscaling by 2 widens the triangle to a radius of 2 input pixels: output pixel 0
        // (centre 1.0) reads inputs 0, 1, 2 with weights 0.75, 0.75, 0.25 (normalised by 1.75),
        // so [0, 0, 255, 255] → [255·0.25/1.75, ...] = [36, 219], as Pillow gives.
        let mut src = RgbImage::new(4, 1);
        for (x, v) in [0u8, 0, 255, 255].into_iter().enumerate() {
            src.put_pixel(x as u32, 0, image::Rgb([v, v, v]));
        }
        let out = resize(&src, 2, 1, Filter::Bilinear);
        assert_eq!((out.get_pixel(0, 0).0[0], out.get_pixel(1, 0).0[0]), (36, 219));
    }

    #[test]
    fn the_same_size_is_the_identity() {
        let src: Vec<u8> = (0..16 * 9 * 3).map(|i| (i * 37 % 256) as u8).collect();
        for filter in [Filter::Bilinear, Filter::Bicubic] {
            assert_eq!(resize_rgb(&src, 16, 9, 16, 9, filter), src);
        }
    }
}
