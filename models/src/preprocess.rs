//! The single preprocessing function: RGB pixels -> model input (resize, scale to [0, 1],
//! ImageNet mean/std, CHW). The trainer and the edge both call it. Also how crops are cut
//! from a frame ([`CropPolicy`]): as images (the trainer's crop tools) or straight into a
//! model's input batch ([`CropPolicy::cut_into`], the edge), with the same numbers.

use std::cell::RefCell;

use fast_image_resize as fr;
use image::RgbImage;
use rayon::prelude::*;
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

/// Resizes `img` to `size` x `size` (bilinear, a triangle filter as wide as the scale;
/// skipped when already that size) and writes the normalised CHW planes into `out` (length
/// `3 * size * size`).
pub fn preprocess_into(img: &RgbImage, size: u32, norm: &Normalization, out: &mut [f32]) {
    SCRATCH.with(|s| {
        let s = &mut *s.borrow_mut();
        resize_normalise(
            img.as_raw(),
            img.width(),
            img.height(),
            size,
            norm,
            out,
            &mut s.resizer,
            &mut s.resized,
        )
    });
}

/// What cutting and resizing a crop needs, kept per thread so a frame's crops allocate
/// nothing: the resizer (its filter coefficients cached) and pixel buffers.
struct Scratch {
    resizer: fr::Resizer,
    /// The crop as cut (and blanked).
    crop: Vec<u8>,
    /// The crop at the model's size.
    resized: Vec<u8>,
    /// Masks of the crop for blanking its neighbours.
    blanking: Blanking,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch {
        resizer: fr::Resizer::new(),
        crop: Vec::new(),
        resized: Vec::new(),
        blanking: Blanking::default(),
    });
}

