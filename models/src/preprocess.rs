//! The single preprocessing function: RGB pixels -> model input (resize, scale to [0, 1],
//! ImageNet mean/std, CHW). The trainer and the edge both call it.

use image::imageops::FilterType;
use image::RgbImage;
use serde::{Deserialize, Serialize};

use crate::arch::{IMAGENET_MEAN, IMAGENET_STD};

/// Per-channel normalisation applied after scaling to [0, 1].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Normalization {
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl Default for Normalization {
    fn default() -> Self {
        Normalization {
            mean: IMAGENET_MEAN,
            std: IMAGENET_STD,
        }
    }
}

/// Resizes `img` to `size` x `size` (bilinear; skipped when already that size) and writes the
/// normalised CHW planes into `out` (length `3 * size * size`).
pub fn preprocess_into(img: &RgbImage, size: u32, norm: &Normalization, out: &mut [f32]) {
    let plane = (size * size) as usize;
    assert_eq!(
        out.len(),
        3 * plane,
        "output buffer must hold 3 x size x size values"
    );
    let resized;
    let src = if img.width() == size && img.height() == size {
        img
    } else {
        resized = image::imageops::resize(img, size, size, FilterType::Triangle);
        &resized
    };
    let scale: [f32; 3] = std::array::from_fn(|c| 1.0 / (255.0 * norm.std[c]));
    let offset: [f32; 3] = std::array::from_fn(|c| norm.mean[c] / norm.std[c]);
    for (i, px) in src.pixels().enumerate() {
        for c in 0..3 {
            out[c * plane + i] = px.0[c] as f32 * scale[c] - offset[c];
        }
    }
}

/// A square crop around a cell's box `[x0, y0, x1, y1]` (x1/y1 exclusive): side
/// `margin * max(w, h)`, centred on the box, shifted to stay inside the image and shrunk only
/// when the image is smaller than the side. Trainer crops and edge crops are the same crops.
pub fn square_crop(img: &RgbImage, bbox: [u32; 4], margin: f32) -> RgbImage {
    square_crop_at_least(img, bbox, margin, 0.0)
}

/// [`square_crop`] whose side is at least `margin * min_side` (pixels): a cell smaller than
/// `min_side` is cut with the context of a cell of that size, so that it stays small in the
/// crop.
pub fn square_crop_at_least(
    img: &RgbImage,
    bbox: [u32; 4],
    margin: f32,
    min_side: f32,
) -> RgbImage {
    let [left, top, side] = square_crop_rect(img.width(), img.height(), bbox, margin, min_side);
    image::imageops::crop_imm(img, left, top, side, side).to_image()
}

/// Where [`square_crop_at_least`] cuts in a `width` x `height` image: `[left, top, side]`.
pub fn square_crop_rect(
    width: u32,
    height: u32,
    bbox: [u32; 4],
    margin: f32,
    min_side: f32,
) -> [u32; 3] {
    let [x0, y0, x1, y1] = bbox;
    let bw = x1.saturating_sub(x0).max(1) as f32;
    let bh = y1.saturating_sub(y0).max(1) as f32;
    let side = ((bw.max(bh).max(min_side) * margin).round() as u32)
        .max(1)
        .min(width)
        .min(height);
    let cx = (x0 + x1) as f32 / 2.0;
    let cy = (y0 + y1) as f32 / 2.0;
    let left = (cx - side as f32 / 2.0)
        .round()
        .clamp(0.0, width.saturating_sub(side) as f32) as u32;
    let top = (cy - side as f32 / 2.0)
        .round()
        .clamp(0.0, height.saturating_sub(side) as f32) as u32;
    [left, top, side]
}

/// Median of the longer sides of `boxes` (0 for none).
pub fn median_box_side(boxes: &[[u32; 4]]) -> f32 {
    let mut sides: Vec<u32> = boxes
        .iter()
        .map(|&[x0, y0, x1, y1]| x1.saturating_sub(x0).max(y1.saturating_sub(y0)))
        .collect();
    if sides.is_empty() {
        return 0.0;
    }
    sides.sort_unstable();
    let n = sides.len();
    if n % 2 == 1 {
        sides[n / 2] as f32
    } else {
        (sides[n / 2 - 1] + sides[n / 2]) as f32 / 2.0
    }
}

/// The smallest box side a frame's crops are cut for: `min_side` x the median box side, or 0
/// (off) when `min_side` is 0.
fn side_floor(boxes: &[[u32; 4]], min_side: f32) -> f32 {
    if min_side > 0.0 {
        min_side * median_box_side(boxes)
    } else {
        0.0
    }
}

