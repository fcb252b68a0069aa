//! Rasterising a [`Scene`] in one of the two styles.
//!
//! Pixels must be bit-identical on every machine, so drawing uses only integer arithmetic and the
//! f64 operations IEEE 754 rounds exactly (`+ - * /`, `sqrt`, `floor`, `round`): no `sin`, `exp`
//! or `powf`, whose results vary with the platform's libm. Rust never fuses multiply-adds on its
//! own, so the same expressions give the same bits everywhere.

use image::{Rgb, RgbImage};

use super::scene::{Scene, Shape, ShapeKind, Style};

/// Samples per pixel side for anti-aliasing (and for soft shadows).
const SUPERSAMPLE: usize = 4;

/// Renders `scene` as a `resolution`×`resolution` image.
pub(crate) fn render(scene: &Scene, style: Style, resolution: u32) -> RgbImage {
    let mut canvas = Canvas::new(resolution);
    match style {
        Style::Flat => {
            canvas.fill(|_, _| rgb(scene.background.rgb));
            for shape in &scene.shapes {
                let body = PixelShape::new(shape, resolution);
                canvas.paint(&body, 0.0, |_, _| rgb(shape.colour.rgb));
            }
        }
        Style::Textured => paint_textured(&mut canvas, scene),
        Style::Dusk => {
            paint_textured(&mut canvas, scene);
            grade_dusk(&mut canvas);
        }
    }
    canvas.into_image()
}

/// The textured domain: the flat scene lit by a lamp above the top edge.
fn paint_textured(canvas: &mut Canvas, scene: &Scene) {
    let res = canvas.size as f64;
    let light = Light::new(scene.light, res);
    let noise = Noise { seed: scene.noise_seed, cell: (res / 6.0).max(1.0) };

    // Background: brighter near the lamp, with a mottled, paper-like texture. The warm spill is
    // added rather than multiplied so that dark backgrounds show the lighting too; both stay
    // mild enough that every colour still reads as its name.
    let background = rgb(scene.background.rgb);
    canvas.fill(|x, y| {
        let near = (1.0 - light.distance(x, y) / (1.3 * res)).max(0.0);
        let falloff = 0.82 + 0.3 * near;
        let [r, g, b] = scale(background, falloff * (1.0 + 0.07 * noise.value(x, y, 0)));
        let spill = 40.0 * near * near;
        [r + spill, g + 0.85 * spill, b + 0.6 * spill]
    });

    // Soft shadows first, cast away from the lamp, so they fall on the background only.
    let blur = (0.04 * res).max(1.0);
    for shape in &scene.shapes {
        let mut shadow = PixelShape::new(shape, canvas.size);
        let (ux, uy) = light.direction_from(shadow.cx, shadow.cy);
        shadow.cx -= ux * 0.035 * res;
        shadow.cy -= uy * 0.035 * res;
        canvas.darken(&shadow, blur, 0.45);
    }

    for shape in &scene.shapes {
        let body = PixelShape::new(shape, canvas.size);
        let base = rgb(shape.colour.rgb);
        canvas.paint(&body, 0.0, |x, y| {
            let lit = match body.kind {
                ShapeKind::Circle => light.sphere(&body, base, x, y),
                // Flat faces: a gentle gradient towards the lamp.
                ShapeKind::Square | ShapeKind::Triangle => {
                    let (ux, uy) = light.direction_from(body.cx, body.cy);
                    let along = ((x - body.cx) * ux + (y - body.cy) * uy) / body.half;
                    scale(base, 1.0 + 0.15 * along.clamp(-1.0, 1.0))
                }
            };
            scale(lit, 1.0 + 0.04 * noise.value(x, y, 1))
        });
    }

    // Film grain: the same offset on every channel, so it reads as luminance noise.
    canvas.fill_with(|x, y, [r, g, b]| {
        let grain = 5.0 * noise.hash_unit(x as u64, y as u64, 2);
        [r + grain, g + grain, b + grain]
    });
}

/// Dusk: the lit scene dimmed, cast towards blue and darkened towards the corners.
/// The grade is per channel: red keeps 55% of the colour, green 65%, blue 85%, and a small blue
/// cast is added, so every colour, black included, moves towards blue. It keeps enough of each
/// colour that the palette stays distinct after the demo's tiny VAE: with an earlier grade
/// (35% of every channel plus a cast of (5, 20, 100)) the palette was squeezed into dim blues
/// that the VAE blurred together (half the held-out dusk images decoded to the wrong
/// background colour).
fn grade_dusk(canvas: &mut Canvas) {
    const KEEP: Colour = [0.55, 0.65, 0.85];
    const CAST: Colour = [0.0, 10.0, 40.0];
    let half = canvas.size as f64 / 2.0;
    canvas.fill_with(|x, y, colour| {
        let (dx, dy) = ((x as f64 + 0.5 - half) / half, (y as f64 + 0.5 - half) / half);
        // 1 at the centre, 0.7 in the corners (where dx² + dy² = 2).
        let vignette = 1.0 - 0.15 * (dx * dx + dy * dy);
        let graded = [
            colour[0] * KEEP[0] + CAST[0],
            colour[1] * KEEP[1] + CAST[1],
            colour[2] * KEEP[2] + CAST[2],
        ];
        scale(graded, vignette)
    });
}

