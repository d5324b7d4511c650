//! Synthetic blood smears with per-cell ground truth (class, centre, box, mask).
//!
//! A field is rendered in optical density: each cell adds stain absorbance (haemoglobin, WBC
//! cytoplasm, nuclei, parasite ring and chromatin) and the camera sees
//! `I = I0 * vignette * exp(-OD)` (Beer-Lambert), then focus blur, sensor noise and JPEG.
//! Acquisition-source presets fix the stain palette, magnification, optics and density, so
//! that several presets act as separate sources for leave-one-source-out tests. Everything is
//! deterministic by seed.

mod crops;
mod shapes;

use image::RgbImage;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use serde::{Deserialize, Serialize};

use crate::preprocess::OwnerMap;
use crate::taxonomy::DEFAULT_CLASSES;
use crate::Error;
use shapes::{coverage, CellShape, Shape};

pub use crops::{export_crops, export_crops_by, CropExport, CropSummary, Cuts};

/// Number of classes the generator draws (the default taxonomy).
pub const NUM_CLASSES: usize = DEFAULT_CLASSES.len();

/// Stain family; each has its own absorbance palette.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stain {
    Wright,
    Giemsa,
    MayGrunwaldGiemsa,
}

/// Optical densities per unit of each component, for R, G, B.
#[derive(Debug, Clone, Copy)]
struct Palette {
    hb: [f32; 3],
    cyto: [f32; 3],
    nucleus: [f32; 3],
    ring: [f32; 3],
    chromatin: [f32; 3],
    plasma: [f32; 3],
    light: [f32; 3],
}

impl Stain {
    fn palette(self) -> Palette {
        match self {
            Stain::Wright => Palette {
                hb: [0.12, 0.50, 0.40],
                cyto: [0.16, 0.20, 0.08],
                nucleus: [0.80, 0.95, 0.30],
                ring: [0.55, 0.62, 0.18],
                chromatin: [0.95, 1.35, 0.50],
                plasma: [0.02, 0.03, 0.02],
                light: [242.0, 240.0, 236.0],
            },
            Stain::Giemsa => Palette {
                hb: [0.20, 0.42, 0.30],
                cyto: [0.22, 0.16, 0.05],
                nucleus: [0.90, 0.82, 0.22],
                ring: [0.70, 0.55, 0.12],
                chromatin: [1.05, 1.30, 0.45],
                plasma: [0.05, 0.03, 0.01],
                light: [228.0, 236.0, 245.0],
            },
            Stain::MayGrunwaldGiemsa => Palette {
                hb: [0.15, 0.60, 0.44],
                cyto: [0.18, 0.24, 0.10],
                nucleus: [0.92, 1.08, 0.36],
                ring: [0.60, 0.70, 0.22],
                chromatin: [1.00, 1.45, 0.55],
                plasma: [0.03, 0.04, 0.03],
                light: [246.0, 238.0, 240.0],
            },
        }
    }
}

/// An acquisition source: stain, magnification, optics, camera and smear density.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourcePreset {
    pub name: String,
    pub stain: Stain,
    /// RBC radius range in pixels (magnification).
    pub rbc_radius: (f32, f32),
    /// Gaussian focus blur sigma range in pixels.
    pub blur_sigma: (f32, f32),
    /// Sensor noise standard deviation (8-bit units).
    pub noise: f32,
    /// Light fall-off at the corners (0 = none).
    pub vignetting: f32,
    /// JPEG quality of the camera, if it compresses.
    pub jpeg_quality: Option<u8>,
    /// Fraction of the field covered by cells.
    pub density: f32,
    /// Fraction of cells placed touching or slightly overlapping a neighbour.
    pub touching: f32,
}