/// The crops of every cell found in one frame, as the model's manifest asks: `margin` around
/// each box, and with `min_side` > 0 no crop smaller than that multiple of the frame's median
/// cell ([`median_box_side`]) times the margin. With it, a platelet or a fragment shows its size
/// next to the frame's typical (red) cell, whatever the magnification; with 0 each crop is
/// scaled to its own cell. The trainer's crop tools and the edge both cut through here.
pub fn cell_crops(img: &RgbImage, boxes: &[[u32; 4]], margin: f32, min_side: f32) -> Vec<RgbImage> {
    let floor = side_floor(boxes, min_side);
    boxes
        .iter()
        .map(|&b| square_crop_at_least(img, b, margin, floor))
        .collect()
}

/// Which object each pixel of a frame belongs to, as the cell finder left it: the index of a
/// cell in the frame's list of boxes, [`OwnerMap::BACKGROUND`], or [`OwnerMap::OTHER`] (an
/// object that is not in the list: debris, a cell cut by the frame's edge).
#[derive(Debug, Clone, PartialEq)]
pub struct OwnerMap {
    pub width: u32,
    pub height: u32,
    /// Row-major, `width * height`.
    pub ids: Vec<u32>,
}

impl OwnerMap {
    pub const BACKGROUND: u32 = u32::MAX;
    pub const OTHER: u32 = u32::MAX - 1;

    /// All background.
    pub fn new(width: u32, height: u32) -> Self {
        OwnerMap {
            width,
            height,
            ids: vec![Self::BACKGROUND; (width * height) as usize],
        }
    }
}

/// How far (pixels) a neighbour's blanked area reaches past its found outline: the blurred rim
/// below the finder's threshold goes with it.
pub const NEIGHBOUR_RIM: u32 = 2;

/// [`cell_crops`] with the neighbours blanked out (bundle manifest `blank_neighbours`): in
/// each crop, the pixels of every other object in `owners` (and the background
/// within [`NEIGHBOUR_RIM`] of them) take the mean colour of the crop's remaining background,
/// so the model sees the cell as if it lay on its own. The cell's own pixels and its
/// background are left as they are.
pub fn cell_crops_blanked(
    img: &RgbImage,
    boxes: &[[u32; 4]],
    owners: &OwnerMap,
    margin: f32,
    min_side: f32,
) -> Vec<RgbImage> {
    let floor = side_floor(boxes, min_side);
    boxes
        .iter()
        .enumerate()
        .map(|(i, &b)| blanked_crop(img, owners, i as u32, b, margin, floor))
        .collect()
}

/// How a model's crops are cut from a frame: the margin around each box, the smallest crop
/// as a multiple of the frame's median cell, and whether neighbours are blanked out. A model
/// is trained on crops cut one way and must see them cut the same way on the device: the
/// manifest carries `min_side` and `blank_neighbours` ([`crate::bundle::Manifest::crop_policy`]),
/// the device's config the margin. Every crop tool and the edge cut through [`CropPolicy::cut`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CropPolicy {
    /// Crop side as a multiple of the cell's box.
    pub margin: f32,
    /// No crop smaller than this multiple of the frame's median cell (times the margin); 0 =
    /// each crop scaled to its own cell.
    pub min_side: f32,
    /// Other cells in a crop are blanked out ([`cell_crops_blanked`]).
    pub blank_neighbours: bool,
}

impl CropPolicy {
    /// The margin the edge cuts at unless configured otherwise (`analysis.margin`).
    pub const DEFAULT_MARGIN: f32 = 1.3;

    /// The crops of a frame's boxes; `owners` (the finder's map) is needed to blank
    /// neighbours and ignored otherwise. Panics when neighbours are blanked without a map.
    pub fn cut(
        &self,
        img: &RgbImage,
        boxes: &[[u32; 4]],
        owners: Option<&OwnerMap>,
    ) -> Vec<RgbImage> {
        if self.blank_neighbours {
            let owners = owners.expect("blanking neighbours needs the finder's owner map");
            cell_crops_blanked(img, boxes, owners, self.margin, self.min_side)
        } else {
            cell_crops(img, boxes, self.margin, self.min_side)
        }
    }

    /// The smallest crop side (pixels, before resizing) in a frame whose median cell side is
    /// `median`: `margin x min_side x median` (0 when `min_side` is off).
    pub fn min_crop_side(&self, median: f32) -> f32 {
        self.min_side * median * self.margin
    }
}

impl Default for CropPolicy {
    fn default() -> Self {
        CropPolicy {
            margin: Self::DEFAULT_MARGIN,
            min_side: 0.0,
            blank_neighbours: false,
        }
    }
}

