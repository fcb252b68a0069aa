//! Judging an image against the caption it was made from, the way GenEval judges real models
//! with a detector: is the background the colour the caption names, is every named shape's
//! colour there, and do the shapes stand in the stated relation?
//!
//! The "detector" is a per-pixel colour classifier that knows the synthetic styles: each pixel
//! goes to the palette colour and style whose rendering *at that pixel* (flat; lit and shaded;
//! dimmed, cast blue and vignetted) is nearest in RGB. References are empty scenes of each
//! palette colour in each style, rendered by [`render`] with a fixed, central light, so the
//! lighting falloff and the vignette are part of the reference rather than read as another
//! colour. Colours are judged whatever the style they are drawn in (a model that draws a flat
//! red background where the caption asks for red at dusk has the colour right and the style
//! wrong: a dim dusk white is close to a flat blue, so references of the caption's style alone
//! would call that blue "white"). Then:
//!
//! - background: the most frequent colour in the border ring (the outer eighth on each side),
//!   where the grammar's layouts never put more than a sliver of a shape;
//! - style: the style whose rendering of each pixel's colour is nearest to the image, in the
//!   least-squares sense over all pixels (a whole-image decision: one pixel of a lit scene can
//!   look flat, the falloff across all of them cannot; a black background alone cannot tell,
//!   its shapes can);
//! - a shape's colour is present when at least [`PRESENT_FRACTION`] of the pixels have it
//!   (a fifth of the smallest shape the grammar draws);
//! - a relation holds when the centroids of the two colours' pixels differ along the stated
//!   axis, in the stated direction, more than along the other axis ([`Relation::between`]).
//!
//! Positions are not checked: a caption states relations, not places.

use image::RgbImage;

use super::render::render;
use super::scene::{Colour, Described, Relation, Scene, Style, PALETTE};

/// The least share of the image a shape's colour must cover to count as drawn: a fifth of the
/// smallest shape of the grammar (a triangle half a grid cell wide covers 1/72 of the image).
pub(crate) const PRESENT_FRACTION: f64 = 1.0 / 360.0;

/// One caption check's outcome.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Judgement {
    /// The background colour found, and whether it is the caption's.
    pub(crate) background: &'static str,
    pub(crate) background_correct: bool,
    /// The style most pixels are drawn in, and whether it is the caption's.
    pub(crate) style: &'static str,
    pub(crate) style_correct: bool,
    /// Per named shape (caption order): its colour, the share of pixels of that colour, and
    /// whether that counts as present.
    pub(crate) shapes: Vec<(&'static str, f64, bool)>,
    /// Per stated relation: whether the image shows it (`false` when a colour is missing).
    pub(crate) relations: Vec<bool>,
}

impl Judgement {
    pub(crate) fn colours_correct(&self) -> bool {
        self.shapes.iter().all(|s| s.2)
    }
    /// `None` for a one-shape caption.
    pub(crate) fn relations_correct(&self) -> Option<bool> {
        (!self.relations.is_empty()).then(|| self.relations.iter().all(|&r| r))
    }
    /// Everything the caption states is shown.
    pub(crate) fn all_correct(&self) -> bool {
        self.background_correct
            && self.style_correct
            && self.colours_correct()
            && self.relations_correct() != Some(false)
    }
}

/// The per-pixel references at one size: `refs[s][c][pixel]` is palette colour `c` as an empty
/// scene of that colour renders it in style `s` of [`STYLES`].
pub(crate) struct References {
    side: u32,
    refs: Vec<Vec<Vec<[u8; 3]>>>,
}

/// The styles a pixel can be drawn in, in the references' order.
const STYLES: [Style; 3] = [Style::Flat, Style::Textured, Style::Dusk];

impl References {
    pub(crate) fn new(side: u32) -> References {
        let refs = STYLES
            .iter()
            .map(|&style| {
                PALETTE
                    .iter()
                    .map(|&background| {
                        let scene = Scene {
                            background,
                            shapes: Vec::new(),
                            light: (0.5, -0.25),
                            noise_seed: 0,
                        };
                        render(&scene, style, side).pixels().map(|p| p.0).collect()
                    })
                    .collect()
            })
            .collect();
        References { side, refs }
    }

    /// The (style, colour) indices whose reference at `pixel` is nearest to `rgb`.
    fn classify(&self, pixel: usize, rgb: [u8; 3]) -> (usize, usize) {
        let mut best = (0, 0, u32::MAX);
        for (s, colours) in self.refs.iter().enumerate() {
            for (c, reference) in colours.iter().enumerate() {
                let d = squared_distance(reference[pixel], rgb);
                if d < best.2 {
                    best = (s, c, d);
                }
            }
        }
        (best.0, best.1)
    }

    /// The index in [`STYLES`] whose rendering of each pixel's colour (`classes`) is nearest
    /// to `image` over all its pixels (sum of squared differences).
    fn style_of(&self, image: &RgbImage, classes: &[usize]) -> usize {
        let error = |s: usize| -> u64 {
            image
                .pixels()
                .enumerate()
                .map(|(i, p)| u64::from(squared_distance(self.refs[s][classes[i]][i], p.0)))
                .sum()
        };
        (0..STYLES.len()).min_by_key(|&s| error(s)).unwrap_or(0)
    }
}

