//! The scene grammar: what one synthetic image contains, drawn deterministically from
//! `(seed, index)`, and the caption that describes it exactly.
//!
//! Geometry is kept in unit coordinates (fractions of the image side) so a scene does not depend
//! on the resolution, and the style only changes how a scene is rendered, never what it contains:
//! the same seed gives paired flat and textured datasets with the same layouts.

use rand_chacha::rand_core::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// How a scene is rendered; the two domains a demo trains and finetunes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Style {
    /// Solid fills on a solid background.
    Flat,
    /// Lit from above: background falloff, shaded shapes, soft shadows, texture and grain.
    Textured,
    /// The textured scene at dusk: dim, cast blue and vignetted. Unlike texture, which a tiny
    /// model cannot resolve, this shifts whole-image statistics (brightness, hue, falloff to the
    /// corners), a domain shift a few-channel VAE and UNet can learn and metrics can see.
    Dusk,
}

impl Style {
    pub(crate) const NAMES: &'static [&'static str] = &["flat", "textured", "dusk"];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Style::Flat => "flat",
            Style::Textured => "textured",
            Style::Dusk => "dusk",
        }
    }

    /// Appended to every caption of the style, so a finetune learns the domain as a phrase.
    pub(crate) fn caption_suffix(self) -> &'static str {
        match self {
            Style::Flat => "",
            Style::Textured => ", photographic lighting",
            Style::Dusk => ", photographic lighting at dusk",
        }
    }
}

/// A named colour with its exact sRGB value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Colour {
    pub(crate) name: &'static str,
    pub(crate) rgb: [u8; 3],
}

/// Far enough apart that shading and JPEG never make one read as another.
pub(crate) const PALETTE: [Colour; 8] = [
    Colour { name: "red", rgb: [215, 35, 35] },
    Colour { name: "orange", rgb: [245, 135, 20] },
    Colour { name: "yellow", rgb: [245, 215, 30] },
    Colour { name: "green", rgb: [40, 160, 60] },
    Colour { name: "blue", rgb: [35, 75, 215] },
    Colour { name: "purple", rgb: [135, 55, 175] },
    Colour { name: "white", rgb: [245, 245, 245] },
    Colour { name: "black", rgb: [25, 25, 25] },
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ShapeKind {
    Circle,
    Square,
    /// Isosceles, apex up, filling its bounding box.
    Triangle,
}

impl ShapeKind {
    pub(crate) const ALL: [ShapeKind; 3] =
        [ShapeKind::Circle, ShapeKind::Square, ShapeKind::Triangle];

    pub(crate) fn name(self) -> &'static str {
        match self {
            ShapeKind::Circle => "circle",
            ShapeKind::Square => "square",
            ShapeKind::Triangle => "triangle",
        }
    }
}

/// One placed shape. Every kind fills the square box of side `size` centred on `(cx, cy)`
/// (a circle touches its sides), all in unit coordinates with y pointing down.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Shape {
    pub(crate) kind: ShapeKind,
    pub(crate) colour: Colour,
    pub(crate) cx: f64,
    pub(crate) cy: f64,
    pub(crate) size: f64,
}

impl Shape {
    /// "red circle": unique in a scene, because no two shapes share a colour.
    pub(crate) fn noun(&self) -> String {
        format!("{} {}", self.colour.name, self.kind.name())
    }
}

/// Where one shape lies relative to another, as a caption says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Relation {
    Above,
    Below,
    LeftOf,
    RightOf,
}

impl Relation {
    /// The relation of `a` to `b`, read off their centres along the axis they differ most on.
    /// Layouts put related shapes in one row or column of the grid, so that axis is never a
    /// close call and the boxes are disjoint along it.
    pub(crate) fn between(a: &Shape, b: &Shape) -> Relation {
        Relation::of_offset(a.cx - b.cx, a.cy - b.cy)
    }

    /// The relation of a point at offset `(dx, dy)` (y down) from another.
    pub(crate) fn of_offset(dx: f64, dy: f64) -> Relation {
        if dy.abs() >= dx.abs() {
            if dy < 0.0 {
                Relation::Above
            } else {
                Relation::Below
            }
        } else if dx < 0.0 {
            Relation::LeftOf
        } else {
            Relation::RightOf
        }
    }

    pub(crate) fn phrase(self) -> &'static str {
        match self {
            Relation::Above => "above",
            Relation::Below => "below",
            Relation::LeftOf => "to the left of",
            Relation::RightOf => "to the right of",
        }
    }
}

