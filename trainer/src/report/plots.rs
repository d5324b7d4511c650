//! The report's pictures: the confusion matrix as a heat map and the features' first two
//! principal components as scatter plots, with their colour keys.

use std::path::Path;

use anyhow::Result;
use image::{Rgb, RgbImage};
use tch::{Device, Tensor};

use super::ProtocolReport;
use crate::labelled::LabelledSet;

/// Distinct colours (Tableau 20) for classes and sources in the plots.
pub const PALETTE: [[u8; 3]; 20] = [
    [31, 119, 180],
    [255, 127, 14],
    [44, 160, 44],
    [214, 39, 40],
    [148, 103, 189],
    [140, 86, 75],
    [227, 119, 194],
    [127, 127, 127],
    [188, 189, 34],
    [23, 190, 207],
    [174, 199, 232],
    [255, 187, 120],
    [152, 223, 138],
    [255, 152, 150],
    [197, 176, 213],
    [196, 156, 148],
    [247, 182, 210],
    [199, 199, 199],
    [219, 219, 141],
    [158, 218, 229],
];

/// `#rrggbb` of palette entry `i`.
pub fn colour_hex(i: usize) -> String {
    let c = PALETTE[i % PALETTE.len()];
    format!("#{:02x}{:02x}{:02x}", c[0], c[1], c[2])
}

/// Draws `text` in the 8 x 8 bitmap font with its top-left corner at (`x`, `y`), or, when
/// `upward`, rotated to read bottom to top with its bottom-left corner at (`x`, `y`). Pixels
/// outside the image are skipped; characters the font lacks are drawn as `?`.
pub fn draw_text(img: &mut RgbImage, x: i64, y: i64, text: &str, colour: Rgb<u8>, upward: bool) {
    use font8x8::UnicodeFonts;
    for (i, ch) in text.chars().enumerate() {
        let glyph = font8x8::BASIC_FONTS
            .get(ch)
            .or_else(|| font8x8::BASIC_FONTS.get('?'))
            .unwrap_or([0; 8]);
        for (r, bits) in glyph.iter().enumerate() {
            for c in 0..8 {
                if bits & (1 << c) == 0 {
                    continue;
                }
                let (px, py) = if upward {
                    (x + r as i64, y - 8 * i as i64 - c as i64)
                } else {
                    (x + 8 * i as i64 + c as i64, y + r as i64)
                };
                if px >= 0 && py >= 0 && (px as u32) < img.width() && (py as u32) < img.height() {
                    img.put_pixel(px as u32, py as u32, colour);
                }
            }
        }
    }
}

/// Width in pixels of `text` in the 8 x 8 font.
fn text_width(text: &str) -> u32 {
    8 * text.chars().count() as u32
}

/// Where [`confusion_png`] puts its grid: the top-left pixel of the matrix and the side of one
/// cell, for `names` and the largest count in the matrix.
pub fn confusion_layout(names: &[String], max_count: usize) -> (u32, u32, u32) {
    let label = names.iter().map(|n| text_width(n)).max().unwrap_or(0);
    let cell = 32u32.max(text_width(&max_count.to_string()) + 6);
    // Left: "truth" written upward, then the row names; top: the title, "prediction", then
    // the column names written upward.
    (12 + label + 8, 12 + 12 + label + 8, cell)
}

/// The confusion matrix as a labelled heat map: rows = truth, columns = prediction, in the
/// order of `names`; row-normalised shading, white (0) to dark blue (1), with the count in
/// every non-empty cell.
pub fn confusion_png(confusion: &[Vec<usize>], names: &[String]) -> RgbImage {
    let n = confusion.len() as u32;
    let max_count = confusion.iter().flatten().copied().max().unwrap_or(0);
    let (ox, oy, cell) = confusion_layout(names, max_count);
    let (w, h) = (ox + n * cell + 9, oy + n * cell + 9);
    let mut img = RgbImage::from_pixel(w, h, Rgb([255, 255, 255]));
    let black = Rgb([0, 0, 0]);
    draw_text(&mut img, ox as i64, 4, "prediction", black, false);
    draw_text(
        &mut img,
        2,
        (oy + n * cell / 2 + text_width("truth") / 2) as i64,
        "truth",
        black,
        true,
    );
    let name = |i: usize| names.get(i).cloned().unwrap_or_else(|| i.to_string());
    for i in 0..n as usize {
        let label = name(i);
        let centre = (i as u32 * cell + cell / 2) as i64;
        // Row names right-aligned against the grid; column names upward above it.
        let x = ox as i64 - 6 - text_width(&label) as i64;
        draw_text(&mut img, x, oy as i64 + centre - 4, &label, black, false);
        draw_text(
            &mut img,
            ox as i64 + centre - 4,
            oy as i64 - 6,
            &label,
            black,
            true,
        );
    }
    // Grid lines, then the cells.
    for y in oy..=oy + n * cell {
        for x in ox..=ox + n * cell {
            img.put_pixel(x, y, Rgb([200, 200, 200]));
        }
    }
    for (i, row) in confusion.iter().enumerate() {
        let total: usize = row.iter().sum();
        for (j, &v) in row.iter().enumerate() {
            let f = if total == 0 {
                0.0
            } else {
                v as f32 / total as f32
            };
            let c = Rgb([
                (255.0 * (1.0 - f) + 8.0 * f) as u8,
                (255.0 * (1.0 - f) + 48.0 * f) as u8,
                (255.0 * (1.0 - f) + 107.0 * f) as u8,
            ]);
            let (x0, y0) = (ox + j as u32 * cell, oy + i as u32 * cell);
            for y in 1..cell {
                for x in 1..cell {
                    img.put_pixel(x0 + x, y0 + y, c);
                }
            }
            if v > 0 {
                let text = v.to_string();
                let ink = if f > 0.5 { Rgb([255, 255, 255]) } else { black };
                let tx = x0 + (cell - text_width(&text)) / 2;
                draw_text(
                    &mut img,
                    tx as i64,
                    (y0 + cell / 2 - 4) as i64,
                    &text,
                    ink,
                    false,
                );
            }
        }
    }
    img
}

