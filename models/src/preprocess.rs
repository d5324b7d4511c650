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
    let [x0, y0, x1, y1] = bbox;
    let bw = x1.saturating_sub(x0).max(1) as f32;
    let bh = y1.saturating_sub(y0).max(1) as f32;
    let side = ((bw.max(bh).max(min_side) * margin).round() as u32)
        .max(1)
        .min(img.width())
        .min(img.height());
    let cx = (x0 + x1) as f32 / 2.0;
    let cy = (y0 + y1) as f32 / 2.0;
    let left = (cx - side as f32 / 2.0)
        .round()
        .clamp(0.0, (img.width() - side) as f32) as u32;
    let top = (cy - side as f32 / 2.0)
        .round()
        .clamp(0.0, (img.height() - side) as f32) as u32;
    image::imageops::crop_imm(img, left, top, side, side).to_image()
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

/// The crops of every cell found in one frame, as the model's manifest asks: `margin` around
/// each box, and with `min_side` > 0 no crop smaller than that multiple of the frame's median
/// cell ([`median_box_side`]) times the margin. With it, a platelet or a fragment shows its size
/// next to the frame's typical (red) cell, whatever the magnification; with 0 each crop is
/// scaled to its own cell. The trainer's crop tools and the edge both cut through here.
pub fn cell_crops(img: &RgbImage, boxes: &[[u32; 4]], margin: f32, min_side: f32) -> Vec<RgbImage> {
    let floor = if min_side > 0.0 {
        min_side * median_box_side(boxes)
    } else {
        0.0
    };
    boxes
        .iter()
        .map(|&b| square_crop_at_least(img, b, margin, floor))
        .collect()
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