/// [`preprocess_into`] of packed RGB `pixels` (`w` x `h`), with the caller's resizer and
/// buffer (SIMD bilinear convolution of fast_image_resize).
#[allow(clippy::too_many_arguments)]
fn resize_normalise(
    pixels: &[u8],
    w: u32,
    h: u32,
    size: u32,
    norm: &Normalization,
    out: &mut [f32],
    resizer: &mut fr::Resizer,
    resized: &mut Vec<u8>,
) {
    let plane = (size * size) as usize;
    assert_eq!(
        out.len(),
        3 * plane,
        "output buffer must hold 3 x size x size values"
    );
    let src = if w == size && h == size {
        &pixels[..3 * plane]
    } else {
        resized.resize(3 * plane, 0);
        let from = fr::images::ImageRef::new(w, h, pixels, fr::PixelType::U8x3)
            .expect("RGB buffer of its image's size");
        let mut to = fr::images::Image::from_slice_u8(size, size, resized, fr::PixelType::U8x3)
            .expect("RGB buffer of the model's size");
        let options = fr::ResizeOptions::new()
            .resize_alg(fr::ResizeAlg::Convolution(fr::FilterType::Bilinear));
        resizer
            .resize(&from, &mut to, &options)
            .expect("same pixel type on both sides");
        &resized[..]
    };
    let scale: [f32; 3] = std::array::from_fn(|c| 1.0 / (255.0 * norm.std[c]));
    let offset: [f32; 3] = std::array::from_fn(|c| norm.mean[c] / norm.std[c]);
    let (r, gb) = out.split_at_mut(plane);
    let (g, b) = gb.split_at_mut(plane);
    for (((px, r), g), b) in src.chunks_exact(3).zip(r).zip(g).zip(b) {
        *r = px[0] as f32 * scale[0] - offset[0];
        *g = px[1] as f32 * scale[1] - offset[1];
        *b = px[2] as f32 * scale[2] - offset[2];
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

    /// The crops of a frame's boxes, cut, resized to `size` and normalised straight into
    /// `out` (one `3 x size x size` CHW block per box, in order): the numbers [`CropPolicy::cut`]
    /// then [`preprocess_into`] give, without an image per crop. The boxes are cut side by side
    /// on the current rayon pool. Panics as `cut` does, and when `out` is not `boxes.len()`
    /// blocks long.
    pub fn cut_into(
        &self,
        img: &RgbImage,
        boxes: &[[u32; 4]],
        owners: Option<&OwnerMap>,
        size: u32,
        norm: &Normalization,
        out: &mut [f32],
    ) {
        let per = 3 * (size * size) as usize;
        assert_eq!(out.len(), boxes.len() * per, "one input block per box");
        let owners = self.blank_neighbours.then(|| {
            let o = owners.expect("blanking neighbours needs the finder's owner map");
            check_owners(img, o);
            o
        });
        let floor = side_floor(boxes, self.min_side);
        let frame_fill = std::sync::OnceLock::new();
        let (w, h) = img.dimensions();
        out.par_chunks_exact_mut(per)
            .zip(boxes.par_iter())
            .enumerate()
            .for_each(|(i, (out, &b))| {
                SCRATCH.with(|s| {
                    let s = &mut *s.borrow_mut();
                    let at = square_crop_rect(w, h, b, self.margin, floor);
                    copy_square(img, at[0], at[1], at[2], &mut s.crop);
                    if let Some(o) = owners {
                        s.blanking
                            .run(&mut s.crop, img, o, i as u32, at, &frame_fill);
                    }
                    let (side, crop) = (at[2], &s.crop);
                    resize_normalise(
                        crop,
                        side,
                        side,
                        size,
                        norm,
                        out,
                        &mut s.resizer,
                        &mut s.resized,
                    );
                })
            });
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
    check_owners(img, owners);
    let [left, top, side] = square_crop_rect(img.width(), img.height(), bbox, margin, min_side);
    let mut crop = Vec::new();
    copy_square(img, left, top, side, &mut crop);
    let fill = std::sync::OnceLock::new();
    let at = [left, top, side];
    Blanking::default().run(&mut crop, img, owners, own, at, &fill);
    RgbImage::from_raw(side, side, crop).expect("buffer sized for the crop")
}

fn check_owners(img: &RgbImage, owners: &OwnerMap) {
    let (w, h) = img.dimensions();
    assert!(
        owners.width == w && owners.height == h && owners.ids.len() == (w * h) as usize,
        "owner map {}x{} for an image {w}x{h}",
        owners.width,
        owners.height
    );
}

/// The `side` x `side` square of `img` at (`left`, `top`) into `out` (packed RGB).
fn copy_square(img: &RgbImage, left: u32, top: u32, side: u32, out: &mut Vec<u8>) {
    let (w, s, l) = (img.width() as usize, side as usize, left as usize);
    out.clear();
    for y in top as usize..top as usize + s {
        out.extend_from_slice(&img.as_raw()[3 * (y * w + l)..3 * (y * w + l + s)]);
    }
}

/// Scratch masks of one crop for [`Blanking::run`] (0/1 bytes, so that the dilations run as
/// whole-row byte operations).
#[derive(Default)]
struct Blanking {
    /// Other objects' pixels.
    core: Vec<u8>,
    /// Background pixels.
    background: Vec<u8>,
    /// `core` dilated along the rows, then along the columns.
    rows: Vec<u8>,
    near: Vec<u8>,
}

impl Blanking {
    /// Blanks, in the crop `crop` cut at `[left, top, side]`, the pixels of every object of
    /// `owners` but `own` and the background within [`NEIGHBOUR_RIM`] of them (a square
    /// neighbourhood), with the mean colour of the crop's remaining background (the frame's,
    /// kept in `frame_fill`, when the crop has none).
    fn run(
        &mut self,
        crop: &mut [u8],
        img: &RgbImage,
        owners: &OwnerMap,
        own: u32,
        [left, top, side]: [u32; 3],
        frame_fill: &std::sync::OnceLock<[u8; 3]>,
    ) {
        let (w, s) = (img.width() as usize, side as usize);
        let Blanking {
            core,
            background,
            rows,
            near,
        } = self;
        for v in [&mut *core, &mut *background, &mut *rows, &mut *near] {
            v.clear();
            v.resize(s * s, 0);
        }
        // Each mask in a loop of its own, which vectorises (one loop writing both did not).
        for y in 0..s {
            let start = (top as usize + y) * w + left as usize;
            let ids = &owners.ids[start..start + s];
            let row = y * s..(y + 1) * s;
            for (b, &o) in background[row.clone()].iter_mut().zip(ids) {
                *b = (o == OwnerMap::BACKGROUND) as u8;
            }
            for (c, &o) in core[row].iter_mut().zip(ids) {
                *c = (o != OwnerMap::BACKGROUND && o != own) as u8;
            }
        }
        if !core.contains(&1) {
            return;
        }
        // The core dilated by a (2 rim + 1) square, rows then columns (clipped to the crop).
        let r = (NEIGHBOUR_RIM as usize).min(s.saturating_sub(1));
        rows.copy_from_slice(core);
        for (dst, src) in rows.chunks_exact_mut(s).zip(core.chunks_exact(s)) {
            for d in 1..=r {
                or_shifted(dst, src, d);
            }
        }
        near.copy_from_slice(rows);
        for d in 1..=r {
            or_shifted(near, rows, s * d);
        }
        // Blanked: the neighbours' pixels and the background near them; the rest of the
        // background gives the fill.
        let kept = crop
            .chunks_exact(3)
            .zip(background.iter().zip(near.iter()))
            .filter(|(_, (&b, &nr))| b & !nr & 1 != 0)
            .map(|(px, _)| px);
        // No background in the crop: the frame's (white when it has none).
        let fill = mean_colour(kept)
            .unwrap_or_else(|| *frame_fill.get_or_init(|| frame_background_colour(img, owners)));
        for (((px, &c), &b), &nr) in crop
            .chunks_exact_mut(3)
            .zip(core.iter())
            .zip(background.iter())
            .zip(near.iter())
        {
            if c | (b & nr) != 0 {
                px.copy_from_slice(&fill);
            }
        }
    }
}

/// `src` shifted by `d` both ways, ORed into `dst`: `dst[i] |= src[i + d]` and
/// `dst[i + d] |= src[i]` wherever both lie inside.
fn or_shifted(dst: &mut [u8], src: &[u8], d: usize) {
    let n = src.len() - d;
    for (o, &v) in dst[..n].iter_mut().zip(&src[d..]) {
        *o |= v;
    }
    for (o, &v) in dst[d..].iter_mut().zip(&src[..n]) {
        *o |= v;
    }
}

/// Mean colour of the frame's background pixels (white when it has none).
fn frame_background_colour(img: &RgbImage, owners: &OwnerMap) -> [u8; 3] {
    let frame = img
        .as_raw()
        .chunks_exact(3)
        .zip(&owners.ids)
        .filter(|(_, &o)| o == OwnerMap::BACKGROUND)
        .map(|(px, _)| px);
    mean_colour(frame).unwrap_or([255; 3])
}

/// Mean colour of `pixels` (None for none).
fn mean_colour<'a>(pixels: impl Iterator<Item = &'a [u8]>) -> Option<[u8; 3]> {
    let mut sum = [0u64; 3];
    let mut n = 0u64;
    for px in pixels {
        for (s, &v) in sum.iter_mut().zip(px) {
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
    fn each_value_is_scaled_and_shifted_into_its_plane() {
        // Crops of 1 to 20 pixels a side (no resizing), against the formula per value, bit
        // for bit.
        let norm = Normalization {
            mean: [0.3, 0.5, 0.7],
            std: [0.2, 0.25, 0.3],
        };
        for size in 1..=20u32 {
            let img = RgbImage::from_fn(size, size, |x, y| {
                image::Rgb([
                    (x * 37 + y * 11) as u8,
                    (x * 5 + y * 91) as u8,
                    (x * y) as u8,
                ])
            });
            let out = preprocess(&img, size, &norm);
            let plane = (size * size) as usize;
            for (i, px) in img.pixels().enumerate() {
                for c in 0..3 {
                    let want =
                        px[c] as f32 * (1.0 / (255.0 * norm.std[c])) - norm.mean[c] / norm.std[c];
                    assert_eq!(
                        out[c * plane + i].to_bits(),
                        want.to_bits(),
                        "{size}: pixel {i}, channel {c}"
                    );
                }
            }
        }
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
    fn crops_cut_into_the_batch_equal_cut_then_preprocessed() {
        // Noisy field, cells of several sizes (some at the frame's edge, one without any
        // background in its crop), owners painted; every policy, sizes up and down.
        let (w, h) = (160u32, 120u32);
        let mut img = RgbImage::from_fn(w, h, |x, y| {
            let v = (x * 7 + y * 13 + (x * y) % 17) as u8;
            image::Rgb([200 - v % 40, 190 - v % 30, 210 - v % 50])
        });
        let mut owners = OwnerMap::new(w, h);
        let boxes: Vec<[u32; 4]> = vec![
            [10, 10, 40, 38],
            [38, 12, 60, 36],
            [0, 70, 25, 100],
            [120, 90, 160, 120],
            [80, 40, 86, 47],
            [90, 5, 150, 65],
        ];
        for (i, b) in boxes.iter().enumerate() {
            for y in b[1]..b[3] {
                for x in b[0]..b[2] {
                    img.put_pixel(x, y, image::Rgb([150, (40 * i) as u8, 90]));
                    owners.ids[(y * w + x) as usize] = i as u32;
                }
            }
        }
        let norm = Normalization::default();
        for (margin, min_side, blank) in [(1.3, 0.0, false), (1.3, 0.6, true), (2.0, 1.0, true)] {
            let policy = CropPolicy {
                margin,
                min_side,
                blank_neighbours: blank,
            };
            for size in [14, 56] {
                let per = 3 * size * size;
                let crops = policy.cut(&img, &boxes, Some(&owners));
                let mut want = vec![0f32; boxes.len() * per];
                for (c, o) in crops.iter().zip(want.chunks_exact_mut(per)) {
                    preprocess_into(c, size as u32, &norm, o);
                }
                let mut got = vec![1f32; boxes.len() * per];
                policy.cut_into(&img, &boxes, Some(&owners), size as u32, &norm, &mut got);
                assert_eq!(got, want, "{policy:?} at {size}");
            }
        }
    }

    /// Blanking as it reads: per pixel, the neighbours within the rim looked up one by one.
    fn blank_reference(
        crop: &mut [u8],
        img: &RgbImage,
        owners: &OwnerMap,
        own: u32,
        [left, top, side]: [u32; 3],
    ) {
        let (w, s, r) = (img.width() as usize, side as usize, NEIGHBOUR_RIM as usize);
        let owner = |x: usize, y: usize| owners.ids[(top as usize + y) * w + left as usize + x];
        let core = |x: usize, y: usize| {
            let o = owner(x, y);
            o != OwnerMap::BACKGROUND && o != own
        };
        let near = |x: usize, y: usize| {
            (y.saturating_sub(r)..(y + r + 1).min(s))
                .any(|ny| (x.saturating_sub(r)..(x + r + 1).min(s)).any(|nx| core(nx, ny)))
        };
        let blank =
            |x: usize, y: usize| core(x, y) || (near(x, y) && owner(x, y) == OwnerMap::BACKGROUND);
        if !(0..s * s).any(|p| core(p % s, p / s)) {
            return;
        }
        let kept: Vec<usize> = (0..s * s)
            .filter(|&p| !blank(p % s, p / s) && owner(p % s, p / s) == OwnerMap::BACKGROUND)
            .collect();
        let fill = mean_colour(kept.iter().map(|&p| &crop[3 * p..3 * p + 3]))
            .unwrap_or_else(|| frame_background_colour(img, owners));
        for p in 0..s * s {
            if blank(p % s, p / s) {
                crop[3 * p..3 * p + 3].copy_from_slice(&fill);
            }
        }
    }

    #[test]
    fn blanking_matches_its_per_pixel_reading() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let (w, h) = (90u32, 70u32);
        for round in 0..40 {
            let img = RgbImage::from_fn(w, h, |_, _| image::Rgb(rng.gen::<[u8; 3]>()));
            // Blobs of random owners (a few, some of them OTHER); some rounds all covered.
            let mut owners = OwnerMap::new(w, h);
            let ids = [0, 1, 2, 3, OwnerMap::OTHER];
            for _ in 0..rng.gen_range(1..12) {
                let (cx, cy, rr) = (
                    rng.gen_range(0..w),
                    rng.gen_range(0..h),
                    rng.gen_range(1..15),
                );
                let id = ids[rng.gen_range(0..ids.len())];
                for y in cy.saturating_sub(rr)..(cy + rr).min(h) {
                    for x in cx.saturating_sub(rr)..(cx + rr).min(w) {
                        owners.ids[(y * w + x) as usize] = id;
                    }
                }
            }
            if round % 10 == 9 {
                owners.ids.iter_mut().for_each(|o| *o = 1 + (*o % 2));
            }
            let mut blanking = Blanking::default();
            for _ in 0..20 {
                let side = rng.gen_range(1..=h);
                let at = [
                    rng.gen_range(0..=w - side),
                    rng.gen_range(0..=h - side),
                    side,
                ];
                let own = rng.gen_range(0..4);
                let mut got = Vec::new();
                copy_square(&img, at[0], at[1], side, &mut got);
                let mut want = got.clone();
                blanking.run(
                    &mut got,
                    &img,
                    &owners,
                    own,
                    at,
                    &std::sync::OnceLock::new(),
                );
                blank_reference(&mut want, &img, &owners, own, at);
                assert_eq!(got, want, "round {round}, crop {at:?} of cell {own}");
            }
        }
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