impl SourcePreset {
    /// The built-in presets; each acts as a separate source.
    pub fn all() -> Vec<SourcePreset> {
        vec![
            SourcePreset {
                name: "wright_100x".into(),
                stain: Stain::Wright,
                rbc_radius: (22.0, 27.0),
                blur_sigma: (0.4, 0.9),
                noise: 3.0,
                vignetting: 0.12,
                jpeg_quality: Some(92),
                density: 0.28,
                touching: 0.15,
            },
            SourcePreset {
                name: "giemsa_60x".into(),
                stain: Stain::Giemsa,
                rbc_radius: (15.0, 18.0),
                blur_sigma: (0.7, 1.3),
                noise: 4.0,
                vignetting: 0.2,
                jpeg_quality: Some(85),
                density: 0.32,
                touching: 0.2,
            },
            SourcePreset {
                name: "mgg_100x".into(),
                stain: Stain::MayGrunwaldGiemsa,
                rbc_radius: (25.0, 30.0),
                blur_sigma: (0.3, 0.7),
                noise: 2.0,
                vignetting: 0.08,
                jpeg_quality: None,
                density: 0.25,
                touching: 0.12,
            },
            SourcePreset {
                name: "field_40x".into(),
                stain: Stain::Wright,
                rbc_radius: (10.0, 12.5),
                blur_sigma: (0.9, 1.5),
                noise: 6.0,
                vignetting: 0.3,
                jpeg_quality: Some(75),
                density: 0.3,
                touching: 0.2,
            },
        ]
    }

    /// A built-in preset by name.
    pub fn by_name(name: &str) -> Result<SourcePreset, Error> {
        Self::all()
            .into_iter()
            .find(|p| p.name == name)
            .ok_or_else(|| {
                let names: Vec<String> = Self::all().into_iter().map(|p| p.name).collect();
                Error::Config(format!(
                    "unknown source preset `{name}`; available: {}",
                    names.join(", ")
                ))
            })
    }
}

/// Sets the fraction of cells placed touching a neighbour on every preset (crowded smears for
/// training crops); refused outside 0..=1.
pub fn set_touching(sources: &mut [SourcePreset], touching: f32) -> Result<(), Error> {
    if !(0.0..=1.0).contains(&touching) {
        return Err(Error::Config(format!(
            "touching fraction {touching} is not in 0..=1"
        )));
    }
    for s in sources {
        s.touching = touching;
    }
    Ok(())
}

/// Relative class frequencies; the default keeps every class present.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassMix(pub [f32; NUM_CLASSES]);

impl Default for ClassMix {
    /// Mostly discocytes, every other class still common enough to appear in each field.
    fn default() -> Self {
        ClassMix([
            0.34, 0.06, 0.06, 0.06, 0.05, 0.06, 0.05, 0.05, 0.05, 0.05, 0.07, 0.03, 0.07,
        ])
    }
}

impl ClassMix {
    /// Every class equally likely.
    pub fn uniform() -> Self {
        ClassMix([1.0; NUM_CLASSES])
    }

    fn validate(&self) -> Result<(), Error> {
        if self.0.iter().any(|w| !w.is_finite() || *w < 0.0) || self.0.iter().sum::<f32>() <= 0.0 {
            return Err(Error::Config(
                "class mix weights must be finite, non-negative and not all zero".into(),
            ));
        }
        Ok(())
    }
}

/// What to render.
#[derive(Debug, Clone)]
pub struct FieldSpec {
    pub width: u32,
    pub height: u32,
    pub seed: u64,
    pub source: SourcePreset,
    pub mix: ClassMix,
    /// Blur, noise, vignetting and JPEG; off gives the clean optical-density render.
    pub artifacts: bool,
}

impl FieldSpec {
    /// A field of the given size with the default mix and artefacts on.
    pub fn new(width: u32, height: u32, seed: u64, source: SourcePreset) -> Self {
        FieldSpec {
            width,
            height,
            seed,
            source,
            mix: ClassMix::default(),
            artifacts: true,
        }
    }
}

/// A cell's footprint: a bitmap over its bounding box.
#[derive(Debug, Clone, PartialEq)]
pub struct CellMask {
    pub x0: u32,
    pub y0: u32,
    pub width: u32,
    pub height: u32,
    /// Row-major, `width * height`.
    pub bits: Vec<bool>,
}

impl CellMask {
    /// Whether field pixel (x, y) belongs to the cell.
    pub fn contains(&self, x: u32, y: u32) -> bool {
        x >= self.x0
            && y >= self.y0
            && x < self.x0 + self.width
            && y < self.y0 + self.height
            && self.bits[((y - self.y0) * self.width + (x - self.x0)) as usize]
    }

    /// Number of pixels in the footprint.
    pub fn area(&self) -> usize {
        self.bits.iter().filter(|b| **b).count()
    }
}