/// The squared RGB distance of two colours.
fn squared_distance(a: [u8; 3], b: [u8; 3]) -> u32 {
    (0..3).map(|i| (i32::from(a[i]) - i32::from(b[i])).pow(2) as u32).sum()
}

fn palette_index(colour: Colour) -> usize {
    PALETTE.iter().position(|c| *c == colour).expect("captions name palette colours")
}

/// Judge a square `image` against `described`; `refs` must be for its size.
pub(crate) fn judge(image: &RgbImage, described: &Described, refs: &References) -> Judgement {
    assert_eq!((image.width(), image.height()), (refs.side, refs.side), "references' size");
    let side = refs.side as usize;
    let classes: Vec<usize> =
        image.pixels().enumerate().map(|(i, p)| refs.classify(i, p.0).1).collect();

    let ring = (side / 8).max(1);
    let mut border = vec![0usize; PALETTE.len()];
    for (i, &class) in classes.iter().enumerate() {
        let (x, y) = (i % side, i / side);
        if x < ring || y < ring || x >= side - ring || y >= side - ring {
            border[class] += 1;
        }
    }
    let found = (0..PALETTE.len()).max_by_key(|&c| (border[c], usize::MAX - c)).unwrap_or(0);
    let style = refs.style_of(image, &classes);

    // Pixel count and centroid of each colour.
    let mut count = vec![0usize; PALETTE.len()];
    let mut sum = vec![(0f64, 0f64); PALETTE.len()];
    for (i, &class) in classes.iter().enumerate() {
        count[class] += 1;
        sum[class].0 += (i % side) as f64 + 0.5;
        sum[class].1 += (i / side) as f64 + 0.5;
    }
    let total = classes.len() as f64;
    let shapes: Vec<(&'static str, f64, bool)> = described
        .shapes
        .iter()
        .map(|&(colour, _)| {
            let share = count[palette_index(colour)] as f64 / total;
            (colour.name, share, share >= PRESENT_FRACTION)
        })
        .collect();
    let centroid = |shape: usize| {
        let c = palette_index(described.shapes[shape].0);
        (sum[c].0 / count[c] as f64 / side as f64, sum[c].1 / count[c] as f64 / side as f64)
    };
    let relations = described
        .relations
        .iter()
        .map(|&(a, relation, b)| {
            if !(shapes[a].2 && shapes[b].2) {
                return false;
            }
            let (pa, pb) = (centroid(a), centroid(b));
            Relation::of_offset(pa.0 - pb.0, pa.1 - pb.1) == relation
        })
        .collect();
    Judgement {
        background: PALETTE[found].name,
        background_correct: found == palette_index(described.background),
        style: STYLES[style].name(),
        style_correct: STYLES[style] == described.style,
        shapes,
        relations,
    }
}

#[cfg(test)]
mod tests {
    use super::super::scene::Scene;
    use super::*;

    #[test]
    fn every_caption_the_grammar_writes_reads_back_as_its_scene() {
        for shapes in 1..=3 {
            for index in 0..200 {
                let scene = Scene::generate(7, index, shapes);
                for style in [Style::Flat, Style::Textured, Style::Dusk] {
                    let caption = scene.caption(style);
                    let d = Described::parse(&caption).unwrap_or_else(|| panic!("{caption}"));
                    assert_eq!(d.style, style, "{caption}");
                    assert_eq!(d.background, scene.background, "{caption}");
                    let want: Vec<_> = scene.shapes.iter().map(|s| (s.colour, s.kind)).collect();
                    assert_eq!(d.shapes, want, "{caption}");
                    for &(a, relation, b) in &d.relations {
                        let between = Relation::between(&scene.shapes[a], &scene.shapes[b]);
                        assert_eq!(relation, between, "{caption}");
                    }
                    assert_eq!(d.relations.len(), shapes - 1, "{caption}");
                }
            }
        }
    }

    #[test]
    fn text_outside_the_grammar_does_not_parse() {
        for text in [
            "a photo of a dog",
            "a red circle on a mauve background",
            "a red blob above a blue square on a yellow background",
            "a red circle above a blue square and a green triangle below the red circle on a \
             yellow background",
            "",
        ] {
            assert_eq!(Described::parse(text), None, "{text}");
        }
    }

    #[test]
    fn a_uniform_image_has_that_background_and_no_shapes() {
        let scene = Scene::generate(3, 0, 2);
        let described = Described::parse(&scene.caption(Style::Flat)).unwrap();
        let refs = References::new(32);
        let image = RgbImage::from_pixel(32, 32, image::Rgb(described.background.rgb));
        let j = judge(&image, &described, &refs);
        assert!(j.background_correct);
        assert!(j.style_correct);
        assert!(!j.colours_correct());
        assert_eq!(j.relations_correct(), Some(false));
    }
}
