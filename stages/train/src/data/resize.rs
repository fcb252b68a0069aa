//! Pillow's bilinear resampling of 8-bit RGB images, reproduced exactly.
//!
//! The reference script resizes with `torchvision.transforms.Resize(..., BILINEAR)` applied to a
//! PIL image, which torchvision hands to `PIL.Image.resize`: for PIL inputs the resize is always
//! antialiased (the `antialias` flag only concerns tensors), because Pillow widens the triangle
//! filter by the downscaling factor. Pillow computes it as two separable passes (horizontal over
//! the rows the vertical pass needs, then vertical) with 22-bit fixed-point weights, rounding and
//! clamping to 8 bits after each pass. This module follows those steps, so the result is
//! bit-identical to Pillow's (checked against Pillow in the parity fixtures).

use image::RgbImage;

/// Fractional bits of the fixed-point weights: 32 bits less 8 for the pixel and 2 for overflow.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// The triangle filter and its support radius of 1 input pixel (before widening).
fn bilinear(x: f64) -> f64 {
    let x = x.abs();
    if x < 1.0 {
        1.0 - x
    } else {
        0.0
    }
}

/// For each output pixel along one axis: the first input pixel it reads, how many it reads, and
/// their fixed-point weights (`ksize` slots per output pixel, unused slots zero).
struct Coefficients {
    ksize: usize,
    bounds: Vec<(usize, usize)>,
    weights: Vec<i32>,
}

fn coefficients(in_size: usize, out_size: usize) -> Coefficients {
    let scale = in_size as f64 / out_size as f64;
    let filter_scale = scale.max(1.0);
    let support = filter_scale; // bilinear support (1.0) widened when downscaling
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(out_size);
    let mut weights = vec![0i32; out_size * ksize];
    let mut row = vec![0f64; ksize];
    for out in 0..out_size {
        let center = (out as f64 + 0.5) * scale;
        // Pillow rounds with a C cast (truncation toward zero) after adding 0.5.
        let min = ((center - support + 0.5) as i64).max(0) as usize;
        let max = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        let count = max - min;
        let mut total = 0.0;
        for (x, slot) in row.iter_mut().enumerate().take(count) {
            let w = bilinear((x as f64 + min as f64 - center + 0.5) / filter_scale);
            *slot = w;
            total += w;
        }
        for (x, &w) in row.iter().enumerate().take(count) {
            let w = if total != 0.0 { w / total } else { w };
            let fixed = w * (1u32 << PRECISION_BITS) as f64;
            weights[out * ksize + x] =
                if w < 0.0 { (fixed - 0.5) as i32 } else { (fixed + 0.5) as i32 };
        }
        bounds.push((min, count));
    }
    Coefficients { ksize, bounds, weights }
}

/// Rounds a fixed-point accumulator (which starts at one half) to an 8-bit value.
fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// `PIL.Image.resize((width, height), Image.BILINEAR)` of an RGB image.
pub fn resize_bilinear(src: &RgbImage, width: u32, height: u32) -> RgbImage {
    let (in_w, in_h) = (src.width() as usize, src.height() as usize);
    let (out_w, out_h) = (width as usize, height as usize);
    if (in_w, in_h) == (out_w, out_h) {
        return src.clone();
    }
    let vertical = coefficients(in_h, out_h);
    // The horizontal pass only produces the rows the vertical pass reads.
    let first_row = vertical.bounds[0].0;
    let last_row = {
        let (min, count) = vertical.bounds[out_h - 1];
        min + count
    };
    let src = src.as_raw();
    let (rows, row_offset, tmp_w) = if in_w != out_w {
        let horizontal = coefficients(in_w, out_w);
        let mut out = vec![0u8; (last_row - first_row) * out_w * 3];
        for y in first_row..last_row {
            let line = &src[y * in_w * 3..(y + 1) * in_w * 3];
            let dst = &mut out[(y - first_row) * out_w * 3..(y - first_row + 1) * out_w * 3];
            for (xx, &(min, count)) in horizontal.bounds.iter().enumerate() {
                let k = &horizontal.weights[xx * horizontal.ksize..][..count];
                let mut acc = [1i32 << (PRECISION_BITS - 1); 3];
                for (i, &w) in k.iter().enumerate() {
                    let px = &line[(min + i) * 3..(min + i) * 3 + 3];
                    for c in 0..3 {
                        acc[c] += px[c] as i32 * w;
                    }
                }
                for c in 0..3 {
                    dst[xx * 3 + c] = clip8(acc[c]);
                }
            }
        }
        (out, first_row, out_w)
    } else {
        (src.to_vec(), 0, in_w)
    };
    if in_h == out_h {
        return RgbImage::from_raw(tmp_w as u32, out_h as u32, rows)
            .expect("buffer sized for the image");
    }
    let mut out = vec![0u8; out_h * tmp_w * 3];
    for (yy, &(min, count)) in vertical.bounds.iter().enumerate() {
        let k = &vertical.weights[yy * vertical.ksize..][..count];
        for xx in 0..tmp_w {
            let mut acc = [1i32 << (PRECISION_BITS - 1); 3];
            for (i, &w) in k.iter().enumerate() {
                let y = min + i - row_offset;
                let px = &rows[(y * tmp_w + xx) * 3..(y * tmp_w + xx) * 3 + 3];
                for c in 0..3 {
                    acc[c] += px[c] as i32 * w;
                }
            }
            for c in 0..3 {
                out[(yy * tmp_w + xx) * 3 + c] = clip8(acc[c]);
            }
        }
    }
    RgbImage::from_raw(tmp_w as u32, out_h as u32, out).expect("buffer sized for the image")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flat_image_stays_flat_at_any_size() {
        let src = RgbImage::from_pixel(37, 23, image::Rgb([200, 10, 99]));
        for (w, h) in [(16, 16), (80, 50), (37, 11), (5, 23)] {
            let out = resize_bilinear(&src, w, h);
            assert_eq!(out.dimensions(), (w, h));
            assert!(out.pixels().all(|p| p.0 == [200, 10, 99]), "{w}x{h}");
        }
    }

    #[test]
    fn halving_averages_neighbouring_pixels_with_the_widened_filter() {
        // Downscaling by 2 widens the triangle to a radius of 2 input pixels: output pixel 0
        // (centre 1.0) reads inputs 0, 1, 2 with weights 0.75, 0.75, 0.25 (normalised by 1.75),
        // so [0, 0, 255, 255] → [255·0.25/1.75, ...] = [36, 219], as Pillow gives.
        let mut src = RgbImage::new(4, 1);
        for (x, v) in [0u8, 0, 255, 255].into_iter().enumerate() {
            src.put_pixel(x as u32, 0, image::Rgb([v, v, v]));
        }
        let out = resize_bilinear(&src, 2, 1);
        assert_eq!(out.get_pixel(0, 0).0[0], 36);
        assert_eq!(out.get_pixel(1, 0).0[0], 219);
    }

    #[test]
    fn the_same_size_is_returned_unchanged() {
        let mut src = RgbImage::new(3, 2);
        src.put_pixel(1, 1, image::Rgb([1, 2, 3]));
        assert_eq!(resize_bilinear(&src, 3, 2), src);
    }
}