/// Ground truth of one cell.
#[derive(Debug, Clone, PartialEq)]
pub struct CellTruth {
    /// Class id in the default taxonomy.
    pub class: usize,
    /// Centroid of the footprint (pixels).
    pub center: (f32, f32),
    /// Tight box of the footprint `[x0, y0, x1, y1]`, x1/y1 exclusive.
    pub bbox: [u32; 4],
    /// Equivalent-circle radius of the footprint (pixels).
    pub radius: f32,
    /// The footprint: every pixel the cell stains (also where a neighbour overlaps it).
    pub mask: CellMask,
}

/// A rendered field and its ground truth.
#[derive(Debug, Clone)]
pub struct Field {
    pub image: RgbImage,
    pub cells: Vec<CellTruth>,
    /// The source preset it was rendered with.
    pub source: String,
    /// Background intensity per channel before noise (for tests and cell finders' checks).
    pub background: [f32; 3],
}

impl Field {
    /// Which true cell owns each pixel (indices into `cells`): its footprint; where footprints
    /// overlap, the cell whose centre is nearer.
    pub fn owner_map(&self) -> OwnerMap {
        let mut owners = OwnerMap::new(self.image.width(), self.image.height());
        let w = self.image.width() as usize;
        for (j, cell) in self.cells.iter().enumerate() {
            let m = &cell.mask;
            for y in m.y0..m.y0 + m.height {
                for x in m.x0..m.x0 + m.width {
                    if !m.bits[((y - m.y0) * m.width + (x - m.x0)) as usize] {
                        continue;
                    }
                    let id = &mut owners.ids[y as usize * w + x as usize];
                    let d2 = |c: &CellTruth| {
                        (c.center.0 - x as f32 - 0.5).powi(2)
                            + (c.center.1 - y as f32 - 0.5).powi(2)
                    };
                    if *id == OwnerMap::BACKGROUND || d2(cell) < d2(&self.cells[*id as usize]) {
                        *id = j as u32;
                    }
                }
            }
        }
        owners
    }
}

