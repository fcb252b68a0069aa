//! The reference script's image transform, step by step:
//! `Resize(resolution, BILINEAR)` → `CenterCrop` or `RandomCrop(resolution)` →
//! `RandomHorizontalFlip()` (if `random_flip`) → `ToTensor()` → `Normalize([0.5], [0.5])`.
//!
//! Sizes and offsets follow torchvision exactly: the shorter side becomes `resolution` and the
//! longer `int(resolution · long / short)`; the centre crop offset is Python's
//! `int(round((size − crop) / 2))`, which rounds halves to even; a random crop offset is uniform
//! over all valid positions; the flip happens with probability ½. The resize is Pillow's (see
//! [`super::resize`]). The random draws come from the micro-batch's own stream, so they are
//! reproducible, but not PyTorch's values.

use image::RgbImage;

use crate::rng::Draws;
use sdpipe_stages::params::KindParams;
use sdpipe_stages::pillow::{self, Filter};

/// The transform's settings (the script's `--resolution`, `--center_crop`, `--random_flip`),
/// declared as the training kinds' parameters of those names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, KindParams)]
pub struct Transform {
    /// Images are resized (shorter side) and cropped to this square size.
    #[param(default = 512, min = 8, max = 4096)]
    pub resolution: u32,
    /// Centre crop (true) or random crop (false) after resizing.
    #[param(default = false)]
    pub center_crop: bool,
    /// Flip each image horizontally with probability 0.5.
    #[param(default = false)]
    pub random_flip: bool,
}

/// What the random parts of the transform decided for one image (recorded for tests and logs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Augmentation {
    pub crop_top: u32,
    pub crop_left: u32,
    pub flipped: bool,
}

impl Transform {
    /// torchvision's `Resize(int)` output size (width, height) for an input of `(w, h)`.
    pub fn resized_size(&self, w: u32, h: u32) -> (u32, u32) {
        let (short, long) = if w <= h { (w, h) } else { (h, w) };
        let new_short = self.resolution;
        // Python: int(requested_new_short * long / short), evaluated in double precision.
        let new_long = (new_short as f64 * long as f64 / short as f64) as u32;
        if w <= h {
            (new_short, new_long)
        } else {
            (new_long, new_short)
        }
    }

    /// Applies the transform: a `3 × resolution × resolution` tensor's data (channels first) in
    /// [-1, 1], and what the random steps chose.
    pub fn apply(&self, image: &RgbImage, draws: &mut Draws) -> (Vec<f32>, Augmentation) {
        let (w, h) = self.resized_size(image.width(), image.height());
        let resized = pillow::resize(image, w, h, Filter::Bilinear);
        let augmentation = self.decide(w, h, draws);
        (self.render(&resized, augmentation), augmentation)
    }

    /// Draws the random choices for an image resized to `w × h`: the crop offset (centre crop:
    /// none drawn), then the flip (if `random_flip`).
    pub fn decide(&self, w: u32, h: u32, draws: &mut Draws) -> Augmentation {
        let size = self.resolution;
        let (crop_top, crop_left) = if self.center_crop {
            let offset = |full: u32| ((full - size) as f64 / 2.0).round_ties_even() as u32;
            (offset(h), offset(w))
        } else {
            // RandomCrop draws the row offset first, then the column offset.
            let top = draws.below((h - size + 1) as u64) as u32;
            let left = draws.below((w - size + 1) as u64) as u32;
            (top, left)
        };
        let flipped = self.random_flip && draws.uniform() < 0.5;
        Augmentation { crop_top, crop_left, flipped }
    }