/// One crop of [`cell_crops_blanked`]: the cell `own` of `owners`, its box `bbox`, cut as
/// [`square_crop_at_least`] cuts it. Panics when `owners` is not the image's size.
pub fn blanked_crop(
    img: &RgbImage,
    owners: &OwnerMap,
    own: u32,
    bbox: [u32; 4],
    margin: f32,
    min_side: f32,
) -> RgbImage {
    let (w, h) = img.dimensions();
    assert!(
        owners.width == w && owners.height == h && owners.ids.len() == (w * h) as usize,
        "owner map {}x{} for an image {w}x{h}",
        owners.width,
        owners.height
    );
    let [left, top, side] = square_crop_rect(w, h, bbox, margin, min_side);
    let mut crop = image::imageops::crop_imm(img, left, top, side, side).to_image();
    let s = side as usize;
    let owner =
        |x: usize, y: usize| owners.ids[(top as usize + y) * w as usize + left as usize + x];
    // The neighbours' pixels, then grown by the rim into the background.
    let core: Vec<bool> = (0..s * s)
        .map(|p| {
            let o = owner(p % s, p / s);
            o != OwnerMap::BACKGROUND && o != own
        })
        .collect();
    if !core.iter().any(|&b| b) {
        return crop;
    }
    let r = NEIGHBOUR_RIM as usize;
    let mut blank = core.clone();
    for y in 0..s {
        for x in 0..s {
            if blank[y * s + x] || owner(x, y) != OwnerMap::BACKGROUND {
                continue;
            }
            blank[y * s + x] = (y.saturating_sub(r)..(y + r + 1).min(s))
                .any(|ny| (x.saturating_sub(r)..(x + r + 1).min(s)).any(|nx| core[ny * s + nx]));
        }
    }
    let background = crop
        .pixels()
        .enumerate()
        .filter(|(p, _)| !blank[*p] && owner(p % s, p / s) == OwnerMap::BACKGROUND)
        .map(|(_, px)| px);
    let fill = mean_colour(background).unwrap_or_else(|| {
        // No background in the crop: the frame's (white when it has none).
        let frame = img
            .pixels()
            .zip(&owners.ids)
            .filter(|(_, &o)| o == OwnerMap::BACKGROUND)
            .map(|(px, _)| px);
        mean_colour(frame).unwrap_or([255; 3])
    });
    for (p, px) in crop.pixels_mut().enumerate() {
        if blank[p] {
            px.0 = fill;
        }
    }
    crop
}

/// Mean colour of `pixels` (None for none).
fn mean_colour<'a>(pixels: impl Iterator<Item = &'a image::Rgb<u8>>) -> Option<[u8; 3]> {
    let mut sum = [0u64; 3];
    let mut n = 0u64;
    for px in pixels {
        for (s, &v) in sum.iter_mut().zip(&px.0) {
            *s += v as u64;
        }
        n += 1;
    }
    (n > 0).then(|| sum.map(|v| ((v + n / 2) / n) as u8))
}

