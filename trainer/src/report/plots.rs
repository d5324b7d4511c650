//! The report's pictures, drawn with plotters: the confusion matrix as a heat map (class names
//! on both axes, counts in the cells) and the features' first two principal components as
//! scatter plots with a legend of the class or source names.

use std::path::Path;
use std::sync::Once;

use crate::error::{Context, Error, Result};
use image::RgbImage;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::{register_font, FontStyle, FontTransform};
use tch::{Device, Tensor};

use super::ProtocolReport;
use crate::labelled::LabelledSet;

/// The face every label is drawn in: DejaVu Sans, shipped with the source (assets/, its
/// licence beside it), so a plot looks the same on every machine and needs no system fonts.
const FONT: &[u8] = include_bytes!("../../assets/DejaVuSans.ttf");
const FACE: &str = "sans-serif";

fn register_face() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if register_font(FACE, FontStyle::Normal, FONT).is_err() {
            log::warn!("the plots' font did not load: labels are left out");
        }
    });
}

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

fn palette(i: usize) -> RGBColor {
    let c = PALETTE[i % PALETTE.len()];
    RGBColor(c[0], c[1], c[2])
}

/// The heat map's colour for a row-normalised share: white at 0 to dark blue at 1.
pub fn heat_colour(f: f64) -> [u8; 3] {
    let f = f.clamp(0.0, 1.0);
    let lerp = |a: f64, b: f64| (a + (b - a) * f).round() as u8;
    [lerp(255.0, 8.0), lerp(255.0, 48.0), lerp(255.0, 107.0)]
}