    /// Crops and flips an already resized image as decided, then `ToTensor` and `Normalize`.
    pub fn render(&self, resized: &RgbImage, augmentation: Augmentation) -> Vec<f32> {
        let size = self.resolution;
        let Augmentation { crop_top, crop_left, flipped } = augmentation;
        let plane = (size * size) as usize;
        let mut data = vec![0f32; 3 * plane];
        for y in 0..size {
            for x in 0..size {
                let source_x = if flipped { size - 1 - x } else { x };
                let pixel = resized.get_pixel(crop_left + source_x, crop_top + y).0;
                for (c, &value) in pixel.iter().enumerate() {
                    // ToTensor divides by 255, Normalize subtracts 0.5 and divides by 0.5, in f32.
                    let unit = value as f32 / 255.0;
                    data[c * plane + (y * size + x) as usize] = (unit - 0.5) / 0.5;
                }
            }
        }
        data
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::{Purpose, Seeds};

    fn transform(center_crop: bool, random_flip: bool) -> Transform {
        Transform { resolution: 8, center_crop, random_flip }
    }

    fn gradient(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 10) as u8, (y * 10) as u8, 128]))
    }

    #[test]
    fn the_shorter_side_becomes_the_resolution_and_the_longer_side_truncates() {
        let t = Transform { resolution: 512, center_crop: true, random_flip: false };
        assert_eq!(t.resized_size(1000, 750), (682, 512)); // 512·1000/750 = 682.67
        assert_eq!(t.resized_size(750, 1000), (512, 682));
        assert_eq!(t.resized_size(300, 300), (512, 512));
    }

    #[test]
    fn center_crop_offsets_round_halves_to_even_like_python() {
        // A 8×11 resize leaves 3 rows to trim: round(1.5) = 2. With 8×13, round(2.5) = 2.
        let mut draws = Seeds::new(0).stream(Purpose::MicroBatch, 0);
        let (_, a) = transform(true, false).apply(&gradient(8, 11), &mut draws);
        assert_eq!((a.crop_top, a.crop_left), (2, 0));
        let (_, b) = transform(true, false).apply(&gradient(8, 13), &mut draws);
        assert_eq!((b.crop_top, b.crop_left), (2, 0));
    }

    #[test]
    fn output_is_channels_first_and_scaled_to_minus_one_one() {
        let image = RgbImage::from_pixel(8, 8, image::Rgb([0, 255, 51]));
        let mut draws = Seeds::new(0).stream(Purpose::MicroBatch, 0);
        let (data, _) = transform(true, false).apply(&image, &mut draws);
        assert_eq!(data.len(), 3 * 64);
        assert!(data[..64].iter().all(|&v| v == -1.0));
        assert!(data[64..128].iter().all(|&v| v == 1.0));
        assert!(data[128..].iter().all(|&v| (v - (51.0 / 255.0 - 0.5) / 0.5).abs() < 1e-7));
    }

    #[test]
    fn random_crops_stay_inside_the_image_and_vary() {
        let image = gradient(8, 20);
        let mut tops = std::collections::BTreeSet::new();
        for i in 0..50 {
            let mut draws = Seeds::new(0).stream(Purpose::MicroBatch, i);
            let (_, a) = transform(false, false).apply(&image, &mut draws);
            assert!(a.crop_top <= 12 && a.crop_left == 0);
            tops.insert(a.crop_top);
        }
        assert!(tops.len() > 5, "offsets vary: {tops:?}");
    }

    #[test]
    fn a_flip_mirrors_each_row_and_happens_about_half_the_time() {
        let image = gradient(8, 8);
        let plain = transform(true, false)
            .apply(&image, &mut Seeds::new(0).stream(Purpose::MicroBatch, 0))
            .0;
        let mut flips = 0;
        for i in 0..200 {
            let (data, a) = transform(true, true)
                .apply(&image, &mut Seeds::new(0).stream(Purpose::MicroBatch, i));
            if a.flipped {
                flips += 1;
                assert_eq!(data[0], plain[7], "first pixel of a flipped row is the last");
            } else {
                assert_eq!(data, plain);
            }
        }
        // Binomial(200, ½): standard deviation 7; 5 sigma bounds.
        assert!((65..=135).contains(&flips), "{flips} flips");
    }
}
