//! Pillow's bicubic resampling of 8-bit RGB images, reproduced operation for operation.
//!
//! BLIP's (slow, PIL-backed) image processor resizes with `PIL.Image.resize(..., BICUBIC)`, which
//! the captions of the tutorial were computed from. Pillow's algorithm (`libImaging/Resample.c`)
//! is a separable convolution whose kernel widens with the downscale factor (antialiasing),
//! with the cubic `a = -0.5`, coefficients rounded to 22-bit fixed point, the horizontal pass
//! first (over only the rows the vertical pass reads) and each pass rounded and clamped to
//! 8 bits. Doing the same integer arithmetic gives Pillow's output byte for byte; a generic
//! float Catmull-Rom filter would differ by a level here and there, which the parity fixtures
//! would show.

/// Pillow's `PRECISION_BITS` for 8-bit images: 32 bits minus 8 for the value and 2 for the sign
/// and overshoot of the kernel's negative lobes.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// The bicubic kernel with `a = -0.5` (Keys), support 2.
fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// For each output position: the first input index, and the fixed-point weights of the inputs
/// from there on (`precompute_coeffs` + `normalize_coeffs_8bpc` in Pillow).
struct Coefficients {
    bounds: Vec<(usize, usize)>,
    weights: Vec<i32>,
    ksize: usize,
}

fn coefficients(in_size: usize, out_size: usize) -> Coefficients {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = 2.0 * filterscale;
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
            let w = bicubic((x as f64 + xmin as f64 - center + 0.5) * ss);
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

fn clip8(v: i32) -> u8 {
    if v >= (1 << PRECISION_BITS << 8) {
        255
    } else if v <= 0 {
        0
    } else {
        (v >> PRECISION_BITS) as u8
    }
}

/// Resize an RGB image (`width * height * 3` bytes, row-major) to `out_w` x `out_h` exactly as
/// `PIL.Image.resize((out_w, out_h), Image.BICUBIC)` does.
pub fn resize_bicubic_rgb(
    src: &[u8],
    width: usize,
    height: usize,
    out_w: usize,
    out_h: usize,
) -> Vec<u8> {
    assert_eq!(src.len(), width * height * 3, "an RGB buffer of the given size");
    let horiz = coefficients(width, out_w);
    let vert = coefficients(height, out_h);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernel_is_interpolating_with_negative_lobes() {
        assert_eq!(bicubic(0.0), 1.0);
        assert_eq!(bicubic(1.0), 0.0);
        assert_eq!(bicubic(2.0), 0.0);
        assert!(bicubic(1.5) < 0.0);
    }

    #[test]
    fn weights_of_each_output_sum_to_one_in_fixed_point() {
        for (inp, out) in [(61, 384), (512, 384), (1000, 384), (384, 384)] {
            let c = coefficients(inp, out);
            for xx in 0..out {
                let sum: i32 = c.weights[xx * c.ksize..][..c.ksize].iter().sum();
                assert!((sum - (1 << PRECISION_BITS)).abs() <= c.ksize as i32, "{inp}->{out}");
            }
        }
    }

    #[test]
    fn a_constant_image_stays_constant() {
        let src = vec![77u8; 30 * 20 * 3];
        let out = resize_bicubic_rgb(&src, 30, 20, 384, 384);
        assert!(out.iter().all(|&v| v == 77));
    }

    #[test]
    fn same_size_is_the_identity() {
        let src: Vec<u8> = (0..16 * 9 * 3).map(|i| (i * 37 % 256) as u8).collect();
        assert_eq!(resize_bicubic_rgb(&src, 16, 9, 16, 9), src);
    }
}