/// Draws into a white `w` x `h` picture and returns it.
fn picture(
    w: u32,
    h: u32,
    draw: impl FnOnce(&DrawingArea<BitMapBackend<'_>, Shift>) -> Result<()>,
) -> Result<RgbImage> {
    register_face();
    let mut buf = vec![255u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        draw(&root)?;
        root.present().map_err(plot_err)?;
    }
    RgbImage::from_raw(w, h, buf).context("plot buffer")
}

fn plot_err<E: std::fmt::Display>(e: E) -> Error {
    Error::Plot(e.to_string())
}

/// The confusion matrix (rows = truth, columns = prediction) as a heat map: each cell shaded
/// by its share of its row (white 0 to dark blue 1) with its count written in it, the class
/// names along both axes.
pub fn confusion_png(confusion: &[Vec<usize>], names: &[String]) -> Result<RgbImage> {
    let n = names.len().max(1);
    let cell = 40u32;
    let longest = names.iter().map(|s| s.chars().count()).max().unwrap_or(1) as u32;
    let label_area = 24 + 8 * longest;
    let side = label_area + n as u32 * cell + 20;
    picture(side, side + 40, |root| {
        root.fill(&WHITE).map_err(plot_err)?;
        let mut chart = ChartBuilder::on(root)
            .caption("confusion matrix (rows = truth)", (FACE, 18))
            .margin(10)
            .x_label_area_size(label_area)
            .y_label_area_size(label_area)
            .build_cartesian_2d(0..n, 0..n)
            .map_err(plot_err)?;
        for (r, row) in confusion.iter().enumerate().take(n) {
            let total = row.iter().sum::<usize>().max(1) as f64;
            for (c, &count) in row.iter().enumerate().take(n) {
                let f = count as f64 / total;
                let [cr, cg, cb] = heat_colour(f);
                let y = n - 1 - r;
                chart
                    .draw_series(std::iter::once(Rectangle::new(
                        [(c, y), (c + 1, y + 1)],
                        RGBColor(cr, cg, cb).filled(),
                    )))
                    .map_err(plot_err)?;
                if count > 0 {
                    let ink = if f > 0.5 { &WHITE } else { &BLACK };
                    let text = count.to_string();
                    let (x0, y0) = chart.backend_coord(&(c, y + 1));
                    let style = (FACE, 14).into_font().color(ink);
                    let tw = 8 * text.len() as i32;
                    root.draw(&Text::new(
                        text,
                        (x0 + (cell as i32 - tw) / 2, y0 + cell as i32 / 2 - 7),
                        style,
                    ))
                    .map_err(plot_err)?;
                }
            }
        }
        // Labels after the cells: the rotated column names start over the grid's edge.
        let name_of = |i: usize| names.get(i).cloned().unwrap_or_default();
        chart
            .configure_mesh()
            .disable_mesh()
            .x_labels(n + 1)
            .y_labels(n + 1)
            .x_label_formatter(&|_| String::new())
            .y_label_formatter(&|&i| {
                if i < n {
                    name_of(n - 1 - i)
                } else {
                    String::new()
                }
            })
            .y_label_style((FACE, 13).into_font().color(&BLACK))
            .y_label_offset(-(cell as i32) / 2)
            .x_desc("prediction")
            .y_desc("truth")
            .axis_desc_style((FACE, 14))
            .draw()
            .map_err(plot_err)?;
        // Column names below the grid, read top to bottom, each under its column.
        for c in 0..n {
            let (x, y) = chart.backend_coord(&(c, 0));
            root.draw(&Text::new(
                name_of(c),
                (x + cell as i32 / 2 + 7, y + 6),
                (FACE, 13)
                    .into_font()
                    .transform(FontTransform::Rotate90)
                    .color(&BLACK),
            ))
            .map_err(plot_err)?;
        }
        Ok(())
    })
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

/// A scatter plot of 2-D points coloured by `group` (palette index into `names`), with axes,
/// ticks and a legend of `names` on the picture.
pub fn scatter_png(
    title: &str,
    points: &[[f32; 2]],
    group: &[i64],
    names: &[String],
) -> Result<RgbImage> {
    let (mut lo, mut hi) = ([f32::MAX; 2], [f32::MIN; 2]);
    for p in points {
        for a in 0..2 {
            lo[a] = lo[a].min(p[a]);
            hi[a] = hi[a].max(p[a]);
        }
    }
    if points.is_empty() {
        (lo, hi) = ([0.0; 2], [1.0; 2]);
    }
    let pad = |a: usize| ((hi[a] - lo[a]) * 0.05).max(1e-6);
    let (x0, x1) = (lo[0] - pad(0), hi[0] + pad(0));
    let (y0, y1) = (lo[1] - pad(1), hi[1] + pad(1));
    let longest = names.iter().map(|s| s.chars().count()).max().unwrap_or(1) as u32;
    let key_width = 40 + 8 * longest;
    let height = 560.max(60 + 20 * names.len() as u32);
    picture(560 + key_width, height, |root| {
        root.fill(&WHITE).map_err(plot_err)?;
        // The plot on the left, its legend beside it (never over the points).
        let (plot, key) = root.split_horizontally(560);
        let mut chart = ChartBuilder::on(&plot)
            .caption(title, (FACE, 18))
            .margin(10)
            .x_label_area_size(36)
            .y_label_area_size(56)
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(plot_err)?;
        chart
            .configure_mesh()
            .light_line_style(WHITE.mix(0.0))
            .x_desc("PC 1")
            .y_desc("PC 2")
            .label_style((FACE, 12))
            .draw()
            .map_err(plot_err)?;
        for (g, name) in names.iter().enumerate() {
            let colour = palette(g);
            chart
                .draw_series(
                    points
                        .iter()
                        .zip(group)
                        .filter(|(_, &k)| k == g as i64)
                        .map(|(p, _)| Circle::new((p[0], p[1]), 3, colour.filled())),
                )
                .map_err(plot_err)?;
            let y = 40 + 20 * g as i32;
            key.draw(&Circle::new((12, y), 5, colour.filled()))
                .map_err(plot_err)?;
            key.draw(&Text::new(
                name.clone(),
                (24, y - 7),
                (FACE, 14).into_font().color(&BLACK),
            ))
            .map_err(plot_err)?;
        }
        Ok(())
    })
}

/// Writes confusion.png, pca_class.png and pca_source.png into `dir` and returns the Markdown
/// that shows them.
pub fn write_plots(
    dir: &Path,
    features: &Tensor,
    set: &LabelledSet,
    report: &ProtocolReport,
) -> Result<String> {
    let save = |img: RgbImage, name: &str| {
        let p = dir.join(name);
        img.save(&p)
            .with_context(|| format!("writing {}", p.display()))
    };
    save(
        confusion_png(&report.linear.confusion, &set.class_names)?,
        "confusion.png",
    )?;
    let pts = pca2(features);
    save(
        scatter_png(
            "PCA of the features, by class",
            &pts,
            &set.labels,
            &set.class_names,
        )?,
        "pca_class.png",
    )?;
    save(
        scatter_png(
            "PCA of the features, by source",
            &pts,
            &set.sources,
            &set.source_names,
        )?,
        "pca_source.png",
    )?;
    Ok(format!(
        "\n## Plots\n\nConfusion matrix of the linear probe ({}; rows = truth, columns = \
         prediction, counts in the cells, shading row-normalised from white 0 to dark blue 1):\n\n![confusion](confusion.png)\n\n\
         Features projected on their first two principal components, by class:\n\n\
         ![pca by class](pca_class.png)\n\nand by source:\n\n![pca by source](pca_source.png)\n",
        report.protocol,
    ))
}