/// [`preprocess_into`] into a new buffer.
pub fn preprocess(img: &RgbImage, size: u32, norm: &Normalization) -> Vec<f32> {
    let mut out = vec![0.0; 3 * (size * size) as usize];
    preprocess_into(img, size, norm, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises_known_pixel_values() {
        let mut img = RgbImage::new(2, 2);
        img.put_pixel(0, 0, image::Rgb([255, 0, 128]));
        let out = preprocess(&img, 2, &Normalization::default());
        // Red plane, pixel (0,0): (1 - 0.485) / 0.229.
        assert!((out[0] - (1.0 - 0.485) / 0.229).abs() < 1e-5);
        // Green plane: (0 - 0.456) / 0.224.
        assert!((out[4] - (-0.456 / 0.224)).abs() < 1e-5);
        // Blue plane: (128/255 - 0.406) / 0.225.
        assert!((out[8] - (128.0 / 255.0 - 0.406) / 0.225).abs() < 1e-5);
        // A black pixel elsewhere.
        assert!((out[1] - (-0.485 / 0.229)).abs() < 1e-5);
    }

    #[test]
    fn crops_of_small_cells_keep_the_context_of_the_median_cell() {
        let img = RgbImage::new(200, 100);
        // Three 20 px cells and a 6 px one: the median side is 20.
        let boxes = [
            [10, 10, 30, 30],
            [50, 10, 70, 30],
            [90, 10, 110, 30],
            [150, 50, 156, 56],
        ];
        assert_eq!(median_box_side(&boxes), 20.0);
        assert_eq!(median_box_side(&boxes[..3]), 20.0);
        assert_eq!(median_box_side(&[]), 0.0);
        let scaled = cell_crops(&img, &boxes, 1.5, 0.0);
        let sides: Vec<u32> = scaled.iter().map(|c| c.width()).collect();
        assert_eq!(sides, [30, 30, 30, 9]);
        let sized = cell_crops(&img, &boxes, 1.5, 1.0);
        let sides: Vec<u32> = sized.iter().map(|c| c.width()).collect();
        assert_eq!(sides, [30, 30, 30, 30]);
        // A big cell keeps its own side.
        let big = [[0, 0, 60, 40], [100, 0, 110, 10], [120, 0, 130, 10]];
        let sides: Vec<u32> = cell_crops(&img, &big, 1.0, 1.0)
            .iter()
            .map(|c| c.width())
            .collect();
        assert_eq!(sides, [60, 10, 10]);
    }

    #[test]
    fn blanked_crops_keep_their_cell_and_lose_the_neighbours() {
        // Grey background 200; cell 0 (red, 20x20) touching cell 1 (blue, 20x20) on its
        // right; cell 2 far away; an unlisted object (OTHER) below cell 0.
        let (w, h) = (120u32, 80u32);
        let mut img = RgbImage::from_pixel(w, h, image::Rgb([200, 200, 200]));
        let mut owners = OwnerMap::new(w, h);
        let mut paint = |x0: u32, y0: u32, x1: u32, y1: u32, id: u32, c: [u8; 3]| {
            for y in y0..y1 {
                for x in x0..x1 {
                    img.put_pixel(x, y, image::Rgb(c));
                    owners.ids[(y * w + x) as usize] = id;
                }
            }
        };
        paint(20, 20, 40, 40, 0, [200, 40, 40]);
        paint(40, 20, 60, 40, 1, [40, 40, 200]);
        paint(90, 20, 110, 40, 2, [40, 200, 40]);
        paint(25, 42, 35, 48, OwnerMap::OTHER, [10, 10, 10]);
        let boxes = [[20, 20, 40, 40], [40, 20, 60, 40], [90, 20, 110, 40]];
        let plain = cell_crops(&img, &boxes, 1.6, 0.0);
        let blanked = cell_crops_blanked(&img, &boxes, &owners, 1.6, 0.0);
        for (i, (p, b)) in plain.iter().zip(&blanked).enumerate() {
            assert_eq!(p.dimensions(), b.dimensions(), "crop {i}");
            let [left, top, side] = square_crop_rect(w, h, boxes[i], 1.6, 0.0);
            assert_eq!(p.width(), side);
            for (x, y, px) in b.enumerate_pixels() {
                let o = owners.ids[((top + y) * w + left + x) as usize];
                if o == i as u32 {
                    // Its own pixels are untouched.
                    assert_eq!(px, p.get_pixel(x, y), "crop {i} at ({x}, {y})");
                } else if o != OwnerMap::BACKGROUND {
                    // Neighbours and other objects take the background's colour.
                    assert_eq!(px.0, [200, 200, 200], "crop {i} at ({x}, {y}), owner {o}");
                }
            }
        }
        // The lone cell's crop is the plain crop; the touching ones are not.
        assert_eq!(plain[2], blanked[2]);
        assert_ne!(plain[0], blanked[0]);
        assert_ne!(plain[1], blanked[1]);
        // A rim of background around a neighbour is filled too: a dark halo pixel one pixel
        // right of cell 1 in cell 0's crop is not.
        let mut halo = img.clone();
        halo.put_pixel(60, 30, image::Rgb([120, 120, 120]));
        let c = &cell_crops_blanked(&halo, &boxes, &owners, 3.5, 0.0)[0];
        let [left, top, _] = square_crop_rect(w, h, boxes[0], 3.5, 0.0);
        assert_eq!(c.get_pixel(60 - left, 30 - top).0, [200, 200, 200]);
    }

    #[test]
    fn square_crop_is_centred_and_stays_inside() {
        let mut img = RgbImage::new(100, 80);
        img.put_pixel(50, 40, image::Rgb([255, 0, 0]));
        let c = square_crop(&img, [45, 35, 56, 46], 2.0);
        assert_eq!(c.dimensions(), (22, 22));
        assert_eq!(c.get_pixel(10, 10).0, [255, 0, 0]);
        // Near the corner the crop shifts inwards instead of leaving the image.
        let c = square_crop(&img, [0, 0, 10, 10], 3.0);
        assert_eq!(c.dimensions(), (30, 30));
        // Larger than the image: shrunk to fit.
        assert_eq!(
            square_crop(&img, [0, 0, 100, 80], 1.5).dimensions(),
            (80, 80)
        );
    }

    #[test]
    fn resizes_to_model_size() {
        let img = RgbImage::from_pixel(50, 30, image::Rgb([10, 20, 30]));
        let out = preprocess(&img, 14, &Normalization::default());
        assert_eq!(out.len(), 3 * 14 * 14);
        let v = (10.0 / 255.0 - 0.485) / 0.229;
        assert!(out[..196].iter().all(|x| (x - v).abs() < 1e-5));
    }
}
