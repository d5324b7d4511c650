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
    assert_eq!(out.len(), 3 * plane, "output buffer must hold 3 x size x size values");
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
    fn resizes_to_model_size() {
        let img = RgbImage::from_pixel(50, 30, image::Rgb([10, 20, 30]));
        let out = preprocess(&img, 14, &Normalization::default());
        assert_eq!(out.len(), 3 * 14 * 14);
        let v = (10.0 / 255.0 - 0.485) / 0.229;
        assert!(out[..196].iter().all(|x| (x - v).abs() < 1e-5));
    }
}