type Colour = [f64; 3];

fn rgb([r, g, b]: [u8; 3]) -> Colour {
    [f64::from(r), f64::from(g), f64::from(b)]
}

fn scale([r, g, b]: Colour, factor: f64) -> Colour {
    [r * factor, g * factor, b * factor]
}

/// A shape in pixel coordinates.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PixelShape {
    pub(crate) kind: ShapeKind,
    pub(crate) cx: f64,
    pub(crate) cy: f64,
    /// Half the side of the shape's bounding box.
    pub(crate) half: f64,
}

impl PixelShape {
    pub(crate) fn new(shape: &Shape, resolution: u32) -> PixelShape {
        let res = f64::from(resolution);
        PixelShape {
            kind: shape.kind,
            cx: shape.cx * res,
            cy: shape.cy * res,
            half: shape.size * res / 2.0,
        }
    }

    /// Whether the point `(x, y)` (pixel units, pixel `(i, j)` spans `[i, i+1)`) is inside.
    pub(crate) fn contains(&self, x: f64, y: f64) -> bool {
        let (dx, dy) = (x - self.cx, y - self.cy);
        match self.kind {
            ShapeKind::Circle => dx * dx + dy * dy <= self.half * self.half,
            ShapeKind::Square => dx.abs() <= self.half && dy.abs() <= self.half,
            // Apex at the top centre, base along the bottom: the half-width grows by one half
            // per unit of height below the apex.
            ShapeKind::Triangle => {
                let below_apex = dy + self.half;
                dy <= self.half && below_apex >= 0.0 && dx.abs() <= below_apex / 2.0
            }
        }
    }
}

/// The lamp of the textured style, above the image plane.
struct Light {
    x: f64,
    y: f64,
    /// Height above the image plane, for the circles' 3D shading.
    z: f64,
}

impl Light {
    fn new((x, y): (f64, f64), res: f64) -> Light {
        Light { x: x * res, y: y * res, z: 0.6 * res }
    }

    fn distance(&self, x: f64, y: f64) -> f64 {
        ((x - self.x) * (x - self.x) + (y - self.y) * (y - self.y)).sqrt()
    }

    /// Unit vector in the image plane from `(x, y)` towards the lamp. The lamp is always above
    /// the top edge, so the distance is never zero.
    fn direction_from(&self, x: f64, y: f64) -> (f64, f64) {
        let d = self.distance(x, y);
        ((self.x - x) / d, (self.y - y) / d)
    }

    /// Lambert shading with a small highlight, treating the circle as a hemisphere.
    fn sphere(&self, body: &PixelShape, base: Colour, x: f64, y: f64) -> Colour {
        let nx = ((x - body.cx) / body.half).clamp(-1.0, 1.0);
        let ny = ((y - body.cy) / body.half).clamp(-1.0, 1.0);
        let nz = (1.0 - nx * nx - ny * ny).max(0.0).sqrt();
        let (lx, ly, lz) = (self.x - body.cx, self.y - body.cy, self.z);
        let len = (lx * lx + ly * ly + lz * lz).sqrt();
        let lambert = ((nx * lx + ny * ly + nz * lz) / len).max(0.0);
        // lambert^16 by squaring, not powi/powf, whose precision is unspecified.
        let mut highlight = lambert;
        for _ in 0..4 {
            highlight *= highlight;
        }
        let highlight = 0.35 * highlight;
        let [r, g, b] = scale(base, 0.65 + 0.5 * lambert);
        let lift = |c: f64| c * (1.0 - highlight) + 255.0 * highlight;
        [lift(r), lift(g), lift(b)]
    }
}

/// Deterministic hashed noise, keyed by the scene's noise seed.
struct Noise {
    seed: u64,
    /// Lattice spacing of the smooth value noise, in pixels.
    cell: f64,
}