/// Renders a field.
pub fn render(spec: &FieldSpec) -> Result<Field, Error> {
    spec.mix.validate()?;
    let (w, h) = (spec.width as usize, spec.height as usize);
    let src = &spec.source;
    let min_side = 4.0 * src.rbc_radius.1;
    if (w as f32) < min_side || (h as f32) < min_side {
        return Err(Error::Config(format!(
            "field {w}x{h} is too small for source `{}` (needs at least {min_side:.0} px a side)",
            src.name
        )));
    }
    let mut rng = ChaCha8Rng::seed_from_u64(spec.seed);

    // Per-field stain jitter: intensity and a little hue.
    let mut pal = src.stain.palette();
    let strength = rng.gen_range(0.85..1.15);
    for comp in [
        &mut pal.hb,
        &mut pal.nucleus,
        &mut pal.cyto,
        &mut pal.ring,
        &mut pal.chromatin,
    ] {
        for v in comp.iter_mut() {
            *v *= strength * rng.gen_range(0.93..1.07);
        }
    }

    let cells = place_cells(spec, &mut rng);

    // Optical density, channel-planar.
    let mut od = vec![0f32; 3 * w * h];
    let plane = w * h;
    for c in 0..3 {
        od[c * plane..(c + 1) * plane].fill(pal.plasma[c]);
    }
    let mut truths = Vec::with_capacity(cells.len());
    for cell in &cells {
        let e = cell.shape.extent();
        let x0 = ((cell.cx - e).floor().max(0.0)) as usize;
        let y0 = ((cell.cy - e).floor().max(0.0)) as usize;
        let x1 = ((cell.cx + e).ceil() as usize + 1).min(w);
        let y1 = ((cell.cy + e).ceil() as usize + 1).min(h);
        let (bw, bh) = (x1 - x0, y1 - y0);
        let mut bits = vec![false; bw * bh];
        let (mut sx, mut sy, mut n) = (0f64, 0f64, 0usize);
        let (mut mx0, mut my0, mut mx1, mut my1) = (usize::MAX, usize::MAX, 0, 0);
        for y in y0..y1 {
            for x in x0..x1 {
                let s = cell.eval(x as f32 + 0.5, y as f32 + 0.5);
                let cov = coverage(s.sdf);
                if cov <= 0.0 && s.nucleus <= 0.0 {
                    continue;
                }
                let i = y * w + x;
                for c in 0..3 {
                    od[c * plane + i] += cov * (s.hb * pal.hb[c] + s.cyto * pal.cyto[c])
                        + s.nucleus * pal.nucleus[c]
                        + s.ring * pal.ring[c]
                        + s.chromatin * pal.chromatin[c];
                }
                // The footprint is every pixel the cell stains, anti-aliased edge included.
                if cov > 0.0 || s.nucleus > 0.0 {
                    bits[(y - y0) * bw + (x - x0)] = true;
                    sx += x as f64 + 0.5;
                    sy += y as f64 + 0.5;
                    n += 1;
                    mx0 = mx0.min(x);
                    my0 = my0.min(y);
                    mx1 = mx1.max(x + 1);
                    my1 = my1.max(y + 1);
                }
            }
        }
        if n == 0 {
            continue;
        }
        // Crop the bitmap to the tight box.
        let (tw, th) = (mx1 - mx0, my1 - my0);
        let mut tight = vec![false; tw * th];
        for y in 0..th {
            let src_row = (y + my0 - y0) * bw + (mx0 - x0);
            tight[y * tw..(y + 1) * tw].copy_from_slice(&bits[src_row..src_row + tw]);
        }
        truths.push(CellTruth {
            class: cell.class,
            center: ((sx / n as f64) as f32, (sy / n as f64) as f32),
            bbox: [mx0 as u32, my0 as u32, mx1 as u32, my1 as u32],
            radius: (n as f32 / std::f32::consts::PI).sqrt(),
            mask: CellMask {
                x0: mx0 as u32,
                y0: my0 as u32,
                width: tw as u32,
                height: th as u32,
                bits: tight,
            },
        });
    }

    // Camera: light, vignetting, Beer-Lambert, blur, noise, quantisation, JPEG.
    let mut planes = vec![0f32; 3 * plane];
    let vig = if spec.artifacts { src.vignetting } else { 0.0 };
    let (hw, hh) = (w as f32 / 2.0, h as f32 / 2.0);
    let inv_r2 = 1.0 / (hw * hw + hh * hh);
    for y in 0..h {
        let dy = y as f32 + 0.5 - hh;
        for x in 0..w {
            let dx = x as f32 + 0.5 - hw;
            let fall = 1.0 - vig * (dx * dx + dy * dy) * inv_r2;
            let i = y * w + x;
            for c in 0..3 {
                planes[c * plane + i] = pal.light[c] * fall * (-od[c * plane + i]).exp();
            }
        }
    }
    if spec.artifacts {
        let sigma = rng.gen_range(src.blur_sigma.0..src.blur_sigma.1);
        for c in 0..3 {
            gaussian_blur(&mut planes[c * plane..(c + 1) * plane], w, h, sigma);
        }
    }
    let noise = if spec.artifacts && src.noise > 0.0 {
        Some(Normal::new(0.0f32, src.noise).map_err(|e| Error::Config(format!("noise: {e}")))?)
    } else {
        None
    };
    let mut image = RgbImage::new(spec.width, spec.height);
    let raw: &mut [u8] = &mut image;
    for i in 0..plane {
        for c in 0..3 {
            let mut v = planes[c * plane + i];
            if let Some(n) = &noise {
                v += n.sample(&mut rng);
            }
            raw[i * 3 + c] = v.round().clamp(0.0, 255.0) as u8;
        }
    }
    if spec.artifacts {
        if let Some(q) = src.jpeg_quality {
            image = jpeg_round_trip(&image, q)?;
        }
    }
    let background = std::array::from_fn(|c| pal.light[c] * (-pal.plasma[c]).exp());
    Ok(Field {
        image,
        cells: truths,
        source: src.name.clone(),
        background,
    })
}