/// Everything one image shows. `shapes[0]` is the caption's subject, `shapes[1]` the anchor the
/// others are related to, `shapes[2]` a second shape related to the anchor.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Scene {
    pub(crate) background: Colour,
    pub(crate) shapes: Vec<Shape>,
    /// The textured style's light, in unit coordinates: always above the top edge, horizontally
    /// anywhere near the image, so shading and shadows read as lit from above.
    pub(crate) light: (f64, f64),
    /// Seeds the textured style's noise, which is hashed per pixel rather than drawn from the
    /// stream so its cost and values do not depend on the resolution.
    pub(crate) noise_seed: u64,
}

/// Shapes sit in distinct cells of a `GRID`×`GRID` grid, which keeps them apart.
const GRID: u64 = 3;
/// A shape's side, as a fraction of its cell's.
const SIZE_RANGE: (f64, f64) = (0.5, 0.8);
/// How far a centre may move off its cell's centre, as a fraction of the cell's free margin:
/// below 1 so shapes never touch their cell's border, and neighbours never touch.
const JITTER: f64 = 0.6;

impl Scene {
    /// The scene of image `index` of a dataset. Depends only on its arguments, not on `count`
    /// or the style, so datasets with more images extend smaller ones. Changing the order or
    /// meaning of draws here changes every output: bump the kind's version.
    pub(crate) fn generate(seed: i64, index: u64, shape_count: usize) -> Scene {
        assert!((1..=3).contains(&shape_count), "1 to 3 shapes per scene");
        let mut draw = Draw::new(seed, index);

        // The anchor takes any cell; the others take cells in its row or column, so each
        // stated relation is a clean vertical or horizontal one, never a diagonal.
        let anchor = (draw.below(GRID), draw.below(GRID));
        let mut partners: Vec<(u64, u64)> = (0..GRID)
            .flat_map(|r| (0..GRID).map(move |c| (r, c)))
            .filter(|&(r, c)| (r == anchor.0) != (c == anchor.1))
            .collect();
        let mut cells = vec![anchor];
        for _ in 1..shape_count {
            let cell = partners.remove(draw.below(partners.len() as u64) as usize);
            cells.push(cell);
        }
        // Subject first, then the anchor, then the second partner.
        if shape_count >= 2 {
            cells.swap(0, 1);
        }

        // Distinct colours for the background and every shape, so a colour names a shape.
        let mut colours = PALETTE.to_vec();
        for i in 0..=shape_count {
            let j = i + draw.below((colours.len() - i) as u64) as usize;
            colours.swap(i, j);
        }
        let background = colours[0];

        let cell = 1.0 / GRID as f64;
        let shapes = cells
            .iter()
            .zip(&colours[1..=shape_count])
            .map(|(&(row, col), &colour)| {
                let kind = ShapeKind::ALL[draw.below(ShapeKind::ALL.len() as u64) as usize];
                let size = cell * draw.range(SIZE_RANGE.0, SIZE_RANGE.1);
                let slack = (cell - size) / 2.0 * JITTER;
                let cx = (col as f64 + 0.5) * cell + draw.range(-slack, slack);
                let cy = (row as f64 + 0.5) * cell + draw.range(-slack, slack);
                Shape { kind, colour, cx, cy, size }
            })
            .collect();

        // Drawn for every style, so the flat and textured scenes of one seed stay identical.
        let light = (draw.range(-0.25, 1.25), draw.range(-0.5, -0.05));
        let noise_seed = draw.next_u64();
        Scene { background, shapes, light, noise_seed }
    }

    /// The exact caption, e.g. "a red circle above a blue square on a yellow background":
    /// the subject related to the anchor, then a third shape related to the anchor.
    pub(crate) fn caption(&self, style: Style) -> String {
        let s = &self.shapes;
        let mut text = match s.len() {
            1 => indefinite(&s[0].noun()),
            _ => {
                let mut text = format!(
                    "{} {} {}",
                    indefinite(&s[0].noun()),
                    Relation::between(&s[0], &s[1]).phrase(),
                    indefinite(&s[1].noun())
                );
                if let Some(third) = s.get(2) {
                    text += &format!(
                        " and {} {} the {}",
                        indefinite(&third.noun()),
                        Relation::between(third, &s[1]).phrase(),
                        s[1].noun()
                    );
                }
                text
            }
        };
        text += &format!(" on {} background", indefinite(self.background.name));
        text += style.caption_suffix();
        text
    }
}