impl Noise {
    /// Uniform in `[-1, 1)` for an integer lattice point and a `salt` naming the layer.
    fn hash_unit(&self, x: u64, y: u64, salt: u64) -> f64 {
        let mut h = self.seed
            ^ x.wrapping_mul(0x9E37_79B9_7F4A_7C15)
            ^ y.wrapping_mul(0xC2B2_AE3D_27D4_EB4F)
            ^ salt.wrapping_mul(0x1656_67B1_9E37_79F9);
        // SplitMix64's finaliser: good avalanche for neighbouring lattice points.
        h = (h ^ (h >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        h = (h ^ (h >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        h ^= h >> 31;
        (h >> 11) as f64 / (1u64 << 52) as f64 - 1.0
    }

    /// Smooth value noise in `[-1, 1)` at a point: lattice values blended with smoothstep.
    fn value(&self, x: f64, y: f64, salt: u64) -> f64 {
        let (gx, gy) = (x / self.cell, y / self.cell);
        let (x0, y0) = (gx.floor(), gy.floor());
        let smooth = |t: f64| t * t * (3.0 - 2.0 * t);
        let (tx, ty) = (smooth(gx - x0), smooth(gy - y0));
        let (ix, iy) = (x0 as u64, y0 as u64);
        let at = |dx: u64, dy: u64| self.hash_unit(ix + dx, iy + dy, salt);
        let top = at(0, 0) + (at(1, 0) - at(0, 0)) * tx;
        let bottom = at(0, 1) + (at(1, 1) - at(0, 1)) * tx;
        top + (bottom - top) * ty
    }
}

/// A square f64 RGB buffer, quantised once at the end so blending does not accumulate rounding.
struct Canvas {
    size: u32,
    pixels: Vec<Colour>,
}

impl Canvas {
    fn new(size: u32) -> Canvas {
        Canvas { size, pixels: vec![[0.0; 3]; (size as usize) * (size as usize)] }
    }

    /// Sets every pixel from its centre's coordinates.
    fn fill(&mut self, colour: impl Fn(f64, f64) -> Colour) {
        self.fill_with(|x, y, _| colour(x as f64 + 0.5, y as f64 + 0.5));
    }

    /// Replaces every pixel by a function of its integer position and current colour.
    fn fill_with(&mut self, f: impl Fn(u32, u32, Colour) -> Colour) {
        let size = self.size as usize;
        for (i, pixel) in self.pixels.iter_mut().enumerate() {
            *pixel = f((i % size) as u32, (i / size) as u32, *pixel);
        }
    }

    /// Blends `colour` (evaluated at pixel centres) over the pixels `shape` covers. Coverage is
    /// the fraction of a grid of samples inside the shape, the grid spanning the pixel, or
    /// `spread` pixels around its centre when larger (a box blur, for soft edges).
    fn paint(&mut self, shape: &PixelShape, spread: f64, colour: impl Fn(f64, f64) -> Colour) {
        self.cover(shape, spread, |pixel, coverage, x, y| {
            let c = colour(x, y);
            for k in 0..3 {
                pixel[k] += (c[k] - pixel[k]) * coverage;
            }
        });
    }

    /// Multiplies the pixels under `shape`, blurred by `spread`, by `1 - strength`.
    fn darken(&mut self, shape: &PixelShape, spread: f64, strength: f64) {
        self.cover(shape, spread, |pixel, coverage, _, _| {
            *pixel = scale(*pixel, 1.0 - strength * coverage);
        });
    }

    /// Calls `apply(pixel, coverage, centre_x, centre_y)` for every pixel `shape` touches.
    fn cover(
        &mut self,
        shape: &PixelShape,
        spread: f64,
        mut apply: impl FnMut(&mut Colour, f64, f64, f64),
    ) {
        let width = spread.max(1.0);
        let reach = shape.half + width / 2.0 + 1.0;
        let size = self.size as usize;
        // Only the shape's (blurred) bounding box can be covered; `as usize` saturates at 0.
        let span = |centre: f64| {
            let lo = (centre - reach).floor().max(0.0) as usize;
            let hi = ((centre + reach).ceil().max(0.0) as usize).min(size);
            lo..hi
        };
        let samples = (SUPERSAMPLE * SUPERSAMPLE) as f64;
        for py in span(shape.cy) {
            for px in span(shape.cx) {
                let (x, y) = (px as f64 + 0.5, py as f64 + 0.5);
                let mut inside = 0usize;
                for j in 0..SUPERSAMPLE {
                    for i in 0..SUPERSAMPLE {
                        let offset =
                            |k: usize| ((k as f64 + 0.5) / SUPERSAMPLE as f64 - 0.5) * width;
                        if shape.contains(x + offset(i), y + offset(j)) {
                            inside += 1;
                        }
                    }
                }
                if inside > 0 {
                    apply(&mut self.pixels[py * size + px], inside as f64 / samples, x, y);
                }
            }
        }
    }

    fn into_image(self) -> RgbImage {
        let size = self.size;
        let mut image = RgbImage::new(size, size);
        for (pixel, c) in image.pixels_mut().zip(&self.pixels) {
            *pixel = Rgb(c.map(|v| v.clamp(0.0, 255.0).round() as u8));
        }
        image
    }
}