/// Places cells without overlap, except for the chosen fraction that touch or overlap a little.
fn place_cells(spec: &FieldSpec, rng: &mut ChaCha8Rng) -> Vec<CellShape> {
    let src = &spec.source;
    let (w, h) = (spec.width as f32, spec.height as f32);
    let r_mean = 0.5 * (src.rbc_radius.0 + src.rbc_radius.1);
    let target = (src.density * w * h / (std::f32::consts::PI * r_mean * r_mean)).round() as usize;
    let total: f32 = spec.mix.0.iter().sum();
    let cell = 2.0 * r_mean * 2.2;
    let gw = (w / cell).ceil() as usize + 1;
    let gh = (h / cell).ceil() as usize + 1;
    let mut grid: Vec<Vec<usize>> = vec![Vec::new(); gw * gh];
    let mut placed: Vec<CellShape> = Vec::with_capacity(target);
    let mut radii: Vec<f32> = Vec::with_capacity(target);
    let mut failures = 0;
    while placed.len() < target && failures < 40 * target.max(1) {
        let mut pick = rng.gen_range(0.0..total);
        let mut class = NUM_CLASSES - 1;
        for (i, wgt) in spec.mix.0.iter().enumerate() {
            if pick < *wgt {
                class = i;
                break;
            }
            pick -= wgt;
        }
        let r = rng.gen_range(src.rbc_radius.0..src.rbc_radius.1);
        let shape = Shape::sample(class, r, rng);
        let e = shape.extent();
        if 2.0 * e + 2.0 >= w.min(h) {
            failures += 1;
            continue;
        }
        let cx = rng.gen_range(e + 1.0..w - e - 1.0);
        let cy = rng.gen_range(e + 1.0..h - e - 1.0);
        let br = shape.body_radius();
        let touching = rng.gen_bool(src.touching.clamp(0.0, 1.0) as f64);
        let factor = if touching {
            rng.gen_range(0.85..0.98)
        } else {
            rng.gen_range(1.08..1.6)
        };
        let gx = (cx / cell) as usize;
        let gy = (cy / cell) as usize;
        let mut ok = true;
        'scan: for ny in gy.saturating_sub(1)..(gy + 2).min(gh) {
            for nx in gx.saturating_sub(1)..(gx + 2).min(gw) {
                for &j in &grid[ny * gw + nx] {
                    let o = &placed[j];
                    let d = ((o.cx - cx).powi(2) + (o.cy - cy).powi(2)).sqrt();
                    // Touching cells may meet but never bury each other.
                    let min_d = (br + radii[j]) * factor;
                    if d < min_d.max(0.75 * (br + radii[j])) {
                        ok = false;
                        break 'scan;
                    }
                }
            }
        }
        if !ok {
            failures += 1;
            continue;
        }
        grid[gy * gw + gx].push(placed.len());
        radii.push(br);
        let angle = rng.gen_range(0.0..std::f32::consts::TAU);
        placed.push(CellShape::new(class, cx, cy, angle, shape));
    }
    placed
}

/// In-place separable Gaussian blur of one plane.
fn gaussian_blur(p: &mut [f32], w: usize, h: usize, sigma: f32) {
    if sigma <= 0.05 {
        return;
    }
    let rad = (3.0 * sigma).ceil() as usize;
    let mut k: Vec<f32> = (0..=2 * rad)
        .map(|i| {
            let d = i as f32 - rad as f32;
            (-(d * d) / (2.0 * sigma * sigma)).exp()
        })
        .collect();
    let s: f32 = k.iter().sum();
    k.iter_mut().for_each(|v| *v /= s);
    let mut tmp = vec![0f32; w * h];
    for y in 0..h {
        let row = &p[y * w..(y + 1) * w];
        let out = &mut tmp[y * w..(y + 1) * w];
        for (x, o) in out.iter_mut().enumerate() {
            let mut acc = 0.0;
            for (j, kv) in k.iter().enumerate() {
                let xi = (x + j).saturating_sub(rad).min(w - 1);
                acc += kv * row[xi];
            }
            *o = acc;
        }
    }
    for y in 0..h {
        let out = &mut p[y * w..(y + 1) * w];
        out.fill(0.0);
        for (j, kv) in k.iter().enumerate() {
            let yi = (y + j).saturating_sub(rad).min(h - 1);
            let src = &tmp[yi * w..(yi + 1) * w];
            for (o, s) in out.iter_mut().zip(src) {
                *o += kv * s;
            }
        }
    }
}