/// What a caption of the grammar states: enough to judge an image against it without knowing
/// where the shapes were (a model is told relations, not positions).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Described {
    pub(crate) background: Colour,
    /// Colour and kind of each shape, subject first, then the anchor, then the third.
    pub(crate) shapes: Vec<(Colour, ShapeKind)>,
    /// `(a, relation, b)`: shape `a` lies `relation` shape `b` (indices into `shapes`).
    pub(crate) relations: Vec<(usize, Relation, usize)>,
    pub(crate) style: Style,
}

impl Described {
    /// Reads a caption [`Scene::caption`] writes; `None` for any other text.
    pub(crate) fn parse(caption: &str) -> Option<Described> {
        // The longest suffix first: the dusk one contains the textured one.
        let (body, style) = [Style::Dusk, Style::Textured, Style::Flat]
            .into_iter()
            .find_map(|style| caption.strip_suffix(style.caption_suffix()).map(|b| (b, style)))?;
        let (things, background) = body.rsplit_once(" on ")?;
        let background = colour_named(article_and(background)?.strip_suffix(" background")?)?;
        let (first, third) = match things.split_once(" and ") {
            Some((first, third)) => (first, Some(third)),
            None => (things, None),
        };
        let mut shapes = Vec::new();
        let mut relations = Vec::new();
        match relation_split(first) {
            None => shapes.push(noun(article_and(first)?)?),
            Some((subject, relation, anchor)) => {
                shapes.push(noun(article_and(subject)?)?);
                shapes.push(noun(article_and(anchor)?)?);
                relations.push((0, relation, 1));
            }
        }
        if let Some(third) = third {
            let (shape, relation, anchor) = relation_split(third)?;
            // "... and a green triangle below the blue square": the anchor, named again.
            if shapes.len() != 2 || noun(anchor.strip_prefix("the ")?)? != shapes[1] {
                return None;
            }
            shapes.push(noun(article_and(shape)?)?);
            relations.push((2, relation, 1));
        }
        Some(Described { background, shapes, relations, style })
    }
}

/// `text` without its leading "a " or "an ".
fn article_and(text: &str) -> Option<&str> {
    text.strip_prefix("a ").or_else(|| text.strip_prefix("an "))
}

fn colour_named(name: &str) -> Option<Colour> {
    PALETTE.iter().copied().find(|c| c.name == name)
}

/// "red circle" → (red, circle).
fn noun(text: &str) -> Option<(Colour, ShapeKind)> {
    let (colour, kind) = text.split_once(' ')?;
    let kind = ShapeKind::ALL.into_iter().find(|k| k.name() == kind)?;
    Some((colour_named(colour)?, kind))
}

/// "a red circle above a blue square" → ("a red circle", Above, "a blue square").
fn relation_split(text: &str) -> Option<(&str, Relation, &str)> {
    [Relation::Above, Relation::Below, Relation::LeftOf, Relation::RightOf].into_iter().find_map(
        |relation| {
            let (a, b) = text.split_once(&format!(" {} ", relation.phrase()))?;
            Some((a, relation, b))
        },
    )
}

/// "a red circle", "an orange square".
fn indefinite(noun: &str) -> String {
    let article = if noun.starts_with(['a', 'e', 'i', 'o', 'u']) { "an" } else { "a" };
    format!("{article} {noun}")
}

/// The random stream of one image. Only ChaCha's raw output is used, with our own integer
/// range reduction, so values never change with a `rand` upgrade or the platform.
struct Draw(ChaCha8Rng);

impl Draw {
    fn new(seed: i64, index: u64) -> Draw {
        let mut key = [0u8; 32];
        key[..8].copy_from_slice(&seed.to_le_bytes());
        key[8..16].copy_from_slice(&index.to_le_bytes());
        // Domain separation: other kinds seeding ChaCha from the same seed get other streams.
        key[16..].copy_from_slice(b"sdpipe-synthetic");
        Draw(ChaCha8Rng::from_seed(key))
    }

    fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }

    /// Uniform in `0..n`, without modulo bias (rejection sampling).
    fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0);
        let zone = u64::MAX - u64::MAX % n;
        loop {
            let v = self.next_u64();
            if v < zone {
                return v % n;
            }
        }
    }

    /// Uniform in `[lo, hi)`: 53 random bits make an exact f64 in `[0, 1)`.
    fn range(&mut self, lo: f64, hi: f64) -> f64 {
        let unit = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        lo + (hi - lo) * unit
    }
}