/// First two principal components of `features` ([N, D]).
pub fn pca2(features: &Tensor) -> Vec<[f32; 2]> {
    let x = features.to_kind(tch::Kind::Double).to_device(Device::Cpu);
    let x = &x - x.mean_dim([0i64].as_slice(), true, tch::Kind::Double);
    let (_, _, v) = x.svd(true, true); // v: [D, min(N, D)], columns = principal axes
    let k = v.size()[1].min(2);
    let p = x.matmul(&v.narrow(1, 0, k));
    let v = Vec::<f64>::try_from(p.flatten(0, -1)).expect("projection");
    (0..x.size()[0] as usize)
        .map(|i| {
            let a = v[i * k as usize] as f32;
            let b = if k > 1 {
                v[i * k as usize + 1] as f32
            } else {
                0.0
            };
            [a, b]
        })
        .collect()
}

/// A scatter plot of 2-D points coloured by `group` (palette index into `names`), 512 x 512,
/// with a colour key of `names` on its right.
pub fn scatter_png(points: &[[f32; 2]], group: &[i64], names: &[String]) -> RgbImage {
    let size = 512u32;
    let margin = 16.0;
    let key_width = 28 + names.iter().map(|n| text_width(n)).max().unwrap_or(0);
    let height = size.max(16 + 14 * names.len() as u32);
    let mut img = RgbImage::from_pixel(size + key_width, height, Rgb([255, 255, 255]));
    let (mut lo, mut hi) = ([f32::MAX; 2], [f32::MIN; 2]);
    for p in points {
        for a in 0..2 {
            lo[a] = lo[a].min(p[a]);
            hi[a] = hi[a].max(p[a]);
        }
    }
    let span = |a: usize| (hi[a] - lo[a]).max(1e-12);
    for (p, &g) in points.iter().zip(group) {
        let x = margin + (p[0] - lo[0]) / span(0) * (size as f32 - 2.0 * margin);
        let y = size as f32 - margin - (p[1] - lo[1]) / span(1) * (size as f32 - 2.0 * margin);
        let c = Rgb(PALETTE[g as usize % PALETTE.len()]);
        for dy in -2i32..=2 {
            for dx in -2i32..=2 {
                if dx * dx + dy * dy <= 5 {
                    let (px, py) = (x as i32 + dx, y as i32 + dy);
                    if px >= 0 && py >= 0 && (px as u32) < size && (py as u32) < size {
                        img.put_pixel(px as u32, py as u32, c);
                    }
                }
            }
        }
    }
    for (i, name) in names.iter().enumerate() {
        let y = 12 + 14 * i as u32;
        let c = Rgb(PALETTE[i % PALETTE.len()]);
        for dy in 0..8 {
            for dx in 0..8 {
                img.put_pixel(size + 4 + dx, y + dy, c);
            }
        }
        draw_text(
            &mut img,
            (size + 16) as i64,
            y as i64,
            name,
            Rgb([0, 0, 0]),
            false,
        );
    }
    img
}

/// Writes confusion.png, pca_class.png and pca_source.png into `dir` and returns the Markdown
/// that shows them with their colour keys.
pub fn write_plots(
    dir: &Path,
    features: &Tensor,
    set: &LabelledSet,
    report: &ProtocolReport,
) -> Result<String> {
    confusion_png(&report.linear.confusion, &set.class_names).save(dir.join("confusion.png"))?;
    let pts = pca2(features);
    scatter_png(&pts, &set.labels, &set.class_names).save(dir.join("pca_class.png"))?;
    scatter_png(&pts, &set.sources, &set.source_names).save(dir.join("pca_source.png"))?;
    let key = |names: &[String]| {
        names
            .iter()
            .enumerate()
            .map(|(i, n)| format!("{n} `{}`", colour_hex(i)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    Ok(format!(
        "\n## Plots\n\nConfusion matrix of the linear probe ({}; rows = truth, columns = \
         prediction, counts in the cells, shading row-normalised from white 0 to dark blue 1):\n\n![confusion](confusion.png)\n\n\
         Features projected on their first two principal components, coloured by class \
         ({}):\n\n![pca by class](pca_class.png)\n\nand by source ({}):\n\n![pca by source](pca_source.png)\n",
        report.protocol,
        key(&set.class_names),
        key(&set.source_names)
    ))
}