fn jpeg_round_trip(img: &RgbImage, quality: u8) -> Result<RgbImage, Error> {
    let mut buf = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut buf, quality)
        .encode_image(img)
        .map_err(|e| Error::Image(format!("JPEG encode: {e}")))?;
    Ok(
        image::load_from_memory_with_format(&buf, image::ImageFormat::Jpeg)
            .map_err(|e| Error::Image(format!("JPEG decode: {e}")))?
            .to_rgb8(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(seed: u64, source: &str, artifacts: bool) -> Field {
        let mut spec = FieldSpec::new(640, 480, seed, SourcePreset::by_name(source).unwrap());
        spec.artifacts = artifacts;
        render(&spec).unwrap()
    }

    #[test]
    fn deterministic_by_seed_and_varies_with_it() {
        let a = field(1, "giemsa_60x", true);
        let b = field(1, "giemsa_60x", true);
        let c = field(2, "giemsa_60x", true);
        assert_eq!(a.image, b.image);
        assert_eq!(a.cells, b.cells);
        assert_ne!(a.image, c.image);
    }

    #[test]
    fn masks_are_where_boxes_say_and_pixels_agree() {
        for (i, src) in SourcePreset::all().iter().enumerate() {
            let clean = field(10 + i as u64, &src.name, false);
            assert!(
                clean.cells.len() > 20,
                "{}: only {} cells",
                src.name,
                clean.cells.len()
            );
            let covered = |x: u32, y: u32| clean.cells.iter().any(|c| c.mask.contains(x, y));
            for c in &clean.cells {
                let m = &c.mask;
                // The box is the mask's own tight box.
                assert_eq!([m.x0, m.y0, m.x0 + m.width, m.y0 + m.height], c.bbox);
                let rows: Vec<bool> = (0..m.height)
                    .map(|y| (0..m.width).any(|x| m.bits[(y * m.width + x) as usize]))
                    .collect();
                let cols: Vec<bool> = (0..m.width)
                    .map(|x| (0..m.height).any(|y| m.bits[(y * m.width + x) as usize]))
                    .collect();
                assert!(rows[0] && rows[rows.len() - 1] && cols[0] && cols[cols.len() - 1]);
                assert!(c.center.0 >= c.bbox[0] as f32 && c.center.0 <= c.bbox[2] as f32);
                assert!(c.center.1 >= c.bbox[1] as f32 && c.center.1 <= c.bbox[3] as f32);
                // The pixels under the mask are stained: darker than the background in green.
                let mut sum = 0.0;
                let mut n = 0.0;
                for y in m.y0..m.y0 + m.height {
                    for x in m.x0..m.x0 + m.width {
                        if m.contains(x, y) {
                            sum += clean.image.get_pixel(x, y).0[1] as f32;
                            n += 1.0;
                        }
                    }
                }
                let mean = sum / n;
                assert!(
                    mean < clean.background[1] - 15.0,
                    "{} class {}: mean green {mean} vs background {}",
                    src.name,
                    c.class,
                    clean.background[1]
                );
            }
            // Pixels that no mask covers (one pixel away from any) are background.
            for y in (1..clean.image.height() - 1).step_by(3) {
                for x in (1..clean.image.width() - 1).step_by(3) {
                    let near = (-1i32..=1).any(|dy| {
                        (-1i32..=1)
                            .any(|dx| covered((x as i32 + dx) as u32, (y as i32 + dy) as u32))
                    });
                    if !near {
                        let g = clean.image.get_pixel(x, y).0[1] as f32;
                        let nearest = clean
                            .cells
                            .iter()
                            .min_by_key(|c| {
                                ((c.center.0 - x as f32).powi(2) + (c.center.1 - y as f32).powi(2))
                                    as i64
                            })
                            .map(|c| (c.class, c.bbox));
                        assert!(
                            (g - clean.background[1]).abs() <= 1.0,
                            "{} ({x},{y}): {g}; nearest cell {nearest:?}",
                            src.name
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn artefacts_keep_cells_visible() {
        let f = field(3, "field_40x", true);
        for c in &f.cells {
            let mut sum = 0.0;
            let mut n = 0.0;
            for y in c.bbox[1]..c.bbox[3] {
                for x in c.bbox[0]..c.bbox[2] {
                    if c.mask.contains(x, y) {
                        sum += f.image.get_pixel(x, y).0[1] as f32;
                        n += 1.0;
                    }
                }
            }
            assert!(sum / n < f.background[1] - 10.0);
        }
    }

    #[test]
    fn every_class_appears_and_some_cells_touch() {
        let spec = FieldSpec::new(1920, 1080, 5, SourcePreset::by_name("wright_100x").unwrap());
        let f = render(&spec).unwrap();
        let mut counts = [0; NUM_CLASSES];
        for c in &f.cells {
            counts[c.class] += 1;
        }
        assert!(counts.iter().all(|&n| n > 0), "{counts:?}");
        let touching = touching_cells(&f);
        assert!(touching >= 3, "only {touching} cells against a neighbour");
    }

    /// Cells whose mask meets (touches or overlaps) the mask of a cell listed after them.
    fn touching_cells(f: &Field) -> usize {
        f.cells
            .iter()
            .enumerate()
            .filter(|(i, a)| {
                f.cells.iter().skip(i + 1).any(|b| {
                    let [ax0, ay0, ax1, ay1] = a.bbox;
                    let [bx0, by0, bx1, by1] = b.bbox;
                    let (x0, x1) = (ax0.max(bx0), ax1.min(bx1) + 1);
                    let (y0, y1) = (ay0.max(by0), ay1.min(by1) + 1);
                    (y0..y1).any(|y| {
                        (x0..x1).any(|x| {
                            a.mask.contains(x, y)
                                && (b.mask.contains(x, y)
                                    || b.mask.contains(x + 1, y)
                                    || b.mask.contains(x, y + 1))
                        })
                    })
                })
            })
            .count()
    }

    #[test]
    fn the_owner_map_splits_the_footprints_between_the_cells() {
        let mut source = SourcePreset::by_name("mgg_100x").unwrap();
        set_touching(std::slice::from_mut(&mut source), 0.6).unwrap();
        let field = render(&FieldSpec::new(640, 480, 8, source)).unwrap();
        let owners = field.owner_map();
        let w = 640usize;
        let mut shared = 0;
        for (j, c) in field.cells.iter().enumerate() {
            let m = &c.mask;
            for y in m.y0..m.y0 + m.height {
                for x in m.x0..m.x0 + m.width {
                    let id = owners.ids[y as usize * w + x as usize];
                    if m.contains(x, y) {
                        // Every footprint pixel has an owner whose footprint holds it.
                        assert!(field.cells[id as usize].mask.contains(x, y));
                        shared += (id != j as u32) as usize;
                    } else if id == j as u32 {
                        panic!("cell {j} owns ({x}, {y}) outside its footprint");
                    }
                }
            }
        }
        // Crowded cells overlap: some of their pixels went to the neighbour.
        assert!(shared > 0);
        let owned = owners
            .ids
            .iter()
            .filter(|&&id| id != OwnerMap::BACKGROUND)
            .count();
        assert!(owned > 0 && owned < owners.ids.len());
    }

    #[test]
    fn crowded_presets_place_more_cells_against_a_neighbour() {
        let touching_at = |t: f32| {
            let mut sources = vec![SourcePreset::by_name("mgg_100x").unwrap()];
            set_touching(&mut sources, t).unwrap();
            assert_eq!(sources[0].touching, t);
            touching_cells(&render(&FieldSpec::new(1280, 960, 8, sources.remove(0))).unwrap())
        };
        let (none, crowded) = (touching_at(0.0), touching_at(0.6));
        assert!(
            crowded > 3 * none.max(1),
            "touching cells: {none} apart, {crowded} crowded"
        );
        let mut sources = SourcePreset::all();
        for bad in [-0.1, 1.5, f32::NAN] {
            let err = set_touching(&mut sources, bad).unwrap_err().to_string();
            assert!(err.contains("not in 0..=1"), "{err}");
        }
    }

    #[test]
    fn rejects_bad_specs() {
        let mut spec = FieldSpec::new(40, 40, 1, SourcePreset::by_name("mgg_100x").unwrap());
        assert!(render(&spec).unwrap_err().to_string().contains("too small"));
        spec.width = 400;
        spec.height = 400;
        spec.mix = ClassMix([0.0; NUM_CLASSES]);
        assert!(render(&spec).is_err());
        assert!(SourcePreset::by_name("nope")
            .unwrap_err()
            .to_string()
            .contains("wright_100x"));
    }
}
