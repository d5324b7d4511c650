//! Offline analysis of one image: find cells, crop, preprocess, run the model in batches,
//! classify and count.

use std::collections::BTreeMap;

use image::RgbImage;
use reddino_models::preprocess::{cell_crops, cell_crops_blanked, preprocess_into, Normalization};
use serde::Serialize;

use crate::cells::{self, CellFinderConfig};
use crate::classify::{classify, Counts, Prediction, UNCERTAIN};
use crate::infer::Backend;

/// Settings of the analysis.
#[derive(Debug, Clone)]
pub struct AnalyzeConfig {
    pub cells: CellFinderConfig,
    /// Crop side as a multiple of the cell's box.
    pub margin: f32,
    /// The model's crop policy, from its manifest (`Manifest::crop_min_side`): no crop smaller
    /// than this multiple of the frame's median cell; 0 = each crop scaled to its cell.
    pub crop_min_side: f32,
    /// The model's crop policy for neighbours (`Manifest::blank_neighbours`): other cells in a
    /// crop are blanked out.
    pub blank_neighbours: bool,
    /// Below this top probability a cell counts as uncertain.
    pub min_confidence: f32,
}

impl Default for AnalyzeConfig {
    fn default() -> Self {
        AnalyzeConfig {
            cells: CellFinderConfig::default(),
            margin: 1.3,
            crop_min_side: 0.0,
            blank_neighbours: false,
            min_confidence: 0.5,
        }
    }
}

/// One classified cell in the report.
#[derive(Debug, Clone, Serialize)]
pub struct CellReport {
    pub bbox: [u32; 4],
    pub class: String,
    pub confidence: f32,
}

/// Result for one image.
#[derive(Debug, Clone, Serialize)]
pub struct ImageReport {
    pub image: String,
    pub width: u32,
    pub height: u32,
    /// Cells per class name (and `uncertain`).
    pub counts: BTreeMap<String, u64>,
    pub cells: Vec<CellReport>,
}

/// Analyses one image with a backend whose head has `class_names`.
pub fn analyze_image(
    name: &str,
    img: &RgbImage,
    backend: &mut dyn Backend,
    class_names: &[String],
    norm: &Normalization,
    cfg: &AnalyzeConfig,
) -> Result<ImageReport, reddino_models::Error> {
    let (found, crops) = find_and_crop(
        img,
        &cfg.cells,
        cfg.margin,
        cfg.crop_min_side,
        cfg.blank_neighbours,
    );
    let predictions = classify_crops(&crops, backend, class_names, norm, cfg.min_confidence)?;
    let mut counts = Counts::new(class_names.len());
    let reports = found
        .iter()
        .zip(&predictions)
        .map(|(cell, p)| {
            counts.add(p);
            CellReport {
                bbox: cell.bbox,
                class: p
                    .class
                    .map(|c| class_names[c].clone())
                    .unwrap_or_else(|| UNCERTAIN.into()),
                confidence: p.confidence,
            }
        })
        .collect();
    let by_name = counts.by_name(class_names);
    Ok(ImageReport {
        image: name.into(),
        width: img.width(),
        height: img.height(),
        counts: by_name,
        cells: reports,
    })
}

/// The cells of a frame and their crops, as a model with this crop policy takes them.
pub fn find_and_crop(
    img: &RgbImage,
    finder: &CellFinderConfig,
    margin: f32,
    min_side: f32,
    blank_neighbours: bool,
) -> (Vec<cells::Cell>, Vec<RgbImage>) {
    let (found, owners) = cells::find_maybe_owners(img, finder, blank_neighbours);
    let boxes: Vec<[u32; 4]> = found.iter().map(|c| c.bbox).collect();
    let crops = match &owners {
        Some(o) => cell_crops_blanked(img, &boxes, o, margin, min_side),
        None => cell_crops(img, &boxes, margin, min_side),
    };
    (found, crops)
}

/// Classifies cell crops in batches of the backend's size: preprocess, run, softmax and the
/// `uncertain` threshold. One prediction per crop, in order.
pub fn classify_crops(
    crops: &[RgbImage],
    backend: &mut dyn Backend,
    class_names: &[String],
    norm: &Normalization,
    min_confidence: f32,
) -> Result<Vec<Prediction>, reddino_models::Error> {
    let size = backend.input_size();
    let per = 3 * size * size;
    let batch = backend.batch_size().max(1);
    let mut pixels = vec![0f32; batch.min(crops.len().max(1)) * per];
    let mut out_preds = Vec::with_capacity(crops.len());
    for chunk in crops.chunks(batch) {
        for (i, crop) in chunk.iter().enumerate() {
            preprocess_into(crop, size as u32, norm, &mut pixels[i * per..(i + 1) * per]);
        }
        let out = backend.run(&pixels[..chunk.len() * per], chunk.len())?;
        let logits = out.logits.ok_or_else(|| {
            reddino_models::Error::Inference(
                "the model has no classification head (`logits` output)".into(),
            )
        })?;
        if out.classes != class_names.len() {
            return Err(reddino_models::Error::Inference(format!(
                "the model gives {} logits, the bundle lists {} classes",
                out.classes,
                class_names.len()
            )));
        }
        out_preds.extend(
            logits
                .chunks_exact(out.classes)
                .map(|l| classify(l, min_confidence)),
        );
    }
    Ok(out_preds)
}
